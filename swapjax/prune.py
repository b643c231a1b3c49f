"""The public entry: ``swapjax.prune(loss_fn, params, batch, sparsity=..., method=...)``."""
from __future__ import annotations

import math
import time
import warnings
import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

import jax
import jax.numpy as jnp

from . import checks, holding, layers, memory, pytree, schedules
from .contract import Problem, check_result
from .finetune import check_hook, run_hook
from .gradients import DEFAULT_CHUNK, GradientNoise, LossFn, batch_size, resolve_devices
from .constraints import Constraint, TopK, as_constraint, final_sparsity, kept_count
from .methods import SWAP
from .progress import Progress, enabled as progress_enabled, reporter
from .pytree import PyTree, Select


@dataclass(frozen=True)
class StageInfo:
    """What one stage did: the fields every method has (plain Python numbers) and the method's own info.

    ``objective_start``: f at H_k(w_start), the solver's objective with the stage's targets; ``objective``:
    f at the stage's result; ``moved``: kept weights outside the magnitude support H_k(w_start);
    ``held_out_loss``: the mean ``loss_fn`` of the stage's result on the held-out examples (NaN without
    them). ``method_info``: the info the method returned (:class:`swapjax.contract.Info`): its own
    diagnostics, e.g. LR's and SWAP's :class:`swapjax.SolveInfo` (``iht_iterations``, ``lam``,
    ``epsilon``, ``plan``, ``candidates``, ``chosen``), a blocked solve's
    :class:`swapjax.blocks.BlockedInfo` (``blocks``: each block's info)."""

    stage: int
    sparsity: float
    k: int
    objective_start: float
    objective: float
    gradient_seconds: float
    solve_seconds: float
    moved: int = 0
    held_out_loss: float = math.nan
    method_info: Any = None


@dataclass(frozen=True)
class PruneResult:
    """params: pruned tree (same structure and dtypes); masks: bool arrays for prunable
    leaves (True = kept), None elsewhere; info: one StageInfo per stage run.

    one_shot: for a multi-stage prune with selection, the held-out losses of the
    gradual result and of the one-shot solve at the final sparsity, and which
    was kept ({"gradual": ..., "one-shot": ..., "kept": "gradual" | "one-shot"});
    None otherwise. mode: "in-memory" (X formed), "blocked", "matrix-free" or "layer-wise"."""

    params: PyTree
    masks: PyTree
    info: tuple[StageInfo, ...]
    one_shot: Optional[dict] = None
    mode: str = "in-memory"  # how X was held: "in-memory", "blocked", "matrix-free" (or "layer-wise")
    constraint: str = "global top-k"  # the sparsity constraint, e.g. "2:4" or "per-layer ERK"
    layers: tuple = ()  # layer-wise prunes (swapjax.prune_layerwise): a LayerReport per pruned layer
    input_axes: dict = field(default_factory=dict)  # {leaf path: the axes its products contract}: to_nm(axes=...)

    def summary(self) -> dict[str, dict[str, float]]:
        """Kept / total / sparsity per prunable leaf and in total (``"total"`` also names the constraint)."""
        summary = pytree.sparsity_summary(self.masks)
        summary["total"]["constraint"] = self.constraint
        return summary


#: Stages of ``stages="auto"`` (the cubic schedule) where the one-shot comparison runs.
AUTO_STAGES = schedules.AUTO_STAGES


