"""Real text offline for language models: a corpus as byte tokens, split by document, and perplexity.

    train = text.load("fortunes", "train")          # Text: .tokens (n,) uint8, the split's bytes
    x = text.windows(train.tokens, 128)              # (m, 129) int32: inputs x[:, :-1], targets x[:, 1:]
    calib = text.sample_windows(train.tokens, 128, count=128, seed=0)
    result = swapjax.perplexity(lambda p, t: model.apply({"params": p}, t), params,
                                text.windows(text.load("fortunes", "test").tokens, 128))
    result.perplexity, result.bits_per_byte

**The corpus.** ``"fortunes"``: the fortune cookies of Debian's ``fortunes`` package (with
``fortunes-min``, which it depends on), installed as root by ``apt-get install -y fortunes`` into
``/usr/share/games/fortunes``: about 2.5 MB of English in about 15,000 documents (one fortune each:
quotations, jokes, short poems, dialogues, definitions; a few ASCII drawings and code snippets),
mostly ASCII. It was chosen over ``dict-gcide`` (40 MB of 1913 dictionary entries, mostly markup:
pronunciation codes, etymologies in brackets, source tags) as the one whose text is prose and
whose documents have natural boundaries, and it is small enough to read in a fraction of a
second. Read: every regular file of the directory in sorted name order, except the ``.dat``
indexes, the ``.u8`` names and symbolic links (the offensive set, ``off/``, is a directory and
never read); a document is the text between two lines that are exactly ``%``; blank documents
are dropped and a document found again (the same bytes in another file) is kept once, where
first read.

**Tokens.** Bytes: vocabulary V = 256, token = byte value (UTF-8 bytes of the text), no special
tokens. A split's stream is its documents in corpus order, each followed by ``%\\n``, the
format's own separator (so the model sees where a fortune ends); :func:`decode` of a stream is
text in the fortune format.

**The split, by document.** Document d goes to train when u(d) < 0.9, validation when
0.9 ≤ u(d) < 0.95, test otherwise, where u(d) ∈ [0, 1) is the first 8 bytes of BLAKE2b(salt ‖ d)
read as a big-endian integer / 2⁶⁴ (a hash of the text: deterministic on every machine and
Python, the same split for a document whatever else a package version adds or removes, and
never a document on both sides of a split). Windows are cut within one split's stream, so no
window holds text of two splits.

**Windows.** :func:`windows`: ``(m, T+1)`` windows w_i = stream[i·T : i·T + T + 1] (stride T), so
every byte of the stream after the first is a target exactly once (the last < T bytes that do
not fill a window are left out); :func:`sample_windows`: ``count`` windows at uniform random
offsets (seeded), for training batches and calibration.

**Perplexity.** :func:`perplexity`: for windows w_i (i < m) of T + 1 tokens and a model's logits
ℓ_{i,t} = f(θ, w_{i,<T})_t,

    NLL = (1 / (m·T)) Σ_i Σ_{t<T} −log softmax(ℓ_{i,t})[w_{i,t+1}],   perplexity = exp(NLL),
    bits per byte = NLL / ln 2   (byte tokens: one token is one byte)

(the mean of :func:`swapjax.models.next_token_loss` over the windows; the exp of the mean, not
the mean of per-window perplexities).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks

__all__ = [
    "Text", "Perplexity", "load", "documents", "split_of", "windows", "sample_windows", "encode", "decode",
    "perplexity", "CORPORA", "SPLITS", "VOCAB",
]

#: Corpora :func:`load` knows: name → (default directory, the Debian package that installs it).
CORPORA = {"fortunes": (Path("/usr/share/games/fortunes"), "fortunes")}
#: Splits and their share of the documents, in the order the hash's unit interval is cut.
SPLITS = {"train": 0.9, "validation": 0.05, "test": 0.05}
#: Byte tokens.
VOCAB = 256
#: What follows every document in a split's stream (the fortune format's separator line).
SEPARATOR = b"%\n"
_SALT = b"swapjax.text split v1\x00"


@dataclasses.dataclass(frozen=True, eq=False)
class Text:
    """One split of a corpus as bytes. tokens: (n,) uint8, the split's documents in corpus order,
    each followed by ``%\\n``; documents: how many; name, split: as asked; directory: where read."""

    tokens: np.ndarray
    documents: int
    name: str
    split: str
    directory: Path

    def windows(self, length: int) -> np.ndarray:
        """:func:`windows` of this split's tokens."""
        return windows(self.tokens, length)

    def __repr__(self) -> str:
        return (f"Text(name={self.name!r}, split={self.split!r}, documents={self.documents}, "
                f"tokens={self.tokens.size:,} bytes, directory='{self.directory}')")


