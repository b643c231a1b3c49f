"""The layer methods on one layer (SparseGPT, Wanda, Refit, Regression, LayerOperator) against float64 NumPy
transcriptions of the published algorithms.

The references follow the published code line by line (SparseGPT's ``fasterprune``: dampening,
dead inputs, the upper Cholesky factor of H⁻¹, blocks with lazy updates, N:M at each group's first
input; Wanda's |W|·‖a‖ per output unit), with this library's exact counts (a block's share of the
layer's count, by largest remainder) and ties to the lower index.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax import layer_methods
from swapjax.contract import solve_layer
from swapjax.layer_methods import LayerInfo
from swapjax.baselines import layer_quotas


def _layer(seed=0, n=300, d_in=48, d_out=10, dead=()):
    """Correlated inputs A (n, d_in) (a shared factor) whose features differ in scale (as activations
    do: a few large ones), a dense kernel W̄ (d_in, d_out), H = AᵀA."""
    rng = np.random.default_rng(seed)
    A = (rng.normal(size=(n, d_in)) + 0.8 * rng.normal(size=(n, 1))) * rng.gamma(1.0, size=d_in)
    A[:, list(dead)] = 0
    W = rng.normal(size=(d_in, d_out))
    return A, W, A.T @ A


def _keep_top(score, count):
    """The ``count`` largest entries of a flat score (ties to the lower index), as a bool mask."""
    order = np.lexsort((np.arange(score.size), -score))
    mask = np.zeros(score.size, bool)
    mask[order[:count]] = True
    return mask


def _sparsegpt_reference(W, H, rule, block, percdamp=0.01):
    """SparseGPT's fasterprune in float64 NumPy (columns of Wt are the inputs)."""
    Wt, H = W.T.copy(), H.copy()
    d_out, d_in = Wt.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Wt[:, dead] = 0
    H += percdamp * np.mean(np.diag(H)) * np.eye(d_in)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    starts = list(range(0, d_in, block))
    counts = None if isinstance(rule, swapjax.NM) else layer_quotas(rule, [min(block, d_in - s) * d_out for s in starts])
    pruned = np.zeros((d_out, d_in), bool)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block, d_in)
        W1, U1 = Wt[:, i1:i2].copy(), U[i1:i2, i1:i2]
        Q1, E1 = np.zeros_like(W1), np.zeros_like(W1)
        mask1 = np.zeros(W1.shape, bool)
        if counts is not None:
            score = W1 ** 2 / np.diag(U1)[None, :] ** 2
            mask1 = ~_keep_top(score.ravel(), counts[b]).reshape(W1.shape)
        for i in range(i2 - i1):
            if counts is None and i % rule.m == 0:
                score = W1[:, i:i + rule.m] ** 2 / np.diag(U1)[i:i + rule.m][None, :] ** 2
                for row in range(d_out):
                    mask1[row, i:i + rule.m] = ~_keep_top(score[row], rule.n)
            w, d = W1[:, i], U1[i, i]
            q = np.where(mask1[:, i], 0, w)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        Wt[:, i1:i2] = Q1
        Wt[:, i2:] -= E1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return Wt.T, ~pruned.T


def _wanda_reference(W, H, rule):
    d_in, d_out = W.shape
    score = np.abs(W) * np.sqrt(np.diag(H))[:, None]
    kept = np.zeros(W.shape, bool)
    for j in range(d_out):
        if isinstance(rule, swapjax.NM):
            for g in range(0, d_in, rule.m):
                kept[g:g + rule.m, j] = _keep_top(score[g:g + rule.m, j], rule.n)
        else:
            kept[:, j] = _keep_top(score[:, j], layer_quotas(rule, [d_in] * d_out)[j])
    return np.where(kept, W, 0), kept


RULES = {"count": 173, "2:4": swapjax.NM(2, 4), "1:4": swapjax.NM(1, 4)}


def _groups(rule, d_in, d_out):
    """The layer's Groups for a rule of the references (a count or NM)."""
    if isinstance(rule, swapjax.NM):
        return layer_methods.nm_groups(rule.n, rule.m, d_in, d_out)
    return swapjax.Groups.top_k(rule)