def prune(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    sparsity: Optional[float] = None,
    method=None,
    constraint: Optional[Constraint] = None,
    stages: schedules.Schedule | str = "auto",
    select: Optional[Select] = None,
    key: Optional[jax.Array] = None,
    noise: Optional[GradientNoise] = None,
    anchor: str = "current",
    finetune: Optional[Callable[[PyTree, PyTree, int], PyTree]] = None,
    val_batch: Optional[PyTree] = None,
    holdout: float = 0.2,
    chunk_size: int = DEFAULT_CHUNK,
    mode: str = "auto",
    devices=None,
    progress: Progress = True,
    dense_ends: Union[None, str, Sequence[str]] = None,
) -> PruneResult:
    """Prune ``params`` to ``sparsity`` with ``method`` (default ``SWAP()``).

    Each stage t computes the per-sample gradients X ∈ R^{N×p} of the p prunable
    weights at the current (masked) weights, adds ``noise`` if given, and solves
    the pruning problem (X, w̄, k_t) with ``method``, k_t = round((1 − s_t)·p)
    weights kept. Stages that keep every weight are skipped.

    Which weights are prunable (``select``). By default the weight matrices of
    linear maps: in a Flax tree the ``kernel`` leaves (Dense, DenseGeneral, Conv,
    attention projections, Einsum), in a plain dict the arrays with ndim ≥ 2
    not named as a bias, embedding, token or scale
    (:func:`swapjax.pytree.default_rule`); tokens, position embeddings,
    embedding tables, biases of any rank, norm scales and scalars are never
    pruned, and the progress line names the ndim ≥ 2 leaves left dense.
    ``select(path, leaf) -> bool`` (``path`` like ``"Dense_0/kernel"``)
    only *narrows* that rule: it chooses among the kernels, and returning True
    for any other leaf is a ValueError naming the leaf, so
    ``select=lambda path, leaf: "Dense_1" in path`` prunes ``Dense_1/kernel``
    and cannot silently zero ``Dense_1/bias``. To prune such leaves as well,
    say so with ``select=swapjax.allow_vectors(fn)``; ``fn`` then decides
    alone, for leaves of every rank. ``select`` must return a Python or NumPy
    bool.

    Choosing λ and ε. A method with "auto" values (the defaults of ``LR()``
    and ``SWAP()``) chooses λ and ε at every stage by the real loss of the
    pruned network, the mean ``loss_fn`` over held-out examples: ``val_batch``
    if given, else a ``holdout`` fraction of ``batch`` (every 1/holdout-th
    example, evenly spread), which is then not used in X. A multi-stage prune
    without ``finetune`` also solves one-shot at the final sparsity and keeps
    whichever has the lower held-out loss (``result.one_shot``). Methods
    without "auto" values use the whole batch and no selection.

    The schedule (``stages="auto"``, the default). Where that comparison runs
    (a method that selects on held-out examples, no ``finetune``), ``"auto"``
    prunes gradually in ``AUTO_STAGES`` = 8 stages of the cubic schedule, the
    7 before the last choosing λ alone (``method.without_search()``), the last
    the whole path, and returns the better of the gradual and the one-shot
    network by held-out loss: never worse than one-shot on those examples, at
    a median 4.5× (an MLP) to 6.2× (a ViT) the one-shot call's time. Where X
    is not held in memory (``mode`` "blocked" or "matrix-free", chosen or
    given) every stage recomputes the gradients block by block or product by
    product, so ``"auto"`` stays one-shot there and says so (``stages=8``
    asks for the gradual prune). With ``finetune``, it is 8 stages, fine-tuned
    between them. For any other method (Magnitude, WoodFisher, a fixed λ) it
    is one stage. ``stages=1`` is always the one-shot prune of the papers.
    Each stage's progress line gives its time.

    Every argument is checked (types included; a 0-d array is the number it
    holds) before any gradient is computed; a wrong one is a ValueError naming
    it (a method class instead of an instance is a TypeError). That includes
    what the layout decides (``constraint.check``): a ``LayerBudgets``
    mapping's paths and its mean against ``sparsity``, ``max_sparsity``, N:M
    axes and ragged leaves, a layer left with 0 weights, a constraint that
    would prune nothing; and the signatures of ``finetune`` and a ``noise``
    function. NaN or inf in ``params`` names the leaf, a NaN or inf loss value
    names the examples. Every method's result is checked too
    (``swapjax.contract.check_result``: a finite w of shape (p,), zero off
    a support that keeps exactly the constraint's counts), else a ValueError
    names the method.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example, without
            a batch axis. A model that needs one (convolutions, BatchNorm):
            ``model.apply(variables, example["x"][None])[0]``.
        params: any pytree of arrays: Flax linen ``variables["params"]``, an
            NNX ``nnx.split`` state, a dict. Never modified.
        batch: pytree of arrays with a common leading axis N, the examples of
            the Fisher (the rows of X).
        sparsity: the final fraction of prunable weights set to zero, in [0, 1)
            (default 0.9; with ``NM(n, m)``, 1 − n/m, and any other value is a ValueError;
            with a ``LayerBudgets`` mapping {path: s_l}, its size-weighted mean
            Σ_l s_l·p_l/p, and a value that disagrees is a ValueError).
        method (object): ``SWAP()`` (default), ``LR()``, ``Magnitude()``,
            ``WoodFisher()``, ``Blocked(method, width, budget)``, or an instance
            of a subclass of ``swapjax.Method`` (:mod:`swapjax.contract`): each
            stage fills a ``swapjax.Problem`` (X, w̄, the constraint's Groups,
            w_start, duals, the held-out score where the method selects) and
            calls ``method.solve_problem``. A method that needs each layer's
            Gram (SparseGPT, Wanda) is a ValueError: use ``prune_layerwise``.
        constraint: which supports are allowed (:mod:`swapjax.constraints`):
            ``TopK()`` (default: the k largest over all prunable weights),
            ``LayerBudgets("uniform" | "erk" | "owl" | {path: sparsity}, max_sparsity=...)``
            (a count per leaf) or ``NM(n, m)`` (n of every m weights along each
            kernel's reduction axis). Each stage's constraint is resolved to
            ``Groups`` (``problem.groups``); every method keeps exactly its counts.
        stages: ``"auto"`` (default; see "The schedule" above), an int T (the
            cubic schedule with T stages; 1 = the one-shot prune of the papers)
            or a sequence of sparsities s_1 ≤ … ≤ s_T ending at ``sparsity``;
            at most ``swapjax.checks.MAX_STAGES`` = 1000 stages. A stage that
            keeps every weight (the cubic schedule's first, s_1 = 0) is skipped.
        select: None (the kernels, see above) or ``select(path, leaf) ->
            bool`` narrowing that rule; wrap it in ``swapjax.allow_vectors`` to
            allow any leaf.
        dense_ends: None (default: every layer pruned), ``"first"``, ``"last"``
            or ``("first", "last")``: keep the first and/or the last layer of the
            forward pass dense (the first/last of :func:`swapjax.find_layers`,
            the layers found by use, in the order the forward pass runs them;
            before ``select``: a layer ``select`` already leaves out stays so).
            Its leaf is then left out of the prunable weights as ``select``
            would leave it out: p, k = round((1 − s)·p), the constraint's
            counts and ``result.summary()["total"]`` are over the other layers,
            its mask is None, and the progress line names it with the reason.
            Checked before any gradient (ValueError): an unknown value, an end
            layer that is one slice of a stacked leaf whose other slices would
            be pruned (leave the whole leaf out with ``select``), every prunable
            layer kept dense, a loss whose forward order could not be traced.
        key: a ``jax.random.key``; needed with ``noise``.
        noise: a ``swapjax.GradientNoise`` added to X at every stage, or a
            function ``noise(X, key) -> X``: called once before any gradient
            on a (min(N, 4), p) matrix of standard normal entries, and its
            output checked (shape, finite) there and at every stage.
        anchor: w̄ of each stage's problem (one stage: the dense weights either
            way). ``"current"`` resets w̄ to the stage's starting weights w_t,
            where X is measured, so the quadratic model is centred where its
            curvature is taken (CHITA++); ``"dense"`` keeps w̄ = the dense
            weights at every stage (the published SWAP setting).
        finetune: ``finetune(params, masks, stage) -> params``, run after each
            stage but the last that prunes (``swapjax.make_finetune_hook``
            builds one); its signature is checked before any gradient, its
            result (structure, shapes, NaN) after each call, then masked again.
            A schedule where it would never run (``stages=1``; ``stages=2``,
            whose first stage keeps every weight) is a UserWarning.
        val_batch: held-out examples for the selection of λ and ε, like
            ``batch`` (any N). Pass it when you have more examples than the
            N of X: without it a fifth of ``batch`` leaves X for the selection.
        holdout: the fraction of ``batch`` held out when ``val_batch`` is
            None and the method selects, in [0, 1).
        chunk_size: examples per vectorised chunk of per-sample gradients;
            working memory beyond X is O(chunk_size·p).
        mode: how X ∈ R^{N×p} is held. ``"in-memory"`` forms it (every
            method); ``"matrix-free"`` never does: the solver works with the
            products Xv and Xᵀu of the linearised network
            (:mod:`swapjax.operators`), memory O(p + N·activations) at the
            cost of a forward pass per product, with backsolves by conjugate
            gradients (LR, SWAP, Magnitude; no ``noise``). ``"blocked"`` (or
            ``method=swapjax.Blocked(method, width, budget)``; ``mode=Blocked(width,
            budget)`` still wraps ``method``) forms X one block of columns at
            a time and solves each block's problem with the method (the
            block-diagonal Fisher of CHITA and WoodFisher; the constraint's
            counts shared between blocks by a magnitude or Fisher ranking,
            :mod:`swapjax.blocks`): memory N·width, one gradient pass per block
            (every method; no ``noise`` or ``devices``). ``"auto"``
            (default) estimates the peaks before computing
            (:func:`swapjax.memory.estimate`) against the memory at hand (the
            least of the free memory, the address-space limit and the
            cgroup's limit) and keeps within 75 % of it: in-memory where X
            fits, else blocks (the widest within half, else 75 %) unless
            matrix-free needs less than half where blocks would not, saying
            so when it is not in-memory; where none fits, a ValueError names
            the figures. Running out of memory anyway is a MemoryError naming
            the mode and the ways out.
        devices (str | int | list | None): None (one device), ``"all"``, an int d or a sequence of
            ``jax.Device``: the examples (X's rows) are split into d equal
            blocks, one per device (``swapjax.per_sample_grads``); d must
            divide N (after the held-out split). In-memory mode only.
        progress: True: a line per stage (and per block), and per chunk of
            long gradient computations, on stderr; False: silent (also a hook
            from ``make_finetune_hook``) but for the line saying that ``"auto"``
            did not hold X in memory; a callable ``report(message)``: gets
            each stage's and block's message instead (:mod:`swapjax.progress`;
            the gradients' chunk lines stay on stderr).

    Returns:
        A ``PruneResult``: ``params`` (same structure and dtypes, exactly k of
        the p prunable weights non-zero), ``masks`` (bool arrays for the
        prunable leaves, True = kept, None elsewhere), ``info`` (one
        ``StageInfo`` per stage run: the common fields and the method's own
        info, ``method_info``) and ``one_shot``; ``result.summary()``
        gives the sparsity per layer.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(8, 4)).astype("float32"), "b": np.zeros(4, "float32")}
        >>> batch = {"x": rng.normal(size=(40, 8)).astype("float32"),
        ...          "y": rng.normal(size=(40, 4)).astype("float32")}
        >>> def loss_fn(params, example):  # ONE example: x (8,), y (4,)
        ...     return jnp.sum((example["x"] @ params["w"] + params["b"] - example["y"]) ** 2)
        >>> result = swapjax.prune(loss_fn, params, batch, sparsity=0.75, progress=False)
        >>> result.summary()["total"]  # k = round(0.25 · 32) kernel weights kept
        {'kept': 8, 'total': 32, 'sparsity': 0.75, 'constraint': 'global top-k'}
        >>> result.masks["b"] is None  # a bias (ndim 1) is not prunable by default
        True

        A ``select`` that picks a bias is an error unless wrapped in ``allow_vectors``:

        >>> swapjax.prune(loss_fn, params, batch, select=lambda path, leaf: True)
        Traceback (most recent call last):
        ValueError: select: chose b (4,), with ndim < 2 (biases, norm scales or scalars); ...
        >>> both = swapjax.allow_vectors(lambda path, leaf: True)
        >>> swapjax.prune(loss_fn, params, batch, sparsity=0.75, select=both,
        ...               method=swapjax.Magnitude(), progress=False).summary()["total"]
        {'kept': 9, 'total': 36, 'sparsity': 0.75, 'constraint': 'global top-k'}
    """
    method = SWAP() if method is None else method
    _check_method(method)
    constraint = as_constraint(constraint)
    sparsity = final_sparsity(sparsity, constraint)  # None for a LayerBudgets mapping: its mean, from the layout
    stages = checks.stages(stages)
    checks.choice("anchor", anchor, ("dense", "current"))
    checks.noise_and_key(noise, key)
    check_hook(finetune, params)
    holdout = checks.real("holdout (the held-out fraction of the batch)", holdout, 0.0, 1.0, hi_open=True)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    report = reporter(progress)
    blocked = holding.blocked_spec(mode, method)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    if stages != "auto" and sparsity is not None:
        schedules.resolve(stages, sparsity)  # the schedule's errors before any trace
    batch, val_batch = _checked_batches(batch, val_batch, holdout if method.selects else 0.0)
    devices = resolve_devices(devices, batch_size(batch))  # ValueError naming N and d before any gradient
    ends = dense_ends_option(dense_ends)
    lay = layers.prunable(loss_fn, params, batch, select)  # select, loss_fn's output, the layers: traces only
    lay, kept_dense = without_ends(ends, loss_fn, params, batch, select, lay)
    loss_fn = layers.staged(loss_fn, params, batch)  # its program, run from its jaxpr under every transform
    w_dense = pytree.flatten(params, lay)
    sparsity = constraint.check(lay, sparsity, w_dense)  # paths, caps, ragged leaves, empty layers: from the layout
    levels = None if stages == "auto" else schedules.resolve(stages, sparsity)
    n, p = batch_size(batch), lay.size
    if noise is not None and not isinstance(noise, GradientNoise):  # a user's: checked on a small matrix first
        _check_noise(noise, jax.random.fold_in(key, 0), min(n, 4), p, w_dense.dtype)
    estimate = memory.estimate(loss_fn, params, batch, lay, chunk_size, devices=devices,
                               block_width=None if blocked is None else blocked.width)
    hold = holding.choose(mode, method, noise, estimate, devices,  # the mode chosen: said even when silent
                          report if progress_enabled(report) else reporter(True))
    compared = method.selects and val_batch is not None and finetune is None  # gradual against one-shot
    levels, stage_method, auto_note = _schedule(levels, sparsity, method, compared, finetune, hold.mode)
    idle = schedules.idle_hook(levels, p) if finetune is not None else ""
    if idle:  # a hook that no stage before the last would call
        warnings.warn(idle, UserWarning, stacklevel=2)
    report(f"{type(method).__name__}: N={n} examples"
           + (f" (+{batch_size(val_batch)} held out)" if val_batch is not None else "")
           + f", p={p} prunable weights, {len(levels)} stage(s), X {hold.describe(p)}")
    notes = _constraint_notes(constraint, lay)
    if kept_dense:
        notes.append("kept dense (dense_ends): " + ", ".join(f"{name} ({why})" for name, why in kept_dense.items()))
    for line in [auto_note] + notes:
        if line:
            report(line)
    run = _Run(loss_fn, batch, val_batch, lay, chunk_size, hold, constraint, noise, key, anchor, report,
               progress_enabled(report), len(levels))
    w, mask, duals, infos, current = w_dense, jnp.ones(p, bool), None, [], params
    for t, s in enumerate(levels, start=1):
        if kept_count(s, p) == p:
            continue
        w, solve_info, stage = run.stage(t, s, current, w, w_dense, duals, stage_method.get(t, method))
        duals, mask = solve_info.duals, solve_info.support
        infos.append(stage)
        current = pytree.unflatten(w, current, lay)
        if finetune is not None and t < len(levels):
            masks = pytree.mask_tree(mask, lay)
            current = pytree.apply_masks(run_hook(finetune, current, masks, t, run.enabled), masks)
            w = pytree.flatten(current, lay)
    one_shot = None
    if compared and len(infos) > 1:
        report("one-shot at the final sparsity, for comparison on held-out loss")
        w1, info1, stage1 = run.stage(len(levels), sparsity, params, w_dense, w_dense, None, method)
        gradual_loss = infos[-1].held_out_loss
        kept = "one-shot" if stage1.held_out_loss < gradual_loss else "gradual"
        one_shot = {"gradual": gradual_loss, "one-shot": stage1.held_out_loss, "kept": kept}
        report(f"held-out loss: gradual {gradual_loss:.4g}, one-shot {stage1.held_out_loss:.4g}; keeping {kept}")
        if kept == "one-shot":
            mask, current = info1.support, pytree.unflatten(w1, params, lay)
    return PruneResult(_own_dtypes(current, params), pytree.mask_tree(mask, lay), tuple(infos), one_shot, hold.mode,
                       constraint.label, input_axes=lay.input_axes)


