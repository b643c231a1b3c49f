"""The layers of a model, found by use: which weights are linear layers, and which of their axes are inputs.

A layer is a use of a parameter leaf as one operand of a matrix product (``dot_general``: Dense,
DenseGeneral, einsum, attention projections) or a convolution, whose other operand depends on the
example: y = op(x, K) with K = chain(leaf), the chain made of layout operations (reshape, transpose,
dtype casts) and, inside a ``scan`` over a stacked leaf, the slice of the current iteration. The
product says which of K's axes it contracts (the layer's d_in inputs) and which it keeps (the d_out
output units); K's batch axes (a vmapped stack whose members read their own inputs) and a scan's
iterations index separate layers, so slice l of a stacked leaf is a layer of its own.

Found by tracing the loss on one example (:func:`find_layers`), whatever the names: an einsum weight
``w`` is a layer, an embedding table (gathered), a token or a position embedding (added), a norm
scale or a bias (multiplied, added) never is. A leaf used by two products (tied or shared weights) or
used otherwise as well is left dense, with the reason. Where there is no loss to trace, the name rule
of :func:`swapjax.pytree.default_rule` gives one layer per leaf (:meth:`Layer.whole`).

Each layer holds ``index`` (d_in, d_out): the flat positions in its leaf of W, the layer's weights as a
matrix (row i: input i, row-major over the contracted axes in the kernel's order; column j: output
unit j). Constraints work on it (a budget per layer, N:M groups along its rows) and the layer-wise
driver solves W from the Gram of its inputs.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import layer_grads, pytree
from .loss_check import check_loss_fn
from .pytree import Layer, Layers, Layout, PyTree, Select

# dtype-only steps of a chain: the weights are the leaf's, entry for entry
_CASTS = frozenset({"convert_element_type", "reduce_precision"})


def find_layers(loss_fn, params: PyTree, batch: PyTree) -> Layers:
    """The layers of ``params`` as ``loss_fn(params, example)`` uses them, traced on the first example of
    ``batch`` (no computation: an abstract trace). A loss the tracer cannot follow falls back to the name
    rule (one layer per default-rule leaf), with a warning saying why.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> params = {"embed": np.ones((10, 4), "float32"), "w": np.ones((3, 4), "float32")}  # w: (out, in)
        >>> loss_fn = lambda p, ex: jnp.sum(jnp.einsum("j,kj->k", p["embed"][ex["token"]], p["w"]) ** 2)
        >>> found = swapjax.find_layers(loss_fn, params, {"token": np.zeros(8, "int32")})
        >>> [(layer.name, layer.d_in, layer.d_out, layer.input_axes) for layer in found.layers]
        [('w', 4, 3, (1,))]
        >>> found.left_dense
        {'embed': 'not a layer: used otherwise than as an operand of a product with the data (gathered, added or scaled)'}
    """
    key = _key(loss_fn, params, batch)
    return _found(key) if _hashable(key) else _find(*key)  # an unhashable loss_fn: traced every time


@lru_cache(maxsize=8)
def _found(key) -> Layers:
    """The layers of one (loss, shapes): traced once, as the tracing sees shapes and dtypes only."""
    return _find(*key)


def _key(loss_fn, params: PyTree, batch: PyTree) -> tuple:
    """(loss_fn, params, one example) with every array as its jax.ShapeDtypeStruct: what a trace sees."""
    struct = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), batch)
    return loss_fn, _Frozen(jax.tree_util.tree_map(struct, params)), _Frozen(example)


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


class _Frozen:
    """A pytree of ShapeDtypeStructs, hashable by its structure and shapes."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self._id = (treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))

    def __hash__(self):
        return hash(self._id)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and self._id == other._id


