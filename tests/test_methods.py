"""Tests of the bare-problem methods: ``w, info = fixed_lr(...).solve(X, w_bar, k)`` and SWAP.

Two problem sizes only (each (shape, method config) compiles the solver once):
a small planted problem (N, p, k) = (40, 80, 8) for the properties, and the
(200, 400, 20) planted problems for support recovery. References are float64
NumPy (objective, ridge solve on a support) and swapjax.transport / swapjax.iht
called directly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from compiles import counted
from conftest import fixed_lr, fixed_swap
from swapjax import iht as iht_lib
from swapjax import transport

EPS32 = float(np.finfo(np.float32).eps)
SMALL = (40, 80, 8)
BIG = (200, 400, 20)


def _planted(seed, n, p, k, noise=0.05):
    """X Gaussian, w* k-sparse with |w*_i| ∈ [1, 2], w̄ = w* + noise·N(0, 1) (dense). float32."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    support = np.sort(rng.choice(p, k, replace=False))
    w_star = np.zeros(p)
    w_star[support] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k)
    w_bar = w_star + noise * rng.normal(size=p)
    return X.astype(np.float32), w_bar.astype(np.float32), support


def _cancelling_pairs(seed, n=200, p=400, k=20):
    """A problem where magnitude pruning is wrong and the Fisher-aware answer is known.

    - A (k coordinates): the "true" weights, small |w̄| ∈ [0.5, 0.7], columns scaled by 1.5.
    - k pairs (a, b) of near-duplicate columns x_b = x_a + 0.05·noise with w̄_a = 1.1·s,
      w̄_b = −s (|s| = 1): large weights whose contributions X w̄ almost cancel.
    - the rest: |w̄| ~ 0.05.

    The k largest |w̄| are exactly the a's (1.1 > 1.0 > 0.7), but keeping a without its
    partner b leaves ≈ x_a in the residual: each a kept alone costs ~ N/2, whereas each A
    coordinate dropped costs ~ ½·N·(1.5·0.6)² and dropping a whole pair costs only
    ½‖0.1·x_a − 0.05·η‖² + ridge ≈ 3. The best k-support is A.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(p)
    A, pa, pb = np.sort(perm[:k]), perm[k : 2 * k], perm[2 * k : 3 * k]
    X = rng.normal(size=(n, p))
    X[:, A] *= 1.5
    X[:, pb] = X[:, pa] + 0.05 * rng.normal(size=(n, k))
    w_bar = 0.05 * rng.normal(size=p)
    s = rng.choice([-1, 1], k)
    w_bar[A] = rng.choice([-1, 1], k) * rng.uniform(0.5, 0.7, k)
    w_bar[pa] = 1.1 * s
    w_bar[pb] = -1.0 * s
    return X.astype(np.float32), w_bar.astype(np.float32), A, np.sort(pa)


def _np_objective(X, w, t, w_bar, lam):
    X, w, t, w_bar = (np.asarray(a, np.float64) for a in (X, w, t, w_bar))
    r = X @ w - t
    return 0.5 * r @ r + 0.5 * X.shape[0] * lam * np.sum((w - w_bar) ** 2)


def _np_ridge_on_support(X, t, w_bar, support, lam):
    X, t, w_bar = (np.asarray(a, np.float64) for a in (X, t, w_bar))
    n = X.shape[0]
    S = np.flatnonzero(support)
    A = np.vstack([X[:, S], np.sqrt(n * lam) * np.eye(len(S))])
    b = np.concatenate([t, np.sqrt(n * lam) * w_bar[S]])
    w = np.zeros(X.shape[1])
    w[S] = np.linalg.lstsq(A, b, rcond=None)[0]
    return w


def _ridge_map(X, support, lam):
    """M with w_S = M t + (…): the ridge solution's sensitivity to the targets, and cond(H_S)."""
    X = np.asarray(X, np.float64)
    Xs = X[:, np.asarray(support)]
    H = Xs.T @ Xs + X.shape[0] * lam * np.eye(Xs.shape[1])
    return np.linalg.solve(H, Xs.T), np.linalg.cond(H)


def _mask(idx, p):
    m = np.zeros(p, bool)
    m[idx] = True
    return m


def _check_sparse(w, info, k):
    w, support = np.asarray(w), np.asarray(info.support)
    assert support.dtype == bool and support.sum() == k
    assert np.all(w[~support] == 0)
    assert np.count_nonzero(w) <= k