_ENDS = ("first", "last")


def dense_ends_option(value) -> tuple:
    """``dense_ends`` as a tuple of ``"first"``/``"last"`` (empty for None); ValueError for any other value."""
    if value is None:
        return ()
    values = (value,) if isinstance(value, str) else value
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) and v in _ENDS for v in values):
        raise ValueError(f"dense_ends: expected None, 'first', 'last' or ('first', 'last'), got {value!r}")
    return tuple(end for end in _ENDS if end in values)


def without_ends(ends: tuple, loss_fn, params, batch, select, lay):
    """(the layout ``lay`` without the leaves of the first/last layer named in ``ends``, {leaf: why kept dense}).

    The ends are those of :func:`swapjax.find_layers` (forward order, before ``select``); an end whose leaf
    ``select`` left out needs nothing. ValueError (before any gradient) where the order is unknown (the loss
    was not traced: the name rule), where the end is part of a leaf whose other layers would be pruned, or
    where no prunable layer is left."""
    if not ends:
        return lay, {}
    found = layers.find_layers(loss_fn, params, batch)
    if not found.layers or all(layer.order < 0 for layer in found.layers):
        raise ValueError("dense_ends: the layers' forward order is unknown (loss_fn could not be traced, the layers "
                         "come from the name rule); leave the first or last layer out with select=swapjax.exclude(...)")
    ends_of = {"first": found.layers[0], "last": found.layers[-1]}
    chosen = {ends_of[end].name for end in ends}
    named = {}
    for end in ends:
        layer = ends_of[end]
        if layer.path not in lay.names:
            continue  # left out by select already
        others = [other.name for other in lay.layers if other.path == layer.path and other.name not in chosen]
        if others:
            raise ValueError(f"dense_ends: the {end} layer {layer.name} is one of several layers of the leaf "
                             f"{layer.path} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''} would be "
                             f"pruned); keeping part of a leaf dense is not supported: leave the whole leaf out with "
                             f"select=swapjax.exclude({layer.path!r})")
        named.setdefault(layer.path, []).append(end)
    why = {path: f"the {' and '.join(names)} layer" for path, names in named.items()}
    keep = [name for name in lay.names if name not in why]
    if not keep:
        raise ValueError(f"dense_ends: {ends!r} keeps every prunable layer dense ({', '.join(lay.names)}): nothing "
                         "left to prune")
    if not why:
        return lay, {}
    kept = frozenset(keep)
    narrowed = lambda path, leaf: path in kept  # noqa: E731
    if isinstance(select, pytree._WithVectors):
        narrowed = pytree.allow_vectors(narrowed)
    reduced = pytree.layout(params, narrowed, found)
    return dataclasses.replace(reduced, left_out=lay.left_out), why


