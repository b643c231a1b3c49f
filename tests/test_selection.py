"""Held-out selection of λ and ε, the Fisher-relative λ, and the swap search.

References: a scripted score (the selection must return the candidate it scored lowest),
NumPy objectives, explicit solves, and swapjax.prune's own held-out loss recomputed here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_loss
from test_methods import _cancelling_pairs, _np_objective, _np_ridge_on_support

import swapjax
from swapjax import iht as iht_lib
from swapjax import pytree
from swapjax.prune import AUTO_STAGES
from swapjax.methods import DEFAULT_LAM, EPSILON_PATH, LAM_PATH
from swapjax.selection import walk

# with scores that rise away from the first λ (DEFAULT_LAM), the walk tries it and both neighbours
FIRST_LAMS = [DEFAULT_LAM, LAM_PATH[LAM_PATH.index(DEFAULT_LAM) - 1], LAM_PATH[LAM_PATH.index(DEFAULT_LAM) + 1]]


def _problem(seed=0, n=40, p=80):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, p)) * rng.gamma(1.0, size=p)).astype(np.float32)
    return X, rng.normal(size=p).astype(np.float32)


@pytest.mark.parametrize("winner", [0, 3, -1])
def test_selection_returns_the_candidate_with_the_lowest_score(winner):
    """A scripted score: the i-th call gets a fixed value; the returned w is the one scored lowest."""
    X, w_bar = _problem()
    seen = []
    n_calls = len(FIRST_LAMS) + len(EPSILON_PATH) + 2  # λ walk on y, ε path at the best λ, swap search, OBS start
    values = np.linspace(2.0, 1.0, n_calls)[::-1].copy()  # increasing: the first would win ...
    values[winner] = 0.5  # ... unless another is scripted lower

    def score(w):
        seen.append(np.asarray(w))
        return values[len(seen) - 1]

    w, info = swapjax.SWAP().solve(X, w_bar, 8, score=score)
    assert len(seen) == len(info.candidates) == n_calls
    np.testing.assert_array_equal(np.asarray(w), seen[winner])
    assert [c.score for c in info.candidates] == pytest.approx(list(values))
    lams = len(FIRST_LAMS)
    assert [c.lam for c in info.candidates[:lams]] == FIRST_LAMS
    assert [c.epsilon for c in info.candidates[:lams]] == [None] * lams
    assert [c.epsilon for c in info.candidates[lams:-2]] == list(EPSILON_PATH)
    assert [c.support for c in info.candidates[-2:]] == ["swap", "obs"]
    assert np.sum(np.asarray(w) != 0) <= 8 and int(np.sum(info.support)) == 8


def test_candidates_after_the_first_are_exact_ridge_fits_on_its_support():
    """The first candidate runs IHT and the backsolve; the rest of the path is the ridge solution on its
    support at their own λ (float64 NumPy reference); a winning ridge fit is searched once more at its λ,
    and the OBS support is backsolved at its λ."""
    X, w_bar = _problem(5)
    k, seen = 8, []

    def score(w):
        seen.append(np.asarray(w, np.float64))
        return 0.5 if len(seen) == 2 else float(len(seen))  # the first ridge candidate wins

    w, info = swapjax.LR(swap_rounds=0).solve(X, w_bar, k, score=score)
    kinds = [c.support for c in info.candidates]
    assert kinds == ["iht", "ridge", "ridge", "iht", "obs"]  # the walk down from λ = 0.03; new searches at its λ
    assert info.chosen == 1 and info.candidates[3].lam == info.candidates[1].lam == FIRST_LAMS[1]
    support = seen[0] != 0
    assert support.sum() == k and all(np.array_equal(s != 0, support) for s in seen[1:3])
    scale = float(np.mean(X.astype(np.float64) ** 2))  # ‖X‖²_F/(Np)
    y = X.astype(np.float64) @ w_bar
    for i in (1, 2):
        lam = info.candidates[i].lam
        ref = _np_ridge_on_support(X, y, w_bar, support, lam * scale)
        np.testing.assert_allclose(seen[i], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
        assert info.candidates[i].objective == pytest.approx(_np_objective(X, ref, y, w_bar, lam * scale), rel=1e-3)
    np.testing.assert_array_equal(np.asarray(w), seen[1])
    magnitude = np.zeros(X.shape[1], bool)
    magnitude[np.argsort(-np.abs(w_bar))[:k]] = True
    lam = FIRST_LAMS[1] * scale
    f_mag = _np_objective(X, _np_ridge_on_support(X, y, w_bar, magnitude, lam), y, w_bar, lam)
    assert float(info.objective_magnitude) == pytest.approx(f_mag, rel=1e-3)
    # the last candidate: the ridge solution on the OBS support (w̄²/(2[H_A⁻¹]_qq) over the 2·8 largest |w̄|)
    active = np.argsort(-np.abs(w_bar))[:2 * k]
    Xa = X[:, active].astype(np.float64)
    saliency = w_bar[active] ** 2 / (2 * np.diag(np.linalg.inv(Xa.T @ Xa + X.shape[0] * lam * np.eye(2 * k))))
    obs = np.zeros(X.shape[1], bool)
    obs[active[np.argsort(-saliency)[:k]]] = True
    assert not np.array_equal(obs, support)
    ref = _np_ridge_on_support(X, y, w_bar, obs, lam)
    np.testing.assert_allclose(seen[4], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("gain, chosen", [(0.01, "y"), (0.5, "ε")])
def test_transport_targets_must_beat_lr_targets_beyond_the_held_out_noise(gain, chosen):
    """Per-example scores: a ỹ candidate whose mean is lower by less than one standard error of the
    paired difference does not displace LR's y; one lower by many standard errors does."""
    X, w_bar = _problem(2)
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, size=50)
    noise = rng.normal(size=50)
    noise -= noise.mean()  # paired difference of the first ε candidate: mean −gain, SE ≈ 0.14
    lams, first_eps = len(FIRST_LAMS), len(FIRST_LAMS)
    calls = []

    def score(w):
        i = len(calls)
        calls.append(np.asarray(w))
        if i < lams:  # the λ walk on y: the first (DEFAULT_LAM) is the best
            return base + 0.1 * i
        if i < lams + len(EPSILON_PATH):
            return base - gain + (noise if i == first_eps else 2.0)  # only the first ε can compete
        return base + 1.0  # the swap search loses

    w, info = swapjax.SWAP().solve(X, w_bar, 8, score=score)
    expected = 0 if chosen == "y" else first_eps
    assert info.chosen == expected
    np.testing.assert_array_equal(np.asarray(w), calls[expected])
    assert info.candidates[first_eps].score < info.candidates[0].score  # a lower mean in both cases
    # a float score has no noise estimate: the lowest mean wins
    calls.clear()
    _, plain = swapjax.SWAP().solve(X, w_bar, 8, score=lambda w: float(np.mean(score(w))))
    assert plain.chosen == first_eps


