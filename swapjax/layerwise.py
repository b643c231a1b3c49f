"""Layer by layer: each linear layer pruned from its own inputs (:mod:`swapjax.layer_methods`).

:func:`prune_layerwise` runs a layer method on every plain dense and conv layer of a network, in
forward order, each from the Gram H = AᵀA of its inputs on a calibration batch.
"""
from __future__ import annotations

import sys
from functools import lru_cache, partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, layer_grads, pytree
from . import layers as find
from .constraints import Constraint, LayerBudgets, as_constraint, final_sparsity
from .contract import Method, solve_layer
from .gradients import DEFAULT_CHUNK, LossFn, batch_size, chunk_starts
from .layer_methods import Regression
from .operators import matmul
from .progress import Progress, reporter
from .prune import PruneResult
from .pytree import PyTree, Select


class LayerReport(NamedTuple):
    """One layer of a layer-wise prune: its leaf, d_in × d_out, the rows of A (examples × positions),
    the weights kept, and the relative reconstruction error ‖A(W̄ − W)‖²_F / ‖AW̄‖²_F."""

    name: str
    d_in: int
    d_out: int
    rows: int
    kept: int
    error: float


def prune_layerwise(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    sparsity: Optional[float] = None,
    method: Optional[Method] = None,
    constraint: Optional[Constraint] = None,
    sequential: bool = True,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress = True,
):
    """Prune ``params`` layer by layer: each layer from the Gram H = AᵀA of its own inputs.

    The layers are found by use (:func:`swapjax.find_layers`): every product (a matrix product, an
    einsum, a convolution) of a weight matrix with the data, in the order the forward pass runs them,
    whatever the weights' names; slice l of a stacked leaf run by ``scan`` or ``vmap`` is a layer of
    its own, solved from the inputs of its own iteration. For each, A holds its input rows (examples ×
    positions; a convolution's patches) over ``batch``, and ``method`` solves min ‖AW̄ − AW‖²_F under
    the layer's share of the constraint: by default :class:`~swapjax.layer_methods.Regression` (LR on
    the layer's regression, from SparseGPT's support), or :class:`SparseGPT`, :class:`Wanda`,
    :class:`~swapjax.layer_methods.Refit`, or any method that needs X (LR, SWAP, Magnitude,
    WoodFisher: it gets the layer's X = I ⊗ Lᵀ, LLᵀ = H + δI). ``sequential`` (default): each layer's
    inputs come from the network with the layers before it already pruned, as SparseGPT does; False:
    every layer from the dense network's activations (one pass).

    ``constraint``: a budget per layer (default ``LayerBudgets()``, uniform at ``sparsity``, 0.5 by
    default; ``"erk"``; or a mapping {layer name or leaf path: s_l}, taken as given: ``sparsity`` may
    be left out; not OWL, which needs the Fisher) or ``NM(n, m)`` along each layer's inputs (the axes
    its product contracts). A constraint that ranks weights across layers (the global top-k) is a
    ValueError. Memory: one chunk's activations and the layer's d_in × d_in Gram, never N×p.

    Kernels of any float dtype: H is accumulated in float32, the solve runs in float32 and the result
    has the kernel's dtype. An input that never fires on the batch (H_ii = 0) gets weight 0 in every
    method.

    Checked before any computation (ValueError): the arguments, NaN or inf in ``params`` or in
    ``batch``, ``select``, and, once the layers are traced, the constraint on them (a mapping's names,
    ``NM(..., ragged="error")``, a layer whose budget would keep 0 weights). During the run: a layer
    whose inputs hold NaN or inf (or whose Gram overflows float32) is a ValueError naming it, and
    every ``method``'s result is checked (:func:`swapjax.contract.check_layer_result`). The progress
    line names every weight left dense and why: left out by ``select``, ragged for N:M or N:M along
    other axes than the layer's inputs (an error with ``ragged="error"``), a grouped convolution, not a
    layer (tied, used otherwise, not used).

    Compilation: the Grams are computed by one compiled function per distinct shape of a layer's
    input rows (the layer chosen by an argument; each call runs the whole forward pass), and each
    method's solve is compiled once per layer shape. Layers that read the same rows (q, k and v of one
    input) share one Gram.

    Returns a :class:`swapjax.PruneResult` with ``mode="layer-wise"``, no stages, ``layers``: a
    :class:`LayerReport` per pruned layer (its error measured on the inputs it was solved for), and
    ``input_axes`` for :func:`swapjax.to_nm`.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"Dense_0": {"kernel": rng.normal(size=(8, 6)).astype("float32")},
        ...           "Dense_1": {"kernel": rng.normal(size=(6, 2)).astype("float32")}}
        >>> batch = {"x": rng.normal(size=(32, 8)).astype("float32")}
        >>> loss_fn = lambda p, ex: jnp.sum(jnp.tanh(ex["x"] @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]) ** 2
        >>> result = swapjax.prune_layerwise(loss_fn, params, batch, constraint=swapjax.NM(2, 4), progress=False)
        >>> [(r.name, r.kept) for r in result.layers]     # Dense_1 has 6 inputs, not a multiple of 4: dense
        [('Dense_0/kernel', 24)]
        >>> result.summary()["total"]
        {'kept': 36, 'total': 60, 'sparsity': 0.4, 'constraint': '2:4'}
    """
    method = Regression() if method is None else method
    checks.method(method)
    constraint = LayerBudgets() if constraint is None else as_constraint(constraint)
    if constraint.needs_fisher:
        raise ValueError(f"constraint: {constraint.label} needs the Fisher (diag XᵀX), which layer by layer is not "
                         "formed; use LayerBudgets('uniform' | 'erk' | {path: sparsity}) or NM(n, m), or "
                         "swapjax.prune for it")
    sparsity = final_sparsity(sparsity, constraint, default=0.5)  # a LayerBudgets mapping: None, its mean below
    sequential = checks.boolean("sequential", sequential)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    report = reporter(progress)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    n = batch_size(batch)
    checks.finite_leaves("batch", batch, hint="; the calibration examples must be finite: fix or drop them",
                         examples=True)
    lay = find.prunable(loss_fn, params, batch, select)
    loss_fn = find.staged(loss_fn, params, batch)  # its program, run from its jaxpr under every transform
    w = pytree.flatten(params, lay)
    sparsity = constraint.check(lay, sparsity, w)  # a mapping's names and mean, ragged="error", empty layers
    groups = constraint.resolve(lay, sparsity, w)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    position = [i for i, chosen in enumerate(lay.selected) if chosen]  # prunable leaf l = leaves[position[l]]
    found = _uses(loss_fn, leaves, treedef, batch, position, lay.names)
    work, dense, ragged = [], [], set(constraint.ragged_leaves(lay))
    for layer in sorted(lay.layers, key=lambda layer: layer.order):  # forward order
        layer_groups = groups.restrict(lay.positions(layer), layer.name)
        why = _left_dense(layer, layer_groups, groups, constraint, found, ragged)
        if why:
            dense.append(f"{layer.name} ({why})")
        else:
            work.append((layer, layer_groups) + found[layer.name])
    dense += [f"{name} ({why})" for name, why in lay.why.items()]
    dense += [f"{name} (left out by select)" for name in lay.left_out]
    report(f"{type(method).__name__} layer by layer ({'sequential' if sequential else 'from the dense network'}): "
           f"{len(work)} layers, N={n} examples, {constraint.label}" + (f"; left dense: {', '.join(dense)}" if dense else ""))

    # layers reading the same rows A (q, k and v of one input) share one Gram: A precedes them all in the
    # forward pass, so pruning any of them leaves it unchanged
    source = {}
    for layer, _, use, key, _ in work:
        source[layer.name] = next(u for l, _, u, k, _ in work if k == key)
    shape_of = {use: shape for _, _, use, _, shape in work}
    by_shape = {}  # one compiled Gram per shape of the input rows: the layer an argument, the same-shaped a group
    for use in dict.fromkeys(source.values()):
        by_shape.setdefault(shape_of[use], []).append(use)
    last_use = {source[layer.name]: layer.name for layer, *_ in work}
    gram = partial(_grams, loss_fn, treedef, batch, tuple(position), chunk_size)
    current = list(leaves)
    grams = {} if sequential else gram(current, tuple(dict.fromkeys(source.values())))
    reports, masks = [], {}
    for layer, layer_groups, *_ in work:
        use = source[layer.name]
        if use not in grams:  # sequential: from the network pruned up to this layer
            group = tuple(by_shape[shape_of[use]])
            grams[use] = gram(current, group, group.index(use))
        H, rows = grams[use]
        if sequential and last_use[use] == layer.name:
            del grams[use]  # memory: only the Grams still to be shared are kept
        if not np.all(np.isfinite(np.asarray(H))):  # on the host: no compilation per shape
            raise ValueError(f"loss_fn: the inputs of layer {layer.name} hold NaN or inf on the batch (or their Gram "
                             f"AᵀA overflows {H.dtype}){' after the layers before it were pruned' if sequential else ''}"
                             "; check the forward pass up to that layer (params and batch are finite)")
        leaf = position[lay.names.index(layer.path)]
        kernel = current[leaf]
        W_bar = _weights(kernel, layer.index)
        W, mask = solve_layer(method, layer.name, W_bar, H, layer_groups)
        dtype = jnp.result_type(kernel)
        W = W.astype(dtype)
        if jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max and not np.all(np.isfinite(np.asarray(W, np.float32))):
            raise ValueError(f"method: {type(method).__name__} on {layer.name} returned weights beyond the range of "
                             f"the kernel's dtype {dtype} (inf once cast); prune this layer in float32")
        error = float(_relative_error(W_bar, W, H))
        current[leaf] = _written(kernel, layer.index, W)
        kept_mask = masks.setdefault(leaf, np.ones(np.shape(kernel), bool)).reshape(-1)
        kept_mask[layer.index.ravel()] = np.asarray(mask).ravel()
        kept = int(np.sum(mask))
        reports.append(LayerReport(layer.name, layer.d_in, layer.d_out, rows, kept, error))
        report(f"{layer.name}: {layer.d_in}×{layer.d_out}, kept {kept}, relative reconstruction error {error:.4g}")
    pruned = jax.tree_util.tree_unflatten(treedef, current)
    mask_leaves = [masks.get(i, np.ones(np.shape(leaves[i]), bool)) if chosen else None
                   for i, chosen in enumerate(lay.selected)]
    return PruneResult(pruned, jax.tree_util.tree_unflatten(treedef, mask_leaves), (), None, "layer-wise",
                       constraint.label, tuple(reports), input_axes=lay.input_axes)


