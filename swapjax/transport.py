"""The transport plan π between the 1-D samples y = Xw̄ and z = Xw, and the targets ỹ = N·πᵀy.

Scale of ε. The cost is c_ij = (y_i − z_j)² / Var(y): squared distances in
units of the spread of the dense projections y, so ε means the same thing
whatever the units of the gradients (a relative ε of 0.3 blurs each point
over neighbours about √0.3 ≈ 0.55 standard deviations of y away). The
published code put ε on the unscaled cost, where one ε value behaves very
differently for networks whose gradients differ in size. The cost is formed
from differences, not |y|² + |z|² − 2yz, so float32 keeps its precision
(ott's SqEuclidean loses it when values are large and close).

ε = 0 is the exact monotone matching of the two samples (sort both, pair
ranks), without Sinkhorn.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Duals = tuple[jax.Array, jax.Array]


class PlanInfo(NamedTuple):
    """Sinkhorn's report: iterations run, convergence flag, final marginal error ‖π1 − a‖₁;
    degenerate: Var(y) was 0 (N = 1, identical rows), at rounding level or not finite, so no
    plan was computed and the targets are y (see :func:`transport_targets`)."""

    iterations: jax.Array
    converged: jax.Array
    error: jax.Array
    degenerate: jax.Array = False


@jax.jit
def degenerate_spread(y: jax.Array) -> jax.Array:
    """True when y has no usable spread: Var(y) not finite, or std(y) ≤ 64·eps·max|y| (0 for N = 1
    or identical rows; otherwise rounding noise), where the cost (y_i − z_j)²/Var(y) is meaningless."""
    var = jnp.var(y)
    eps = jnp.finfo(y.dtype).eps
    return ~jnp.isfinite(var) | (jnp.sqrt(var) <= 64 * eps * jnp.max(jnp.abs(y)))


def scaled_cost(y: jax.Array, z: jax.Array) -> jax.Array:
    """C_ij = (y_i − z_j)² / Var(y), the cost on which ε is measured."""
    var = jnp.maximum(jnp.var(y), jnp.finfo(y.dtype).tiny)
    return (y[:, None] - z[None, :]) ** 2 / var


@partial(jax.jit, static_argnames=("threshold", "max_iterations"))
def sinkhorn_plan(
    y: jax.Array,
    z: jax.Array,
    epsilon: float,
    threshold: float = 1e-3,
    max_iterations: int = 5000,
    init: Optional[Duals] = None,
) -> tuple[jax.Array, Duals, PlanInfo]:
    """Entropic plan π ∈ R^{N×N} with uniform marginals 1/N between y and z (ott-jax Sinkhorn).

    Minimises Σ_ij π_ij C_ij − ε·H(π) with C = :func:`scaled_cost`. ``init``
    warm-starts from earlier dual potentials (f, g). Returns (π, (f, g), info).
    """
    from ott.geometry import geometry  # ott-jax takes ~3 s to import: only when a plan is needed
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    geom = geometry.Geometry(cost_matrix=scaled_cost(y, z), epsilon=epsilon)
    solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)
    out = solver(linear_problem.LinearProblem(geom), init=init)
    last_error = out.errors[jnp.maximum(jnp.sum(out.errors != -1) - 1, 0)]
    info = PlanInfo(out.n_iters, out.converged, last_error, jnp.array(False))
    return out.matrix, (out.f, out.g), info


def sorted_matching_plan(y: jax.Array, z: jax.Array) -> jax.Array:
    """The ε = 0 plan: π_ij = 1/N where y_i and z_j have the same rank (ties by index)."""
    n = y.shape[0]
    pairs = jnp.zeros((n, n), y.dtype)
    return pairs.at[jnp.argsort(y, stable=True), jnp.argsort(z, stable=True)].set(1.0 / n)


def sorted_matching_targets(y: jax.Array, z: jax.Array) -> jax.Array:
    """ỹ = N·πᵀy for the ε = 0 plan without forming π: ỹ_j = (sorted y)[rank of z_j]."""
    rank_z = jnp.argsort(jnp.argsort(z, stable=True), stable=True)
    return jnp.sort(y)[rank_z]


def barycentric_targets(plan: jax.Array, y: jax.Array) -> jax.Array:
    """ỹ = N·πᵀy: each pruned projection's target is the plan-weighted mean of the dense ones."""
    return y.shape[0] * (plan.T @ y)


def transport_targets(
    y: jax.Array,
    z: jax.Array,
    epsilon: float,
    threshold: float = 1e-3,
    max_iterations: int = 5000,
    init: Optional[Duals] = None,
) -> tuple[jax.Array, Optional[Duals], PlanInfo]:
    """ỹ for the plan between y and z: sorted matching when ε = 0, else Sinkhorn.

    Degenerate y (:func:`degenerate_spread`: N = 1, identical rows, overflow): there is no
    spread to transport, so the targets are y itself (LR's), no Sinkhorn is run, and
    ``info.degenerate`` is True. Returns (ỹ, duals for a warm start or None, info).
    """
    degenerate = degenerate_spread(y)
    flat = PlanInfo(jnp.array(0), jnp.array(True), jnp.array(0.0, y.dtype), degenerate)
    if not isinstance(degenerate, jax.core.Tracer) and bool(degenerate):
        return y, None, flat
    if epsilon == 0:
        return jnp.where(degenerate, y, sorted_matching_targets(y, z)), None, flat
    plan, duals, info = sinkhorn_plan(y, z, epsilon, threshold, max_iterations, init)
    if isinstance(degenerate, jax.core.Tracer):  # inside jit (plan_update="iteration"): select, don't branch
        info = jax.tree_util.tree_map(lambda a, b: jnp.where(degenerate, a, b), flat, info._replace(
            degenerate=jnp.asarray(False)))
        return jnp.where(degenerate, y, barycentric_targets(plan, y)), duals, info
    return barycentric_targets(plan, y), duals, info._replace(degenerate=jnp.array(False))