@pytest.mark.parametrize("minimum", range(len(LAM_PATH)))
def test_the_lam_walk_finds_the_minimum_of_a_unimodal_score(minimum):
    """Scores |i − minimum| along the path: the walk reaches the minimum, trying only the values on the way
    (and at most one step the wrong way and one past the minimum)."""
    tried = []
    for lam in walk(LAM_PATH, DEFAULT_LAM, lambda: abs(LAM_PATH.index(tried[-1]) - minimum)):
        tried.append(lam)
    start = LAM_PATH.index(DEFAULT_LAM)
    assert tried[0] == DEFAULT_LAM and LAM_PATH[minimum] in tried
    assert len(tried) <= abs(minimum - start) + 3 and len(set(tried)) == len(tried)


DAMPS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def test_selected_chooses_any_methods_field_on_held_out_loss():
    """Selected(WoodFisher(), "damp", path): every value tried is a full WoodFisher solve (scores recomputed
    here in float64 from separate solves), the walk stops at a local minimum along the path, and the
    returned w is WoodFisher's at the chosen damp."""
    X, w_bar = _problem(2)
    held_out = np.random.default_rng(7).normal(size=(60, X.shape[1]))
    score = lambda w: float(np.mean((held_out @ (np.asarray(w, np.float64) - w_bar)) ** 2))  # noqa: E731
    method = swapjax.Selected(swapjax.WoodFisher(), "damp", DAMPS, start=1e-2)
    w, info = method.solve(X, w_bar, 20, score=score)
    values = [c.value for c in info.candidates]
    assert values[0] == 1e-2 and len(set(values)) == len(values) and set(values) <= set(DAMPS)
    for c in info.candidates:
        alone, _ = swapjax.WoodFisher(damp=c.value).solve(X, w_bar, 20)
        np.testing.assert_allclose(c.score, score(alone), rtol=1e-6)
    best = info.candidates[info.chosen]
    assert best.score == min(c.score for c in info.candidates)
    i = DAMPS.index(best.value)  # a local minimum: each neighbour on the path was tried and scored higher
    for j in (i - 1, i + 1):
        if 0 <= j < len(DAMPS) and DAMPS[j] in values:
            assert info.candidates[values.index(DAMPS[j])].score >= best.score
    np.testing.assert_array_equal(np.asarray(w), np.asarray(swapjax.WoodFisher(damp=best.value).solve(X, w_bar, 20)[0]))
    assert info.held_out_loss == best.score
    w_plain, _ = method.solve(X, w_bar, 20)  # without a score: the method at start
    np.testing.assert_array_equal(np.asarray(w_plain), np.asarray(swapjax.WoodFisher(damp=1e-2).solve(X, w_bar, 20)[0]))