def _left_dense(layer, layer_groups, groups, constraint, found, ragged) -> Optional[str]:
    """Why ``layer`` is not solved (None: it is)."""
    if layer.name in ragged or layer.path in ragged:
        return f"ragged for {constraint.label}: {layer.d_in} inputs"
    if groups.nm is not None and layer_groups.nm is None:
        # layer by layer, N:M groups run along the layer's inputs: another grouping is treated as a ragged one
        message = (f"constraint: {constraint.label} groups {layer.name} along other axes than the layer's inputs "
                   f"{layer.input_axes} (the axes its product contracts)")
        if constraint.ragged == "error":
            raise ValueError(message + "; pass NM(..., axes=) with those, leave it out with select, or ragged='dense'")
        return f"{constraint.label} along other axes than its inputs {layer.input_axes}"
    if layer.name not in found:
        return ("a grouped convolution: one product per feature group" if layer.kind == "grouped conv" else
                "no product of it with the data to take its inputs from")
    return None


@jax.jit
def _weights(leaf, index):
    """The layer's W = leaf.ravel()[index] (compiled once per leaf and layer shape, the index an argument)."""
    return jnp.ravel(leaf)[index]


@jax.jit
def _written(leaf, index, W):
    """The leaf with the layer's weights replaced by W."""
    return jnp.ravel(leaf).at[jnp.ravel(index)].set(jnp.ravel(W).astype(leaf.dtype)).reshape(leaf.shape)