def _find(loss_fn, params: "_Frozen", example: "_Frozen") -> Layers:
    params, example = params.tree, example.tree
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in with_path]
    paths = [pytree.path_name(p) for p, _ in with_path]
    # the weight matrices: floating leaves with ndim ≥ 2 (a vector is a bias or a scale, whatever its use)
    floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2]
    loss = lambda lv, ex: loss_fn(jax.tree_util.tree_unflatten(treedef, lv), ex)  # noqa: E731
    closed = layer_grads.trace_loss(loss, leaves, example)
    if closed is None:
        raise ValueError("loss_fn: must return a scalar for one example")
    try:
        taps, other_use = layer_grads.discover(closed, len(leaves), floating)
    except Exception as err:  # noqa: BLE001 - a primitive the interpreter cannot replay
        warnings.warn(f"layers: the loss could not be followed ({type(err).__name__}: {err}); using the name rule "
                      "(one layer per kernel)", RuntimeWarning, stacklevel=2)
        return by_name(params)
    found, reasons, in_order = {}, {}, []
    for t, tap in enumerate(taps):  # in the order of the traced program: forward order
        uses, why = tap_layers(tap, paths[tap.leaf], tuple(leaves[tap.leaf].shape), t)
        if why:
            reasons.setdefault(tap.leaf, why)
        found.setdefault(tap.leaf, []).extend(uses)
        in_order.extend((tap.leaf, layer) for layer in uses)
    left_dense, kept = {}, set()
    for i in floating:
        why = reasons.get(i) or _why_not(i, found.get(i, []), other_use, math.prod(leaves[i].shape))
        if why is None:
            kept.add(i)
        else:
            left_dense[paths[i]] = why
    return Layers(tuple(layer for i, layer in in_order if i in kept), left_dense)


def _why_not(leaf: int, layers: list, other_use, size: int) -> Optional[str]:
    """Why leaf ``leaf`` is not pruned as the layers found for it (None: it is)."""
    if leaf in other_use:
        if layers:
            return "used by a product and otherwise as well (tied to a gather, scaled, or in a regulariser)"
        return "not a layer: used otherwise than as an operand of a product with the data (gathered, added or scaled)"
    if not layers:
        return "not used by loss_fn"
    uses = np.bincount(np.concatenate([layer.index.ravel() for layer in layers]), minlength=size)
    if uses.max() > 1:
        return f"used by {int(uses.max())} products (tied or shared weights)"
    if uses.min() == 0:
        return "only part of it is used by products"
    return None


def by_name(params: PyTree) -> Layers:
    """The layers of the name rule (no loss to trace): each default-rule leaf one layer, its inputs along
    :func:`swapjax.pytree.reduction_axes`."""
    lay = pytree.layout(params)
    layers = tuple(Layer.whole(name, shape, pytree.reduction_axes(name, shape))
                   for name, shape in zip(lay.names, lay.shapes))
    return Layers(layers, {name: "not a kernel by the name rule" for name in lay.left_dense})


def prunable(loss_fn, params: PyTree, batch: PyTree, select: Optional[Select] = None) -> Layout:
    """The layout of the prunable weights: the layers of ``loss_fn`` (:func:`find_layers`) narrowed by ``select``.

    In order, before any computation: ``select`` called on every leaf (it must return a bool), ``loss_fn``
    checked on one abstract example (:func:`swapjax.loss_check.check_loss_fn`), the layers found (a trace).
    """
    pytree.check_select(params, select)
    check_loss_fn(loss_fn, params, batch)
    return pytree.layout(params, select, find_layers(loss_fn, params, batch))


def staged(loss_fn, params: PyTree, batch: PyTree):
    """``loss_fn`` as the program it traces to on one example: the same function of (params, example)
    for arrays of these shapes, evaluated from its jaxpr, so the Python code runs once, at the top
    level. A loss that may be traced but not run under ``jax.vmap`` (an NNX ``nnx.scan`` with graph
    updates) then runs under every transform the drivers apply. One staged function per loss and
    shapes (the last few kept), so compiled functions keyed on it are reused across calls."""
    key = _key(loss_fn, params, batch)
    return _staged(key) if _hashable(key) else loss_fn  # an unhashable loss_fn: as it is


@lru_cache(maxsize=8)
def _staged(key):
    loss_fn, params, example = key
    closed = jax.make_jaxpr(loss_fn)(params.tree, example.tree)

    def loss(params, example):
        (value,) = jcore.jaxpr_as_fun(closed)(*jax.tree_util.tree_leaves((params, example)))
        return value

    loss.__name__ = getattr(loss_fn, "__name__", "loss_fn")
    return loss


# ---------------------------------------------------------------- one product's layers

