"""Tests of swapjax.iht: hard thresholding, the two step sizes, the IHT loop, the backsolve.

References: NumPy stable argsort for the top-k mask, float64 NumPy for the
quadratic objective and its minimiser along a line, numpy.linalg.lstsq for the
ridge problem on a support. A few fixed shapes keep the compile count low.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import swapjax
from conftest import fixed_lr, fixed_swap
from swapjax import iht as I

# ---------------------------------------------------------------------------
# helpers


def _np_topk_mask(v, k):
    """Reference: the k largest |v|, ties to the lower index (stable argsort of −|v|)."""
    v = np.asarray(v)
    order = np.argsort(-np.abs(v), kind="stable")
    mask = np.zeros(v.shape, bool)
    mask[order[:k]] = True
    return mask


def _np_objective(X, w, t, w_bar, lam):
    X, w, t, w_bar = (np.asarray(a, np.float64) for a in (X, w, t, w_bar))
    r = X @ w - t
    return 0.5 * r @ r + 0.5 * X.shape[0] * lam * np.sum((w - w_bar) ** 2)


def _np_gradient(X, w, t, w_bar, lam):
    X, w, t, w_bar = (np.asarray(a, np.float64) for a in (X, w, t, w_bar))
    return X.T @ (X @ w - t) + X.shape[0] * lam * (w - w_bar)


def _problem(seed, n, p, k, dtype=np.float64):
    """Random (X, w̄, y = Xw̄) and a k-sparse w with support S (generic: no ties)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) / np.sqrt(n)
    w_bar = rng.normal(size=p)
    support = np.zeros(p, bool)
    support[rng.choice(p, k, replace=False)] = True
    w = np.where(support, w_bar + 0.1 * rng.normal(size=p), 0.0)
    return X.astype(dtype), w_bar.astype(dtype), (X @ w_bar).astype(dtype), w.astype(dtype), support


def _np_ridge_on_support(X, t, w_bar, support, lam):
    """lstsq of [X_S; √(Nλ) I] w_S ≈ [t; √(Nλ) w̄_S] in float64; zero off S."""
    n = X.shape[0]
    S = np.flatnonzero(support)
    A = np.vstack([X[:, S], np.sqrt(n * lam) * np.eye(len(S))])
    b = np.concatenate([t, np.sqrt(n * lam) * w_bar[S]])
    w = np.zeros(X.shape[1])
    w[S] = np.linalg.lstsq(A, b, rcond=None)[0]
    return w


# ---------------------------------------------------------------------------
# hard_threshold_mask

_tie_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0])


@st.composite
def _vector_and_k(draw):
    p = draw(st.sampled_from([1, 3, 16, 37]))  # few shapes: each one compiles the radix loop
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    width = 32 if dtype == np.float32 else 64
    floats = st.floats(allow_nan=False, allow_infinity=False, width=width, min_value=-1e6, max_value=1e6)
    elements = st.one_of(_tie_values, floats) if draw(st.booleans()) else _tie_values
    v = draw(hnp.arrays(dtype, p, elements=elements))
    k = draw(st.integers(0, p))
    return v, k