@jax.jit
def _relative_error(W_bar, W, H):
    """‖A(W̄ − W)‖²_F / ‖AW̄‖²_F = tr(ΔᵀHΔ) / tr(W̄ᵀHW̄) in H's dtype."""
    W_bar, W = W_bar.astype(H.dtype), W.astype(H.dtype)
    delta = W - W_bar
    return jnp.sum(delta * matmul(H, delta)) / jnp.maximum(jnp.sum(W_bar * matmul(H, W_bar)), 1e-30)


@lru_cache(maxsize=64)
def _loss_of_leaves(loss_fn, treedef):
    """loss(leaves, example), one function per (loss_fn, tree structure): the compiled Grams are reused."""
    return lambda leaves, example: loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)


def _uses(loss_fn, leaves, treedef, batch, position, names) -> dict:
    """{layer name: ((tap, slice), rows key, (rows per example, d_in))} for every layer a plain product solves
    (a dense product, a one-group convolution), from a trace of the loss on one example. Layers with equal
    rows keys have the same rows A: one input x, taken apart the same way."""
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], batch)
    pl = layer_grads.plan(_loss_of_leaves(loss_fn, treedef), leaves, first, position, True)
    xs = jax.eval_shape(lambda ls, ex: layer_grads.layer_inputs(pl, ls, ex), leaves, first) if pl.taps else []
    paths = dict(zip(position, names))
    out = {}
    for t, (tap, x) in enumerate(zip(pl.taps, xs)):
        rows = jax.eval_shape(lambda x: layer_grads.layer_rows(tap, x), x)
        if rows is None:
            continue
        for b, layer in enumerate(find.tap_layers(tap, paths[tap.leaf], np.shape(leaves[tap.leaf]))[0]):
            out[layer.name] = ((t, b), layer_grads.rows_key(tap) + (b,), tuple(rows.shape[1:]))
    return out