@pytest.fixture(scope="module")
def small():
    return _planted(0, *SMALL)


# ---------------------------------------------------------------------------
# LR = SWAP when the plan is I/N


def test_swap_epsilon0_one_shot_equals_lr_exactly(small):
    """At w_start = w̄, z = y; the sorted self-matching of y (no ties) is I/N, so ỹ = y bit for bit.

    Bit-identity is guaranteed here on any CPU: ỹ is a gather of y (exact), and w comes from the same
    compiled solve and refit on bit-equal inputs (the plan's report only passes through)."""
    X, w_bar, _ = small
    k = SMALL[2]
    y = np.asarray(jnp.asarray(X) @ jnp.asarray(w_bar))
    assert len(np.unique(y)) == len(y)
    w_lr, i_lr = fixed_lr().solve(X, w_bar, k)
    w_sw, i_sw = fixed_swap(epsilon=0.0).solve(X, w_bar, k)
    np.testing.assert_array_equal(np.asarray(i_sw.targets), np.asarray(i_lr.targets))
    np.testing.assert_array_equal(np.asarray(i_sw.support), np.asarray(i_lr.support))
    np.testing.assert_array_equal(np.asarray(w_sw), np.asarray(w_lr))
    assert float(i_sw.objective) == float(i_lr.objective)


def test_iht_with_identity_plan_targets_equals_lr(small):
    X, w_bar, _ = small
    n, p, k = SMALL
    lr = fixed_lr(backsolve=False)
    w_lr, i_lr = lr.solve(X, w_bar, k)
    Xj, wbj = jnp.asarray(X), jnp.asarray(w_bar)
    y = Xj @ wbj
    t = transport.barycentric_targets(jnp.eye(n, dtype=jnp.float32) / n, y)
    np.testing.assert_allclose(np.asarray(t), np.asarray(y), rtol=1e-6, atol=1e-6 * float(jnp.abs(y).max()))
    res, _ = iht_lib.iht(Xj, t, wbj, wbj, k, lr.lam, lr.max_iters, lr.tol, lr.growth)
    np.testing.assert_array_equal(np.asarray(res.support), np.asarray(i_lr.support))
    # targets equal to ~1 ulp, so the IHT paths agree to float32 rounding
    np.testing.assert_allclose(np.asarray(res.w), np.asarray(w_lr), rtol=1e-4, atol=1e-5)
    assert float(res.objective) == pytest.approx(float(i_lr.objective), rel=1e-4)


def test_swap_tiny_epsilon_close_to_lr(small):
    """ε = 1e-4 on the scaled cost blurs each y_j over neighbours ≲ 5·√ε = 0.05 std(y) away."""
    X, w_bar, _ = small
    k = SMALL[2]
    lam = 0.01
    w_lr, i_lr = fixed_lr(lam=lam).solve(X, w_bar, k)
    w_sw, i_sw = fixed_swap(lam=lam, epsilon=1e-4).solve(X, w_bar, k)
    assert bool(i_sw.plan.converged)
    y, t = np.asarray(i_lr.targets, np.float64), np.asarray(i_sw.targets, np.float64)
    assert np.abs(t - y).max() <= 0.05 * y.std()
    np.testing.assert_array_equal(np.asarray(i_sw.support), np.asarray(i_lr.support))
    # both are the ridge solution on the same support: ‖Δw‖ ≤ ‖M‖₂‖Δt‖ (+ float32 rounding)
    assert bool(i_lr.backsolved) and bool(i_sw.backsolved)
    M, cond = _ridge_map(X, i_lr.support, lam)
    dw = np.linalg.norm(np.asarray(w_sw, np.float64) - np.asarray(w_lr, np.float64))
    bound = np.linalg.norm(M, 2) * np.linalg.norm(t - y) + 10 * cond * EPS32 * np.linalg.norm(w_lr)
    assert dw <= bound, (dw, bound)


