"""The public entry: ``swapjax.prune(loss_fn, params, batch, sparsity=..., method=...)``."""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from . import pytree, schedules
from .gradients import GradientNoise, LossFn, batch_size, check_finite, per_sample_grads
from .methods import SWAP
from .pytree import PyTree, Select


@dataclass(frozen=True)
class StageInfo:
    """What one stage did (plain Python numbers)."""

    stage: int
    sparsity: float
    k: int
    objective_start: float  # f at H_k(w_start), the solver's objective with the stage's targets
    objective: float  # f at the stage's result
    iht_iterations: int
    backsolved: bool
    sinkhorn_iterations: int  # 0 for LR and ε = 0
    sinkhorn_converged: bool
    sinkhorn_error: float
    gradient_seconds: float
    solve_seconds: float


@dataclass(frozen=True)
class PruneResult:
    """params: pruned tree (same structure and dtypes); masks: bool arrays for prunable
    leaves (True = kept), None elsewhere; info: one StageInfo per stage run."""

    params: PyTree
    masks: PyTree
    info: tuple[StageInfo, ...]

    def summary(self) -> dict[str, dict[str, float]]:
        """Kept / total / sparsity per prunable leaf and in total."""
        return pytree.sparsity_summary(self.masks)


def kept_count(sparsity: float, p: int) -> int:
    """k = round((1 − sparsity)·p), the number of weights kept."""
    return int(round((1 - sparsity) * p))


def prune(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    sparsity: float = 0.9,
    method=None,
    stages: schedules.Schedule = 1,
    select: Optional[Select] = None,
    key: Optional[jax.Array] = None,
    noise: Optional[GradientNoise] = None,
    anchor: str = "dense",
    finetune: Optional[Callable[[PyTree, PyTree, int], PyTree]] = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> PruneResult:
    """Prune ``params`` to ``sparsity`` with ``method`` (default ``SWAP()``).

    loss_fn(params, example) -> scalar, for ONE example; batch: pytree of
    arrays with leading axis N (the examples of the Fisher). stages: an int T
    (cubic schedule, T = 1 one-shot) or a sequence of sparsities ending at
    ``sparsity``. Each stage recomputes X at the current masked weights, adds
    ``noise`` (needs ``key``), and solves for k_t = round((1 − s_t)·p); stages
    that keep every weight are skipped. anchor: "dense" keeps w̄ = the dense
    weights (SWAP); "current" resets w̄ to the stage's starting weights
    (CHITA++). finetune(params, masks, stage) -> params runs between stages.
    """
    method = SWAP() if method is None else method
    if not hasattr(method, "solve"):
        raise ValueError(f"method: expected an object with .solve(X, w_bar, k), got {method!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: must be in [0, 1), got {sparsity}")
    if anchor not in ("dense", "current"):
        raise ValueError(f"anchor: must be 'dense' or 'current', got {anchor!r}")
    if noise is not None and key is None:
        raise ValueError("key: a jax.random key is needed when noise is given")
    levels = schedules.resolve(stages, sparsity)
    lay = pytree.layout(params, select)
    p = lay.size
    if kept_count(sparsity, p) < 1:
        raise ValueError(
            f"sparsity: {sparsity} keeps round((1 - sparsity) * p) = 0 of p = {p} prunable weights; "
            f"use sparsity ≤ {1 - 1 / p:.6g}"
        )
    n = batch_size(batch)
    log = (lambda msg: print(f"[swapjax] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    log(f"{type(method).__name__}: N={n} examples, p={p} prunable weights, {len(levels)} stage(s)")

    w_dense = pytree.flatten(params, lay)
    w = w_dense
    mask = jnp.ones(p, bool)
    duals = None
    infos = []
    current = params
    for t, s in enumerate(levels, start=1):
        k = kept_count(s, p)
        if k == p:
            continue
        t0 = time.perf_counter()
        X = per_sample_grads(loss_fn, current, batch, select, chunk_size)
        check_finite(X)
        if noise is not None:
            X = noise(X, jax.random.fold_in(key, t))
        t1 = time.perf_counter()
        w_bar = w_dense if anchor == "dense" else w
        layers = {"segments": lay.offsets} if getattr(method, "needs_segments", False) else {}
        w, info = method.solve(X, w_bar, k, w_start=w, duals=duals, **layers)
        w.block_until_ready()
        t2 = time.perf_counter()
        duals, mask = info.duals, info.support
        stage = StageInfo(
            stage=t, sparsity=s, k=k,
            objective_start=float(info.objective_trace[0]), objective=float(info.objective),
            iht_iterations=int(info.iht_iterations), backsolved=bool(info.backsolved),
            sinkhorn_iterations=int(info.plan.iterations), sinkhorn_converged=bool(info.plan.converged),
            sinkhorn_error=float(info.plan.error), gradient_seconds=t1 - t0, solve_seconds=t2 - t1,
        )
        infos.append(stage)
        if not stage.sinkhorn_converged:
            warnings.warn(
                f"stage {t}: Sinkhorn did not converge in {stage.sinkhorn_iterations} iterations "
                f"(marginal error {stage.sinkhorn_error:.2e}); raise sinkhorn_max_iters or epsilon",
                RuntimeWarning, stacklevel=2,
            )
        log(
            f"stage {t}/{len(levels)} sparsity {s:.4f} k={k}: f {stage.objective_start:.4g} -> "
            f"{stage.objective:.4g}, {stage.iht_iterations} IHT its"
            + (f", Sinkhorn {stage.sinkhorn_iterations} its" if stage.sinkhorn_iterations else "")
            + f", {stage.gradient_seconds:.2f}s grads + {stage.solve_seconds:.2f}s solve"
        )
        current = pytree.unflatten(w, current, lay)
        if finetune is not None and t < len(levels):
            masks = pytree.mask_tree(mask, lay)
            current = pytree.apply_masks(finetune(current, masks, t), masks)
            w = pytree.flatten(current, lay)
    return PruneResult(current, pytree.mask_tree(mask, lay), tuple(infos))