@settings(max_examples=30, deadline=None)
@given(_vector_and_k())
def test_hard_threshold_mask_matches_stable_argsort(vk):
    v, k = vk
    with jax.enable_x64(True):  # lets float64 inputs stay float64; float32 stays float32
        mask = np.asarray(I.hard_threshold_mask(jnp.asarray(v), k))
    assert mask.dtype == bool and mask.shape == v.shape
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, _np_topk_mask(v, k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hard_threshold_mask_many_ties_large(dtype):
    rng = np.random.default_rng(0)
    p = 1000
    v = rng.integers(-4, 5, size=p).astype(dtype)  # 9 values: ~110 copies of each, ~110 zeros
    with jax.enable_x64(True):
        for k in [0, 1, 55, 111, 223, 500, 777, 999, 1000]:
            mask = np.asarray(I.hard_threshold_mask(jnp.asarray(v), k))
            assert mask.sum() == k
            np.testing.assert_array_equal(mask, _np_topk_mask(v, k))


def test_hard_threshold_mask_under_disable_jit():
    """Debugging with jax.disable_jit() must not break the top-k mask (fori_loop then passes Python ints)."""
    v = np.random.default_rng(2).normal(size=16).astype(np.float32)
    with jax.disable_jit():
        mask = np.asarray(I.hard_threshold_mask(jnp.asarray(v), 5))
    np.testing.assert_array_equal(mask, _np_topk_mask(v, 5))


def test_hard_threshold_mask_traced_k():
    v = jnp.asarray(np.random.default_rng(1).normal(size=64), jnp.float32)
    f = jax.jit(I.hard_threshold_mask)
    for k in [0, 5, 64]:
        np.testing.assert_array_equal(np.asarray(f(v, k)), _np_topk_mask(np.asarray(v), k))


# ---------------------------------------------------------------------------
# exact_step and support_change_step


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_exact_step_minimises_the_line_quadratic(seed, lam):
    n, p, k = 30, 60, 12
    X, w_bar, y, w, support = _problem(seed, n, p, k)
    t = y + 0.3 * np.random.default_rng(seed + 100).normal(size=n)
    g = _np_gradient(X, w, t, w_bar, lam)
    g_s = np.where(support, g, 0.0)

    def phi(tau):
        return _np_objective(X, w - tau * g_s, t, w_bar, lam)

    # φ is a quadratic in τ: the parabola through three evaluations is exact
    h = 1.0 / np.sum(X**2)
    f0, f1, f2 = phi(0.0), phi(h), phi(2 * h)
    a2 = (f2 - 2 * f1 + f0) / (2 * h * h)
    a1 = (f1 - f0) / h - a2 * h
    tau_ref = -a1 / (2 * a2)
    with jax.enable_x64(True):
        tau = float(I.exact_step(jnp.asarray(X), jnp.asarray(g_s), lam))
    assert tau == pytest.approx(tau_ref, rel=1e-6)
    # a true minimum along the line
    assert phi(tau) <= min(phi(0.99 * tau), phi(1.01 * tau))
    # float32 agrees to float32 precision
    tau32 = float(I.exact_step(jnp.asarray(X, jnp.float32), jnp.asarray(g_s, jnp.float32), lam))
    assert tau32 == pytest.approx(tau_ref, rel=1e-4)


def test_exact_step_zero_direction():
    X = jnp.asarray(np.random.default_rng(3).normal(size=(5, 8)), jnp.float32)
    assert float(I.exact_step(X, jnp.zeros(8, jnp.float32), 0.0)) == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_support_change_step_is_where_the_support_changes(seed):
    n, p, k = 30, 60, 12
    X, w_bar, y, w, support = _problem(seed, n, p, k)
    t = y + 0.5 * np.random.default_rng(seed + 200).normal(size=n)
    g = _np_gradient(X, w, t, w_bar, 0.01)
    with jax.enable_x64(True):
        tau_c = float(I.support_change_step(jnp.asarray(w), jnp.asarray(g), jnp.asarray(support)))
    assert np.isfinite(tau_c) and tau_c > 0
    for tau in [0.5 * tau_c, tau_c * (1 - 1e-7)]:
        assert np.array_equal(_np_topk_mask(w - tau * g, k), support), tau
    for tau in [tau_c * (1 + 1e-7), 1.5 * tau_c]:
        assert not np.array_equal(_np_topk_mask(w - tau * g, k), support), tau


def test_support_change_step_infinite_when_nothing_can_enter():
    rng = np.random.default_rng(9)
    p, k = 20, 6
    support = np.zeros(p, bool)
    support[:k] = True
    w = np.where(support, rng.normal(size=p), 0.0)
    # outside S: g = 0; inside S: g pushes every weight away from zero
    g = np.where(support, -np.sign(w) * rng.random(p), 0.0)
    with jax.enable_x64(True):
        tau_c = float(I.support_change_step(jnp.asarray(w), jnp.asarray(g), jnp.asarray(support)))
        # k = p: nothing outside S at all
        tau_all = float(I.support_change_step(jnp.asarray(w), jnp.asarray(g), jnp.ones(p, bool)))
    assert tau_c == np.inf and tau_all == np.inf
    assert np.array_equal(_np_topk_mask(w - 1e6 * g, k), support)


# ---------------------------------------------------------------------------
# the IHT loop: f never increases, the reported objective is f

N_, P_, K_ = 40, 80, 10  # one shape for the solver tests


def _trace(info):
    tr = np.asarray(info.objective_trace, np.float64)
    n_it = int(info.iht_iterations)
    assert np.all(np.isfinite(tr[: n_it + 1])) and np.all(np.isnan(tr[n_it + 1 :]))
    return tr[: n_it + 1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("method", [fixed_lr(backsolve=False), fixed_swap(backsolve=False)],
                         ids=["LR", "SWAP"])
def test_iht_objective_never_increases(seed, method):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(N_, P_)) * rng.gamma(1.0, size=P_)).astype(np.float32)  # uneven columns
    w_bar = rng.normal(size=P_).astype(np.float32)
    w, info = method.solve(jnp.asarray(X), jnp.asarray(w_bar), K_)
    tr = _trace(info)
    assert len(tr) >= 2  # at least one step was taken
    # non-increasing (the solver compares in its own float32 arithmetic: exact, no slack)
    assert np.all(np.diff(tr) <= 0), np.diff(tr)
    assert tr[-1] < tr[0]  # and IHT did improve on H_k(w̄)
    assert float(info.objective) == tr[-1]
    # the reported objective is f(w) at the returned w and the reported targets (float64)
    f64 = _np_objective(X, w, info.targets, w_bar, method.lam)
    assert float(info.objective) == pytest.approx(f64, rel=1e-4)
    # trace[0] is f at the start H_k(w̄)
    w0 = np.where(_np_topk_mask(w_bar, K_), w_bar, 0)
    assert tr[0] == pytest.approx(_np_objective(X, w0, info.targets, w_bar, method.lam), rel=1e-4)