# ---------------------------------------------------------------------------
# support recovery


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("method", [fixed_lr(), fixed_swap()], ids=["LR", "SWAP"])
def test_planted_support_recovered(seed, method):
    X, w_bar, support = _planted(seed, *BIG)
    k = BIG[2]
    w, info = method.solve(X, w_bar, k)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info.support)), support)
    _check_sparse(w, info, k)
    # the returned weights solve the ridge problem on that support (backsolve), in float64
    ref = _np_ridge_on_support(X, info.targets, w_bar, info.support, method.lam)
    np.testing.assert_allclose(np.asarray(w, np.float64), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_lr_recovers_support_where_magnitude_pruning_fails(seed):
    X, w_bar, A, pa = _cancelling_pairs(seed)
    n, p, k = BIG
    # magnitude pruning keeps exactly the large, cancelling a's and none of A
    mp = np.sort(np.argsort(-np.abs(w_bar), kind="stable")[:k])
    np.testing.assert_array_equal(mp, pa)
    lam = 0.01
    y = X.astype(np.float64) @ w_bar.astype(np.float64)

    def f_on(support):
        return _np_objective(X, _np_ridge_on_support(X, y, w_bar, support, lam), y, w_bar, lam)

    f_A, f_mp = f_on(_mask(A, p)), f_on(_mask(pa, p))
    assert f_A < 0.2 * f_mp
    # A is 1-swap optimal: replacing any A coordinate by any pair coordinate or any of 30
    # other coordinates does not lower the (backsolved) objective
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(p), A)
    rest = np.setdiff1d(others, pa)
    candidates = np.concatenate([pa, rest[rng.choice(len(rest), 30, replace=False)]])
    for i in A:
        for j in candidates:
            swapped = _mask(np.append(A[A != i], j), p)
            assert f_on(swapped) >= f_A, (i, j)
    w, info = fixed_lr(lam=lam).solve(X, w_bar, k)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info.support)), A)
    assert float(info.objective) == pytest.approx(f_A, rel=1e-4)


# ---------------------------------------------------------------------------
# precision and determinism


@pytest.mark.parametrize("method", [fixed_lr(), fixed_swap()], ids=["LR", "SWAP"])
def test_float32_agrees_with_float64(small, method):
    X, w_bar, _ = small
    k = SMALL[2]
    w32, i32 = method.solve(X, w_bar, k)
    assert w32.dtype == jnp.float32
    with jax.enable_x64(True):
        w64, i64 = method.solve(jnp.asarray(X, jnp.float64), jnp.asarray(w_bar, jnp.float64), k)
        assert w64.dtype == jnp.float64
        w64, t64, s64 = np.asarray(w64), np.asarray(i64.targets), np.asarray(i64.support)
    np.testing.assert_array_equal(np.asarray(i32.support), s64)
    assert bool(i32.backsolved) and bool(i64.backsolved)
    # Both are ridge solutions on the same support with targets t32, t64:
    #   ‖w32 − w64‖ ≤ ‖M‖₂‖t32 − t64‖ + 10·cond(H_S)·eps32·‖w64‖,
    # the first term from the targets (SWAP: two Sinkhorn runs, each stopped at a marginal
    # error ≤ 1e-3, so the targets differ by up to ~1e-3 relative; LR: rounding of y = Xw̄),
    # the second from solving the ridge system in float32.
    t32 = np.asarray(i32.targets, np.float64)
    M, cond = _ridge_map(X, s64, method.lam)
    assert cond * EPS32 < 1e-4  # a well-conditioned support: float32 is meaningful here
    if isinstance(method, swapjax.SWAP):
        assert np.linalg.norm(t32 - t64) <= 1e-2 * np.linalg.norm(t64)
    else:
        assert np.linalg.norm(t32 - t64) <= 1e-5 * np.linalg.norm(t64)
    dw = np.linalg.norm(np.asarray(w32, np.float64) - w64)
    bound = np.linalg.norm(M, 2) * np.linalg.norm(t32 - t64) + 10 * cond * EPS32 * np.linalg.norm(w64)
    assert dw <= bound, (dw, bound)
    assert dw <= 1e-2 * np.linalg.norm(w64)  # and the bound itself is small


@pytest.mark.parametrize("method", [fixed_lr(), fixed_swap()], ids=["LR", "SWAP"])
def test_deterministic(small, method):
    X, w_bar, _ = small
    k = SMALL[2]
    a_w, a = method.solve(X, w_bar, k)
    b_w, b = method.solve(np.array(X), np.array(w_bar), k)  # the same compiled programs on equal inputs: same bits
    np.testing.assert_array_equal(np.asarray(a_w), np.asarray(b_w))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# the plan inside SWAP


