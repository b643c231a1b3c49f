"""Pruning methods on a bare problem (X, w̄, k): ``w, info = method.solve(X, w_bar, k)``.

``LR`` (sparse linear regression, CHITA's formulation) and ``SWAP`` (entropic
Wasserstein regression) share one IHT solver; they differ only in the
targets: LR keeps y = Xw̄, SWAP uses ỹ = N·πᵀy with π the entropic plan
between y and z = Xw_start, computed once at the start (METHOD.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from . import iht as iht_lib
from . import transport
from .gradients import check_finite


class SolveInfo(NamedTuple):
    """Diagnostics of one solve (arrays; see field comments)."""

    objective: jax.Array  # f(w) at the returned w, f = ½‖Xw − t‖² + (Nλ/2)‖w − w̄‖²
    objective_trace: jax.Array  # f after each IHT iteration (index 0 = start), NaN-padded
    iht_iterations: jax.Array
    backsolved: jax.Array  # the backsolve was run and lowered f
    support: jax.Array  # (p,) bool, exactly k True
    targets: jax.Array  # t: y for LR, ỹ for SWAP
    plan: transport.PlanInfo  # Sinkhorn report (zeros for LR and ε = 0)
    duals: tuple  # Sinkhorn potentials (f, g), for warm starts


def check_problem(X, w_bar, k) -> int:
    """Validate a bare problem; returns k as an int."""
    if jnp.ndim(X) != 2:
        raise ValueError(f"X: expected a 2-D (N, p) matrix, got shape {jnp.shape(X)}")
    n, p = X.shape
    if n == 0:
        raise ValueError("X: N = 0 rows; at least one per-sample gradient is needed")
    if jnp.shape(w_bar) != (p,):
        raise ValueError(f"w_bar: expected shape ({p},) to match X's columns, got {jnp.shape(w_bar)}")
    if int(k) != k or not 1 <= k <= p:
        raise ValueError(f"k: must be an integer in [1, p] = [1, {p}], got {k}")
    check_finite(X, "X")
    if not bool(jnp.all(jnp.isfinite(w_bar))):
        raise ValueError("w_bar: the dense weights contain NaN or inf")
    return int(k)


def prepare_problem(X, w_bar, k, w_start=None, duals=None):
    """Validate and convert a problem for a method's solve: (X, w̄, w_start, k, duals).

    Arrays become at least float32 (there is no float16 linear algebra on CPU);
    w_start defaults to w̄; duals to zero potentials (a cold Sinkhorn start).
    """
    k = check_problem(X, w_bar, k)
    X = jnp.asarray(X, jnp.promote_types(jnp.result_type(X), jnp.float32))
    w_bar = jnp.asarray(w_bar, X.dtype)
    w_start = w_bar if w_start is None else jnp.asarray(w_start, X.dtype)
    if jnp.shape(w_start) != w_bar.shape:
        raise ValueError(f"w_start: expected shape {w_bar.shape}, got {jnp.shape(w_start)}")
    if duals is None:
        duals = (jnp.zeros(X.shape[0], X.dtype),) * 2
    return X, w_bar, w_start, k, duals


@dataclass(frozen=True)
class LR:
    """Sparse linear regression (CHITA): min ½‖y − Xw‖² + (Nλ/2)‖w − w̄‖², ‖w‖₀ ≤ k.

    lam: λ ≥ 0 (published 0.01). max_iters, tol: IHT stops after max_iters
    steps or when a step lowers f by ≤ tol·f. growth: factor of the geometric
    step growth. backsolve: finish with the exact ridge solve on the support.
    patience: with the backsolve on, also stop IHT once the support has not
    changed for this many steps (None: run to tol; 3 cut a 14-stage MLPNet
    prune from 1300 to about 40 IHT steps, see docs/benchmarks.md).
    active_set: None, or CHITA's active-set phase with an initial active set of
    ⌈active_set·k⌉ weights (see :func:`swapjax.iht.active_set_iht`). With
    masked arrays it saves no time here; it changes which local optimum IHT finds.
    """

    lam: float = 0.01
    max_iters: int = 100
    tol: float = 1e-5
    growth: float = 2.0
    backsolve: bool = True
    patience: Optional[int] = None
    active_set: Optional[float] = None

    def __post_init__(self):
        if not self.lam >= 0:
            raise ValueError(f"lam: λ must be ≥ 0, got {self.lam}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters: must be ≥ 0, got {self.max_iters}")
        if not self.tol >= 0:
            raise ValueError(f"tol: must be ≥ 0, got {self.tol}")
        if not self.growth > 1:
            raise ValueError(f"growth: must be > 1, got {self.growth}")
        if self.patience is not None and not (int(self.patience) == self.patience and self.patience >= 1):
            raise ValueError(f"patience: must be None or an integer ≥ 1, got {self.patience}")
        if self.active_set is not None and not self.active_set >= 1:
            raise ValueError(f"active_set: the active set's size as a multiple of k must be ≥ 1, got {self.active_set}")

    def solve(self, X, w_bar, k, w_start=None, duals=None) -> tuple[jax.Array, SolveInfo]:
        """k-sparse w for the problem (X ∈ R^{N×p}, w̄ ∈ R^p, k).

        w_start: the weights where the stage starts (default w̄); IHT starts
        from H_k(w_start), and SWAP's plan is computed at z = X·w_start.
        duals: Sinkhorn potentials from an earlier solve, for a warm start.
        """
        X, w_bar, w_start, k, duals = prepare_problem(X, w_bar, k, w_start, duals)
        w, info = _solve(self, X, w_bar, jnp.asarray(k), w_start, duals)
        if self.backsolve:
            w, info = _backsolve(self.lam, _bucket(k, X.shape[1]), X, w_bar, w, info)
        return w, info

    # The hooks SWAP overrides: the stage's targets, and (optionally) per-step retargeting.
    def _targets(self, y, z, duals):
        return y, duals, transport.PlanInfo(jnp.array(0), jnp.array(True), jnp.zeros((), y.dtype))

    def _retarget(self, y):
        return None


@dataclass(frozen=True)
class SWAP(LR):
    """Entropic Wasserstein regression: LR with targets ỹ = N·πᵀy (METHOD.md §2).

    epsilon: ε ≥ 0 on the cost (y_i − z_j)²/Var(y) (see :mod:`swapjax.transport`);
    0 = exact sorted matching. sinkhorn_threshold, sinkhorn_max_iters: Sinkhorn's
    stopping rule. plan_update: "stage" computes π once at z = X·w_start (the
    published algorithm, default); "iteration" re-estimates it before every IHT
    step (a study option, which degenerates to a rank matching once z is far from y).
    """

    epsilon: float = 0.3  # from the held-out sweep in docs/epsilon.md
    sinkhorn_threshold: float = 1e-3
    sinkhorn_max_iters: int = 5000
    plan_update: str = "stage"

    def __post_init__(self):
        super().__post_init__()
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon: ε must be ≥ 0, got {self.epsilon}")
        if self.plan_update not in ("stage", "iteration"):
            raise ValueError(f"plan_update: must be 'stage' or 'iteration', got {self.plan_update!r}")

    def _targets(self, y, z, duals):
        t, new_duals, info = transport.transport_targets(
            y, z, self.epsilon, self.sinkhorn_threshold, self.sinkhorn_max_iters, duals
        )
        return t, duals if new_duals is None else new_duals, info

    def _retarget(self, y):
        if self.plan_update == "stage":
            return None

        def retarget(z, aux):
            duals, total = aux
            t, duals, info = self._targets(y, z, duals)
            seen = transport.PlanInfo(
                total.iterations + info.iterations, total.converged & info.converged, info.error
            )
            return t, (duals, seen)

        return retarget


@partial(jax.jit, static_argnums=0)
def _solve(method: LR, X, w_bar, k, w_start, duals):
    y = X @ w_bar
    t, duals, plan = method._targets(y, X @ w_start, duals)
    iht_args = dict(max_iters=method.max_iters, tol=method.tol, growth=method.growth,
                    patience=method.patience if method.backsolve else None,
                    retarget=method._retarget(y), aux=(duals, plan))
    if method.active_set is None:
        result, (duals, plan) = iht_lib.iht(X, t, w_bar, w_start, k, method.lam, **iht_args)
    else:
        result, (duals, plan), _ = iht_lib.active_set_iht(
            X, t, w_bar, w_start, k, method.lam, method.active_set, **iht_args)
    info = SolveInfo(result.objective, result.trace, result.iterations, jnp.array(False),
                     result.support, result.targets, plan, duals)
    return result.w, info


def _bucket(k: int, p: int) -> int:
    """The backsolve's static width: the next power of two ≥ k (few compilations, O(N²k) work)."""
    return min(p, 1 << max(k - 1, 0).bit_length())


@partial(jax.jit, static_argnums=(0, 1))
def _backsolve(lam, width, X, w_bar, w, info: SolveInfo):
    """Replace w by the exact ridge solution on its support when that lowers f (it should)."""
    w_bs = iht_lib.backsolve(X, info.targets, w_bar, info.support, lam, width)
    obj_bs = iht_lib.objective(X, w_bs, info.targets, w_bar, lam)
    better = jnp.isfinite(obj_bs) & (obj_bs <= info.objective)
    info = info._replace(objective=jnp.where(better, obj_bs, info.objective), backsolved=better)
    return jnp.where(better, w_bs, w), info