def _check_method(method) -> None:
    """A method instance the network-wide driver can run: ValueError for one that needs each layer's Gram."""
    checks.method(method)
    if method.needs == "H":
        raise ValueError(f"method: {type(method).__name__} needs each layer's Gram H (a layer method): prune layer "
                         f"by layer with swapjax.prune_layerwise(..., method={type(method).__name__}())")


def _checked_batches(batch, val_batch, holdout: float):
    """(fit examples, held-out examples or None), each checked finite (ValueError naming the examples)."""
    batch_size(batch)
    checks.finite_leaves("batch", batch, hint="; the examples must be finite: fix or drop them", examples=True)
    if val_batch is not None:
        checks.same_structure("val_batch", val_batch, batch, "batch")
        checks.finite_leaves("val_batch", val_batch, hint="; the held-out examples must be finite", examples=True)
    return _split_held_out(batch, val_batch, holdout)


def _schedule(levels, sparsity, method, compared: bool, finetune, mode: str):
    """(the stages' sparsities, {stage: its method where not ``method``}, a note on "auto" or ""): ``levels``
    as given, or (None) "auto": gradual where one-shot is compared with it on held-out loss (the stages before
    the last with the method's cheaper variant), or fine-tuned; one-shot otherwise (:func:`swapjax.schedules.auto`)."""
    if levels is not None:
        return levels, {}, ""
    count, note = schedules.auto(compared, finetune is not None, mode)
    levels = schedules.resolve(count, sparsity)
    stage_method = dict.fromkeys(range(1, len(levels)), method.without_search()) if compared and count > 1 else {}
    return levels, stage_method, note