def _solve(method, W, H, rule):
    """``method`` on the layer (contract.solve_layer: the driver's one call per layer)."""
    return solve_layer(method, "layer", W, H, _groups(rule, *np.shape(W)))


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_sparsegpt_matches_the_published_algorithm_in_float64(rule):
    A, W, H = _layer(dead=(5,))
    spec = RULES[rule]
    expected_w, expected_mask = _sparsegpt_reference(W, H, spec, block=16)
    with jax.enable_x64(True):
        w, mask = layer_methods.sparsegpt(W, H, _groups(spec, *np.shape(W)), block=16)
        w, mask = np.asarray(w), np.asarray(mask)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(w, expected_w, rtol=1e-5, atol=1e-5 * np.abs(expected_w).max())
    w32, mask32 = layer_methods.sparsegpt(W.astype(np.float32), H.astype(np.float32), _groups(spec, *W.shape), block=16)
    assert w32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mask32), expected_mask)  # well conditioned: the same masks
    np.testing.assert_allclose(np.asarray(w32), expected_w, atol=1e-3 * np.abs(expected_w).max())


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_wanda_matches_the_published_rule(rule):
    A, W, H = _layer(1)
    expected_w, expected_mask = _wanda_reference(W, H, RULES[rule])
    w, mask = layer_methods.wanda(W.astype(np.float32), H.astype(np.float32), _groups(RULES[rule], *W.shape))
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(w), expected_w.astype(np.float32))


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_both_keep_the_constraint_exactly_and_sparsegpt_reconstructs_better(rule):
    A, W, H = _layer(2, d_in=64, d_out=12)
    spec = RULES[rule]
    errors = {}
    for name, fn in (("wanda", layer_methods.wanda), ("sparsegpt", layer_methods.sparsegpt)):
        w, mask = (np.asarray(a) for a in fn(W.astype(np.float32), H.astype(np.float32), _groups(spec, *W.shape)))
        assert np.all(w[~mask] == 0)
        if isinstance(spec, swapjax.NM):
            groups = mask.reshape(64 // spec.m, spec.m, 12).sum(axis=1)
            assert np.all(groups == spec.n)
        else:
            assert mask.sum() == spec
        errors[name] = np.linalg.norm(A @ (w - W))
    magnitude, _ = _wanda_reference(W, np.eye(64), spec)  # |W| alone, compared the same way
    errors["magnitude"] = np.linalg.norm(A @ (magnitude - W))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_layer_errors_name_the_argument():
    A, W, H = _layer()
    with pytest.raises(ValueError, match=r"H: expected the Gram AᵀA of the layer's inputs, shape \(48, 48\)"):
        layer_methods.sparsegpt(W, H[:4, :4], swapjax.Groups.top_k(10))
    with pytest.raises(ValueError, match="groups: 2:4 groups run along the 50 inputs, not a multiple of m = 4"):
        layer_methods.nm_groups(2, 4, 50, 3)
    with pytest.raises(ValueError, match="block: 6 inputs per block must be a multiple of m = 4"):
        layer_methods.sparsegpt(W, H, _groups(swapjax.NM(2, 4), *W.shape), block=6)
    with pytest.raises(ValueError, match=r"groups: keep 481 weights of the layer's 480"):
        layer_methods.wanda(W, H, swapjax.Groups.top_k(W.size + 1))
    with pytest.raises(ValueError, match=r"groups: ids of shape \(8,\), expected \(480,\)"):
        layer_methods.wanda(W, H, swapjax.Groups(np.array([1, 1]), np.array([0, 0, 0, 0, 1, 1, 1, 1])))
    per_unit = swapjax.Groups(np.full(10, 20, np.int32), np.tile(np.arange(10, dtype=np.int32), 48))
    with pytest.raises(ValueError, match=r"groups: SparseGPT keeps a count per layer or N:M \(groups.nm\), got 10 "
                                         r"groups of other counts"):
        layer_methods.sparsegpt(W, H, per_unit)
    with pytest.raises(ValueError, match=r"W_bar: expected a 2-D kernel \(d_in, d_out\), got shape \(480,\)"):
        solve_layer(layer_methods.Wanda(), "layer", W.ravel(), H, per_unit)


def test_refit_is_the_least_squares_solution_on_each_units_support():
    A, W, H = _layer(3)
    w, mask = _solve(layer_methods.Refit(layer_methods.Wanda(), percdamp=0.0), W.astype(np.float32),
                     H.astype(np.float32), 200)
    w, mask = np.asarray(w, np.float64), np.asarray(mask)
    np.testing.assert_array_equal(mask, np.asarray(layer_methods.wanda(W, H, _groups(200, *np.shape(W)))[1]))
    for j in range(W.shape[1]):
        keep = mask[:, j]
        expected = np.linalg.lstsq(A[:, keep], A @ W[:, j], rcond=None)[0]
        np.testing.assert_allclose(w[keep, j], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        assert np.all(w[~keep, j] == 0)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_regression_on_the_layer_starts_from_sparsegpt_and_only_improves(rule):
    """LR on the layer's operator from SparseGPT's support: the rule exactly, and a reconstruction error
    no higher than SparseGPT's (IHT, the backsolve and the swap search never raise f)."""
    A, W, H = _layer(4, d_in=32, d_out=8)
    spec = RULES[rule] if not isinstance(RULES[rule], int) else 90
    err = lambda w: np.linalg.norm(A @ (np.asarray(w, np.float64) - W)) ** 2  # noqa: E731
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    w_gpt, _ = _solve(layer_methods.SparseGPT(), W32, H32, spec)
    w, mask = (np.asarray(a) for a in _solve(layer_methods.Regression(), W32, H32, spec))
    assert np.all(w[~mask] == 0)
    if isinstance(spec, swapjax.NM):
        assert np.all(mask.reshape(32 // spec.m, spec.m, 8).sum(axis=1) == spec.n)
    else:
        assert mask.sum() == spec
    assert err(w) <= err(w_gpt) * (1 + 1e-5)


def test_layer_operator_products_are_the_kronecker_of_the_cholesky_factor():
    rng = np.random.default_rng(0)
    L = np.tril(rng.normal(size=(5, 5))).astype(np.float32)
    op = layer_methods.LayerOperator(jnp.asarray(L), 3)
    X = np.kron(L.T.astype(np.float64), np.eye(3))  # row-major vec of Lᵀ V, V (5, 3)
    v, u = rng.normal(size=15), rng.normal(size=15)
    A = op.products()
    np.testing.assert_allclose(A.mv(jnp.asarray(v, jnp.float32)), X @ v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(A.rmv(jnp.asarray(u, jnp.float32)), X.T @ u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(op.col_sq, (X * X).sum(0), rtol=1e-5)


def _dead_layer(dead, seed=5, d_in=16, d_out=6):
    A, W, H = _layer(seed, n=80, d_in=d_in, d_out=d_out, dead=dead)
    return A, W.astype(np.float32), H.astype(np.float32)


DEAD_METHODS = {"Wanda": layer_methods.Wanda(), "SparseGPT": layer_methods.SparseGPT(block=8),
                "Refit": layer_methods.Refit(layer_methods.Wanda()), "Regression": layer_methods.Regression(),
                "Swaps": layer_methods.Swaps()}


@pytest.mark.parametrize("rule", [40, swapjax.NM(2, 4)], ids=["count", "2:4"])
@pytest.mark.parametrize("method", DEAD_METHODS)
def test_a_layer_whose_inputs_never_fire_becomes_zero_under_the_rule(method, rule):
    """H = 0 (all-zero inputs): every method returns W = 0 with a mask that keeps the rule exactly (the
    ties of zero scores to the lower index where the mask is a ranking). Regression used to raise
    "X: ... overflow float32"; Refit returned NaN; Wanda kept the first inputs' weights."""
    W = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    w, mask = (np.asarray(a) for a in _solve(DEAD_METHODS[method], W, np.zeros((16, 16), np.float32), rule))
    assert w.shape == mask.shape == (16, 6) and np.all(w == 0)
    if isinstance(rule, swapjax.NM):
        assert np.all(mask.reshape(4, 4, 6).sum(axis=1) == 2)
    else:
        assert mask.sum() == rule
    if method in ("Wanda", "Refit"):  # Wanda's ranking of zeros: the lower inputs, per output unit
        np.testing.assert_array_equal(mask, _wanda_reference(np.zeros((16, 6)), np.zeros((16, 16)), rule)[1])


# Group 0 of 2:4 has three dead inputs: one of its two kept weights is a dead one. A count of 84 of 16×6
# keeps 14 inputs per output unit in Wanda, 12 live ones: the rule keeps dead weights there too.
_DEAD = (0, 1, 2, 9)


@pytest.mark.parametrize("rule", [84, swapjax.NM(2, 4)], ids=["count", "2:4"])
def test_dead_inputs_wanda_zeroes_their_weights(rule):
    """Wanda on a layer with dead inputs (H_ii = 0): the published rule on W̄ with the dead inputs' weights
    set to 0, as SparseGPT treats them: the dead weights a rule still keeps are 0 (they were W̄_i)."""
    A, W, H = _dead_layer(_DEAD)
    W0 = W.astype(np.float64).copy()
    W0[list(_DEAD)] = 0
    expected_w, expected_mask = _wanda_reference(W0, H.astype(np.float64), rule)
    w, mask = (np.asarray(a) for a in layer_methods.wanda(W, H, _groups(rule, *np.shape(W))))
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(w, expected_w.astype(np.float32))
    assert np.all(w[list(_DEAD)] == 0) and mask[list(_DEAD)].any()


@pytest.mark.parametrize("rule", [84, swapjax.NM(2, 4)], ids=["count", "2:4"])
def test_dead_inputs_sparsegpt_matches_the_published_code(rule):
    A, W, H = _dead_layer(_DEAD)
    expected_w, expected_mask = _sparsegpt_reference(W.astype(np.float64), H.astype(np.float64), rule, block=8)
    w, mask = (np.asarray(a) for a in layer_methods.sparsegpt(W, H, _groups(rule, *np.shape(W)), block=8))
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(w, expected_w, rtol=1e-4, atol=1e-4 * np.abs(expected_w).max())
    assert np.all(w[list(_DEAD)] == 0)


@pytest.mark.parametrize("rule", [84, swapjax.NM(2, 4)], ids=["count", "2:4"])
def test_dead_inputs_refit_solves_with_their_diagonal_one_and_weights_zero(rule):
    """Refit on a layer with dead inputs, against float64 NumPy: H_ii = 1 and W̄_i = 0 for the dead ones,
    damped by δ = percdamp·mean diag, each unit solved on its support: the dead weights kept are 0
    (before, the damping alone made them W̄_i)."""
    A, W, H = _dead_layer(_DEAD)
    refit = layer_methods.Refit(layer_methods.Wanda(), percdamp=0.01)
    w, mask = (np.asarray(a, np.float64) for a in _solve(refit, W, H, rule))
    mask = mask.astype(bool)
    np.testing.assert_array_equal(mask, np.asarray(layer_methods.wanda(W, H, _groups(rule, *np.shape(W)))[1]))
    Hd, W0 = H.astype(np.float64), W.astype(np.float64)
    Hd[list(_DEAD), list(_DEAD)] = 1
    W0[list(_DEAD)] = 0
    Hd += 0.01 * np.mean(np.diag(Hd)) * np.eye(16)
    for j in range(W.shape[1]):
        keep = mask[:, j]
        expected = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ W0[:, j])[keep])
        np.testing.assert_allclose(w[keep, j], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
        assert np.all(w[~keep, j] == 0)
    assert np.all(w[list(_DEAD)] == 0) and mask[list(_DEAD)].any()


@pytest.mark.parametrize("rule", [84, swapjax.NM(2, 4)], ids=["count", "2:4"])
def test_dead_inputs_regression_keeps_the_rule_zeroes_them_and_beats_sparsegpt(rule):
    """LR on the layer with dead inputs: the rule exactly, the dead weights 0 (the ridge term pulled them
    to W̄_i before), and a reconstruction error ‖A(W − W̄)‖² no higher than SparseGPT's."""
    A, W, H = _dead_layer(_DEAD)
    w, mask = (np.asarray(a) for a in _solve(layer_methods.Regression(), W, H, rule))
    w_gpt, _ = _solve(layer_methods.SparseGPT(), W, H, rule)
    assert np.all(np.isfinite(w)) and np.all(w[~mask] == 0) and np.all(w[list(_DEAD)] == 0)
    if isinstance(rule, swapjax.NM):
        assert np.all(mask.reshape(4, 4, 6).sum(axis=1) == 2)
    else:
        assert mask.sum() == rule
    err = lambda w: np.linalg.norm(A @ (np.asarray(w, np.float64) - W)) ** 2  # noqa: E731
    assert err(w) <= err(w_gpt) * (1 + 1e-5)


def test_methods_on_x_run_on_the_layers_operator():
    """Any method on X runs on a layer: X = I ⊗ Lᵀ with LLᵀ = H + δI, so Magnitude keeps the largest |W̄| of
    the layer (NumPy) and LR, from W̄'s magnitude support, reconstructs no worse than it; a method that needs
    X formed (WoodFisher) is refused with the way out."""
    A, W, H = _layer(6, n=120, d_in=16, d_out=4)
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    k = swapjax.Groups.top_k(20)
    w_mp, mask_mp = solve_layer(swapjax.Magnitude(), "layer", W32, H32, k)
    expected = _keep_top(np.abs(W32).ravel(), 20).reshape(16, 4)
    np.testing.assert_array_equal(mask_mp, expected)
    np.testing.assert_array_equal(np.asarray(w_mp), np.where(expected, W32, 0))
    w_lr, mask_lr = solve_layer(swapjax.LR(lam=1e-4), "layer", W32, H32, k)
    assert mask_lr.sum() == 20 and np.all(np.asarray(w_lr)[~mask_lr] == 0)
    err = lambda w: np.linalg.norm(A @ (np.asarray(w, np.float64) - W)) ** 2  # noqa: E731
    assert err(w_lr) <= err(w_mp) * (1 + 1e-5)
    with pytest.raises(ValueError, match=r"method: WoodFisher needs X formed \(its columns\), and layer by layer X is "
                                         r"the layer's operator"):
        solve_layer(swapjax.WoodFisher(), "layer", W32, H32, k)


class _Wrong(swapjax.Method):
    """A layer method returning what ``how`` says (the mistakes a user's method makes)."""

    needs = "H"

    def __init__(self, how):
        self.how = how

    def solve_problem(self, problem):
        w, info = swapjax.Wanda().solve_problem(problem)
        if self.how == "keep all":
            return problem.w_bar, LayerInfo(jnp.ones(problem.w_bar.shape, bool))
        if self.how == "NaN":
            return jnp.where(info.support, jnp.nan, 0.0), info
        if self.how == "dense":
            return problem.w_bar, info
        if self.how == "int mask":
            return w, LayerInfo(info.support.astype(jnp.int32))
        return w[:-1], info


@pytest.mark.parametrize("how, rule, message", [
    ("keep all", 20, r"method: _Wrong on layer L kept 64 weights; the layer's budget is exactly 20"),
    ("keep all", swapjax.NM(2, 4), r"method: _Wrong on layer L keeps 2:4 in 0 of its 16 groups of 4 inputs; every "
                                   r"group must keep exactly 2"),
    ("NaN", 20, r"method: _Wrong on layer L returned 20 NaN or inf weights of 64"),
    ("dense", 20, r"method: _Wrong on layer L returned 44 non-zero weights where its mask prunes"),
    ("int mask", 20, r"method: _Wrong on layer L returned a mask of dtype int32; expected booleans"),
    ("short", 20, r"method: _Wrong on layer L returned w of shape \(63,\) and info.support of shape \(64,\); "
                  r"expected 64 entries each, the layer \(16, 4\) row-major"),
])
def test_solve_layer_checks_every_result(how, rule, message):
    A, W, H = _layer(7, n=60, d_in=16, d_out=4)
    with pytest.raises(ValueError, match=message):
        solve_layer(_Wrong(how), "L", W.astype(np.float32), H.astype(np.float32), _groups(rule, 16, 4))


@pytest.mark.parametrize("rule", [30, swapjax.NM(1, 4)], ids=["count", "1:4"])
def test_layer_magnitude_is_wanda_without_the_inputs(rule):
    """LayerMagnitude: Wanda's ranking on |W̄| alone (H = I in the reference): per output unit by largest
    remainder, or per N:M group; kept weights unchanged; network-wide (no layer shape) the groups' top |w̄|."""
    A, W, H = _layer(8, n=50, d_in=16, d_out=6)
    W32 = W.astype(np.float32)
    expected_w, expected_mask = _wanda_reference(W, np.eye(16), rule)
    w, mask = _solve(swapjax.LayerMagnitude(), W32, H.astype(np.float32), rule)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(np.asarray(w), expected_w.astype(np.float32))
    flat, info = swapjax.LayerMagnitude().solve_problem(swapjax.Problem(W32.ravel(), swapjax.Groups.top_k(30)))
    np.testing.assert_array_equal(np.asarray(info.support), _keep_top(np.abs(W32).ravel(), 30))
    assert np.isnan(float(info.objective))  # no curvature given: f is not defined


def test_refit_of_a_method_on_x_refits_its_mask():
    """Refit(Magnitude()): the magnitude mask of the layer (its operator's), each unit then solved exactly."""
    A, W, H = _layer(9, n=80, d_in=12, d_out=3)
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    w, mask = _solve(layer_methods.Refit(swapjax.Magnitude(), percdamp=0.0), W32, H32, 18)
    np.testing.assert_array_equal(mask, _keep_top(np.abs(W32).ravel(), 18).reshape(12, 3))
    for j in range(3):
        keep = mask[:, j]
        expected = np.linalg.lstsq(A[:, keep], A @ W[:, j], rcond=None)[0]
        np.testing.assert_allclose(np.asarray(w)[keep, j], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


# ---------------------------------------------------------------------------
# Swaps: SparseGPT's mask, single swaps per output unit, exact refits (swapjax/layer_search.py)


def _damped(W, H, percdamp=0.01):
    return H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))


@pytest.mark.parametrize("rule", [200, swapjax.NM(2, 4)], ids=["count", "2:4"])
def test_swaps_returns_the_least_squares_weights_on_its_support_and_beats_the_refit_of_sparsegpt(rule):
    """On three random layers: each output unit's weights solve (H + δI)_SS w_S = ((H + δI) w̄)_S on the
    support S the method returns (float64), the layer keeps its count (N:M: 2 per group of every unit; with
    ``across=False`` each unit keeps SparseGPT's count), and the reconstruction error is at most that of
    SparseGPT's mask refitted exactly."""
    for seed in range(3):
        A, W, H = _layer(10 + seed)
        W32, H32 = W.astype(np.float32), H.astype(np.float32)
        w, mask = (np.asarray(a) for a in _solve(layer_methods.Swaps(), W32, H32, rule))
        _, gpt_mask = _solve(layer_methods.SparseGPT(), W32, H32, rule)
        w_refit, _ = _solve(layer_methods.Refit(layer_methods.SparseGPT()), W32, H32, rule)
        Hd = _damped(W, H)
        for j in range(W.shape[1]):
            keep = mask[:, j]
            expected = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ W[:, j])[keep])
            np.testing.assert_allclose(w[keep, j], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
            assert np.all(w[~keep, j] == 0)
        if isinstance(rule, swapjax.NM):
            assert np.all(mask.reshape(12, 4, 10).sum(axis=1) == 2)
        else:
            assert int(mask.sum()) == 200
            _, within = _solve(layer_methods.Swaps(across=False), W32, H32, rule)
            np.testing.assert_array_equal(np.asarray(within).sum(axis=0), np.asarray(gpt_mask).sum(axis=0))
        f = lambda w: np.sum((np.asarray(w, np.float64) - W) * (Hd @ (np.asarray(w, np.float64) - W)))  # noqa: E731
        assert f(w) <= f(w_refit) * (1 + 1e-5), (seed, f(w), f(w_refit))


def _swap_reference(W, W_bar, Hd, mask):
    """One swap per column in float64: p the kept weight whose removal costs least, then q the pruned one
    with the largest decrease of f (its optimal value), done if f decreases."""
    W, mask = W.copy(), mask.copy()
    for j in range(W.shape[1]):
        w, keep = W[:, j], mask[:, j]
        f = lambda v: 0.5 * (v - W_bar[:, j]) @ Hd @ (v - W_bar[:, j])  # noqa: E731
        g = Hd @ (w - W_bar[:, j])
        cost = np.where(keep, 0.5 * np.diag(Hd) * w ** 2 - w * g, np.inf)
        p = int(np.argmin(cost))
        removed = w.copy()
        removed[p] = 0
        best, best_f = None, f(w)
        for q in np.flatnonzero(~keep):
            v = removed.copy()
            v[q] = -(Hd[q] @ (removed - W_bar[:, j])) / Hd[q, q]
            if f(v) < best_f - 1e-12 * abs(best_f):
                best, best_f = q, f(v)
                W_new = v
        if best is not None:
            W[:, j] = W_new
            mask[p, j], mask[best, j] = False, True
    return W, mask


def test_a_swap_is_the_best_exchange_for_the_cheapest_removal_float64():
    """layer_search.swap, one step from the exact refit on SparseGPT's mask: the same exchange per column as
    a float64 search over every pruned input q (p fixed), and f(W) lower in every column that swapped."""
    from swapjax import layer_search

    _, W, H = _layer(7, d_in=24, d_out=6)
    Hd = _damped(W, H)
    mask = np.asarray(_solve(layer_methods.SparseGPT(), W.astype(np.float32), H.astype(np.float32), 70)[1])
    start = np.zeros_like(W)
    for j in range(W.shape[1]):
        keep = mask[:, j]
        start[keep, j] = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ W[:, j])[keep])
    start[mask & (np.abs(start) < 1e-3)] = 1e-3  # no kept weight near 0 (a tie between removals)
    w, new_mask, made = layer_search.swap(*(jnp.asarray(a, jnp.float32) for a in (start, W, Hd)), jnp.asarray(mask), 1, 24)
    w_ref, mask_ref = _swap_reference(start, W, Hd, mask)
    np.testing.assert_array_equal(np.asarray(new_mask), mask_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-4, atol=1e-4)
    assert int(made) == int(np.sum(np.any(mask_ref != mask, axis=0))) > 0


def test_refit_by_conjugate_gradients_is_the_exact_least_squares_on_the_support():
    from swapjax import layer_search

    _, W, H = _layer(8, d_in=40, d_out=7)
    Hd = _damped(W, H)
    mask = np.random.default_rng(0).random(W.shape) < 0.5
    w = np.asarray(layer_search.refit(jnp.zeros(W.shape, jnp.float32), jnp.asarray(W, jnp.float32),
                                      jnp.asarray(Hd, jnp.float32), jnp.asarray(mask), 60), np.float64)
    for j in range(W.shape[1]):
        keep = mask[:, j]
        expected = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ W[:, j])[keep])
        np.testing.assert_allclose(w[keep, j], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert np.all(w[~mask] == 0)


def test_swaps_refuses_other_groups_and_bad_settings():
    _, W, H = _layer(9, d_in=8, d_out=3)
    per_unit = swapjax.Groups(jnp.asarray([4, 4, 4]), jnp.asarray(np.tile(np.arange(3), 8)))
    with pytest.raises(ValueError, match=r"groups: Swaps keeps a count per layer or N:M \(groups.nm\), got 3 groups"):
        solve_layer(layer_methods.Swaps(start=layer_methods.Wanda()), "layer", W.astype(np.float32),
                    H.astype(np.float32), per_unit)
    for bad in ({"rounds": -1}, {"swaps": 1.5}, {"iterations": "10"}, {"start": "sparsegpt"}, {"candidates": 0},
                {"across": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            layer_methods.Swaps(**bad)


# ---------------------------------------------------------------------------
# layer_solvers.search: swaps from several candidate removals and exchanges between output units


def _search_case(seed=3, d_in=24, d_out=8, kept=10, settled=False):
    """A layer with output units of different scales, a random support of ``kept`` per unit and the exact
    least-squares weights on it (float64): (W, W̄, H_δ, mask). ``settled``: the support after 40 steps of
    swaps within units, where few swaps are left and exchanges between units pay."""
    from swapjax import layer_solvers
    rng = np.random.default_rng(seed)
    A = (rng.normal(size=(80, d_in)) + 0.7 * rng.normal(size=(80, 1))) * rng.gamma(1.5, size=d_in)
    W_bar = rng.normal(size=(d_in, d_out)) * np.exp(rng.normal(size=d_out))
    Hd = _damped(None, A.T @ A)
    mask = np.zeros((d_in, d_out), bool)
    for j in range(d_out):
        mask[rng.choice(d_in, kept, replace=False), j] = True

    def refit(mask):
        W = np.zeros_like(W_bar)
        for j in range(d_out):
            keep = mask[:, j]
            W[keep, j] = np.linalg.solve(Hd[np.ix_(keep, keep)], (Hd @ W_bar[:, j])[keep])
        return W

    W = refit(mask)
    if settled:
        mask = np.asarray(layer_solvers.search(*(jnp.asarray(a, jnp.float32) for a in (W, W_bar, Hd)),
                                               jnp.asarray(mask), 40, False, 4)[1])
        W = refit(mask)
    return W, W_bar, Hd, mask


def _unit_f(W, W_bar, Hd):
    """f_j = ½(w_j − w̄_j)ᵀH_δ(w_j − w̄_j) per output unit, float64."""
    D = np.asarray(W, np.float64) - W_bar
    return 0.5 * np.sum(D * (Hd @ D), axis=0)


def _best_swap_reference(w, w_bar, Hd, keep, candidates):
    """The best single swap of one unit in float64 over its ``candidates`` cheapest removals p and every pruned
    q (q at its optimal value): (change of f, p, q), or None where no swap lowers f."""
    h, g = np.diag(Hd), Hd @ (w - w_bar)
    cost = np.where(keep, 0.5 * h * w ** 2 - w * g, np.inf)
    best = None
    for p in np.argsort(cost, kind="stable")[:candidates]:
        g_p = g - Hd[:, p] * w[p]
        for q in np.flatnonzero(~keep):
            change = cost[p] - g_p[q] ** 2 / (2 * h[q])
            if best is None or change < best[0]:
                best = (change, p, q)
    return best if best[0] < 0 else None


@pytest.mark.parametrize("candidates", [1, 3])
def test_search_step_makes_the_best_swap_of_its_candidate_removals_float64(candidates):
    """One step within units (``across=False``): each unit makes the swap a float64 search over its
    ``candidates`` cheapest removals and every pruned input finds, and its f_j falls by exactly that change;
    pruned weights exactly 0, each unit's count kept."""
    from swapjax import layer_solvers
    W, W_bar, Hd, mask = _search_case()
    w, new_mask, swaps, moved, _ = layer_solvers.search(*(jnp.asarray(a, jnp.float32) for a in (W, W_bar, Hd)),
                                                        jnp.asarray(mask), 1, False, candidates)
    w, new_mask = np.asarray(w, np.float64), np.asarray(new_mask)
    change = _unit_f(w, W_bar, Hd) - _unit_f(W, W_bar, Hd)
    made = 0
    for j in range(W.shape[1]):
        ref = _best_swap_reference(W[:, j], W_bar[:, j], Hd, mask[:, j], candidates)
        if ref is None:
            np.testing.assert_array_equal(new_mask[:, j], mask[:, j])
            continue
        made += 1
        expected = mask[:, j].copy()
        expected[ref[1]], expected[ref[2]] = False, True
        np.testing.assert_array_equal(new_mask[:, j], expected)
        np.testing.assert_allclose(change[j], ref[0], rtol=1e-3)
    assert int(swaps) == made > 0 and int(moved) == 0
    assert np.all(w[~new_mask] == 0)
    np.testing.assert_array_equal(new_mask.sum(axis=0), mask.sum(axis=0))


def test_search_stops_after_a_round_that_changes_nothing():
    """The search stops early only where every later round would repeat a round with no change: the result of
    at most 500 rounds equals that of exactly the rounds it ran, and a search from it changes nothing."""
    from swapjax import layer_solvers
    W, W_bar, Hd, mask = (jnp.asarray(a) for a in _search_case(seed=7))
    args = [jnp.asarray(a, jnp.float32) for a in (W, W_bar, Hd)]
    w, m, swaps, moved, rounds = layer_solvers.search(*args, mask, 500, True, 2)
    assert 1 < int(rounds) < 500 and int(swaps) > 0
    w_again, m_again, *_ = layer_solvers.search(*args, mask, int(rounds), True, 2)
    np.testing.assert_array_equal(np.asarray(m_again), np.asarray(m))
    np.testing.assert_array_equal(np.asarray(w_again), np.asarray(w))
    _, m_next, swaps_next, moved_next, rounds_next = layer_solvers.search(w, args[1], args[2], m, 500, True, 2)
    assert (int(swaps_next), int(moved_next), int(rounds_next)) == (0, 0, 1)
    np.testing.assert_array_equal(np.asarray(m_next), np.asarray(m))


def test_search_exchange_moves_weights_between_units_at_a_price_float64():
    """One step with ``across``: the units whose count falls drop their cheapest removal (f_j rises by exactly
    c_j = ½h_p w_p² − w_p g_p), as many units whose count rises take their best addition (f_j falls by exactly
    a_j = max_q g_q²/(2h_q)), every c of a remover below every a of an adder, so f falls; the other units make
    their best swap (float64 reference); the layer keeps its count, pruned weights exactly 0."""
    from swapjax import layer_solvers
    W, W_bar, Hd, mask = _search_case(seed=5, settled=True)
    w, new_mask, swaps, moved, _ = layer_solvers.search(*(jnp.asarray(a, jnp.float32) for a in (W, W_bar, Hd)),
                                                        jnp.asarray(mask), 1, True, 2)
    w, new_mask = np.asarray(w, np.float64), np.asarray(new_mask)
    change = _unit_f(w, W_bar, Hd) - _unit_f(W, W_bar, Hd)
    h, G = np.diag(Hd), Hd @ (W - W_bar)
    counts = new_mask.sum(axis=0) - mask.sum(axis=0)
    removers, adders = np.flatnonzero(counts == -1), np.flatnonzero(counts == 1)
    assert len(removers) == len(adders) == int(moved) >= 1 and set(counts) <= {-1, 0, 1}
    c, a = [], []
    for j in removers:
        cost = np.where(mask[:, j], 0.5 * h * W[:, j] ** 2 - W[:, j] * G[:, j], np.inf)
        p = int(np.argmin(cost))
        np.testing.assert_array_equal(np.flatnonzero(mask[:, j] & ~new_mask[:, j]), [p])
        np.testing.assert_allclose(change[j], cost[p], rtol=1e-3)
        c.append(cost[p])
    for j in adders:
        gain = np.where(mask[:, j], -np.inf, G[:, j] ** 2 / (2 * h))
        q = int(np.argmax(gain))
        np.testing.assert_array_equal(np.flatnonzero(new_mask[:, j] & ~mask[:, j]), [q])
        np.testing.assert_allclose(change[j], -gain[q], rtol=1e-3)
        a.append(gain[q])
    assert max(c) < min(a) and np.sum(change) < 0
    for j in np.flatnonzero(counts == 0):
        ref = _best_swap_reference(W[:, j], W_bar[:, j], Hd, mask[:, j], 2)
        if ref is not None:
            np.testing.assert_allclose(change[j], ref[0], rtol=1e-3)
    assert int(new_mask.sum()) == int(mask.sum()) and np.all(w[~new_mask] == 0)


def test_swaps_moves_counts_between_units_under_a_count_per_layer():
    """On units of different scales under a count per layer, Swaps (``across``) moves the kept count between
    units (SparseGPT's counts per unit change, the layer's stays) and ends below the exact refit on SparseGPT's
    mask; ``across=False`` keeps SparseGPT's count in every unit."""
    A, W, H = _layer(seed=5)
    W = W * np.exp(np.random.default_rng(5).normal(size=W.shape[1]))
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    f = lambda w: np.sum((np.asarray(w, np.float64) - W) * (_damped(W, H) @ (np.asarray(w, np.float64) - W)))  # noqa: E731
    (w1, m1), (w0, m0), (_, gpt), (w_refit, _) = (_solve(m, W32, H32, 200) for m in (
        layer_methods.Swaps(), layer_methods.Swaps(across=False), layer_methods.SparseGPT(),
        layer_methods.Refit(layer_methods.SparseGPT())))
    assert int(np.sum(m1)) == int(np.sum(m0)) == 200
    assert np.any(np.asarray(m1).sum(axis=0) != np.asarray(gpt).sum(axis=0))
    np.testing.assert_array_equal(np.asarray(m0).sum(axis=0), np.asarray(gpt).sum(axis=0))
    assert f(w1) < f(w_refit) and f(w0) < f(w_refit)


def test_swaps_bfloat16_kernel_is_solved_in_float32_with_dead_inputs_zero():
    """A bfloat16 kernel: the result is float32, equal to the solve of the same kernel given in float32; an input
    that never fires has weight 0 in every unit."""
    A, W, H = _layer(seed=6, dead=(3,))
    Wb = jnp.asarray(W, jnp.bfloat16)
    w, mask = _solve(layer_methods.Swaps(), Wb, H.astype(np.float32), 200)
    w32, mask32 = _solve(layer_methods.Swaps(), np.asarray(Wb.astype(jnp.float32)), H.astype(np.float32), 200)
    assert w.dtype == jnp.float32 and int(np.sum(mask)) == 200
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w32))
    np.testing.assert_array_equal(mask, mask32)
    assert np.all(np.asarray(w)[3] == 0)