def test_swap_targets_are_barycentric_of_plan_at_w_start(small):
    X, w_bar, _ = small
    n, p, k = SMALL
    rng = np.random.default_rng(7)
    w_start = (w_bar * (rng.random(p) < 0.5)).astype(np.float32)
    method = fixed_swap()
    _, info = method.solve(X, w_bar, k, w_start=w_start)
    Xj = jnp.asarray(X)
    y, z = Xj @ jnp.asarray(w_bar), Xj @ jnp.asarray(w_start)
    plan, _, pinfo = transport.sinkhorn_plan(y, z, method.epsilon, method.sinkhorn_threshold)
    assert int(info.plan.iterations) == int(pinfo.iterations) > 0
    assert bool(info.plan.converged) == bool(pinfo.converged) is True
    np.testing.assert_allclose(
        np.asarray(info.targets), np.asarray(transport.barycentric_targets(plan, y)),
        rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()),
    )


def test_swap_reports_unconverged_plan(small):
    X, w_bar, _ = small
    k = SMALL[2]
    w, info = fixed_swap(sinkhorn_threshold=1e-9, sinkhorn_max_iters=10).solve(X, w_bar, k)
    assert not bool(info.plan.converged)
    assert int(info.plan.iterations) == 10
    assert float(info.plan.error) > 1e-9
    _check_sparse(w, info, k)


def test_swap_warm_start_duals(small):
    X, w_bar, _ = small
    k = SMALL[2]
    method = fixed_swap(epsilon=0.03)  # small enough that a cold start needs > 10 iterations
    _, cold = method.solve(X, w_bar, k)
    assert int(cold.plan.iterations) > 10
    _, warm = method.solve(X, w_bar, k, duals=cold.duals)
    assert bool(warm.plan.converged)
    assert int(warm.plan.iterations) < int(cold.plan.iterations)


def test_plan_update_iteration(small):
    X, w_bar, _ = small
    k = SMALL[2]
    w_st, stage = fixed_swap().solve(X, w_bar, k)
    w_it, it = fixed_swap(plan_update="iteration").solve(X, w_bar, k)
    _check_sparse(w_it, it, k)
    assert bool(it.plan.converged)
    # the stage plan plus one Sinkhorn solve per IHT step
    assert int(it.plan.iterations) >= int(stage.plan.iterations) + int(it.iht_iterations)
    # final targets are transport targets at an iterate: a plan-weighted mean of y
    y = np.asarray(jnp.asarray(X) @ jnp.asarray(w_bar), np.float64)
    t = np.asarray(it.targets, np.float64)
    assert np.all(t >= y.min() - 1e-4 * np.abs(y).max()) and np.all(t <= y.max() + 1e-4 * np.abs(y).max())
    assert t.mean() == pytest.approx(y.mean(), abs=2e-3 * np.abs(y).max())


# ---------------------------------------------------------------------------
# sparsity, objective, backsolve


@pytest.mark.parametrize("k", [1, 8, 33, 80])
@pytest.mark.parametrize("method", [fixed_lr(), fixed_swap()], ids=["LR", "SWAP"])
def test_exactly_k_nonzeros(small, method, k):
    X, w_bar, _ = small
    w, info = method.solve(X, w_bar, k)
    _check_sparse(w, info, k)
    f = _np_objective(X, w, info.targets, w_bar, method.lam)
    assert float(info.objective) == pytest.approx(f, rel=1e-4, abs=1e-4)
    if k == X.shape[1]:  # nothing to prune: w = w̄ is the minimiser of f for LR
        if not isinstance(method, swapjax.SWAP):
            np.testing.assert_allclose(np.asarray(w), w_bar, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [fixed_lr, fixed_swap], ids=["LR", "SWAP"])