def documents(name: str = "fortunes", data_dir: Union[None, str, os.PathLike] = None) -> list[bytes]:
    """Every document of the corpus (bytes, each ending with a newline), in corpus order, each once.

    ``data_dir``: a directory of fortune files (text; documents separated by lines that are exactly
    ``%``) in place of the default. Raises FileNotFoundError naming the directory and the apt
    command when there is none."""
    directory = _directory(name, data_dir)
    files = _corpus_files(directory)
    if not files:
        raise FileNotFoundError(_missing_message(name, directory, data_dir))
    seen, out = set(), []
    for path in files:
        for doc in _fortunes(path.read_bytes()):
            if doc not in seen:
                seen.add(doc)
                out.append(doc)
    if not out:
        raise FileNotFoundError(_missing_message(name, directory, data_dir, empty=True))
    return out


def split_of(document: bytes) -> str:
    """The split of one document: its hash's point u ∈ [0, 1) against :data:`SPLITS`' cumulative shares."""
    u = int.from_bytes(hashlib.blake2b(_SALT + document, digest_size=8).digest(), "big") / 2.0 ** 64
    edge = 0.0
    for split, share in SPLITS.items():
        edge += share
        if u < edge:
            return split
    return split  # u within rounding of 1: the last split


def load(name: str = "fortunes", split: str = "train", data_dir: Union[None, str, os.PathLike] = None) -> Text:
    """One split (``"train"``, ``"validation"`` or ``"test"``) of a corpus as byte tokens (module docstring)."""
    checks.choice("split", split, tuple(SPLITS))
    directory = _directory(name, data_dir)
    docs = [d for d in documents(name, data_dir) if split_of(d) == split]
    stream = b"".join(d + SEPARATOR for d in docs)
    return Text(np.frombuffer(stream, np.uint8).copy(), len(docs), name, split, directory)


def windows(tokens, length: int) -> np.ndarray:
    """(m, length + 1) int32: w_i = tokens[i·length : i·length + length + 1], m = ⌊(n − 1) / length⌋.

    Stride ``length``: every token after the first is a target (w_i[1:]) exactly once; the last
    fewer than ``length`` tokens that do not fill a window are left out."""
    tokens = _stream("tokens", tokens)
    length = checks.integer("length", length, 1)
    m = (tokens.size - 1) // length
    if m < 1:
        raise ValueError(f"tokens: {tokens.size} tokens make no window of length + 1 = {length + 1}")
    index = np.arange(m)[:, None] * length + np.arange(length + 1)[None, :]
    return tokens[index].astype(np.int32)


