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
from .constraints import NM, Constraint, LayerBudgets, final_sparsity
from .gradients import DEFAULT_CHUNK, LossFn, batch_size, chunk_starts
from .layer_methods import LayerMethod, Regression, _nm_ids
from .loss_check import check_loss_fn
from .operators import matmul
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
    method: Optional[LayerMethod] = None,
    constraint: Optional[Constraint] = None,
    sequential: bool = True,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
):
    """Prune ``params`` layer by layer: each prunable kernel from the Gram H = AᵀA of its own inputs.

    The layers are the kernels of plain dense (``x @ K``, K's leading axes contracted: Dense,
    DenseGeneral, attention projections) and convolution (HWIO, one feature group) layers, found by
    tracing ``loss_fn`` on one example, in the order the forward pass uses them. For each, A holds
    its input rows (examples × positions; a convolution's patches) over ``batch``, and ``method``
    solves min ‖AW̄ − AW‖²_F under the layer's rule: by default :class:`Regression` (LR on the layer's
    regression, from SparseGPT's support; the best of the layer-wise methods on the MLPNet and ViT
    presets), or :class:`SparseGPT`, :class:`Wanda`, :class:`Refit` of either. ``sequential``
    (default): each layer's inputs come from the network with the layers before it already pruned,
    as SparseGPT does; False: every layer from the dense network's activations (one pass).

    ``constraint``: a per-layer budget (default ``LayerBudgets()``, uniform at ``sparsity``, 0.5 by
    default; ``"erk"``; or a mapping {path: s_l}, taken as given: ``sparsity`` may be left out; not
    OWL, which needs the Fisher) or ``NM(n, m)`` along the inputs. Memory: one chunk's activations
    and the layer's d_in × d_in Gram, never N×p.

    Kernels of any float dtype: a bfloat16 or float16 kernel cast to the inputs' dtype before its
    product (Flax's dtype promotion) is a layer like any other; H is accumulated in float32, the
    solve runs in float32 and the result has the kernel's dtype. An input that never fires on the
    batch (H_ii = 0) gets weight 0 in every method (see the module's notes).

    Checked before ``loss_fn`` is first called (ValueError): the arguments, NaN or inf in ``params``
    or in ``batch``, the constraint on the layout (``Constraint.check``: a mapping's paths,
    ``NM(..., ragged="error")``, and a layer whose budget would keep 0 weights, an error naming it:
    lower the sparsity, give it a budget of its own or leave it out with ``select``). During the
    run: a layer whose inputs hold NaN or inf (or whose Gram overflows float32) is a ValueError
    naming it, and every ``method``'s result is checked (shape, a boolean mask, finite, pruned
    weights exactly 0, the rule kept exactly): a ValueError naming the method and the layer otherwise.
    The progress line names every prunable leaf left dense and why: left out by ``select``, ragged
    for N:M or N:M along other axes than the layer's inputs (an error with ``ragged="error"``), used
    otherwise than as one plain layer's kernel (tied, scaled, in a scan, a grouped convolution), or
    not used by ``loss_fn``.

    Compilation: the Grams are computed by one compiled function per distinct shape of a layer's
    input rows (the layer chosen by an argument; each call runs the whole forward pass), and each
    method's solve is compiled once per layer shape, so a network whose layers repeat a few shapes
    compiles a few functions. Layers that read the same rows (q, k and v of one input) share one Gram.

    Returns a :class:`swapjax.PruneResult` with ``mode="layer-wise"``, no stages, and ``layers``: a
    :class:`LayerReport` per pruned layer (its error measured on the inputs it was solved for).

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
    if isinstance(method, type):
        raise TypeError(f"method: got the class {method.__name__}; pass an instance, e.g. swapjax.{method.__name__}()")
    if not isinstance(method, LayerMethod):
        raise ValueError(f"method: expected a layer-wise method (swapjax.layer_methods.SparseGPT() or Wanda()), "
                         f"got {method!r}")
    constraint = LayerBudgets() if constraint is None else constraint
    if not isinstance(constraint, (LayerBudgets, NM)) or constraint.needs_fisher:
        raise ValueError(f"constraint: layer by layer needs a budget per layer, LayerBudgets('uniform' | 'erk' | "
                         f"{{path: sparsity}}) or NM(n, m), got {constraint!r}; a global "
                         "top-k or OWL ranks weights across layers: use swapjax.prune for those")
    sparsity = final_sparsity(sparsity, constraint, default=0.5)  # a LayerBudgets mapping: None, its mean below
    sequential = checks.boolean("sequential", sequential)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    progress = checks.boolean("progress", progress)
    lay = pytree.layout(params, select)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    n = batch_size(batch)
    checks.finite_leaves("batch", batch, hint="; the calibration examples must be finite: fix or drop them",
                         examples=True)
    w = pytree.flatten(params, lay)
    # from the layout, before loss_fn is called: a mapping's paths and mean, NM's axes and ragged="error",
    # a layer that would keep 0 weights
    sparsity = constraint.check(lay, sparsity, w)
    counts = np.asarray(constraint.resolve(lay, sparsity, w).counts)
    ragged = set(constraint.ragged_leaves(lay)) if isinstance(constraint, NM) else set()
    check_loss_fn(loss_fn, params, batch)
    log = (lambda msg: print(f"[swapjax] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    position = [i for i, chosen in enumerate(lay.selected) if chosen]  # prunable leaf l = leaves[position[l]]
    layers, reasons = _layers(loss_fn, leaves, treedef, batch, position)
    rules, rows_shape, source = {}, {}, {}
    for tap_index, leaf, shape, rows_key, inputs in layers:
        l = position.index(leaf)
        if lay.names[l] in ragged:
            reasons[leaf] = f"ragged for {constraint.label}: {shape[1]} inputs, not a multiple of {constraint.m}"
        elif isinstance(constraint, NM) and not _along_inputs(constraint, lay.names[l], lay.shapes[l], inputs):
            # layer by layer, N:M groups run along the layer's inputs: another grouping of this leaf is
            # treated as a ragged one (dense, or the error asked for)
            axes = constraint.leaf_axes(lay.names[l], lay.shapes[l])
            if constraint.ragged == "error":
                raise ValueError(f"constraint: {constraint.label} groups {lay.names[l]} {lay.shapes[l]} along axes "
                                 f"{axes}, but layer by layer the groups run along the layer's inputs, axes {inputs} "
                                 f"(the axes its product contracts); pass NM(..., axes=) with those, leave it out "
                                 f"with select, or ragged='dense' to leave it dense")
            reasons[leaf] = f"{constraint.label} along axes {axes}, not the layer's inputs {inputs}"
        else:
            rules[tap_index] = constraint if isinstance(constraint, NM) else int(counts[l])
            rows_shape[tap_index] = shape
            # layers fed the same rows A (q, k and v of one input) share one Gram: A precedes them all in the
            # forward pass, so pruning any of them leaves it unchanged
            source[tap_index] = next((t for t, _, _, key, _ in layers if key == rows_key and t in rules), tap_index)
    dense = [f"{lay.names[position.index(leaf)]} ({why})" for leaf, why in sorted(reasons.items())]
    dense += [f"{name} (left out by select)" for name in _left_out_by_select(params, lay, select)]
    log(f"{type(method).__name__} layer by layer ({'sequential' if sequential else 'from the dense network'}): "
        f"{len(rules)} layers, N={n} examples, {constraint.label}"
        + (f"; left dense: {', '.join(dense)}" if dense else ""))

    current = list(leaves)
    gram = partial(_grams, loss_fn, treedef, batch, tuple(position), chunk_size)
    # one compiled Gram per shape of the input rows: the layer is an argument, the same-shaped layers a group
    groups = {}
    for tap_index in sorted(set(source.values())):
        groups.setdefault(rows_shape[tap_index], []).append(tap_index)
    last_use = {source[t]: t for t in rules}
    grams = {} if sequential else gram(current, tuple(sorted(set(source.values()))))
    reports, masks = [], {}
    for tap_index, leaf, *_ in layers:
        if tap_index not in rules:
            continue
        name = lay.names[position.index(leaf)]
        if source[tap_index] not in grams:  # sequential: from the network pruned up to this layer
            group = tuple(groups[rows_shape[tap_index]])
            grams[source[tap_index]] = gram(current, group, group.index(source[tap_index]))
        H, rows = grams[source[tap_index]]
        if sequential and last_use[source[tap_index]] == tap_index:
            del grams[source[tap_index]]  # memory: only the Grams still to be shared are kept
        if not np.all(np.isfinite(np.asarray(H))):  # on the host: no compilation per shape
            raise ValueError(f"loss_fn: the inputs of layer {name} hold NaN or inf on the batch (or their Gram AᵀA "
                             f"overflows {H.dtype}){' after the layers before it were pruned' if sequential else ''}; "
                             "check the forward pass up to that layer (params and batch are finite)")
        kernel = current[leaf]
        W_bar = jnp.asarray(kernel).reshape(H.shape[0], -1)
        W, mask = _checked_result(method, name, rules[tap_index], W_bar.shape,
                                  method.solve_layer(W_bar, H, rules[tap_index]))
        dtype = jnp.result_type(kernel)
        W = W.astype(dtype)
        if jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max and not np.all(np.isfinite(np.asarray(W, np.float32))):
            raise ValueError(f"method: {type(method).__name__} on {name} returned weights beyond the range of the "
                             f"kernel's dtype {dtype} (inf once cast); prune this layer in float32")
        error = float(_relative_error(W_bar, W, H))
        current[leaf] = W.reshape(jnp.shape(kernel))
        masks[leaf] = np.asarray(mask).reshape(jnp.shape(kernel))
        kept = int(np.sum(mask))
        reports.append(LayerReport(name, W_bar.shape[0], W_bar.shape[1], rows, kept, error))
        log(f"{name}: {W_bar.shape[0]}×{W_bar.shape[1]}, kept {kept}, relative reconstruction error {error:.4g}")
    pruned = jax.tree_util.tree_unflatten(treedef, current)
    mask_leaves = [masks.get(i, np.ones(np.shape(leaves[i]), bool)) if chosen else None
                   for i, chosen in enumerate(lay.selected)]
    return PruneResult(pruned, jax.tree_util.tree_unflatten(treedef, mask_leaves), (), None, "layer-wise",
                       constraint.label, tuple(reports))


def _along_inputs(rule: NM, name: str, shape: tuple, inputs: tuple) -> bool:
    """The leaf's N:M axes are the layer's input axes (axes of size 1 aside: they do not change the groups)."""
    axes = rule.leaf_axes(name, shape)
    return tuple(a for a in axes if shape[a] != 1) == tuple(a for a in inputs if shape[a] != 1)


def _left_out_by_select(params, lay, select) -> list[str]:
    """The leaves the default rule prunes that ``select`` left out."""
    if select is None:
        return []
    rule = pytree.default_rule(params)
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    return [pytree.path_name(p) for (p, x), chosen in zip(with_path, lay.selected) if not chosen and rule(p, x)]


def _checked_result(method, name, rule, shape, out):
    """``method``'s (W, mask) for the layer ``name``, checked: shape (d_in, d_out) each, a boolean mask,
    W finite and exactly 0 where the mask is False, the rule kept exactly. ValueError naming both."""
    who = f"method: {type(method).__name__}.solve_layer on layer {name}"
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"{who} must return (W, kept mask), got {checks._show(out)}")
    W, mask = out
    shapes = (tuple(np.shape(W)), tuple(np.shape(mask)))
    if shapes != (tuple(shape), tuple(shape)):
        raise ValueError(f"{who} returned W of shape {shapes[0]} and a mask of shape {shapes[1]}; expected both "
                         f"{tuple(shape)} (d_in, d_out)")
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise ValueError(f"{who} returned W of dtype {W.dtype}; expected floating-point weights")
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"{who} returned a mask of dtype {mask.dtype}; expected booleans (True = kept)")
    w = np.asarray(W.astype(jnp.promote_types(W.dtype, jnp.float32)))
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{who} returned {int(np.sum(~np.isfinite(w)))} NaN or inf weights of {w.size}")
    nonzero = int(np.count_nonzero(w[~mask]))
    if nonzero:
        raise ValueError(f"{who} returned {nonzero} non-zero weights where its mask prunes; pruned weights must be "
                         "exactly 0")
    if isinstance(rule, NM):
        ids, counts = _nm_ids(rule, *shape)
        kept = np.bincount(ids, weights=mask.ravel(), minlength=counts.size)
        wrong = int(np.sum(kept != counts))
        if wrong:
            raise ValueError(f"{who} keeps {rule.label} in {counts.size - wrong} of its {counts.size} groups of "
                             f"{rule.m} inputs; every group must keep exactly {rule.n}")
    elif int(mask.sum()) != rule:
        raise ValueError(f"{who} kept {int(mask.sum())} weights; the layer's budget is exactly {rule}")
    return W, mask


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


_OTHER_USE = "used otherwise than as one layer's kernel: tied, scaled, in a scan or in a regulariser"


def _layers(loss_fn, leaves, treedef, batch, position):
    """([(tap index, leaf index, (rows per example, d_in), rows key, input axes) of each prunable kernel used
    once by a plain layer, in forward order], {leaf index: why it is left dense} for the other prunable
    kernels), from a trace of the loss on one example. Layers with equal rows keys have the same rows A: one
    input x, taken apart the same way. The input axes are the kernel's leading axes that the product contracts."""
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], batch)
    pl = layer_grads.plan(_loss_of_leaves(loss_fn, treedef), leaves, first, position, True)
    uses = {}
    for t in pl.taps:
        uses[t.leaf] = uses.get(t.leaf, 0) + 1
    layers, reasons = [], {}
    xs = jax.eval_shape(lambda ls, ex: layer_grads.layer_inputs(pl, ls, ex), leaves, first) if pl.taps else []
    for t, (tap, x) in enumerate(zip(pl.taps, xs)):
        rows = jax.eval_shape(lambda x: layer_grads.patch_rows(tap, x, np.shape(leaves[tap.leaf])), x)
        if uses[tap.leaf] > 1:
            reasons[tap.leaf] = f"used by {uses[tap.leaf]} layers (tied or shared)"
        elif rows is None:
            reasons[tap.leaf] = ("not a plain dense or convolution kernel (batched axes, feature groups, or "
                                 "reshaped before use)")
        else:
            kernel_shape = np.shape(leaves[tap.leaf])
            contracted = (len(tap.params["dimension_numbers"][0][1]) if tap.primitive.name == "dot_general"
                          else len(kernel_shape) - 1)
            layers.append((t, tap.leaf, tuple(rows.shape), _rows_key(tap, kernel_shape), tuple(range(contracted))))
    for leaf in position:
        if leaf not in pl.fast:
            reasons[leaf] = _OTHER_USE
        elif leaf not in uses:
            reasons[leaf] = "not used by loss_fn"
    return layers, reasons