def tap_layers(tap, path: str, leaf_shape: tuple, order: int = -1):
    """(the layers of one product ``tap`` of the leaf at ``path``: one per slice of its batch axes, in row-major
    order; why it has none, or "")."""
    positions = np.arange(math.prod(leaf_shape), dtype=np.int64).reshape(leaf_shape)
    kernel = _through(tap.chain, positions)
    if np.count_nonzero(np.bincount(kernel.ravel(), minlength=positions.size)) < kernel.size:  # O(size), no sort
        return [], "broadcast before its product: each weight used several times"
    if tap.primitive.name == "conv_general_dilated":
        dn = tap.params["dimension_numbers"]
        spatial = tuple(dn.rhs_spec[2:])
        matrix = kernel.transpose(spatial + (dn.rhs_spec[1], dn.rhs_spec[0]))
        kind = "conv" if tap.params["feature_group_count"] == 1 else "grouped conv"
        return [_layer(path, matrix.reshape(-1, kernel.shape[dn.rhs_spec[0]]), kernel.shape, leaf_shape, kind, order)], ""
    (lc, rc), (lb, rb) = tap.params["dimension_numbers"]
    contract, batch = (rc, rb) if tap.kernel_pos == 1 else (lc, lb)
    inputs = tuple(sorted(contract))
    outputs = tuple(a for a in range(kernel.ndim) if a not in inputs and a not in batch)
    arranged = kernel.transpose(tuple(batch) + inputs + outputs)
    d_in = math.prod(kernel.shape[a] for a in inputs)
    stacked = arranged.reshape(tuple(kernel.shape[a] for a in batch) + (d_in, -1))
    shape = tuple(kernel.shape[a] for a in range(kernel.ndim) if a not in batch)
    return [_layer(path, stacked[b], shape, leaf_shape, "dense", order)
            for b in np.ndindex(*stacked.shape[:len(batch)])], ""


def _layer(path, index, shape, leaf_shape, kind, order) -> Layer:
    """The layer W = leaf.ravel()[index]; named by its leaf's path and, for a slice of a stacked leaf, the
    indices of the leaf's axes it holds fixed, in the leaf's axis order ('blocks/kernel[2]')."""
    coords = np.unravel_index(index.ravel(), leaf_shape)
    fixed = [a for a in range(len(leaf_shape)) if leaf_shape[a] > 1 and np.all(coords[a] == coords[a][0])]
    name = path + (f"[{', '.join(str(int(coords[a][0])) for a in fixed)}]" if fixed else "")
    index = np.array(index)
    index.flags.writeable = False  # found layers are cached and shared
    return Layer(name, path, index, tuple(int(d) for d in shape),
                 _input_axes(index, leaf_shape), kind, order)


def _through(chain, positions: np.ndarray) -> np.ndarray:
    """The leaf's flat positions carried through the chain's layout steps: K's entry → the leaf's (in NumPy:
    no compilation per step and shape)."""
    x = positions
    for prim, params in chain:
        x = _NUMPY_STEPS.get(prim.name, _bound(prim))(x, params)
    return np.asarray(x, np.int64)


def _bound(prim):
    """A layout step NumPy does not mirror here, run by JAX."""
    return lambda x, params: np.asarray(prim.bind(jnp.asarray(x, jnp.int32), **params))


def _broadcast_in_dim(x, params):
    shape, dims = params["shape"], params["broadcast_dimensions"]
    expanded = x.reshape([x.shape[dims.index(a)] if a in dims else 1 for a in range(len(shape))])
    return np.broadcast_to(expanded, shape)


_NUMPY_STEPS = {
    **dict.fromkeys(_CASTS | {"copy", "copy_p"}, lambda x, params: x),
    "reshape": lambda x, params: x.reshape(params["new_sizes"]) if params.get("dimensions") is None
    else x.transpose(params["dimensions"]).reshape(params["new_sizes"]),
    "transpose": lambda x, params: x.transpose(params["permutation"]),
    "squeeze": lambda x, params: x.reshape([d for a, d in enumerate(x.shape) if a not in params["dimensions"]]),
    "expand_dims": lambda x, params: np.expand_dims(x, tuple(params["dimensions"])),
    "broadcast_in_dim": _broadcast_in_dim,
    "slice": lambda x, params: x[tuple(slice(a, b, s) for a, b, s in zip(
        params["start_indices"], params["limit_indices"], params["strides"] or (1,) * x.ndim))],
}


def _input_axes(index: np.ndarray, leaf_shape: tuple) -> Optional[tuple]:
    """The leaf axes that W's rows run over, row-major in that order, or None where the rows mix axes
    in another way (a reshape across input and output axes)."""
    if not leaf_shape:
        return None
    coords = np.unravel_index(index, leaf_shape)
    rows = [a for a in range(len(leaf_shape)) if leaf_shape[a] > 1 and np.any(coords[a] != coords[a][:1, :])]
    if any(np.any(coords[a] != coords[a][:, :1]) for a in rows):
        return None  # an axis that varies along both rows and columns
    if not rows:
        return None
    flat = np.ravel_multi_index([coords[a][:, 0] for a in rows], [leaf_shape[a] for a in rows])
    return tuple(rows) if np.array_equal(flat, np.arange(index.shape[0])) else None
