"""Tests of swapjax.transport: the entropic plan π, the ε = 0 sorted matching, the targets ỹ = N·πᵀy.

References are independent of swapjax: float64 NumPy (a log-domain Sinkhorn,
the cost, the identity (N/2)·Σ_ij π_ij (y_i − z_j)² = ½‖z − N·πᵀy‖² + const) and ott's exact univariate solver.
Shapes are kept to N = 50 (plus eager hypothesis cases) so the jitted Sinkhorn
compiles only a few times.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapjax import transport as T

N = 50
EPS = 0.1  # relative ε used throughout (on the cost scaled by Var(y))
THRESHOLD = 1e-3  # sinkhorn_plan's default stopping threshold on ‖π1 − a‖₁


def _sample(seed, n=N, noise=0.3):
    """y ~ N(0, 1), z = y + noise (the shape of a pruning stage: z close to y), float64."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    z = y + noise * rng.normal(size=n)
    return y, z


def _np_scaled_cost(y, z):
    y = np.asarray(y, np.float64)
    z = np.asarray(z, np.float64)
    return (y[:, None] - z[None, :]) ** 2 / np.var(y)


def _lse(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _np_sinkhorn(C, eps, tol=1e-13, max_iter=100_000):
    """Float64 log-domain Sinkhorn with uniform marginals; returns π = exp((f ⊕ g − C)/ε)."""
    n, m = C.shape
    log_a, log_b = -np.log(n), -np.log(m)
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(max_iter):
        f = eps * log_a - eps * _lse((g[None, :] - C) / eps, axis=1)
        g = eps * log_b - eps * _lse((f[:, None] - C) / eps, axis=0)
        P = np.exp((f[:, None] + g[None, :] - C) / eps)
        if np.abs(P.sum(1) - 1.0 / n).sum() < tol:
            return P
    raise AssertionError("reference Sinkhorn did not converge")


def _marginal_errors(P):
    """(‖π1 − 1/N‖₁, ‖πᵀ1 − 1/N‖₁) in float64."""
    P = np.asarray(P, np.float64)
    n, m = P.shape
    return np.abs(P.sum(1) - 1.0 / n).sum(), np.abs(P.sum(0) - 1.0 / m).sum()


# ---------------------------------------------------------------------------
# sinkhorn_plan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_marginals_within_threshold(seed):
    y, z = _sample(seed)
    plan, _, info = T.sinkhorn_plan(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), EPS)
    assert plan.shape == (N, N)
    assert bool(info.converged)
    assert int(info.iterations) > 0
    # ott reports ‖π1 − a‖₁ (one marginal, the other is matched exactly by the last
    # update); both must be below the threshold. Slack: float32 rounding of N² entries
    # summed to marginals of size 1/N (≈ N·eps32·(1/N)·√N ≪ 1e-5).
    row_err, col_err = _marginal_errors(plan)
    assert row_err <= THRESHOLD + 1e-5, row_err
    assert col_err <= THRESHOLD + 1e-5, col_err
    # the reported error is a real marginal error, below the threshold
    assert float(info.error) <= THRESHOLD
    assert float(info.error) == pytest.approx(max(row_err, col_err), abs=1e-5)
    assert np.all(np.asarray(plan) >= 0)
    assert float(np.asarray(plan, np.float64).sum()) == pytest.approx(1.0, abs=THRESHOLD + 1e-5)


def test_sinkhorn_large_epsilon_is_uniform():
    y, z = _sample(3)
    eps = 1e3
    plan, _, info = T.sinkhorn_plan(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), eps)
    assert bool(info.converged)
    # With K = exp(−C/ε) ∈ [e^{−δ}, 1], δ = max C / ε, the scalings u, v of a plan with
    # exact uniform marginals each vary by at most e^{δ}, so N²π ∈ [e^{−3δ}, e^{3δ}]·c.
    delta = _np_scaled_cost(y, z).max() / eps
    bound = np.expm1(3 * delta) + N * float(info.error) + 1e-5
    dev = np.abs(N * N * np.asarray(plan, np.float64) - 1.0).max()
    assert dev <= bound, (dev, bound)
    assert bound < 0.2  # the test is meaningful: the plan really is close to 11ᵀ/N²
    # ... and the targets collapse to the mean of y
    t = np.asarray(T.barycentric_targets(plan, jnp.asarray(y, jnp.float32)), np.float64)
    np.testing.assert_allclose(t, np.full(N, y.mean()), atol=bound * np.abs(y).max() + 1e-5)