def _rows_key(tap, kernel_shape):
    """What A depends on besides x: the product's layout (its precision aside) and a convolution's window."""
    params = tuple(sorted((k, repr(v)) for k, v in tap.params.items()
                          if k not in ("precision", "preferred_element_type", "out_sharding")))
    window = ()
    if tap.primitive.name == "conv_general_dilated":
        window = tuple(int(kernel_shape[i]) for i in tap.params["dimension_numbers"].rhs_spec[2:])
    return tap.operand, tap.primitive.name, params, window


def _grams(loss_fn, treedef, batch, position, chunk_size, leaves, taps, index=None) -> dict:
    """{tap: (H = AᵀA, rows of A)} over ``batch``, chunk by chunk (an overlapping last chunk counts its
    new examples only); with ``index``, (H, rows) of ``taps[index]`` alone, from a function compiled once
    for all of ``taps`` (layers whose input rows share one shape). H in float32 or wider."""
    n = batch_size(batch)
    b, starts = chunk_starts(n, chunk_size)
    loss = _loss_of_leaves(loss_fn, treedef)
    total, done = None, 0
    for start in starts:
        examples = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(jnp.asarray(a), start, start + b), batch)
        if index is None:
            part = _chunk_grams(loss, tuple(leaves), examples, start + b - done, position, taps)
        else:
            part = [_chunk_gram(loss, tuple(leaves), examples, start + b - done, jnp.asarray(index, jnp.int32),
                                position, taps)]
        total = part if total is None else [(h + g, r + q) for (h, r), (g, q) in zip(total, part)]
        done = start + b
    out = [(h, int(r)) for h, r in total]
    return out[0] if index is not None else dict(zip(taps, out))