def sample_windows(tokens, length: int, count: int, seed: int) -> np.ndarray:
    """(count, length + 1) int32 windows of ``tokens`` at offsets drawn uniformly from
    [0, n − length − 1] by ``np.random.default_rng(seed)`` (with replacement; the same for a seed)."""
    tokens = _stream("tokens", tokens)
    length = checks.integer("length", length, 1)
    count = checks.integer("count", count, 1)
    seed = checks.integer("seed", seed, 0)
    if tokens.size < length + 1:
        raise ValueError(f"tokens: {tokens.size} tokens make no window of length + 1 = {length + 1}")
    starts = np.random.default_rng(seed).integers(0, tokens.size - length, count)
    return tokens[starts[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)


def encode(text: Union[str, bytes]) -> np.ndarray:
    """(n,) uint8 byte tokens of ``text`` (a str is UTF-8 encoded)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise ValueError(f"text: expected a str or bytes, got {type(text).__name__}")
    return np.frombuffer(bytes(text), np.uint8).copy()


def decode(tokens) -> str:
    """The text of byte tokens (UTF-8; a byte sequence that is not valid UTF-8, as a window cut
    inside a character may start or end, decodes to U+FFFD)."""
    return bytes(_stream("tokens", tokens, any_shape=True).ravel().astype(np.uint8)).decode("utf-8", errors="replace")


class Perplexity(NamedTuple):
    """perplexity = exp(nll); bits_per_byte = nll / ln 2 (bits per predicted token: one byte for byte
    tokens); nll: the mean negative log-likelihood in nats per predicted token; tokens: m·T, their count."""

    perplexity: float
    bits_per_byte: float
    nll: float
    tokens: int


def perplexity(apply_fn: Callable, params, windows, batch_size: int = 64) -> Perplexity:
    """Perplexity and bits per byte of a causal language model on token windows (module docstring).

    ``apply_fn(params, inputs)`` maps (B, T) int32 tokens to (B, T, V) logits (any float dtype; the
    log-softmax is taken in float32): for a linen model, ``lambda p, x: model.apply({"params": p}, x)``.
    ``windows``: (m, T + 1) integer tokens in [0, V), e.g. :func:`windows`; position t of a window
    predicts its token t + 1. Chunks of ``batch_size`` windows (the last padded and weighted out), so
    one compilation per (batch_size, T) serves every chunk, and every later call with the same
    ``apply_fn`` object; sums in float32 per window, float64 across windows.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> uniform = lambda params, x: jnp.zeros(x.shape + (256,))  # every byte equally likely
        >>> result = swapjax.perplexity(uniform, {}, np.zeros((5, 9), np.int32), batch_size=2)
        >>> round(result.perplexity, 4), round(result.bits_per_byte, 4), result.tokens
        (256.0, 8.0, 40)
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn: expected a callable (params, (B, T) tokens) → (B, T, V) logits, "
                         f"got {type(apply_fn).__name__}")
    batch_size = checks.integer("batch_size", batch_size, 1)
    host = np.asarray(windows)
    if host.ndim != 2 or not np.issubdtype(host.dtype, np.integer) or host.shape[0] < 1 or host.shape[1] < 2:
        raise ValueError(f"windows: expected (m, T + 1) integer tokens with m ≥ 1 and T ≥ 1, got "
                         f"{host.dtype}{list(host.shape)}")
    m, T = host.shape[0], host.shape[1] - 1
    b = min(batch_size, m)
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((b, T), jnp.int32))
    if not hasattr(out, "shape") or len(out.shape) != 3 or tuple(out.shape[:2]) != (b, T):
        raise ValueError(f"apply_fn: expected (B, T, V) = ({b}, {T}, V) logits for ({b}, {T}) tokens, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    vocab = int(out.shape[2])
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"windows: tokens must lie in [0, {vocab}) (the logits' V), found {lo}..{hi}")
    total = 0.0
    for a in range(0, m, b):
        chunk = host[a:a + b].astype(np.int32)
        weight = np.zeros(b, np.float32)
        weight[:len(chunk)] = 1
        if len(chunk) < b:
            chunk = np.concatenate([chunk, np.zeros((b - len(chunk), T + 1), np.int32)])
        total += float(np.sum(np.asarray(_window_nll(apply_fn, params, chunk, weight), np.float64)))
    nll = total / (m * T)
    return Perplexity(math.exp(nll), nll / math.log(2), nll, m * T)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(apply_fn, params, chunk, weight):
    """(B,) float32: weight_i · Σ_t −log softmax(ℓ_{i,t})[w_{i,t+1}]."""
    logits = apply_fn(params, chunk[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, chunk[:, 1:, None], axis=-1)[..., 0]
    return weight * jnp.sum(nll, axis=-1)


# ------------------------------------------------------------------------------------- helpers


def _directory(name: str, data_dir) -> Path:
    checks.choice("name", name, tuple(CORPORA))
    if data_dir is None:
        return CORPORA[name][0]
    return Path(checks.path_like("data_dir", data_dir)).expanduser()


def _corpus_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in sorted(directory.iterdir())
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and not p.name.startswith(".")]


def _fortunes(raw: bytes) -> list[bytes]:
    """The documents of one fortune file: text between lines that are exactly ``%``, blank ones dropped."""
    docs, current = [], []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line == b"%":
            docs.append(current)
            current = []
        else:
            current.append(line)
    docs.append(current)
    out = []
    for lines in docs:
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        if any(line.strip() for line in lines):
            out.append(b"\n".join(lines) + b"\n")
    return out


def _missing_message(name: str, directory: Path, data_dir, empty: bool = False) -> str:
    package = CORPORA[name][1]
    found = "has fortune files but no document in them" if empty else "has no fortune files"
    if data_dir is None:
        return (f"corpus {name!r}: {directory} {found}; Debian's {package!r} package installs it "
                f"(as root: `apt-get install -y {package}`), or pass data_dir=<a directory of fortune files>")
    return (f"corpus {name!r}: data_dir {directory} {found} (text files whose documents are separated by "
            f"lines that are exactly '%'); the default, {CORPORA[name][0]}, comes with Debian's {package!r} "
            f"package (as root: `apt-get install -y {package}`)")


def _stream(name: str, tokens, any_shape: bool = False) -> np.ndarray:
    array = np.asarray(tokens)
    if not np.issubdtype(array.dtype, np.integer) or (array.ndim != 1 and not any_shape):
        raise ValueError(f"{name}: expected a 1-D integer token array, got {array.dtype}{list(array.shape)}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= VOCAB):
        raise ValueError(f"{name}: byte tokens must lie in [0, {VOCAB}), found {int(array.min())}..{int(array.max())}")
    return array
