"""N:M kernels in the compressed layout of 2:4 sparse matrix products: the kept values and their
in-group indices.

    packed = swapjax.to_nm(result.params, result.masks, n=2, m=4)   # {"Dense_0/kernel": NMKernel, ...}
    params = swapjax.from_nm(packed, result.params)                 # dense-with-zeros leaves again

A kernel is seen as the matrix W ∈ R^{O×K} of its matrix product: K = the reduction axes
(:func:`swapjax.constraints.reduction_axes`, flattened row-major), O = the other axes. Each row
of W holds K/M groups of M consecutive weights with N kept; the export stores, per row, the K·N/M
kept values in order and, for each, its index within its group (0 … M − 1): the layout that
2:4 sparse tensor cores take (values plus 2-bit metadata; here one uint8 per index, unpacked).
JAX has no 2:4 matrix product in its public API: in JAX the pruned network runs as dense with
zeros, at dense speed on CPU and GPU; the export is the handoff to a runtime that has one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, NamedTuple, Sequence, Union

import jax
import numpy as np

from . import checks
from .constraints import reduction_axes
from .io import _kept_leaves
from .pytree import PyTree, path_name


class NMKernel(NamedTuple):
    """One kernel in N:M form: ``values`` (O, K·N/M) and ``indices`` (O, K·N/M, uint8, each in [0, M))
    of the matrix W (O, K), with the kernel's ``shape``, its reduction ``axes`` and ``m``."""

    values: np.ndarray
    indices: np.ndarray
    shape: tuple
    axes: tuple
    m: int


def _as_matrix(x: np.ndarray, axes: tuple) -> np.ndarray:
    """The kernel as W (O, K): the other axes, then the reduction axes, each flattened row-major."""
    others = tuple(a for a in range(x.ndim) if a not in axes)
    return x.transpose(others + axes).reshape(math.prod(x.shape[a] for a in others) or 1, -1)