def _layer_grams(loss, leaves, examples, new_rows, position):
    """gram(t) -> (AᵀA of tap t over the examples counted, rows), inside a trace: one forward pass."""
    first = jax.tree_util.tree_map(lambda a: a[0], examples)
    pl = layer_grads.plan(loss, list(leaves), first, list(position), True)
    xs = jax.vmap(lambda ex: layer_grads.layer_inputs(pl, list(leaves), ex))(examples)
    c = jax.tree_util.tree_leaves(examples)[0].shape[0]
    counted = jnp.arange(c) >= c - new_rows

    def gram(t):
        tap = pl.taps[t]
        x = jnp.where(counted.reshape((c,) + (1,) * (xs[t].ndim - 1)), xs[t], 0)
        A = jax.vmap(lambda x: layer_grads.patch_rows(tap, x, np.shape(leaves[tap.leaf])))(x)
        A = A.reshape(-1, A.shape[-1])
        A = A.astype(jnp.promote_types(A.dtype, jnp.float32))  # bfloat16 inputs: H accumulated in float32
        return matmul(A.T, A), jnp.sum(counted) * (A.shape[0] // c)

    return gram


@partial(jax.jit, static_argnames=("loss", "position", "taps"))
def _chunk_grams(loss, leaves, examples, new_rows, position, taps):
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    return [gram(t) for t in taps]


@partial(jax.jit, static_argnames=("loss", "position", "taps"))
def _chunk_gram(loss, leaves, examples, new_rows, index, position, taps):
    """The Gram of ``taps[index]``: ``index`` is traced, so one compilation serves every layer of ``taps``."""
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    if len(taps) == 1:
        return gram(taps[0])
    return jax.lax.switch(index, [partial(gram, t) for t in taps])