def _grams(loss_fn, treedef, batch, position, chunk_size, leaves, uses, index=None) -> dict:
    """{use: (H = AᵀA, rows of A)} over ``batch`` for each layer use (tap, slice), chunk by chunk (an
    overlapping last chunk counts its new examples only); with ``index``, (H, rows) of ``uses[index]`` alone,
    from a function compiled once for all of ``uses`` (layers whose input rows share one shape). H in
    float32 or wider."""
    n = batch_size(batch)
    b, starts = chunk_starts(n, chunk_size)
    loss = _loss_of_leaves(loss_fn, treedef)
    total, done = None, 0
    for start in starts:
        examples = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(jnp.asarray(a), start, start + b), batch)
        if index is None:
            part = _chunk_grams(loss, tuple(leaves), examples, start + b - done, position, uses)
        else:
            part = [_chunk_gram(loss, tuple(leaves), examples, start + b - done, jnp.asarray(index, jnp.int32),
                                position, uses)]
        total = part if total is None else [(h + g, r + q) for (h, r), (g, q) in zip(total, part)]
        done = start + b
    out = [(h, int(r)) for h, r in total]
    return out[0] if index is not None else dict(zip(uses, out))


def _layer_grams(loss, leaves, examples, new_rows, position):
    """gram((tap, slice)) -> (AᵀA of that layer over the examples counted, rows), inside a trace: one forward pass."""
    first = jax.tree_util.tree_map(lambda a: a[0], examples)
    pl = layer_grads.plan(loss, list(leaves), first, list(position), True)
    xs = jax.vmap(lambda ex: layer_grads.layer_inputs(pl, list(leaves), ex))(examples)
    c = jax.tree_util.tree_leaves(examples)[0].shape[0]
    counted = jnp.arange(c) >= c - new_rows

    def gram(use):
        t, b = use
        x = jnp.where(counted.reshape((c,) + (1,) * (xs[t].ndim - 1)), xs[t], 0)
        A = jax.vmap(lambda x: layer_grads.layer_rows(pl.taps[t], x)[b])(x)
        A = A.reshape(-1, A.shape[-1])
        A = A.astype(jnp.promote_types(A.dtype, jnp.float32))  # bfloat16 inputs: H accumulated in float32
        return matmul(A.T, A), jnp.sum(counted) * (A.shape[0] // c)

    return gram


@partial(jax.jit, static_argnames=("loss", "position", "uses"))
def _chunk_grams(loss, leaves, examples, new_rows, position, uses):
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    return [gram(u) for u in uses]


@partial(jax.jit, static_argnames=("loss", "position", "uses"))
def _chunk_gram(loss, leaves, examples, new_rows, index, position, uses):
    """The Gram of ``uses[index]``: ``index`` is traced, so one compilation serves every layer of ``uses``."""
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    if len(uses) == 1:
        return gram(uses[0])
    return jax.lax.switch(index, [partial(gram, u) for u in uses])
