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
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

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


def to_nm(params: PyTree, masks: PyTree, n: int = 2, m: int = 4,
          axes: Optional[Callable[[str, tuple], Sequence[int]]] = None) -> dict[str, NMKernel]:
    """{path: NMKernel} for every masked kernel whose reduction size is a multiple of m (the others,
    left dense by ``NM``, are not exported). ValueError naming the leaf and the group if a group does
    not keep exactly n.

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
    out = {}
    for name, (mask, leaf) in _kept_leaves(params, masks).items():
        shape = tuple(np.shape(leaf))
        ax = tuple(int(a) % len(shape) for a in (axes or reduction_axes)(name, shape))
        reduce = math.prod(shape[a] for a in ax)
        if reduce % m:
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
    return out


def from_nm(packed: dict[str, NMKernel], params: PyTree) -> PyTree:
    """``params`` with every exported kernel rebuilt dense (zeros off the kept positions), in its dtype.

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
    def rebuild(path, leaf):
        name = path_name(path)
        if name not in packed:
            return leaf
        kernel = packed[name]
        if tuple(np.shape(leaf)) != kernel.shape:
            raise ValueError(f"packed: {name} has shape {kernel.shape}, params {np.shape(leaf)}")
        rows, kept = kernel.values.shape
        n = kept * kernel.m // (math.prod(kernel.shape) // rows)
        W = np.zeros((rows * kept // n, kernel.m), kernel.values.dtype)
        np.put_along_axis(W, kernel.indices.reshape(-1, n).astype(np.int64), kernel.values.reshape(-1, n), axis=1)
        others = tuple(a for a in range(len(kernel.shape)) if a not in kernel.axes)
        permuted = tuple(kernel.shape[a] for a in others + kernel.axes)
        dense = W.reshape(permuted).transpose(np.argsort(others + kernel.axes))
        return np.asarray(dense, np.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(rebuild, params)