def test_selected_in_prune_and_its_errors(trained_mlp, digits, capsys):
    x, y = digits
    batch = {"x": jnp.asarray(x[:60]), "y": jnp.asarray(y[:60])}
    method = swapjax.Selected(swapjax.WoodFisher(), "damp", DAMPS)
    res = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.8, method=method, stages=1)
    stage, info = res.info[0], res.info[0].method_info  # Selected's own info: the values tried
    assert info.candidates and stage.held_out_loss == min(c.score for c in info.candidates)
    assert info.candidates[info.chosen].score == stage.held_out_loss
    assert f"damp={info.candidates[info.chosen].value:g}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="field: WoodFisher has no field 'lam' to select"):
        swapjax.Selected(swapjax.WoodFisher(), "lam", DAMPS)
    with pytest.raises(ValueError, match=r"start \(the first value of lam; default LR's own\)"):
        swapjax.Selected(swapjax.LR(), "lam", LAM_PATH)  # LR's own λ is "auto": no number to start from
    with pytest.raises(ValueError, match="method \\(the method whose field is selected\\): expected a swapjax method"):
        swapjax.Selected("WoodFisher", "damp", DAMPS)


def test_a_nan_score_is_never_chosen():
    X, w_bar = _problem(1)
    calls = []

    def score(w):
        calls.append(1)
        return float("nan") if len(calls) == 1 else float(len(calls))

    w, info = swapjax.LR().solve(X, w_bar, 8, score=score)
    assert info.candidates[0].score == np.inf
    assert min(info.candidates, key=lambda c: c.score) is info.candidates[1]
    assert float(info.lam) == pytest.approx(FIRST_LAMS[1])  # as configured, and f's λ on the Fisher's scale:
    assert float(info.lam_absolute) / float(np.mean(X.astype(np.float64) ** 2)) == pytest.approx(FIRST_LAMS[1], rel=1e-5)


def test_swap_never_scores_worse_than_lr_on_its_targets():
    """SWAP's path starts with LR's candidates (targets y), so its best score is ≤ theirs."""
    X, w_bar = _problem(2)
    X_val, _ = _problem(3)
    y_val = X_val @ w_bar

    def score(w):  # a held-out squared error on other rows
        return float(np.sum((X_val @ np.asarray(w) - y_val) ** 2))

    _, lr = swapjax.LR().solve(X, w_bar, 10, score=score)
    _, sw = swapjax.SWAP().solve(X, w_bar, 10, score=score)
    lr_path = [c.score for c in lr.candidates if c.support not in ("swap", "obs")]
    assert min(c.score for c in sw.candidates) <= min(lr_path) * (1 + 1e-6)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_relative_lam_makes_the_solution_invariant_to_scaling_X(scale):
    X, w_bar = _problem(4)
    w1, i1 = swapjax.SWAP(lam=0.1, epsilon=0.3).solve(X, w_bar, 12)
    w2, i2 = swapjax.SWAP(lam=0.1, epsilon=0.3).solve(X * np.float32(scale), w_bar, 12)
    np.testing.assert_array_equal(np.asarray(i1.support), np.asarray(i2.support))
    np.testing.assert_allclose(np.asarray(w2), np.asarray(w1), rtol=2e-3, atol=2e-4)
    assert float(i2.lam_absolute) == pytest.approx(float(i1.lam_absolute) * scale**2, rel=1e-4)
    assert float(i1.lam) == float(i2.lam) == pytest.approx(0.1)
    # an absolute λ is not invariant: the same number means a different penalty
    _, a1 = swapjax.LR(lam=0.1, lam_scale="absolute").solve(X, w_bar, 12)
    _, a2 = swapjax.LR(lam=0.1, lam_scale="absolute").solve(X * np.float32(scale), w_bar, 12)
    assert float(a1.lam_absolute) == float(a2.lam_absolute) == float(a1.lam) == pytest.approx(0.1)


