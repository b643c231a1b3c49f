"""Layer by layer: each linear layer pruned from its own inputs (:mod:`swapjax.layer_methods`).

:func:`prune_layerwise` runs a layer method on every plain dense and conv layer of a network, in
forward order, each from the Gram H = AᵀA of its inputs on a calibration batch.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, layer_grads, pytree, walk
from . import layers as find
from .constraints import Constraint, LayerBudgets, as_constraint, final_sparsity
from .contract import Method, solve_layer
from .gradients import DEFAULT_CHUNK, LossFn, batch_size, resolve_devices
from .layer_methods import Swaps
from .operators import matmul
from .progress import Progress, reporter
from .prune import PruneResult, dense_ends_option, without_ends
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
    devices=None,
    progress: Progress = True,
    dense_ends: Union[None, str, Sequence[str]] = None,
):
    """Prune ``params`` layer by layer: each layer from the Gram H = AᵀA of its own inputs.

    The layers are found by use (:func:`swapjax.find_layers`): every product (a matrix product, an
    einsum, a convolution) of a weight matrix with the data, in the order the forward pass runs them,
    whatever the weights' names; slice l of a stacked leaf run by ``scan`` or ``vmap`` is a layer of
    its own, solved from the inputs of its own iteration. For each, A holds its input rows (examples ×
    positions; a convolution's patches) over ``batch``, and ``method`` solves min ‖AW̄ − AW‖²_F under
    the layer's share of the constraint: by default :class:`~swapjax.layer_methods.Swaps` (SparseGPT's
    mask, then single swaps per output unit and exact refits on H), or :class:`SparseGPT`,
    :class:`Wanda`, :class:`~swapjax.layer_methods.Refit`, :class:`~swapjax.layer_methods.Regression`
    (LR on the layer's regression), or any method that needs X (LR, SWAP, Magnitude,
    WoodFisher: it gets the layer's X = I ⊗ Lᵀ, LLᵀ = H + δI). ``sequential`` (default): each layer's
    inputs come from the network with the layers before it already pruned, as SparseGPT does; False:
    every layer from the dense network's activations.

    One pass through the network (:mod:`swapjax.walk`): the calibration batch is walked once, chunk by
    chunk, stopping at each layer input; the layers that read it (q, k and v of one input) are solved
    from its one Gram, and the walk goes on with their pruned weights (sequential) or the dense ones.
    Between stops only the activations still to be read are kept. ``devices`` (None, ``"all"``, a count
    or a sequence of devices; N a multiple of their number): the batch sharded over them, each device
    forming its part of every H, added by one all-reduce.

    ``constraint``: a budget per layer (default ``LayerBudgets()``, uniform at ``sparsity``, 0.5 by
    default; ``"erk"``; ``"owl"``; or a mapping {layer name or leaf path: s_l}, taken as given:
    ``sparsity`` may be left out) or ``NM(n, m)`` along each layer's inputs (the axes its product
    contracts). A constraint that ranks weights across layers (the global top-k) is a ValueError.
    Memory: the activations live at a stop for the whole batch (a transformer's residual stream and
    the layer input), one chunk's intermediates, and the Grams of one input, never N×p.

    OWL (``LayerBudgets("owl", owl_threshold=M, owl_spread=Λ, min_sparsity=, max_sparsity=,
    owl_group=)``), as published: every layer's Wanda scores S_ij = |W_ij|·‖A_:,i‖₂ (‖A_:,i‖₂² = H_ii)
    are taken from the DENSE network in one extra pass before any layer is solved (one more forward
    pass, the walk's compiled segments reused; only diag H kept); D_l = the share of layer l's S above
    M × their mean (M = 5), s_l = s − Λ·(2(D_l − min D)/(max D − min D) − 1) (Λ = 0.08), then shifted
    by one constant so that the size-weighted mean Σ_l s_l·p_l/p is s, within the caps
    [min_sparsity, max_sparsity]: more outliers, lower sparsity. A layer that OWL would leave with 0
    weights is a ValueError after that pass, before any layer is solved.

    ``dense_ends``: None (default: every layer found is pruned, the head and a classifier
    included), ``"first"``, ``"last"`` or ``("first", "last")``: keep the first and/or last layer
    of the forward pass (the first/last of :func:`swapjax.find_layers`, before ``select``) dense.
    The published SparseGPT and Wanda code prune a language model's decoder blocks and leave its
    head dense: ``dense_ends="last"`` is that recipe (where the head is its own leaf; a head tied to
    the embedding is no layer and is left dense anyway, and "last" is then the last block's last
    projection). The leaf is left out of the prunable weights as by ``select``: the budgets are
    those of the other layers (uniform at s: each of them at s), its mask is None, and
    ``result.summary()["total"]`` (the overall sparsity) is over the layers pruned; the progress
    line names it as left dense with the reason.

    Kernels of any float dtype: H is accumulated in float32, the solve runs in float32 and the result
    has the kernel's dtype. An input that never fires on the batch (H_ii = 0) gets weight 0 in every
    method.

    Checked before any computation (ValueError): the arguments, NaN or inf in ``params`` or in
    ``batch``, ``select``, and, once the layers are traced, ``dense_ends`` (an unknown value, an end that
    is one slice of a stacked leaf, every layer kept dense) and the constraint on them (a mapping's
    names, ``NM(..., ragged="error")``, a layer whose budget would keep 0 weights, OWL's caps against
    the sparsity). During the run: a layer
    whose inputs hold NaN or inf (or whose Gram overflows float32) is a ValueError naming it, and
    every ``method``'s result is checked (:func:`swapjax.contract.check_layer_result`). The progress
    line names every weight left dense and why: left out by ``select``, ragged for N:M or N:M along
    other axes than the layer's inputs (an error with ``ragged="error"``), a grouped convolution, not a
    layer (tied, used otherwise, not used).

    Compilation: one function per distinct segment of the walk (the repeated blocks of a deep network
    share theirs, across calls and loss functions) and each method's solve once per layer shape.

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
    method = Swaps() if method is None else method
    checks.method(method)
    constraint = LayerBudgets() if constraint is None else as_constraint(constraint)
    owl = isinstance(constraint, LayerBudgets) and constraint.rule == "owl"
    if constraint.needs_fisher and not owl:
        raise ValueError(f"constraint: {constraint.label} needs the Fisher (diag XᵀX), which layer by layer is not "
                         "formed; use LayerBudgets('uniform' | 'erk' | 'owl' | {path: sparsity}) or NM(n, m), or "
                         "swapjax.prune for it")
    sparsity = final_sparsity(sparsity, constraint, default=0.5)  # a LayerBudgets mapping: None, its mean below
    sequential = checks.boolean("sequential", sequential)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    ends = dense_ends_option(dense_ends)
    report = reporter(progress)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    n = batch_size(batch)
    devices = resolve_devices(devices, n)  # ValueError naming N and d before any computation
    checks.finite_leaves("batch", batch, hint="; the calibration examples must be finite: fix or drop them",
                         examples=True)
    lay = find.prunable(loss_fn, params, batch, select)
    lay, kept_dense = without_ends(ends, loss_fn, params, batch, select, lay)
    w = pytree.flatten(params, lay)
    sparsity = constraint.check(lay, sparsity, w)  # a mapping's names and mean, ragged="error", empty layers, caps
    leaves, treedef, position, program, found = _program(loss_fn, params, batch, lay)
    if owl:  # OWL's budgets from the dense network's Wanda scores: one pass before any layer is solved
        scores = _wanda_scores(program, leaves, position, lay, found, batch, chunk_size, devices)
        groups = constraint.resolve(lay, sparsity, w, scores=scores)
        share = constraint.outlier_ratios(lay, scores)
        counts = np.asarray(groups.counts)
        report("OWL from the dense network's Wanda scores (one extra pass): " + ", ".join(
            f"{layer.name} D={d:.4g} s={1 - c / layer.size:.4f}"
            for layer, d, c in sorted(zip(lay.layers, share, counts), key=lambda item: item[0].order)))
    else:
        groups = constraint.resolve(lay, sparsity, w)
    work, dense, ragged = {}, [], set(constraint.ragged_leaves(lay))
    for layer in sorted(lay.layers, key=lambda layer: layer.order):  # forward order
        layer_groups = groups.restrict(lay.positions(layer), layer.name)
        why = _left_dense(layer, layer_groups, groups, constraint, found, ragged)
        if why:
            dense.append(f"{layer.name} ({why})")
        else:
            work[found[layer.name]] = (layer, layer_groups)
    dense += [f"{name} ({why})" for name, why in lay.why.items()]
    dense += [f"{name} ({why}, dense_ends)" for name, why in kept_dense.items()]
    dense += [f"{name} (left out by select)" for name in lay.left_out]
    report(f"{type(method).__name__} layer by layer ({'sequential' if sequential else 'from the dense network'}): "
           f"{len(work)} layers, N={n} examples, {constraint.label}" + (f"; left dense: {', '.join(dense)}" if dense else ""))

    steps = walk.Walk(program, list(work), batch, chunk_size, devices)
    current = list(leaves)
    reports, masks = [], {}
    for stop in steps.stops:  # one pass: up to each input of the layers, whose Grams (shared: q, k, v) it gives
        grams = steps.advance(current if sequential else leaves)
        for use in stop.uses:
            layer, layer_groups = work[use]
            H, rows = grams[use]
            if not np.all(np.isfinite(np.asarray(H))):  # on the host: no compilation per shape
                raise ValueError(f"loss_fn: the inputs of layer {layer.name} hold NaN or inf on the batch (or their "
                                 f"Gram AᵀA overflows {H.dtype}){' after the layers before it were pruned' if sequential else ''}"
                                 "; check the forward pass up to that layer (params and batch are finite)")
            leaf = position[lay.names.index(layer.path)]
            kernel = current[leaf]
            W_bar = _weights(kernel, layer.index)
            W, mask = solve_layer(method, layer.name, W_bar, H, layer_groups)
            dtype = jnp.result_type(kernel)
            W = W.astype(dtype)
            if jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max and not np.all(np.isfinite(np.asarray(W, np.float32))):
                raise ValueError(f"method: {type(method).__name__} on {layer.name} returned weights beyond the range "
                                 f"of the kernel's dtype {dtype} (inf once cast); prune this layer in float32")
            error = float(_relative_error(W_bar, W, H))
            current[leaf] = _written(kernel, layer.index, W)
            kept_mask = masks.setdefault(leaf, np.ones(np.shape(kernel), bool)).reshape(-1)
            kept_mask[layer.index.ravel()] = np.asarray(mask).ravel()
            kept = int(np.sum(mask))
            reports.append((layer.order, LayerReport(layer.name, layer.d_in, layer.d_out, rows, kept, error)))
            report(f"{layer.name}: {layer.d_in}×{layer.d_out}, kept {kept}, relative reconstruction error {error:.4g}")
    reports = [r for _, r in sorted(reports, key=lambda item: item[0])]  # forward order
    pruned = jax.tree_util.tree_unflatten(treedef, current)
    mask_leaves = [masks.get(i, np.ones(np.shape(leaves[i]), bool)) if chosen else None
                   for i, chosen in enumerate(lay.selected)]
    return PruneResult(pruned, jax.tree_util.tree_unflatten(treedef, mask_leaves), (), None, "layer-wise",
                       constraint.label, tuple(reports), input_axes=lay.input_axes)


def _wanda_scores(program, leaves, position, lay, found, batch, chunk_size, devices) -> np.ndarray:
    """Wanda's score S_ij = |W_ij|·‖A_:,i‖₂ = |W_ij|·√H_ii of every prunable weight (float64, (p,), in the
    layout's flat order) from the dense network, in one walk keeping only diag H; NaN for the weights of a
    layer with no Gram (a grouped convolution: left dense)."""
    scores = np.full(lay.size, np.nan)
    by_use = {found[layer.name]: layer for layer in lay.layers if layer.name in found}
    steps = walk.Walk(program, list(by_use), batch, chunk_size, devices)
    for _ in steps.stops:
        for use, (H, _rows) in steps.advance(leaves).items():
            layer = by_use[use]
            diag = np.asarray(jnp.diagonal(H), np.float64)
            if not np.all(np.isfinite(diag)):
                raise ValueError(f"loss_fn: the inputs of layer {layer.name} hold NaN or inf on the batch (or their "
                                 f"Gram AᵀA overflows {H.dtype}); check the forward pass up to that layer")
            W = np.asarray(_weights(leaves[position[lay.names.index(layer.path)]], layer.index), np.float64)
            scores[lay.positions(layer)] = np.abs(W) * np.sqrt(np.maximum(diag, 0.0))[:, None]
    return scores


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


def layer_grams(loss_fn: LossFn, params: PyTree, batch: PyTree, select: Optional[Select] = None,
                chunk_size: int = DEFAULT_CHUNK, devices=None) -> dict:
    """{layer name: (H, rows)}: the Gram H = AᵀA (float32 or wider) of each layer's input rows A over
    ``batch`` and the number of rows of A, for every layer :func:`prune_layerwise` solves, from the dense
    network in one pass (layers reading one input share one H). ``devices``: the batch sharded over them,
    each device's part of every H added by one all-reduce.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> x = np.arange(12, dtype="float32").reshape(4, 3)
        >>> params = {"w": np.ones((3, 2), "float32")}
        >>> H, rows = swapjax.layer_grams(lambda p, ex: jnp.sum(ex["x"] @ p["w"]), params, {"x": x})["w"]
        >>> rows, bool(np.allclose(H, x.T @ x))
        (4, True)
    """
    n = batch_size(batch)
    devices = resolve_devices(devices, n)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    checks.finite_leaves("batch", batch, examples=True)
    lay = find.prunable(loss_fn, params, batch, select)
    leaves, _, _, program, found = _program(loss_fn, params, batch, lay)
    names = {found[layer.name]: layer.name for layer in lay.layers if layer.name in found}
    steps = walk.Walk(program, list(names), batch, chunk_size, devices)
    out = {}
    for _ in steps.stops:
        out.update({names[use]: H for use, H in steps.advance(leaves).items()})
    return out


def _program(loss_fn, params, batch, lay) -> tuple:
    """(leaves, treedef, positions of the prunable leaves, the flattened program, {layer name: (tap, slice)})."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    position = [i for i, chosen in enumerate(lay.selected) if chosen]  # prunable leaf l = leaves[position[l]]
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], batch)
    try:
        program = walk.flatten(_loss_of_leaves(loss_fn, treedef), leaves, first, position)
    except Exception as err:  # noqa: BLE001 - a primitive the interpreter cannot replay
        raise ValueError(f"loss_fn: its forward pass could not be followed layer by layer ({type(err).__name__}: "
                         f"{err}); swapjax.prune prunes it network-wide") from err
    return leaves, treedef, position, program, _uses(program, leaves, position, lay.names)


def _uses(program, leaves, position, names) -> dict:
    """{layer name: (tap, slice)} for every layer a plain product solves (a dense product, a one-group
    convolution) in the flattened program."""
    paths = dict(zip(position, names))
    out = {}
    for t, tap in enumerate(program.taps):
        x = program.operand(t).aval
        if jax.eval_shape(lambda x: layer_grads.layer_rows(tap, x), jax.ShapeDtypeStruct(x.shape, x.dtype)) is None:
            continue  # a grouped convolution
        for b, layer in enumerate(find.tap_layers(tap, paths[tap.leaf], np.shape(leaves[tap.leaf]))[0]):
            out[layer.name] = (t, b)
    return out