@pytest.mark.parametrize("seed", [0, 4])
def test_backsolve_never_worse(cls, seed):
    rng = np.random.default_rng(seed)
    n, p, k = SMALL
    X = (rng.normal(size=(n, p)) * rng.gamma(1.0, size=p)).astype(np.float32)  # harder: uneven columns
    w_bar = rng.normal(size=p).astype(np.float32)
    w_no, i_no = cls(backsolve=False).solve(X, w_bar, k)
    w_bs, i_bs = cls().solve(X, w_bar, k)
    np.testing.assert_array_equal(np.asarray(i_bs.support), np.asarray(i_no.support))
    # in float32, never above IHT's f beyond the rounding of f (the backsolve evaluates it in another form)
    slack = float(swapjax.methods._rounding_of_f(i_no.objective, i_no.targets))
    assert float(i_bs.objective) <= float(i_no.objective) + slack
    f_no = _np_objective(X, w_no, i_no.targets, w_bar, 0.01)
    f_bs = _np_objective(X, w_bs, i_bs.targets, w_bar, 0.01)
    assert f_bs <= f_no * (1 + 1e-5)
    # the backsolved w is the ridge solution on the support (float64 reference)
    ref = _np_ridge_on_support(X, i_bs.targets, w_bar, i_bs.support, 0.01)
    assert bool(i_bs.backsolved)
    M, cond = _ridge_map(X, i_bs.support, 0.01)
    err = np.linalg.norm(np.asarray(w_bs, np.float64) - ref)
    assert err <= 10 * cond * EPS32 * np.linalg.norm(ref) + 1e-6, (err, cond)
    assert f_bs == pytest.approx(_np_objective(X, ref, i_bs.targets, w_bar, 0.01), rel=1e-4)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "X_shape,w_shape,k,name",
    [
        ((10, 20, 1), (20,), 5, "X"),
        ((20,), (20,), 5, "X"),
        ((10, 20), (19,), 5, "w_bar"),
        ((10, 20), (20, 1), 5, "w_bar"),
        ((10, 20), (20,), 0, "k"),
        ((10, 20), (20,), 21, "k"),
        ((10, 20), (20,), -1, "k"),
    ],
)
@pytest.mark.parametrize("cls", [swapjax.LR, swapjax.SWAP])
def test_solve_rejects_bad_problems(cls, X_shape, w_shape, k, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls().solve(np.ones(X_shape, np.float32), np.ones(w_shape, np.float32), k)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_solve_rejects_nonfinite_X(bad):
    X = np.random.default_rng(0).normal(size=(10, 20)).astype(np.float32)
    X[3, 7] = bad
    with pytest.raises(ValueError, match=r"\bX\b"):
        fixed_lr().solve(X, np.ones(20, np.float32), 5)


def test_solve_rejects_nonfinite_w_bar(small):
    """A NaN in w̄ otherwise comes back as a NaN weight in the 'pruned' w with f = NaN."""
    X, w_bar, support = small
    w_bar = w_bar.copy()
    w_bar[support[0]] = np.nan
    with pytest.raises(ValueError, match=r"\bw_bar\b"):
        fixed_lr().solve(X, w_bar, SMALL[2])


@pytest.mark.parametrize(
    "make",
    [
        lambda: swapjax.LR(lam=-1.0),
        lambda: swapjax.LR(growth=1.0),
        lambda: swapjax.LR(growth=0.5),
        lambda: swapjax.LR(lam=float("nan")),
        lambda: swapjax.SWAP(epsilon=-0.1),
        lambda: swapjax.SWAP(epsilon=float("nan")),
        lambda: swapjax.SWAP(plan_update="x"),
        lambda: swapjax.SWAP(lam=-1.0),
    ],
)
def test_bad_configuration(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("patience", [1, 3])
def test_patience_stops_once_the_support_is_stable(patience):
    """With patience, IHT stops after `patience` steps that kept the support: the last
    `patience` steps of the trace all kept it, and it never runs longer than without."""
    rng = np.random.default_rng(7)
    n, p, k = SMALL
    X = (rng.normal(size=(n, p)) * rng.gamma(1.0, size=p)).astype(np.float32)
    w_bar = rng.normal(size=p).astype(np.float32)
    _, full = fixed_lr(tol=0.0, max_iters=60).solve(X, w_bar, k)
    _, short = fixed_lr(tol=0.0, max_iters=60, patience=patience).solve(X, w_bar, k)
    assert int(short.iht_iterations) <= int(full.iht_iterations)
    # Re-run the same IHT for exactly that many steps without patience: same support, and the
    # support after `its - patience` steps is already the final one.
    its = int(short.iht_iterations)
    _, same = fixed_lr(tol=0.0, max_iters=its, backsolve=False).solve(X, w_bar, k)
    _, before = fixed_lr(tol=0.0, max_iters=its - patience, backsolve=False).solve(X, w_bar, k)
    np.testing.assert_array_equal(np.asarray(same.support), np.asarray(short.support))
    np.testing.assert_array_equal(np.asarray(before.support), np.asarray(short.support))
    if its - patience >= 1:
        _, earlier = fixed_lr(tol=0.0, max_iters=its - patience - 1, backsolve=False).solve(X, w_bar, k)
        assert not np.array_equal(np.asarray(earlier.support), np.asarray(short.support))


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_patience_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="patience"):
        swapjax.LR(patience=bad)


# ---------------------------------------------------------------------------
# Compilations


def test_one_compilation_serves_every_k(small):
    """The Gram and exchange widths follow k (the next power of two ≥ k, at most p): a program compiled for
    one width at first, and once a second width is met on the shape, the program that chooses the width at
    run time. After solves at two widths, solves at k in other power-of-two buckets (with the λ/ε selection,
    the swap search and the OBS start) compile nothing."""
    X, w_bar, _ = small  # N = 40, p = 80
    rng = np.random.default_rng(1)
    held_out = rng.normal(size=(30, X.shape[1])).astype(np.float32)

    def score(w):  # per-example held-out losses
        return (held_out @ (np.asarray(w) - w_bar)) ** 2

    method = swapjax.SWAP()
    for k in (8, 12):  # buckets 8 and 16, sparsity ≥ 0.75: every candidate kind, the OBS start included
        method.solve(X, w_bar, k, score=score)
    with counted() as seen:
        for k in (2, 20, 40, 70):  # buckets 2, 32, 64 and p = 80
            w, info = method.solve(X, w_bar, k, score=score)
            _check_sparse(w, info, k)
    assert not seen, f"compiled again for another k: {dict(seen)}"


# ---------------------------------------------------------------------------
# one method contract: a method written here alone runs in both drivers


class _ToyInfo(NamedTuple):
    """A user's info: the contract's fields and a diagnostic of its own (``largest``)."""

    support: jax.Array
    objective: jax.Array
    objective_trace: jax.Array
    duals: tuple
    largest: float
    held_out_loss: float = float("nan")
    gradient_seconds: float = 0.0

    def describe(self) -> str:
        return f"largest kept {self.largest:.3g}"

    def warnings(self, n):
        return ()


def _toy_result(problem, score):
    support = problem.groups.project(score)
    w = jnp.where(support, problem.w_bar, 0)
    f = jnp.zeros(())
    return w, _ToyInfo(support, f, f[None], problem.duals, float(jnp.max(jnp.abs(w))))


class _KeepLargest(swapjax.Method):
    """Keep the largest |w̄_i| of each group: needs nothing but w̄ and the groups."""

    needs = "w"
    matrix_free = True

    def solve_problem(self, problem):
        return _toy_result(problem, jnp.abs(problem.w_bar))


class _KeepScaled(swapjax.Method):
    """Keep the largest |w̄_i|·‖x_i‖ of each group: needs X's column norms (diag XᵀX)."""

    matrix_free = True

    def solve_problem(self, problem):
        return _toy_result(problem, jnp.abs(problem.w_bar) * jnp.sqrt(problem.X.col_sq))


_TOY_X = np.random.default_rng(3).normal(size=(24, 8)).astype(np.float32)
_TOY_W = np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32)


