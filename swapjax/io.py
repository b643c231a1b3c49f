"""Save and load a pruned model with its masks (orbax), and export the kept weights as sparse BCOO.

    swapjax.save_pruned("runs/mlp-90", result.params, result.masks)
    params, masks = swapjax.load_pruned("runs/mlp-90", like=dense_params)

    sparse = swapjax.to_bcoo(result.params, result.masks)  # {"Dense_0/kernel": BCOO, ...}
    y = x @ sparse["Dense_0/kernel"]                      # a sparse matmul, same as x @ masked kernel (x: a JAX array)
    params = swapjax.from_bcoo(sparse, result.params)     # dense leaves again, zeros off the masks
    swapjax.bcoo_bytes(sparse)["total"]                   # {"dense_bytes": ..., "sparse_bytes": ...}

A checkpoint holds the parameters (dense arrays, pruned weights exactly 0), the
masks of the prunable leaves (bool, one byte per weight) and their names; it is
no smaller than the dense model. The compact form is the BCOO export: per kept
weight, its value plus one index per dimension (int32 by default), so a 2-D
kernel takes 12 bytes per kept float32 weight against 4 per weight dense: it
is smaller once more than 2/3 of the weights are pruned (more than 4/5 for a
4-D conv kernel; ``index_dtype=jnp.int16`` halves the indices when every
dimension is below 32,768). :func:`bcoo_bytes` gives the figures.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .pytree import PyTree, apply_masks, path_name

FORMAT = "swapjax-pruned/1"


def _kept_leaves(params: PyTree, masks: PyTree) -> dict[str, tuple[np.ndarray, jax.Array]]:
    """{path name: (mask, leaf)} for every prunable leaf (a mask that is an array, not None)."""
    checks.mask_tree("masks", masks)
    if params is None:
        raise ValueError("params: expected the pytree of parameters the masks belong to, got None")
    leaves = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        name = path_name(p)
        if name not in leaves:
            raise ValueError(f"masks: leaf {name!r} is not in params (leaves: {list(leaves)})")
        if np.shape(m) != np.shape(leaves[name]):
            raise ValueError(f"masks: {name!r} has shape {np.shape(m)}, the parameter {np.shape(leaves[name])}")
        out[name] = (np.asarray(m, bool), leaves[name])
    if not out:
        raise ValueError("masks: no mask array found (expected the masks of swapjax.prune's result)")
    return out


# What save_pruned writes at the top of a checkpoint: its three orbax items and orbax's own files.
_CHECKPOINT_ENTRIES = {"params", "masks", "meta", "_CHECKPOINT_METADATA", "commit_success.txt"}


def _stored_meta(path: str) -> Optional[dict]:
    """The "meta" item save_pruned wrote in ``path`` (a dict with "format" == FORMAT), or None."""
    import orbax.checkpoint as ocp

    if os.path.islink(path) or not os.path.isdir(os.path.join(path, "meta")):
        return None
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # unreadable or not orbax's JSON: not ours
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _writable_parent(path: str) -> None:
    """ValueError naming ``path`` unless its nearest existing ancestor is a directory we may write in."""
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"directory: cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"directory: cannot write {path}: no write permission in {parent}")


def save_pruned(directory: str | os.PathLike, params: PyTree, masks: PyTree, *, force: bool = False) -> str:
    """Write ``apply_masks(params, masks)`` and the masks to ``directory`` with orbax; returns its absolute path.

    params: any pytree of arrays (Flax linen params, an NNX ``State``, dicts);
    masks: as ``swapjax.prune`` returns them (bool arrays for the prunable
    leaves, None elsewhere). An existing ``directory`` is an error, unless
    force=True and it is a checkpoint written by save_pruned (recognised by
    its stored format, holding nothing else): then the new checkpoint is
    written beside it and swapped in, so the old one is removed only once
    the new one is complete. Any other file or folder is never replaced.

    Examples:
        >>> import os, tempfile, numpy as np, swapjax
        >>> params = {"w": np.arange(1, 7, dtype="float32").reshape(2, 3), "b": np.ones(3, "float32")}
        >>> masks = {"w": np.array([[True, False, True], [False, True, False]]), "b": None}
        >>> path = swapjax.save_pruned(os.path.join(tempfile.mkdtemp(), "mlp-50"), params, masks)
        >>> os.path.basename(path), os.path.isdir(path)
        ('mlp-50', True)
    """
    import shutil
    import tempfile

    import orbax.checkpoint as ocp

    path = os.path.abspath(checks.path_like("directory", directory))
    force = checks.boolean("force", force)
    kept = _kept_leaves(params, masks)
    _writable_parent(path)
    replace = os.path.lexists(path)
    if replace:
        if _stored_meta(path) is None:
            what = "a directory" if os.path.isdir(path) and not os.path.islink(path) else "a file"
            raise ValueError(f"directory: {path} already exists and is {what}, not a swapjax checkpoint; "
                             f"nothing was written: choose another path")
        if not force:
            raise ValueError(f"directory: {path} already exists (a swapjax checkpoint); pass force=True to replace it")
        foreign = sorted(set(os.listdir(path)) - _CHECKPOINT_ENTRIES)
        if foreign:
            raise ValueError(f"directory: {path} is a swapjax checkpoint but also holds {foreign}, which "
                             f"save_pruned did not write; nothing was replaced: move them or choose another path")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.swapjax-", dir=parent)  # orbax's own temporaries go in it too
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, "new"), args=ocp.args.Composite(
                params=ocp.args.StandardSave(apply_masks(params, masks)),
                masks=ocp.args.StandardSave([m for m, _ in kept.values()]),
                meta=ocp.args.JsonSave({"format": FORMAT, "masked": list(kept)}),
            ))
        if replace:  # a checkpoint of ours (checked above): swap, then drop the old one
            os.rename(path, os.path.join(tmp, "old"))
            try:
                os.rename(os.path.join(tmp, "new"), path)
            except OSError:
                os.rename(os.path.join(tmp, "old"), path)
                raise
        else:
            os.rename(os.path.join(tmp, "new"), path)
    except OSError as err:
        raise ValueError(f"directory: could not write the checkpoint {path}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_like(path: str, like: PyTree) -> None:
    """ValueError unless ``like`` has the stored params' leaf names, shapes and dtypes."""
    import orbax.checkpoint as ocp
    from etils import epath

    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / "params").tree
    have = {path_name(p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {path_name(p): (tuple(np.shape(x)), np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    if set(have) != set(want):
        extra, missing = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        diff = [f"{what} {names[:10]}" for what, names in (("not in the checkpoint:", extra), ("missing from like:", missing))
                if names]
        raise ValueError(f"like: another structure than the params stored in {path}; {', '.join(diff)}")
    for name, (shape, dtype) in want.items():
        if have[name] != (shape, dtype):
            raise ValueError(f"like: {name!r} is stored in {path} as {have[name][0]} {have[name][1]}, "
                             f"like has {shape} {dtype}; pass a like of the saved model")


def load_pruned(directory: str | os.PathLike, like: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
    """(params, masks) saved by :func:`save_pruned`.

    like: a pytree with the structure, shapes and dtypes of the saved params
    (the dense params, or ``jax.eval_shape`` of the model's init); the params
    come back in that structure (an NNX ``State`` stays a ``State``). Without
    it they come back as nested dicts. The masks are rebuilt over the same
    structure: bool arrays for the leaves that were masked, None elsewhere.

    Examples:
        >>> import os, tempfile, numpy as np, swapjax
        >>> params = {"w": np.arange(1, 7, dtype="float32").reshape(2, 3), "b": np.ones(3, "float32")}
        >>> masks = {"w": np.array([[True, False, True], [False, True, False]]), "b": None}
        >>> path = swapjax.save_pruned(os.path.join(tempfile.mkdtemp(), "mlp-50"), params, masks)
        >>> loaded, loaded_masks = swapjax.load_pruned(path, like=params)
        >>> np.asarray(loaded["w"]).tolist(), loaded_masks["b"]     # zeros off the mask; b was not masked
        ([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]], None)
        >>> np.array_equal(loaded_masks["w"], masks["w"])
        True
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(checks.path_like("directory", directory))
    if not os.path.isdir(path):
        why = "it is a file, not a directory" if os.path.lexists(path) else "it does not exist"
        raise ValueError(f"directory: no checkpoint at {path}: {why}")
    meta = _stored_meta(path)
    if meta is None:
        held = sorted(os.listdir(path))
        raise ValueError(f"directory: {path} is not a checkpoint written by swapjax.save_pruned (no swapjax "
                         f"metadata; it holds {held[:10] if held else 'nothing'})")
    if like is not None and not jax.tree_util.tree_leaves(like):
        raise ValueError(f"like: expected a pytree of arrays (or ShapeDtypeStructs) like the saved params, got {like!r}")
    if like is not None:
        _check_like(path, like)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restore = ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        saved = ckptr.restore(path, args=ocp.args.Composite(params=restore, masks=ocp.args.StandardRestore()))
    by_name = dict(zip(meta["masked"], saved.masks))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(saved.params)
    missing = set(by_name) - {path_name(p) for p, _ in leaves_with_path}
    if missing:
        raise ValueError(f"{path}: masked leaves {sorted(missing)} are not in the restored params; check `like`")
    masks = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(by_name[path_name(p)]) if path_name(p) in by_name else None for p, _ in leaves_with_path]
    )
    return saved.params, masks


def to_bcoo(params: PyTree, masks: PyTree, index_dtype=jnp.int32) -> dict:
    """{path name: ``jax.experimental.sparse.BCOO``} of the kept weights of every prunable leaf.

    Each BCOO holds exactly the weights under True in the mask (nse = kept
    count), indices in row-major order, with the leaf's shape and dtype;
    ``x @ sparse["Dense_0/kernel"]`` is then a sparse matmul equal to ``x`` times
    the masked kernel (``x`` a JAX array: NumPy's ``@`` does not know BCOO).

    Examples:
        >>> import numpy as np, swapjax
        >>> params = {"w": np.arange(1, 7, dtype="float32").reshape(2, 3), "b": np.ones(3, "float32")}
        >>> masks = {"w": np.array([[True, False, True], [False, True, False]]), "b": None}
        >>> sparse = swapjax.to_bcoo(params, masks)
        >>> list(sparse), sparse["w"].nse, sparse["w"].data.tolist(), sparse["w"].indices.tolist()
        (['w'], 3, [1.0, 3.0, 5.0], [[0, 0], [0, 2], [1, 1]])
        >>> import jax.numpy as jnp
        >>> (jnp.ones((1, 2)) @ sparse["w"]).tolist()   # a sparse matmul: x times the masked w (x a JAX array)
        [[1.0, 5.0, 3.0]]
    """
    from jax.experimental import sparse

    try:
        index_dtype = np.dtype(index_dtype)
    except TypeError:
        raise ValueError(f"index_dtype: expected an integer dtype such as jnp.int32, got {index_dtype!r}") from None
    if not np.issubdtype(index_dtype, np.integer):
        raise ValueError(f"index_dtype: expected an integer dtype such as jnp.int32, got {index_dtype}")
    kept = _kept_leaves(params, masks)
    limit = int(np.iinfo(index_dtype).max)
    for name, (m, _) in kept.items():
        if max(np.shape(m), default=0) - 1 > limit:
            raise ValueError(f"index_dtype: {index_dtype} cannot index {name!r} of shape {np.shape(m)} "
                             f"(largest index {limit}); use jnp.int32")
    out = {}
    for name, (m, x) in kept.items():
        idx = np.argwhere(m).astype(index_dtype)  # (nse, ndim), row-major
        data = jnp.asarray(x)[tuple(idx.T)]
        out[name] = sparse.BCOO((data, jnp.asarray(idx)), shape=tuple(np.shape(x)),
                                indices_sorted=True, unique_indices=True)
    return out


def _check_sparse(sparse) -> None:
    """A dict {path name: BCOO} as :func:`to_bcoo` returns it."""
    from jax.experimental.sparse import BCOO

    if not isinstance(sparse, dict) or not all(isinstance(v, BCOO) for v in sparse.values()):
        raise ValueError(f"sparse: expected a dict {{path name: BCOO}} from swapjax.to_bcoo, got "
                         f"{type(sparse).__name__}" + (f" with {sorted({type(v).__name__ for v in sparse.values()})}"
                                                        if isinstance(sparse, dict) else ""))


def from_bcoo(sparse: dict, params: PyTree) -> PyTree:
    """``params`` with each leaf named in ``sparse`` replaced by its densified BCOO (zeros off the mask).

    Examples:
        >>> import numpy as np, swapjax
        >>> params = {"w": np.arange(1, 7, dtype="float32").reshape(2, 3), "b": np.ones(3, "float32")}
        >>> masks = {"w": np.array([[True, False, True], [False, True, False]]), "b": None}
        >>> dense = swapjax.from_bcoo(swapjax.to_bcoo(params, masks), params)
        >>> np.asarray(dense["w"]).tolist(), dense["b"] is params["b"]
        ([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]], True)
    """
    _check_sparse(sparse)
    shapes = {path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(sparse) - set(shapes):
        raise ValueError(f"sparse: leaves {sorted(set(sparse) - set(shapes))} are not in params")
    for name, s in sparse.items():
        if tuple(s.shape) != tuple(shapes[name]):
            raise ValueError(f"sparse: {name!r} has shape {tuple(s.shape)}, the parameter {tuple(shapes[name])}")

    def put(path, x):
        s = sparse.get(path_name(path))
        return x if s is None else s.todense().astype(jnp.result_type(x))

    return jax.tree_util.tree_map_with_path(put, params)


def bcoo_bytes(sparse: dict) -> dict[str, dict[str, int]]:
    """Per leaf and in "total": bytes of the dense array and of the BCOO (values + indices).

    Examples:
        >>> import numpy as np, swapjax
        >>> params = {"w": np.ones((100, 10), "float32")}
        >>> masks = {"w": np.arange(1000).reshape(100, 10) % 10 == 0}  # 10 % kept: 100 weights
        >>> swapjax.bcoo_bytes(swapjax.to_bcoo(params, masks))["total"]  # 100 × (4 + 2 × 4) bytes
        {'dense_bytes': 4000, 'sparse_bytes': 1200}
    """
    _check_sparse(sparse)
    rows = {
        name: dict(dense_bytes=int(np.prod(s.shape)) * s.dtype.itemsize,
                   sparse_bytes=int(s.data.nbytes + s.indices.nbytes))
        for name, s in sparse.items()
    }
    rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("dense_bytes", "sparse_bytes")}
    return rows
