"""Image-classification datasets as NumPy arrays: TFDS (`tfds.data_source`) and local IDX files.

    ds = load("fashion_mnist", "train")                 # IDX files if present, else TFDS; never downloads
    ds = load("fashion_mnist", "test", flatten=True)    # ds.x: (10000, 784) float32
    ds = load("cifar10", "train[:5000]", source="tfds", data_dir="~/tensorflow_datasets")
    for xb, yb in batches(ds.x, ds.y, 128, jax.random.key(0)): ...

Every source returns the same :class:`Dataset`:

- ``x``: float32 images in [0, 1] (pixel / 255), layout **NHWC** ``(N, H, W, C)``
  (MNIST and Fashion-MNIST: ``(N, 28, 28, 1)``), or ``(N, H·W·C)`` with ``flatten=True``
  (row-major, so the flat vector is the same as ``x.reshape(N, -1)``). No mean/std normalisation.
- ``y``: int32 labels in ``[0, num_classes)``, shape ``(N,)``.

Sources (``source=``):

- ``"tfds"``: ``tfds.data_source(name, split=..., data_dir=..., download=...)``, which reads
  array_record files and needs no TensorFlow. ``download`` is explicit and ``False`` by default,
  so nothing touches the network unless asked. Preparing a dataset (``download=True``) needs a
  network, and TFDS encodes images with TensorFlow while preparing (``pip install tensorflow``
  on the machine that prepares; the prepared ``data_dir`` can then be copied anywhere).
- ``"idx"`` (``mnist`` and ``fashion_mnist`` only): the four IDX files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``data_dir``; for ``fashion_mnist``
  the default directory is Debian's ``dataset-fashion-mnist`` package,
  ``/usr/share/datasets/fashion-mnist``. IDX split ``"test"`` reads the ``t10k`` files.
- ``"auto"`` (default): the IDX files when they are found (in ``data_dir``, or the default IDX
  directory when ``data_dir`` is None), otherwise TFDS with the same ``data_dir``/``download``.

``split`` takes TFDS's split syntax on both sources (``"train"``, ``"test[:1000]"``,
``"train[:10%]+test"``); ``examples`` (an int n = the first n, or a slice) then selects within it.
A missing dataset raises :class:`FileNotFoundError` naming the dataset, the directory searched and
how to prepare it; a corrupt IDX file raises :class:`ValueError` naming the file.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional, Union

import numpy as np

from . import checks

__all__ = [
    "Dataset", "load", "batches", "read_idx", "DATASETS", "IDX_DATASETS", "DEFAULT_IDX_DIRS",
    "IDX_FILES",
]

#: Names :func:`load` accepts (TFDS names); value: number of classes.
DATASETS = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "imagenet2012": 1000}
#: Datasets that can also be read from local IDX files.
IDX_DATASETS = ("mnist", "fashion_mnist")
#: Default IDX directory per dataset (Debian's ``dataset-fashion-mnist``); none for MNIST.
DEFAULT_IDX_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
#: IDX file stems per split: (images, labels); each may carry a ``.gz`` suffix.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SOURCES = ("auto", "tfds", "idx")

# IDX type codes (third byte of the magic number) → big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Standard ImageNet evaluation crop: shorter side to size / 0.875, then a centred size × size crop.
_CROP_FRACTION = 0.875

Examples = Union[None, int, slice]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of an image-classification dataset, in memory.

    x: (N, H, W, C) float32 in [0, 1] (or (N, H·W·C) when loaded with ``flatten=True``);
    y: (N,) int32 in [0, num_classes); name: the TFDS name; split: the split spec as asked;
    source: "tfds" or "idx" (what was actually read).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    split: str
    source: str

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, split={self.split!r}, source={self.source!r}, "
                f"x={self.x.dtype}{list(self.x.shape)}, y={self.y.dtype}{list(self.y.shape)}, "
                f"num_classes={self.num_classes})")


def load(
    name: str,
    split: str = "train",
    *,
    source: str = "auto",
    data_dir: Union[str, os.PathLike, None] = None,
    download: bool = False,
    examples: Examples = None,
    flatten: bool = False,
    image_size: Optional[int] = None,
) -> Dataset:
    """Load ``split`` of dataset ``name`` as float32 NHWC images in [0, 1] and int32 labels.

    Args:
      name: one of ``DATASETS``: "mnist", "fashion_mnist", "cifar10", "imagenet2012".
      split: TFDS split spec, e.g. "train", "test", "validation", "train[:1000]", "train[:10%]+test".
      source: "auto" (IDX files when present, else TFDS), "tfds" or "idx"; see the module doc.
      data_dir: TFDS data directory (source "tfds"; None: TFDS's default, ``$TFDS_DATA_DIR`` or
        ~/tensorflow_datasets) or the directory holding the IDX files (source "idx"; None: the
        default in ``DEFAULT_IDX_DIRS``). With "auto" it is searched for IDX files first.
      download: passed to ``tfds.data_source``; False (default) never touches the network.
      examples: within the split, an int n (the first n examples) or a slice; None: all.
      flatten: return x as (N, H·W·C) instead of (N, H, W, C).
      image_size: resize to image_size × image_size (shorter side to image_size / 0.875, centre
        crop: the standard ImageNet evaluation transform). Needed when image sizes vary
        (imagenet2012); None keeps the stored size.

    Returns:
      :class:`Dataset` (x, y, num_classes, name, split, source).

    Raises:
      FileNotFoundError: the dataset is not found where it was searched (the message says where,
        and how to prepare it).
      ValueError: unknown name/source/split, a corrupt IDX file, or varying image sizes without
        ``image_size``.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; swapjax.data.load knows {sorted(DATASETS)}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a TFDS split spec such as 'train' or 'test[:1000]', got {split!r}")
    checks.boolean("download", download)
    checks.boolean("flatten", flatten)
    checks.integer("image_size", image_size, 1, allow_none=True)
    if data_dir is not None:
        checks.path_like("data_dir", data_dir)
    if examples is not None and not isinstance(examples, slice):
        checks.integer("examples (an int n, a slice or None)", examples, 0)
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"source: must be one of {SOURCES}, got {source!r}")
    if source == "idx" and name not in IDX_DATASETS:
        raise ValueError(f"source='idx': only {IDX_DATASETS} come as IDX files, not {name!r}")
    if source == "idx" and download:
        raise ValueError("download=True applies to TFDS only; source='idx' reads local files")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise ValueError(f"image_size: a positive integer or None, got {image_size!r}")

    idx_dir = _idx_dir(name, data_dir)
    if source == "idx" and idx_dir is None:
        raise FileNotFoundError(
            f"{name}: no IDX directory to read: pass data_dir=<directory with the files "
            f"{_idx_file_list()}>")
    use_idx = source == "idx" or (
        source == "auto" and name in IDX_DATASETS and idx_dir is not None
        and _idx_present(idx_dir, split))

    if use_idx:
        images, labels = _load_idx(name, split, idx_dir)
        images, labels = _select(images, examples), _select(labels, examples)
        x = _to_float(images[..., None], flatten, image_size)  # (N, H, W) → NHWC, C = 1
        num_classes = DATASETS[name]
    else:
        try:
            x, labels, num_classes = _load_tfds(name, split, data_dir, download, examples,
                                                flatten, image_size)
        except FileNotFoundError as e:
            if source == "auto" and name in IDX_DATASETS:
                raise FileNotFoundError(f"{e}\nOr use the {_idx_hint(name, idx_dir)}") from e
            raise
    y = np.asarray(labels).astype(np.int32)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} {split}: labels outside [0, {num_classes}): "
                         f"min {y.min()}, max {y.max()} (corrupt data?)")
    return Dataset(x=x, y=y, num_classes=int(num_classes), name=name, split=split,
                   source="idx" if use_idx else "tfds")