def _constraint_notes(constraint, lay) -> list[str]:
    """The progress lines on what is pruned: the prunable leaves, the constraint, the leaves it leaves dense."""
    lines = [f"pruning {lay.describe()}" + ("" if constraint.label == TopK.label else f" under {constraint.label}")]
    ragged = constraint.ragged_leaves(lay)
    if ragged:
        lines.append(f"{constraint.label}: left dense, the constraint cannot group them: " + ", ".join(ragged))
    return lines


class _Run(NamedTuple):
    """What every stage of one prune shares (:meth:`stage` runs one)."""

    loss_fn: Callable
    batch: PyTree
    val_batch: Optional[PyTree]
    lay: pytree.Layout
    chunk_size: int
    hold: holding.Holding
    constraint: Constraint
    noise: Any
    key: Any
    anchor: str
    report: Callable[[str], None]
    enabled: bool
    count: int

    def score(self, current):
        """The held-out loss of the pruned network at weights w (per example), or None without held-out
        examples; a progress line per candidate once a stage's solve passes 5 s."""
        if self.val_batch is None:
            return None
        start, count = time.perf_counter(), [0]

        def score(w):
            losses = np.asarray(_example_losses(self.loss_fn, self.lay, self.chunk_size, current, w, self.val_batch))
            count[0] += 1
            if time.perf_counter() - start > 5.0:
                self.report(f"  candidate {count[0]}: held-out loss {losses.mean():.4g} "
                            f"({time.perf_counter() - start:.1f} s)")
            return losses

        return score

    def stage(self, t, s, current, w, w_dense, duals, method):
        """One stage: X at ``current``, the constraint at sparsity s, ``method`` on the problem, the result
        checked: (w, info, StageInfo)."""
        t0 = time.perf_counter()
        X = self.hold.gradients(self.loss_fn, current, self.batch, self.lay, self.chunk_size, self.enabled, self.noise,
                                None if self.noise is None else jax.random.fold_in(self.key, t), report=self.report)
        if self.noise is not None and not isinstance(self.noise, GradientNoise):
            checks.array_output("noise", X.matrix, (batch_size(self.batch), self.lay.size),
                                f"{checks.callable_name(self.noise)}(X, key) at stage {t}")
        t1 = time.perf_counter()
        groups = self.constraint.resolve(self.lay, s, w, X.col_sq if self.constraint.needs_fisher else None)
        score = self.score(current) if method.selects else None
        problem = Problem(w_dense if self.anchor == "dense" else w, groups, X=X, w_start=w, duals=duals, score=score,
                          segments=self.lay.offsets if method.needs_segments else None)
        w_new, info = self.hold.solve(method, problem)
        w_new = check_result(method, w_new, info, groups, self.lay.size, w.dtype)  # feasible, zeros off the support
        w_new.block_until_ready()
        t2 = time.perf_counter()
        held_out = info.held_out_loss
        if math.isnan(held_out) and self.val_batch is not None:
            held_out = float(np.mean((score or self.score(current))(w_new)))
        inside = info.gradient_seconds  # the blocked mode's gradient passes run inside the solve
        stage = StageInfo(t, s, int(groups.k), float(info.objective_trace[0]), float(info.objective),
                          t1 - t0 + inside, t2 - t1 - inside, int(jnp.sum(info.support & ~groups.project(w))),
                          held_out, info)
        for message in info.warnings(batch_size(self.batch)):
            warnings.warn(f"stage {t}: {message}", RuntimeWarning, stacklevel=3)
        own = info.describe()
        self.report(f"stage {t}/{self.count} sparsity {s:.4f} k={stage.k}: f {stage.objective_start:.4g} -> "
                    f"{stage.objective:.4g}, {stage.moved} kept weights off |w| top-k" + (f", {own}" if own else "")
                    + (f", held-out loss {held_out:.4g}" if math.isfinite(held_out) else "")
                    + f", {stage.gradient_seconds:.2f}s grads + {stage.solve_seconds:.2f}s solve"
                    + f" ({time.perf_counter() - t0:.2f}s in all)")
        return w_new, info, stage