def test_iht_true_objective_decreases_iteration_by_iteration():
    """f recomputed in float64 at the iterates w_j (IHT stopped after j steps) never increases."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(N_, P_)) * rng.gamma(1.0, size=P_)
    w_bar = rng.normal(size=P_)
    y = X @ w_bar
    lam = 0.01
    run = jax.jit(
        lambda X, t, wb, j: I.iht(X, t, wb, wb, K_, lam, max_iters=j, tol=0.0)[0],
        static_argnums=3,
    )
    steps = [1, 3, 6]  # each is one compilation
    w0 = np.where(_np_topk_mask(w_bar, K_), w_bar, 0)
    f = [_np_objective(X, w0, y, w_bar, lam)]
    with jax.enable_x64(True):
        Xj, yj, wbj = jnp.asarray(X), jnp.asarray(y), jnp.asarray(w_bar)
        for j in steps:
            r = run(Xj, yj, wbj, j)
            assert int(r.iterations) == j  # tol = 0: no early stop on this problem
            assert int(np.sum(np.asarray(r.support))) == K_
            assert np.all(np.asarray(r.w)[~np.asarray(r.support)] == 0)
            f.append(_np_objective(X, r.w, y, w_bar, lam))
            assert float(r.objective) == pytest.approx(f[-1], rel=1e-10)
    assert np.all(np.diff(f) <= 1e-12 * f[0]), f
    assert f[-1] < 0.9 * f[0], f  # measured: 2210 → 1216 in 6 steps
    # the trace of the longest run records the same values at the same iterations
    np.testing.assert_allclose(np.asarray(r.trace)[[0] + steps], f, rtol=1e-10)


# ---------------------------------------------------------------------------
# backsolve


@pytest.mark.parametrize("k", [10, 48], ids=["k<N", "k>N"])
@pytest.mark.parametrize("use_width", [False, True], ids=["width=None", "width=pow2"])
@pytest.mark.parametrize("lam", [0.01, 0.0])
def test_backsolve_equals_lstsq(k, use_width, lam):
    n, p = 30, 80
    if lam == 0.0 and k > n:
        pytest.skip("λ = 0 with k > N has no unique least-squares solution")
    rng = np.random.default_rng(k)
    X = rng.normal(size=(n, p))
    w_bar = rng.normal(size=p)
    t = X @ w_bar + 0.3 * rng.normal(size=n)
    support = np.zeros(p, bool)
    support[rng.choice(p, k, replace=False)] = True
    width = 1 << (k - 1).bit_length() if use_width else None
    with jax.enable_x64(True):
        w = np.asarray(I.backsolve(jnp.asarray(X), jnp.asarray(t), jnp.asarray(w_bar), jnp.asarray(support), lam, width))
    ref = _np_ridge_on_support(X, t, w_bar, support, lam)
    assert np.all(w[~support] == 0)
    np.testing.assert_allclose(w, ref, rtol=1e-8, atol=1e-9 * np.abs(ref).max())
    # the first-order condition of the ridge problem on S holds
    g = _np_gradient(X, w, t, w_bar, lam)
    assert np.abs(g[support]).max() <= 1e-8 * np.abs(X.T @ t).max()


def test_backsolve_support_smaller_than_width():
    """Padding columns of the gathered block (|S| < width) contribute nothing."""
    n, p, k = 30, 80, 9
    rng = np.random.default_rng(11)
    X = rng.normal(size=(n, p))
    w_bar = rng.normal(size=p)
    t = X @ w_bar
    support = np.zeros(p, bool)
    support[rng.choice(p, k, replace=False)] = True
    with jax.enable_x64(True):
        w = np.asarray(I.backsolve(jnp.asarray(X), jnp.asarray(t), jnp.asarray(w_bar), jnp.asarray(support), 0.01, 32))
    np.testing.assert_allclose(w, _np_ridge_on_support(X, t, w_bar, support, 0.01), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [10, 48], ids=["k<N", "k>N"])
@pytest.mark.parametrize("lam", [0.01, 0.0])
def test_ridge_state_is_the_backsolve_with_its_objective_and_gradient(k, lam):
    """w, f and ∇f from one pass over X (and the Gram) against float64 NumPy: the ridge solution, f by
    its definition, ∇f = Xᵀ(Xw − t) + Nλ(w − w̄), which vanishes on S."""
    n, p = 30, 80
    if lam == 0.0 and k > n:
        pytest.skip("λ = 0 with k > N has no unique least-squares solution")
    rng = np.random.default_rng(k + 1)
    X = rng.normal(size=(n, p))
    w_bar = rng.normal(size=p)
    t = X @ w_bar + 0.3 * rng.normal(size=n)
    support = np.zeros(p, bool)
    support[rng.choice(p, k, replace=False)] = True
    ref = _np_ridge_on_support(X, t, w_bar, support, lam)
    with jax.enable_x64(True):
        gram = I.support_gram(jnp.asarray(X), jnp.asarray(support))
        for x_anchor in (None, jnp.asarray(X @ np.where(support, w_bar, 0))):
            w, f, g = (np.asarray(a) for a in I.ridge_state(jnp.asarray(X), jnp.asarray(t), jnp.asarray(w_bar),
                                                               jnp.asarray(support), lam, gram, x_anchor))
            np.testing.assert_allclose(w, ref, rtol=1e-8, atol=1e-9 * np.abs(ref).max())
            assert f == pytest.approx(_np_objective(X, ref, t, w_bar, lam), rel=1e-9)
            np.testing.assert_allclose(g, _np_gradient(X, ref, t, w_bar, lam), atol=1e-8 * np.abs(X.T @ t).max())
            assert np.abs(g[support]).max() <= 1e-8 * np.abs(X.T @ t).max()


def test_solve_spd_by_cholesky_and_by_lu_where_the_factor_breaks_down():
    rng = np.random.default_rng(3)
    B = rng.normal(size=(40, 60))
    A, b = B @ B.T + 0.1 * np.eye(40), rng.normal(size=40)
    x = np.asarray(jax.jit(I.solve_spd)(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)), np.float64)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-3, atol=1e-4 * np.abs(np.linalg.solve(A, b)).max())
    # symmetric but indefinite: the Cholesky factor is NaN, LU still solves it
    D = np.diag(np.r_[np.ones(39), -1.0]).astype(np.float32)
    x = np.asarray(I.solve_spd(jnp.asarray(D), jnp.ones(40, jnp.float32)))
    np.testing.assert_allclose(x, np.r_[np.ones(39), -1.0])


def _rise_when_removed(H, w, q):
    """min ½dᵀHd over d with d_q = −w_q (the others free): the cost of removing w_q, by a direct solve."""
    rest = np.arange(len(w)) != q
    d_rest = np.linalg.solve(H[np.ix_(rest, rest)], H[rest, q] * w[q])
    d = np.zeros(len(w))
    d[q], d[rest] = -w[q], d_rest
    return 0.5 * d @ H @ d


@pytest.mark.parametrize("block", [None, 7], ids=["one block", "blocks of 7"])
@pytest.mark.parametrize("n, p, k, width", [(20, 60, 10, 30), (30, 40, 8, 40)])
def test_obs_support_keeps_the_weights_dearest_to_remove_within_the_active_set(n, p, k, width, block, monkeypatch):
    """Float64 reference: each weight of the ``width`` largest |w| priced by re-fitting the others exactly;
    the k dearest are kept (which is not the magnitude support). Blocks of 7 columns (with padding) give
    the same support."""
    if block is not None:
        monkeypatch.setattr(I, "GRAM_BLOCK", block)
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, p)) * rng.gamma(0.5, size=p)
    w = rng.normal(size=p)
    lam = 0.1 * np.mean(X**2)
    active = np.argsort(-np.abs(w))[:width]
    H = X[:, active].T @ X[:, active] + n * lam * np.eye(width)
    rise = np.array([_rise_when_removed(H, w[active], q) for q in range(width)])
    expected = np.zeros(p, bool)
    expected[active[np.argsort(-rise)[:k]]] = True
    obs_support = jax.jit(I.obs_support, static_argnums=4)
    got = np.asarray(obs_support(jnp.asarray(X, jnp.float32), jnp.asarray(w, jnp.float32), k, float(lam), width))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, np.asarray(I.hard_threshold_mask(jnp.asarray(w), k)))


@pytest.mark.parametrize("moved", [0, 3, 7], ids=["same", "near", "far"])
def test_nearby_gram_equals_the_support_gram(moved):
    """G_S updated from a reference support R (rank-2m exchange, or afresh when S is far) equals X_S X_Sᵀ."""
    n, p, k, diff = 20, 60, 15, 4
    rng = np.random.default_rng(moved)
    X = rng.normal(size=(n, p))
    order = rng.permutation(p)
    reference, support = np.zeros(p, bool), np.zeros(p, bool)
    reference[order[:k]] = True
    support[np.r_[order[moved:k], order[k:k + moved]]] = True  # `moved` kept columns exchanged
    with jax.enable_x64(True):
        Xj = jnp.asarray(X)
        G_R = I.support_gram(Xj, jnp.asarray(reference), 16)
        G = np.asarray(jax.jit(I.nearby_gram, static_argnums=(4, 5))(
            Xj, jnp.asarray(support), jnp.asarray(reference), G_R, 16, diff))
    X_S = X[:, support]
    np.testing.assert_allclose(G, X_S @ X_S.T, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# CHITA's active-set phase


def test_active_set_monotone_and_a_fixed_point_of_full_iht():
    X, w_bar, _ = _problem(5, 200, 400, 20, np.float32)[:3]
    t = np.asarray(X, np.float64) @ np.asarray(w_bar, np.float64)
    method = fixed_lr(active_set=1.0, backsolve=False, max_iters=200, tol=0.0)
    w, info = method.solve(X, w_bar, 20)
    trace = _trace(info)
    assert np.all(np.diff(trace) <= 1e-6 * abs(trace[0]))
    np.testing.assert_allclose(float(info.objective), _np_objective(X, w, t, w_bar, 0.01), rtol=1e-4)
    # At the end no coordinate outside the support would enter at the exact step (float64 check).
    g = _np_gradient(X, w, t, w_bar, 0.01)
    S = np.asarray(info.support)
    Xd = np.asarray(X, np.float64)
    gs = np.where(S, g, 0)
    tau = gs @ gs / (np.sum((Xd @ gs) ** 2) + 200 * 0.01 * gs @ gs)
    smallest_kept = np.min(np.abs(np.asarray(w, np.float64) - tau * g)[S])
    assert np.sum(~S & (tau * np.abs(g) > smallest_kept * (1 + 1e-4))) == 0


def test_active_set_covering_everything_equals_plain_iht():
    X, w_bar, _ = _problem(6, 200, 400, 20, np.float32)[:3]
    plain, i_plain = fixed_lr(backsolve=False).solve(X, w_bar, 20)
    full, i_full = fixed_lr(backsolve=False, active_set=400 / 20).solve(X, w_bar, 20)
    # two compiled programs (the active set gathers X's columns): the same support, w to float32 rounding
    np.testing.assert_array_equal(np.asarray(i_full.support), np.asarray(i_plain.support))
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain), rtol=1e-5, atol=1e-6 * float(np.abs(plain).max()))


def test_active_set_below_one_is_an_error():
    with pytest.raises(ValueError, match="active_set"):
        swapjax.LR(active_set=0.5)