def batches(
    x, y, batch_size: int, key=None, *, drop_remainder: bool = False,
) -> Iterator[tuple]:
    """Yield (x[b], y[b]) mini-batches of ``batch_size`` rows over one epoch.

    ``key`` (a ``jax.random.key``): shuffle with ``jax.random.permutation(key, N)``, so the order
    is a deterministic function of the key; None: in order. ``drop_remainder``: skip a last batch
    shorter than ``batch_size``. Works for NumPy and JAX arrays (indexing keeps the array type).
    """
    n = len(y)
    if len(x) != n:
        raise ValueError(f"x and y differ in length: {len(x)} vs {n}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if key is None:
        order = np.arange(n)
    else:
        import jax

        order = np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


# --------------------------------------------------------------------------------------- IDX


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a NumPy array of its stored shape.

    Checks the magic number (two zero bytes, a known type code, the number of dimensions) and that
    the payload size matches the dimensions; raises ValueError naming the file otherwise.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"IDX file {path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path}: {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path}: bad magic number 0x{raw[:4].hex()} (expected "
                         f"0x0000TTNN, TT a type code in {sorted(_IDX_DTYPES)}, NN the rank)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path}: truncated header ({len(raw)} bytes for rank {ndim})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path}: {len(raw) - header} data bytes, but dimensions {dims} "
                         f"of {dtype} need {expected} (truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_dir(name: str, data_dir) -> Optional[Path]:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return DEFAULT_IDX_DIRS.get(name)


def _idx_file_list() -> str:
    return ", ".join(f"{stem}[.gz]" for pair in IDX_FILES.values() for stem in pair)


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_paths(directory: Path, split_name: str):
    return tuple(_find_idx(directory, stem) for stem in IDX_FILES[split_name])


def _split_names(split: str) -> list[str]:
    """The IDX splits a TFDS split spec reads ("train[:10%]+test" → ["train", "test"])."""
    import tensorflow_datasets as tfds

    try:
        spec = tfds.core.ReadInstruction.from_spec(split)
        # Only the names matter here: any count larger than a slice bound will do.
        parts = spec.to_absolute({s: SimpleNamespace(num_examples=2**62) for s in IDX_FILES})
    except (ValueError, AssertionError) as e:
        raise ValueError(f"split {split!r} for IDX files (splits {sorted(IDX_FILES)}): {e}") from e
    return list(dict.fromkeys(p.splitname for p in parts))


def _idx_present(directory: Path, split: str) -> bool:
    try:
        names = _split_names(split)
    except ValueError:
        return False
    return all(all(_idx_paths(directory, n)) for n in names)


def _load_idx(name: str, split: str, directory: Path):
    """(images uint8 (N, H, W), labels) of a TFDS-style split spec over the IDX files in directory."""
    import tensorflow_datasets as tfds

    wanted = _split_names(split)
    arrays = {}
    for s in wanted:
        image_path, label_path = _idx_paths(directory, s)
        if image_path is None or label_path is None:
            raise FileNotFoundError(
                f"{name} split {s!r}: IDX files {' and '.join(IDX_FILES[s])} (optionally .gz) not "
                f"found in {directory}.\n{_idx_hint(name, directory)}")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"IDX file {image_path}: expected uint8 images of rank 3, got "
                             f"{images.dtype} of shape {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"IDX file {label_path}: expected rank-1 labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name} split {s!r}: {len(images)} images in {image_path} but "
                             f"{len(labels)} labels in {label_path}")
        arrays[s] = (images, labels)
    infos = {s: SimpleNamespace(num_examples=len(a[1])) for s, a in arrays.items()}
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    images = [arrays[p.splitname][0][p.from_:p.to] for p in parts]
    labels = [arrays[p.splitname][1][p.from_:p.to] for p in parts]
    if len({i.shape[1:] for i in images}) > 1:
        raise ValueError(f"{name} {split}: the splits' image sizes differ")
    return np.concatenate(images), np.concatenate(labels)