def _check_noise(noise, key, rows: int, p: int, dtype) -> None:
    """A user's noise callable, checked before any gradient: callable as noise(X, key), and on a (rows, p)
    matrix of standard normal entries returning a finite matrix of that shape; ValueError naming it."""
    name = checks.callable_name(noise)
    checks.signature_accepts("noise", noise, (None, key), {}, "noise(X, key) -> X")
    probe = jax.random.normal(jax.random.fold_in(key, 1), (rows, p), dtype)
    checks.array_output("noise", noise(probe, key), (rows, p),
                        f"{name}(X, key) on a ({rows}, {p}) test matrix of standard normal entries")


def _own_dtypes(result: PyTree, params: PyTree) -> PyTree:
    """The result's leaves in the dtypes of ``params`` (NumPy float64 leaves stay float64 without x64)."""
    def cast(new, old):
        dtype = getattr(old, "dtype", None)
        if dtype is None or getattr(new, "dtype", None) == dtype:
            return new
        if isinstance(old, np.ndarray):
            return np.asarray(new).astype(dtype)
        return new
    return jax.tree_util.tree_map(cast, result, params)


def _split_held_out(batch: PyTree, val_batch: Optional[PyTree], holdout: float):
    """(fit examples, held-out examples or None): ``val_batch`` as given, or every 1/holdout-th example."""
    n = batch_size(batch)
    if val_batch is not None:
        batch_size(val_batch)
        checks.same_structure("val_batch", val_batch, batch, "batch")
        return batch, val_batch
    n_val = int(round(holdout * n))
    if n_val == 0:
        return batch, None
    if n - n_val < 1:
        raise ValueError(f"holdout: holding out {n_val} of N = {n} examples leaves none to fit")
    held = np.zeros(n, bool)
    held[((np.arange(n_val) + 0.5) * n / n_val).astype(int)] = True
    take = lambda idx: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[idx], batch)  # noqa: E731
    return take(np.flatnonzero(~held)), take(np.flatnonzero(held))


@partial(jax.jit, static_argnames=("loss_fn", "lay", "chunk_size"))
def _example_losses(loss_fn, lay, chunk_size, params, w, batch):
    """loss_fn of each example of ``batch`` at the weights w (forward passes only)."""
    tree = pytree.unflatten(w, params, lay)
    return jax.lax.map(lambda ex: loss_fn(tree, ex), batch, batch_size=chunk_size)