def _toy_loss(params, example):
    return jnp.sum(jnp.tanh(example["x"] @ params["w"]) ** 2)


def _top(score, count):
    """The ``count`` largest entries of a flat score, ties to the lower index (NumPy)."""
    keep = np.zeros(score.size, bool)
    keep[np.lexsort((np.arange(score.size), -score))[:count]] = True
    return keep


def _nm_top(score, n, m):
    """N of every M consecutive inputs (rows) of each output unit (column) of a (d_in, d_out) score."""
    keep = np.zeros(score.shape, bool)
    for j in range(score.shape[1]):
        for g in range(0, score.shape[0], m):
            keep[g:g + m, j] = _top(score[g:g + m, j], n)
    return keep


@pytest.mark.parametrize("constraint", ["uniform", "2:4"])
def test_a_method_written_once_runs_in_both_drivers(constraint):
    """_KeepLargest, defined in this file alone, in swapjax.prune and swapjax.prune_layerwise: the same masks,
    against NumPy (the 24 largest |w| of the layer, or 2 of every 4 inputs of each unit), the kept weights
    unchanged, its own info (with a diagnostic of its own) kept as the stage's method_info."""
    spec = swapjax.LayerBudgets() if constraint == "uniform" else swapjax.NM(2, 4)
    params, batch = {"w": _TOY_W}, {"x": _TOY_X}
    score = np.abs(_TOY_W)
    expected = _top(score.ravel(), 24).reshape(8, 6) if constraint == "uniform" else _nm_top(score, 2, 4)
    network = swapjax.prune(_toy_loss, params, batch, sparsity=0.5, method=_KeepLargest(), constraint=spec,
                            progress=False)
    layerwise = swapjax.prune_layerwise(_toy_loss, params, batch, sparsity=0.5, method=_KeepLargest(),
                                        constraint=spec, progress=False)
    for result in (network, layerwise):
        np.testing.assert_array_equal(np.asarray(result.masks["w"]), expected)
        np.testing.assert_array_equal(np.asarray(result.params["w"]), np.where(expected, _TOY_W, 0))
    (stage,) = network.info
    assert isinstance(stage.method_info, _ToyInfo)
    assert stage.method_info.largest == pytest.approx(float(np.abs(_TOY_W[expected]).max()))