def test_explicit_values_are_used_exactly_and_never_scored():
    X, w_bar = _problem(5)

    def score(w):
        raise AssertionError("an explicit method must not be scored")

    method = swapjax.SWAP(lam=0.01, epsilon=0.3)
    assert not method.selects
    w, info = method.solve(X, w_bar, 8, score=score)
    w0, info0 = method.solve(X, w_bar, 8)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w0))
    assert info.candidates == () and info.epsilon == 0.3
    assert float(info.lam_absolute) == pytest.approx(0.01 * float(np.mean(X.astype(np.float64) ** 2)), rel=1e-5)
    f = _np_objective(X, w, info.targets, w_bar, float(info.lam_absolute))
    assert float(info.objective) == pytest.approx(f, rel=1e-4)
    # without a score, "auto" means the documented defaults
    _, auto = swapjax.SWAP().solve(X, w_bar, 8)
    _, fixed = swapjax.SWAP(lam=swapjax.methods.DEFAULT_LAM, epsilon=swapjax.methods.DEFAULT_EPSILON).solve(X, w_bar, 8)
    assert float(auto.objective) == float(fixed.objective) and auto.epsilon == fixed.epsilon


def test_swap_search_leaves_the_magnitude_support_and_lowers_f():
    X, w_bar, A, _ = _cancelling_pairs(0)
    k, lam = 20, 0.01
    y = X @ w_bar
    magnitude = iht_lib.hard_threshold_mask(jnp.asarray(w_bar), k)
    w0 = iht_lib.backsolve(jnp.asarray(X), y, w_bar, magnitude, lam)
    f0 = _np_objective(X, w0, y, w_bar, lam)
    gram = iht_lib.support_gram(jnp.asarray(X), magnitude)
    w, support, f, swapped = jax.jit(iht_lib.swap_search, static_argnums=(6, 8))(
        jnp.asarray(X), jnp.asarray(y), jnp.asarray(w_bar), w0, magnitude, lam, 30, gram, 4)
    support = np.asarray(support)
    assert support.sum() == k and np.all(np.asarray(w)[~support] == 0)
    assert int(swapped) > 0 and np.sum(support & ~np.asarray(magnitude)) > 0
    f_np = _np_objective(X, w, y, w_bar, lam)
    assert float(f) == pytest.approx(f_np, rel=1e-4) and f_np < 0.5 * f0
    # the search reaches the best support here; an LR solve reports both objectives
    np.testing.assert_array_equal(np.flatnonzero(support), A)
    _, info = swapjax.LR(lam=lam, lam_scale="absolute").solve(X, w_bar, k)
    assert float(info.objective) < float(info.objective_magnitude)


def test_prune_selects_on_held_out_examples(trained_mlp, digits, capsys):
    x, y = digits
    batch = {"x": jnp.asarray(x[:60]), "y": jnp.asarray(y[:60])}
    val = {"x": jnp.asarray(x[1000:1040]), "y": jnp.asarray(y[1000:1040])}
    res = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.8, method=swapjax.SWAP(), stages=1, val_batch=val)
    (stage,) = res.info
    info = stage.method_info  # SWAP's SolveInfo: the candidates, the λ and ε chosen
    assert stage.held_out_loss == info.held_out_loss
    assert len(info.candidates) >= 2 + len(EPSILON_PATH) + 2  # at least two λ, every ε, the two searches
    assert [c.support for c in info.candidates[-2:]] == ["swap", "obs"]  # s = 0.8 ≥ obs_sparsity
    chosen = next(c for c in info.candidates if c.score == info.held_out_loss)
    assert f"λ={chosen.lam:g} [absolute {chosen.lam_absolute:.3g}], ε={chosen.epsilon}, {chosen.support} candidate" \
        in capsys.readouterr().err
    assert float(info.lam) == chosen.lam and float(info.lam_absolute) == pytest.approx(chosen.lam_absolute)
    # the chosen candidate: never above LR's targets' best (ỹ must beat it beyond noise)
    assert info.held_out_loss in [c.score for c in info.candidates]
    assert info.held_out_loss <= min(c.score for c in info.candidates if c.epsilon is None)
    losses = jax.vmap(mlp_loss, in_axes=(None, 0))(res.params, val)
    assert info.held_out_loss == pytest.approx(float(jnp.mean(losses)), rel=1e-5)
    assert res.one_shot is None
    # the default holds out a fifth of the batch: 12 of 60 examples, which X then does not contain
    seen = []

    class Spy(swapjax.LR):
        def solve(self, X, *a, **kw):
            seen.append((X.shape[0], kw.get("score") is not None))
            return super().solve(X, *a, **kw)

    swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.8, method=Spy(), stages=1, progress=False)
    swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.8, method=Spy(lam=0.01), progress=False)
    assert seen == [(48, True), (60, False)]