def _idx_hint(name: str, directory: Optional[Path]) -> str:
    where = f"searched {directory}" if directory is not None else "no default IDX directory"
    hint = (f"IDX source for {name} ({where}): put the files {_idx_file_list()} in a directory and "
            f"pass data_dir=<that directory>")
    if name == "fashion_mnist":
        hint += (f", or install Debian's package (as root): `apt-get install -y "
                 f"dataset-fashion-mnist` (files go to {DEFAULT_IDX_DIRS[name]})")
    return hint + "."


# -------------------------------------------------------------------------------------- TFDS


def _tfds_data_dir(data_dir) -> str:
    if data_dir is not None:
        return str(Path(data_dir).expanduser())
    import tensorflow_datasets as tfds

    return str(tfds.core.constants.DATA_DIR)


def _tfds_prepared(name: str, data_dir: Optional[str]) -> bool:
    import tensorflow_datasets as tfds

    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # noqa: BLE001 — a builder that cannot even be made is not prepared
        return False


def _tfds_missing_message(name: str, split: str, data_dir, error: BaseException) -> str:
    searched = _tfds_data_dir(data_dir)
    default = "" if data_dir is not None else " (TFDS's default data_dir; set data_dir= or $TFDS_DATA_DIR)"
    lines = [
        f"Dataset {name!r} (split {split!r}) is not available through TFDS: no array_record "
        f"files under {searched}/{name}{default}.",
        f"To prepare it, on a machine with network access and TensorFlow (`pip install "
        f"tensorflow`; TFDS encodes images with it while preparing), run "
        f"swapjax.data.load({name!r}, {split!r}, source='tfds', data_dir={searched!r}, "
        f"download=True), then copy {searched}/{name} to this machine. (A copy in TFRecord "
        f"format, tfds.load's default, cannot be read without TensorFlow; download=True here "
        f"prepares array_record.)",
    ]
    if name == "imagenet2012":
        lines.append(
            f"TFDS cannot download imagenet2012 itself: place ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar (from https://image-net.org) in {searched}/downloads/manual/, "
            f"then run the download=True call above.")
    first_line = (str(error).strip().splitlines() or [""])[0]
    lines.append(f"TFDS said: {type(error).__name__}: {first_line}")
    return "\n".join(lines)