def test_scaled_cost_matches_numpy():
    y, z = _sample(4)
    y, z = 3.0 * y + 7.0, 3.0 * z + 7.0
    C = T.scaled_cost(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(C, np.float64), _np_scaled_cost(y, z), rtol=2e-5, atol=1e-6)
    with jax.enable_x64(True):
        C64 = T.scaled_cost(jnp.asarray(y), jnp.asarray(z))
        assert C64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(C64), _np_scaled_cost(y, z), rtol=1e-13, atol=0)


def test_scaled_cost_keeps_float32_precision_for_large_close_values():
    """The cost is formed from differences: values near 1e4 with spread ~1 keep their precision."""
    y, z = _sample(5)
    y32 = (1e4 + y).astype(np.float32)
    z32 = (1e4 + z).astype(np.float32)
    C = np.asarray(T.scaled_cost(jnp.asarray(y32), jnp.asarray(z32)), np.float64)
    ref = _np_scaled_cost(y32.astype(np.float64), z32.astype(np.float64))
    # |y|²+|z|²−2yz in float32 would have absolute errors ~ 1e8·6e-8 ≈ 6 here
    np.testing.assert_allclose(C, ref, rtol=1e-3, atol=1e-3)


def test_sinkhorn_matches_numpy_log_domain_reference():
    y, z = _sample(7)
    ref = _np_sinkhorn(_np_scaled_cost(y, z), EPS)
    # float64 swapjax, run to a tight threshold: the same plan to ~1e-9 relative
    with jax.enable_x64(True):
        plan64, _, info64 = T.sinkhorn_plan(jnp.asarray(y), jnp.asarray(z), EPS, threshold=1e-10)
        assert plan64.dtype == jnp.float64
        assert bool(info64.converged)
        np.testing.assert_allclose(N * N * np.asarray(plan64), N * N * ref, rtol=0, atol=1e-7)
    # float32 swapjax at the default threshold 1e-3 on the marginals. The L1 distance to
    # the exact plan is not bounded by the marginal error alone (it grows like 1/ε); measured
    # ‖π − π*‖₁ ≈ 4–5 × the reported error at ε = 0.1, N = 50. Allow 10 × the threshold.
    plan32, _, info32 = T.sinkhorn_plan(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), EPS)
    assert bool(info32.converged)
    l1 = np.abs(np.asarray(plan32, np.float64) - ref).sum()
    assert l1 <= 10 * THRESHOLD, l1


@pytest.mark.parametrize("a,b", [(37.0, -1e3), (-0.02, 5.0)])
def test_sinkhorn_plan_invariant_to_affine_rescale(a, b):
    """The point of the relative ε: C and therefore π do not change under y, z → a·y + b, a·z + b."""
    y, z = _sample(7)
    with jax.enable_x64(True):
        p0, _, i0 = T.sinkhorn_plan(jnp.asarray(y), jnp.asarray(z), EPS, threshold=1e-10)
        p1, _, i1 = T.sinkhorn_plan(jnp.asarray(a * y + b), jnp.asarray(a * z + b), EPS, threshold=1e-10)
        assert bool(i0.converged) and bool(i1.converged)
        np.testing.assert_allclose(N * N * np.asarray(p1), N * N * np.asarray(p0), rtol=0, atol=1e-7)
    # and in float32 at the default threshold (a = 37, b = −1e3 loses ~3 digits of y to b)
    p0, _, _ = T.sinkhorn_plan(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), EPS)
    p1, _, _ = T.sinkhorn_plan(
        jnp.asarray(a * y + b, jnp.float32), jnp.asarray(a * z + b, jnp.float32), EPS
    )
    assert np.abs(np.asarray(p1, np.float64) - np.asarray(p0, np.float64)).sum() <= 5 * THRESHOLD


def test_sinkhorn_warm_start():
    y, z = _sample(8)
    rng = np.random.default_rng(80)
    z2 = z + 0.05 * rng.normal(size=N)
    y32, z32, z232 = (jnp.asarray(v, jnp.float32) for v in (y, z, z2))
    _, duals, info = T.sinkhorn_plan(y32, z32, EPS)
    assert bool(info.converged)
    # restarting at the solution: converged after the first error check
    _, _, same = T.sinkhorn_plan(y32, z32, EPS, init=duals)
    assert bool(same.converged)
    assert int(same.iterations) < int(info.iterations)
    # a perturbed problem: warm start needs no more iterations than a cold start
    cold_plan, _, cold = T.sinkhorn_plan(y32, z232, EPS)
    warm_plan, _, warm = T.sinkhorn_plan(y32, z232, EPS, init=duals)
    assert bool(cold.converged) and bool(warm.converged)
    assert int(warm.iterations) <= int(cold.iterations), (int(warm.iterations), int(cold.iterations))
    # ... and reaches the same plan (both within the threshold of the exact one)
    assert np.abs(np.asarray(warm_plan, np.float64) - np.asarray(cold_plan, np.float64)).sum() <= 10 * THRESHOLD