def test_a_method_on_x_gets_the_per_sample_gradients_or_the_layers_operator():
    """_KeepScaled reads diag(XᵀX): network-wide the per-sample gradients' (X from swapjax.per_sample_grads),
    layer by layer the layer's X = I ⊗ Lᵀ, LLᵀ = H + δI, so diag(XᵀX) = H_ii + δ for every unit (H = AᵀA of
    the layer's inputs, δ = 0.01·mean diag H): a Wanda score with the damping, over the whole layer."""
    params, batch = {"w": _TOY_W}, {"x": _TOY_X}
    X = np.asarray(swapjax.per_sample_grads(_toy_loss, params, batch), np.float64)
    expected = _top(np.abs(_TOY_W.ravel()) * np.sqrt((X ** 2).sum(0)), 24).reshape(8, 6)
    network = swapjax.prune(_toy_loss, params, batch, sparsity=0.5, method=_KeepScaled(),
                            constraint=swapjax.LayerBudgets(), progress=False)
    np.testing.assert_array_equal(np.asarray(network.masks["w"]), expected)
    H = _TOY_X.astype(np.float64).T @ _TOY_X
    diag = np.diag(H) + 0.01 * np.mean(np.diag(H))
    expected = _top((np.abs(_TOY_W) * np.sqrt(diag)[:, None]).ravel(), 24).reshape(8, 6)
    layerwise = swapjax.prune_layerwise(_toy_loss, params, batch, sparsity=0.5, method=_KeepScaled(), progress=False)
    np.testing.assert_array_equal(np.asarray(layerwise.masks["w"]), expected)


def test_a_method_that_needs_the_layers_gram_is_refused_network_wide():
    with pytest.raises(ValueError, match=r"method: SparseGPT needs each layer's Gram H \(a layer method\): prune layer "
                                         r"by layer with swapjax.prune_layerwise\(\.\.\., method=SparseGPT\(\)\)"):
        swapjax.prune(_toy_loss, {"w": _TOY_W}, {"x": _TOY_X}, sparsity=0.5, method=swapjax.SparseGPT(),
                      progress=False)


def test_a_method_must_implement_solve_problem_or_solve():
    class Empty(swapjax.Method):
        pass

    problem = swapjax.contract.Problem(_TOY_W.ravel(), swapjax.Groups.top_k(3), X=np.eye(48, dtype=np.float32))
    with pytest.raises(TypeError, match=r"Empty implements neither solve_problem\(problem\) nor solve\(X, w_bar, k"):
        Empty().solve_problem(problem)
    with pytest.raises(TypeError, match=r"Empty implements neither"):
        Empty().solve(np.eye(48, dtype=np.float32), _TOY_W.ravel(), 3)


def test_the_bare_solve_and_solve_problem_are_the_same_solve(small):
    """LR's bare form solve(X, w̄, k) and solve_problem(Problem(...)) give the same weights; so does a
    problem-only method called in the bare form."""
    X, w_bar, support = small
    k = len(support)
    problem = swapjax.contract.Problem(w_bar, swapjax.Groups.top_k(k), X=X)
    a, _ = fixed_lr().solve(X, w_bar, k)
    b, _ = fixed_lr().solve_problem(problem)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w, info = _KeepLargest().solve(X, w_bar, k)
    np.testing.assert_array_equal(np.asarray(info.support), _top(np.abs(w_bar), k))