def _load_tfds(name, split, data_dir, download, examples, flatten, image_size):
    import tensorflow_datasets as tfds

    tfds_dir = None if data_dir is None else str(Path(data_dir).expanduser())
    try:
        # file_format: with an explicit data_dir TFDS would otherwise prepare TFRecord files,
        # which a data source cannot read.
        src = tfds.data_source(name, split=split, data_dir=tfds_dir, download=bool(download),
                               builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # noqa: BLE001 — re-raised unchanged unless the dataset is missing
        # Missing data shows up as NotImplementedError (nothing prepared, so TFDS assumes TFRecord),
        # KeyError (empty split dict), AssertionError (imagenet2012's manual files) or an OSError
        # while preparing; a split that does not exist in a prepared dataset is left to TFDS.
        if isinstance(e, NotImplementedError) or not _tfds_prepared(name, tfds_dir):
            raise FileNotFoundError(_tfds_missing_message(name, split, data_dir, e)) from e
        raise
    features = src.dataset_info.features
    num_classes = features["label"].num_classes
    indices = range(len(src))
    if examples is not None:
        indices = indices[_as_slice(examples)]
    images, labels = [], []
    for i in indices:
        example = src[i]
        images.append(_resize(np.asarray(example["image"]), image_size))
        labels.append(example["label"])
    if not images:  # an empty selection: (0, H, W, C) with the stored (or requested) size
        h, w, c = features["image"].shape
        if image_size is not None:
            h = w = image_size
        x = np.zeros((0, h or 0, w or 0, c), np.float32)
        return _flat(x) if flatten else x, np.zeros((0,), np.int32), num_classes
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{name} {split}: images have different sizes ({len(shapes)} distinct, "
                         f"e.g. {sorted(shapes)[:3]}); pass image_size=<int> to resize them")
    return _to_float(np.stack(images), flatten, None), np.asarray(labels), num_classes


# ------------------------------------------------------------------------------------ arrays


def _as_slice(examples) -> slice:
    if isinstance(examples, slice):
        return examples
    if isinstance(examples, (bool, np.bool_)) or int(examples) != examples or examples < 0:
        raise ValueError(f"examples: a non-negative int, a slice or None, got {examples!r}")
    return slice(0, int(examples))


def _select(array: np.ndarray, examples) -> np.ndarray:
    return array if examples is None else array[_as_slice(examples)]


def _to_float(images: np.ndarray, flatten: bool, image_size: Optional[int]) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 in [0, 1], resized if asked, flattened if asked."""
    if image_size is not None:
        images = np.stack([_resize(im, image_size) for im in images]) if len(images) else \
            np.zeros((0, image_size, image_size, images.shape[-1]), images.dtype)
    x = images.astype(np.float32)
    x /= 255.0
    return _flat(x) if flatten else x


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _resize(image: np.ndarray, size: Optional[int]) -> np.ndarray:
    """Shorter side to round(size / 0.875), then a centred size × size crop (uint8 HWC in and out)."""
    if size is None:
        return image
    from PIL import Image

    h, w, c = image.shape
    short = int(round(size / _CROP_FRACTION))
    if h <= w:
        nh, nw = short, max(short, int(round(w * short / h)))
    else:
        nh, nw = max(short, int(round(h * short / w))), short
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    resized = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    if resized.ndim == 2:
        resized = resized[..., None]
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top:top + size, left:left + size]