def test_sinkhorn_nonconvergence_is_reported():
    y, z = _sample(9)
    with jax.enable_x64(True):
        _, _, info = T.sinkhorn_plan(jnp.asarray(y), jnp.asarray(z), 1e-3, threshold=1e-10, max_iterations=20)
        assert not bool(info.converged)
        assert float(info.error) > 1e-10
        assert int(info.iterations) == 20


# ---------------------------------------------------------------------------
# ε = 0: the sorted matching


def _ott_univariate_plan(y, z):
    from ott.geometry.pointcloud import PointCloud
    from ott.problems.linear.linear_problem import LinearProblem
    from ott.solvers.linear import univariate

    prob = LinearProblem(PointCloud(jnp.asarray(y)[:, None], jnp.asarray(z)[:, None]))
    out = univariate.uniform_solver(prob, return_transport=True)
    return np.asarray(out.transport_matrices.todense()[0], np.float64)


@pytest.mark.parametrize("seed", [10, 11])
def test_sorted_matching_equals_ott_univariate(seed):
    y, z = _sample(seed, noise=1.0)
    y32, z32 = jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)
    assert len(np.unique(np.asarray(y32))) == N and len(np.unique(np.asarray(z32))) == N  # no ties
    plan = np.asarray(T.sorted_matching_plan(y32, z32), np.float64)
    ref = _ott_univariate_plan(y32, z32)
    np.testing.assert_allclose(plan, ref, rtol=1e-6, atol=0)
    assert (plan > 0).sum() == N  # a permutation matrix / N
    # targets without forming π: exact (a gather of y)
    t = T.sorted_matching_targets(y32, z32)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(y32)[np.argmax(ref, axis=0)])


def test_sorted_matching_self_is_identity():
    y, _ = _sample(12)
    y32 = jnp.asarray(y, jnp.float32)
    np.testing.assert_array_equal(np.asarray(T.sorted_matching_targets(y32, y32)), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(T.sorted_matching_plan(y32, y32)), np.eye(N, dtype=np.float32) / N)


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([1, 2, 7, 12]),  # few shapes: each new shape recompiles the eager ops
    data=st.data(),
)
def test_sorted_matching_targets_equal_barycentric_of_sorted_plan(n, data):
    """With ties (small integer values) as well: the shortcut is the barycentric map of the plan."""
    vals = st.integers(-3, 3).map(float)
    y = np.array(data.draw(st.lists(vals, min_size=n, max_size=n)), np.float32)
    z = np.array(data.draw(st.lists(vals, min_size=n, max_size=n)), np.float32)
    y, z = jnp.asarray(y), jnp.asarray(z)
    plan = T.sorted_matching_plan(y, z)
    # the plan is a permutation / n, monotone: sorted y's i-th value goes to z's i-th rank
    P = np.asarray(plan, np.float64) * n
    np.testing.assert_allclose(P.sum(0), 1, rtol=1e-6)
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-6)
    i, j = np.nonzero(P > 0.5)
    order = np.argsort(np.asarray(y)[i], kind="stable")
    assert np.all(np.diff(np.asarray(z)[j][order]) >= 0) or n == 1
    bary = np.asarray(T.barycentric_targets(plan, y), np.float64)
    fast = np.asarray(T.sorted_matching_targets(y, z), np.float64)
    np.testing.assert_allclose(fast, bary, rtol=1e-6, atol=1e-6)
    # the targets are a rearrangement of y, in the order of z
    np.testing.assert_array_equal(np.sort(fast), np.sort(np.asarray(y, np.float64)))
    assert np.all(np.diff(fast[np.argsort(np.asarray(z), kind="stable")]) >= 0)