def _int(name: str, value, minimum: int) -> int:
    """An int ≥ minimum; a 0-d integer array (``jnp.asarray(4)``) counts as one."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == () \
            and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    return checks.integer(name, value, minimum)


def _m(name: str, m) -> int:
    m = _int(name, m, 2)
    if m > 256:
        raise ValueError(f"{name}: must be at most 256 (the in-group indices are uint8), got {m}")
    return m


def _axes(name: str, shape: tuple, axes, where: str) -> tuple:
    """``axes`` for a kernel of ``shape`` as non-negative ints: an int or a sequence of them, in range,
    no repeats."""
    seq = list(axes) if isinstance(axes, (tuple, list, np.ndarray)) and np.ndim(axes) == 1 else [axes]
    try:
        ax = tuple(_int(where, a, -len(shape)) for a in seq)
    except ValueError:
        ax = ()
    if not ax or any(a >= len(shape) for a in ax) or len(set(a % len(shape) for a in ax)) < len(ax):
        raise ValueError(f"{where}: {name} of shape {shape} got axes {axes!r}; expected distinct axes in "
                         f"[-{len(shape)}, {len(shape)}), the kernel's reduction axes")
    return tuple(a % len(shape) for a in ax)


def to_nm(params: PyTree, masks: PyTree, n: int = 2, m: int = 4,
          axes: Union[None, Sequence[int], Callable[[str, tuple], Sequence[int]]] = None) -> dict[str, NMKernel]:
    """{path: NMKernel} for every masked kernel whose reduction size is a multiple of m (the others,
    left dense by ``NM``, are not exported). n, m: 0 < n < m ≤ 256. axes: the axes the groups run along:
    a prune's ``result.input_axes`` ({path: the axes its products contract}, as ``NM`` groups them by
    default), the axes ``NM`` was given (the same tuple for every kernel, e.g. ``(0,)``, or
    ``axes(path, shape)``), or None (the name rule :func:`reduction_axes`).
    ValueError naming the leaf and the group if a group does not keep exactly n, and if no masked
    kernel can be exported.

    Examples:
        >>> import numpy as np, swapjax
        >>> kernel = np.arange(1, 9, dtype="float32").reshape(4, 2)     # Dense (in = 4, out = 2)
        >>> mask = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)     # 2 of 4 inputs per output
        >>> packed = swapjax.to_nm({"k": kernel * mask}, {"k": mask})
        >>> packed["k"].values.tolist(), packed["k"].indices.tolist()   # rows = outputs
        ([[1.0, 5.0], [4.0, 6.0]], [[0, 2], [1, 2]])
        >>> bool(np.array_equal(swapjax.from_nm(packed, {"k": kernel})["k"], kernel * mask))
        True
    """
    m = _m("m", m)
    n = _int("n", n, 1)
    if n >= m:
        raise ValueError(f"n: must be below m = {m} (keep n of every m weights), got {n}")
    if not (axes is None or callable(axes) or isinstance(axes, (tuple, list, np.ndarray, Mapping))):
        raise ValueError(f"axes: expected None, the axes of every kernel such as (0,), a mapping {{path: axes}} "
                         f"(a prune's result.input_axes) or a function axes(path, shape) -> axes, got "
                         f"{checks._show(axes)}")
    if isinstance(axes, Mapping):
        leaf_axes = lambda name, shape: axes[name]  # noqa: E731
    else:
        leaf_axes = axes if callable(axes) else reduction_axes if axes is None else lambda name, shape: axes
    out, ragged = {}, {}
    for name, (mask, leaf) in _kept_leaves(params, masks).items():
        if isinstance(axes, Mapping) and name not in axes:
            continue  # no product says its inputs (a vector chosen with allow_vectors): not exported
        shape = tuple(np.shape(leaf))
        if 0 in shape:
            raise ValueError(f"params: {name} has shape {shape}, an axis of size 0: no weights to export")
        ax = _axes(name, shape, leaf_axes(name, shape), "axes")
        reduce = math.prod(shape[a] for a in ax)
        if reduce % m:
            ragged[name] = reduce
            continue
        W = _as_matrix(np.asarray(leaf), ax).reshape(-1, m)  # one row per group
        kept = _as_matrix(np.asarray(mask, bool), ax).reshape(-1, m)
        counts = kept.sum(axis=1)
        if np.any(counts != n):
            g = int(np.flatnonzero(counts != n)[0])
            raise ValueError(f"masks: {name} is not {n}:{m}: group {g} along axes {ax} keeps {int(counts[g])}")
        order = np.argsort(~kept, axis=1, kind="stable")[:, :n]  # the kept positions, in order
        rows = math.prod(shape) // reduce
        out[name] = NMKernel(np.take_along_axis(W, order, axis=1).reshape(rows, -1),
                             order.astype(np.uint8).reshape(rows, -1), shape, ax, m)
    if not out:
        raise ValueError(f"m: no masked kernel has a reduction size that is a multiple of m = {m} "
                         f"(sizes: {ragged}); nothing to export")
    return out


def _check_kernel(name: str, kernel, shape: tuple) -> tuple[int, tuple]:
    """(n, axes) of a packed kernel for the parameter of ``shape``; ValueError naming what does not fit."""
    where = f"packed[{name!r}]"
    if tuple(kernel.shape) != shape:
        raise ValueError(f"{where}: shape {tuple(kernel.shape)}, the parameter in params has {shape}")
    m = _m(f"{where}.m", kernel.m)
    ax = _axes(name, shape, kernel.axes, f"{where}.axes")
    K = math.prod(shape[a] for a in ax)
    if K == 0 or K % m:
        raise ValueError(f"{where}: K = {K} inputs along axes {ax} of shape {shape}, not a positive multiple of m = {m}")
    values, indices = np.asarray(kernel.values), np.asarray(kernel.indices)
    rows = math.prod(shape) // K
    n, rest = divmod(values.shape[1] * m if values.ndim == 2 else 0, K)
    if values.shape != indices.shape or values.shape[:1] != (rows,) or rest or not 0 < n < m:
        raise ValueError(f"{where}: values {values.shape} and indices {indices.shape} do not fit shape {shape} "
                         f"(rows O = {rows}, K = {K} along axes {ax}): expected both (O, K·n/m) with 0 < n < m = {m}")
    groups = indices.reshape(-1, n)
    if not np.issubdtype(indices.dtype, np.integer) or np.any((groups < 0) | (groups >= m)):
        raise ValueError(f"{where}.indices: expected integers in [0, {m}), got {indices.dtype} in "
                         f"[{indices.min()}, {indices.max()}]")
    repeated = np.flatnonzero(np.any(np.diff(np.sort(groups, axis=1), axis=1) == 0, axis=1))
    if repeated.size:
        g = int(repeated[0])
        raise ValueError(f"{where}.indices: group {g} repeats an index ({groups[g].tolist()}); "
                         f"each of its {n} kept weights needs its own position")
    return n, ax


def from_nm(packed: dict[str, NMKernel], params: PyTree) -> PyTree:
    """``params`` with every exported kernel rebuilt dense (zeros off the kept positions), in its dtype.
    ValueError if a packed name is not in params or a kernel's fields do not fit its shape (indices
    out of [0, m) or repeated within a group, values and indices of other shapes).

    Examples:
        >>> import numpy as np, swapjax
        >>> conv = np.ones((3, 3, 4, 2), "float32")                 # Conv (h, w, in, out): groups along in
        >>> mask = np.zeros_like(conv, bool); mask[..., :2, :] = True  # inputs 0 and 1 of every 4
        >>> packed = swapjax.to_nm({"c": conv * mask}, {"c": mask})
        >>> packed["c"].values.shape, packed["c"].indices[0, :4].tolist()  # O = 2 rows, K·2/4 = 18 values
        ((2, 18), [0, 1, 0, 1])
        >>> swapjax.from_nm(packed, {"c": conv})["c"].sum() == mask.sum()
        np.True_
    """
    if not isinstance(packed, Mapping) or not all(isinstance(k, NMKernel) for k in packed.values()):
        raise ValueError(f"packed: expected the dict {{path: NMKernel}} that swapjax.to_nm returns, got "
                         f"{checks._show(packed)}")
    if params is None:
        raise ValueError("params: expected the pytree of parameters that to_nm was given, got None")
    shapes = {path_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(packed) - set(shapes))
    if missing:
        raise ValueError(f"packed: {missing} are not in params (leaves: {sorted(shapes)[:10]}); pass the params "
                         f"of the model that was exported")
    found = {name: _check_kernel(name, kernel, shapes[name]) for name, kernel in packed.items()}

    def rebuild(path, leaf):
        name = path_name(path)
        if name not in packed:
            return leaf
        kernel, (n, ax) = packed[name], found[name]
        values = np.asarray(kernel.values)
        W = np.zeros((values.size // n, kernel.m), values.dtype)
        np.put_along_axis(W, np.asarray(kernel.indices).reshape(-1, n).astype(np.int64), values.reshape(-1, n), axis=1)
        others = tuple(a for a in range(len(kernel.shape)) if a not in ax)
        permuted = tuple(kernel.shape[a] for a in others + ax)
        dense = W.reshape(permuted).transpose(np.argsort(others + ax))
        return np.asarray(dense, np.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(rebuild, params)