def test_gradual_keeps_the_better_of_gradual_and_one_shot(trained_mlp, digits):
    x, y = digits
    batch = {"x": jnp.asarray(x[:60]), "y": jnp.asarray(y[:60])}
    res = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.9, method=swapjax.LR(), stages=3, progress=False)
    kept, other = ("gradual", "one-shot") if res.one_shot["kept"] == "gradual" else ("one-shot", "gradual")
    assert res.one_shot[kept] <= res.one_shot[other]
    assert res.one_shot["gradual"] == res.info[-1].held_out_loss
    held = {k: v[2::5] for k, v in batch.items()}  # every fifth example (the middle one), the default hold-out
    loss = float(jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0))(res.params, held)))
    assert loss == pytest.approx(res.one_shot[kept], rel=1e-5)
    lay = pytree.layout(res.params)
    assert int(jnp.sum(pytree.flatten(res.params, lay) != 0)) == swapjax.kept_count(0.9, lay.size)


def test_auto_schedule_is_gradual_where_compared_and_one_shot_elsewhere(trained_mlp, digits):
    x, y = digits
    batch = {"x": jnp.asarray(x[:60]), "y": jnp.asarray(y[:60])}
    auto = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.9, method=swapjax.LR(), progress=False)
    levels = swapjax.cubic_schedule(0.9, AUTO_STAGES)
    assert [i.sparsity for i in auto.info] == list(levels[1:])  # the first stage keeps every weight
    assert auto.one_shot["kept"] == min(("gradual", "one-shot"), key=lambda kind: auto.one_shot[kind])
    for method in (swapjax.LR(lam=0.01), swapjax.Magnitude()):  # nothing to compare on: one-shot
        fixed = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.9, method=method, progress=False)
        assert [i.sparsity for i in fixed.info] == [0.9] and fixed.one_shot is None
    with pytest.raises(ValueError, match=r'stages: expected "auto", an integer'):
        swapjax.prune(mlp_loss, trained_mlp, batch, stages="gradual", progress=False)


@pytest.mark.parametrize("method, expected", [
    (swapjax.LR(), swapjax.LR(swap_rounds=0, obs_sparsity=None)),
    (swapjax.LR(lam=0.01, cg_iters=7), swapjax.LR(lam=0.01, cg_iters=7, swap_rounds=0, obs_sparsity=None)),
    (swapjax.SWAP(max_iters=9), swapjax.LR(max_iters=9, swap_rounds=0, obs_sparsity=None)),
    (swapjax.SWAP(epsilon=0.5), swapjax.SWAP(epsilon=0.5, swap_rounds=0, obs_sparsity=None)),
])
def test_without_search_keeps_the_lam_selection_alone(method, expected):
    assert method.without_search() == expected


def test_auto_schedule_searches_only_at_the_last_stage(trained_mlp, digits):
    """The stages before the last choose λ alone (LR's targets, no swap or OBS candidates), as the same
    schedule run with ``without_search()`` does (same objectives); the last stage runs the whole path."""
    x, y = digits
    batch = {"x": jnp.asarray(x[:60]), "y": jnp.asarray(y[:60])}
    auto = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=0.9, method=swapjax.SWAP(), progress=False)
    *stages, _ = auto.info
    *early, last = (stage.method_info for stage in auto.info)  # SWAP's own info: its candidates
    assert all({c.support for c in i.candidates} <= {"iht", "ridge"} and i.epsilon is None for i in early)
    assert all(c.epsilon is None for i in early for c in i.candidates)
    assert {"swap", "obs"} <= {c.support for c in last.candidates} and len({c.epsilon for c in last.candidates}) > 1
    levels = swapjax.cubic_schedule(0.9, AUTO_STAGES)[:-1]
    light = swapjax.prune(mlp_loss, trained_mlp, batch, sparsity=levels[-1], stages=levels,
                          method=swapjax.SWAP().without_search(), finetune=lambda p, m, t: p, progress=False)
    assert [i.k for i in light.info] == [i.k for i in stages]
    np.testing.assert_allclose([i.objective for i in light.info], [i.objective for i in stages], rtol=1e-5)
    np.testing.assert_allclose([i.held_out_loss for i in light.info], [i.held_out_loss for i in stages], rtol=1e-5)