def test_transport_targets_dispatch():
    y, z = _sample(13)
    y32, z32 = jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)
    t0, d0, i0 = T.transport_targets(y32, z32, 0.0)
    assert d0 is None and bool(i0.converged) and int(i0.iterations) == 0
    np.testing.assert_array_equal(np.asarray(t0), np.asarray(T.sorted_matching_targets(y32, z32)))
    t1, d1, i1 = T.transport_targets(y32, z32, EPS)
    plan, _, _ = T.sinkhorn_plan(y32, z32, EPS)
    np.testing.assert_allclose(np.asarray(t1), np.asarray(T.barycentric_targets(plan, y32)), rtol=1e-6, atol=1e-6)
    assert d1 is not None and bool(i1.converged)


# ---------------------------------------------------------------------------
# barycentric targets and the identity (N/2)·Σ_ij π_ij (y_i − z_j)² = ½‖z − N·πᵀy‖² + const


def test_barycentric_identity_plan_gives_y():
    y, _ = _sample(14)
    with jax.enable_x64(True):
        t = T.barycentric_targets(jnp.eye(N) / N, jnp.asarray(y))
        np.testing.assert_allclose(np.asarray(t), y, rtol=1e-14, atol=1e-15)
    t32 = T.barycentric_targets(jnp.eye(N, dtype=jnp.float32) / N, jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(np.asarray(t32, np.float64), y, rtol=1e-6, atol=1e-6)


def test_barycentric_targets_match_numpy():
    y, z = _sample(15)
    plan, _, _ = T.sinkhorn_plan(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), EPS)
    P = np.asarray(plan, np.float64)
    t = np.asarray(T.barycentric_targets(plan, jnp.asarray(y, jnp.float32)), np.float64)
    np.testing.assert_allclose(t, N * P.T @ np.asarray(np.float32(y), np.float64), rtol=1e-5, atol=1e-5)


def _identity_sides(P, y, z, ytil):
    n = len(y)
    lhs = 0.5 * n * np.sum(P * (y[:, None] - z[None, :]) ** 2)
    rhs = 0.5 * np.sum((z - ytil) ** 2) + 0.5 * np.sum(y**2) - 0.5 * np.sum(ytil**2)
    return lhs, rhs


@pytest.mark.parametrize("seed", [16, 17])
def test_method_identity_exact_doubly_stochastic_plan(seed):
    """(N/2)Σπ_ij(y_i − z_j)² = ½‖z − ỹ‖² + ½‖y‖² − ½‖ỹ‖², ỹ = Nπᵀy, for π = mixture of permutations / N."""
    rng = np.random.default_rng(seed)
    y, z = _sample(seed)
    weights = rng.dirichlet(np.ones(5))
    P = sum(c * np.eye(N)[rng.permutation(N)] for c in weights) / N
    np.testing.assert_allclose(P.sum(0), 1 / N, rtol=1e-13)
    np.testing.assert_allclose(P.sum(1), 1 / N, rtol=1e-13)
    with jax.enable_x64(True):
        ytil = np.asarray(T.barycentric_targets(jnp.asarray(P), jnp.asarray(y)))
    lhs, rhs = _identity_sides(P, y, z, ytil)
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_method_identity_sinkhorn_plan():
    """Same identity on the (float32) Sinkhorn plan: exact up to its marginal errors.

    LHS − RHS = (N/2)Σ_i (r_i − 1/N) y_i² + (N/2)Σ_j (c_j − 1/N) z_j² with r, c the row and
    column sums, so |LHS − RHS| ≤ (N/2)(‖r − a‖₁ max y² + ‖c − b‖₁ max z²).
    """
    y, z = _sample(18)
    y32, z32 = np.float32(y).astype(np.float64), np.float32(z).astype(np.float64)
    plan, _, _ = T.sinkhorn_plan(jnp.asarray(y32, jnp.float32), jnp.asarray(z32, jnp.float32), EPS)
    P = np.asarray(plan, np.float64)
    ytil = N * P.T @ y32
    lhs, rhs = _identity_sides(P, y32, z32, ytil)
    r, c = P.sum(1), P.sum(0)
    r_err, c_err = _marginal_errors(P)
    scale = 0.5 * np.sum(y32**2) + 0.5 * np.sum(z32**2)
    bound = 0.5 * N * (r_err * np.max(y32**2) + c_err * np.max(z32**2)) + 1e-12 * scale
    assert abs(lhs - rhs) <= bound, (lhs, rhs, bound)
    # the gap is exactly the marginal-error term (float64 algebra on the same P)
    gap = 0.5 * N * (np.sum((r - 1 / N) * y32**2) + np.sum((c - 1 / N) * z32**2))
    assert lhs - rhs == pytest.approx(gap, abs=1e-12 * scale)
    # and small relative to the terms of the identity
    assert bound <= 1e-2 * scale
