"""swapjax.prune end to end on a tiny trained MLP (scikit-learn digits), and every argument error."""
from __future__ import annotations

import copy
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forbid import traced_only
import swapjax
from conftest import fixed_lr, fixed_swap
from swapjax import pytree

P = 64 * 12 + 12 * 10  # prunable kernel weights of the conftest MLP
KERNELS = ("Dense_0", "Dense_1")
LR = fixed_lr()
SWAP = fixed_swap()
METHODS = {"LR": LR, "SWAP": SWAP}


def _k(s, p=P):
    """k = round((1 − s)·p), computed here (numpy's round-half-even, as Python's round)."""
    return int(np.round((1 - s) * p))


def _flat_mask(masks):
    return np.concatenate([np.ravel(np.asarray(masks[name]["kernel"])) != 0 for name in KERNELS])


def _check_pruned(res, params, k):
    """Exact k, params zero exactly off the mask, biases untouched (same objects), structure kept."""
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(params)
    kept = 0
    for name in KERNELS:
        m = np.asarray(res.masks[name]["kernel"]) != 0
        w = np.asarray(res.params[name]["kernel"])
        assert m.shape == w.shape == params[name]["kernel"].shape
        assert w.dtype == params[name]["kernel"].dtype
        assert np.all(w[~m] == 0) and np.all(w[m] != 0)
        kept += int(m.sum())
        assert res.masks[name]["bias"] is None
        assert res.params[name]["bias"] is params[name]["bias"]
    assert kept == k
    assert res.summary()["total"] == {"kept": k, "total": P, "sparsity": pytest.approx(1 - k / P),
                                      "constraint": "global top-k"}


def _check_masks_are_bool(res):
    for name in KERNELS:
        assert res.masks[name]["kernel"].dtype == jnp.bool_, "masks must be boolean arrays (True = kept)"


def _check_info(info, levels):
    """One StageInfo per non-skipped stage, numbered by the schedule, objective non-increasing."""
    run = [(t, s) for t, s in enumerate(levels, start=1) if _k(s) < P]
    assert [i.stage for i in info] == [t for t, _ in run]
    for i, (_, s) in zip(info, run):
        assert i.sparsity == pytest.approx(s, abs=1e-12)
        assert i.k == _k(s)
        assert np.isfinite(i.objective) and np.isfinite(i.objective_start)
        assert i.objective <= i.objective_start
        assert int(i.method_info.iht_iterations) >= 1  # LR's and SWAP's own diagnostics: their SolveInfo
        assert bool(i.method_info.plan.converged)


class Recorder(swapjax.Method):
    """A method wrapper that records what the driver hands to .solve (the problem of each stage)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def solve(self, X, w_bar, k, w_start=None, duals=None):
        self.calls.append(dict(X=np.asarray(X.matrix), w_bar=np.asarray(w_bar), k=k, w_start=np.asarray(w_start)))
        return self.inner.solve(X, w_bar, k, w_start=w_start, duals=duals)


def test_kept_count():
    assert swapjax.kept_count(0.8, P) == _k(0.8) == 178
    assert swapjax.kept_count(0.0, 10) == 10
    assert swapjax.kept_count(0.9999, 100) == 0


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def one_shot(trained_mlp, prune_batch, loss_fn):
    return {name: swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=m, progress=False)
            for name, m in METHODS.items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_one_shot(one_shot, trained_mlp, name):
    res = one_shot[name]
    _check_pruned(res, trained_mlp, _k(0.8))
    _check_info(res.info, (0.8,))
    info = res.info[0]
    plan = info.method_info.plan
    if name == "LR":
        assert int(plan.iterations) == 0
    else:
        assert int(plan.iterations) > 0 and float(plan.error) < SWAP.sinkhorn_threshold
    _check_masks_are_bool(res)


def test_one_shot_beats_magnitude_on_the_local_model(one_shot, trained_mlp, prune_batch, loss_fn):
    # LR minimises ½‖X(w − w̄)‖² + (Nλ/2)‖w − w̄‖² at X = per-sample grads at w̄: its result must score
    # no worse on that quadratic than magnitude pruning to the same k (an independent numpy computation).
    X = np.asarray(swapjax.per_sample_grads(loss_fn, trained_mlp, prune_batch), np.float64)
    lay = pytree.layout(trained_mlp)
    w_bar = np.asarray(pytree.flatten(trained_mlp, lay), np.float64)
    k = _k(0.8)
    w_mp = np.where(np.isin(np.arange(P), np.argsort(-np.abs(w_bar))[:k]), w_bar, 0)
    w_lr = np.asarray(pytree.flatten(one_shot["LR"].params, lay), np.float64)

    def f(w):
        d = w - w_bar
        return 0.5 * np.sum((X @ d) ** 2) + 0.5 * len(X) * LR.lam * np.sum(d ** 2)

    assert f(w_lr) < f(w_mp)
    assert f(w_lr) == pytest.approx(one_shot["LR"].info[0].objective, rel=1e-3)


@pytest.mark.parametrize("name", list(METHODS))
def test_multi_stage_cubic(trained_mlp, prune_batch, loss_fn, name):
    res = swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=METHODS[name], stages=3,
                        progress=False)
    levels = swapjax.cubic_schedule(0.8, 3)
    np.testing.assert_allclose(levels, [0.0, 0.7, 0.8], atol=1e-12)
    _check_info(res.info, levels)
    assert len(res.info) == 2  # stage 1 (sparsity 0) keeps every weight and is skipped
    _check_pruned(res, trained_mlp, _k(0.8))


def test_same_key_same_result_with_noise(trained_mlp, prune_batch, loss_fn, one_shot):
    noise = swapjax.GradientNoise(std_scale=1.0, prop=0.25)
    run = lambda key: swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=SWAP,  # noqa: E731
                                    key=key, noise=noise, progress=False)
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    # a and b: the same compiled programs on the same inputs, so the same bits on any CPU
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.info[0].objective == b.info[0].objective
    # the noise does something, and a different key draws different noise
    assert not np.array_equal(np.asarray(a.params["Dense_0"]["kernel"]), np.asarray(c.params["Dense_0"]["kernel"]))
    assert not np.array_equal(np.asarray(a.params["Dense_0"]["kernel"]),
                              np.asarray(one_shot["SWAP"].params["Dense_0"]["kernel"]))
    _check_pruned(a, trained_mlp, _k(0.8))


def test_float32_agrees_with_float64(trained_mlp, prune_batch, loss_fn):
    # A well-separated problem: the top 30% of the trained weights by magnitude stay, the other 70% are
    # shrunk 100×, and we prune to sparsity 0.7. The best support is then unambiguous (the smallest kept
    # |w| is ~0.7, the largest shrunk one ~0.008), so both precisions must find the same support, and the
    # weights on it come from the same ridge solve (backsolve). float32 carries ~1e-7 relative precision;
    # the N×N ridge system (N = 48, λ = 0.01) is well conditioned, and we measured a 1e-7 relative
    # difference. A 1e-4 bound (norm-wise) and 1e-3 per weight leaves a wide margin for other BLAS/CPUs
    # and still catches a half-precision or otherwise lossy path (float16 alone is ~1e-3).
    lay = pytree.layout(trained_mlp)
    w = np.asarray(pytree.flatten(trained_mlp, lay))
    k = _k(0.7)
    top = np.argsort(-np.abs(w))[:k]
    scale = np.full(P, 0.01, np.float32)
    scale[top] = 1.0
    params = pytree.unflatten(jnp.asarray(w * scale), trained_mlp, lay)
    r32 = swapjax.prune(loss_fn, params, prune_batch, sparsity=0.7, method=SWAP, progress=False)
    w32 = np.asarray(pytree.flatten(r32.params, lay), np.float64)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        b64 = {"x": jnp.asarray(np.asarray(prune_batch["x"], np.float64)), "y": prune_batch["y"]}
        r64 = swapjax.prune(loss_fn, p64, b64, sparsity=0.7, method=SWAP, progress=False)
        assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(r64.params))
        w64 = np.asarray(pytree.flatten(r64.params, pytree.layout(r64.params)))
    assert w64.dtype == np.float64
    assert np.array_equal(np.sort(np.flatnonzero(w32)), np.sort(top))  # the separated support
    assert np.array_equal(w32 != 0, w64 != 0)
    assert np.linalg.norm(w32 - w64) <= 1e-4 * np.linalg.norm(w64)
    np.testing.assert_allclose(w32[w64 != 0], w64[w64 != 0], rtol=1e-3)
    assert r32.info[0].objective == pytest.approx(r64.info[0].objective, rel=1e-3)


def test_anchor_dense_vs_current(trained_mlp, prune_batch, loss_fn):
    lay = pytree.layout(trained_mlp)
    w_dense = np.asarray(pytree.flatten(trained_mlp, lay))
    results = {}
    for anchor in ("dense", "current", "default"):
        rec = Recorder(LR)
        res = swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=rec, stages=(0.5, 0.8),
                            **({} if anchor == "default" else {"anchor": anchor}), progress=False)
        results[anchor] = res
        assert [int(c["k"].k) for c in rec.calls] == [_k(0.5), _k(0.8)]  # the constraint's Groups, never an int
        first, second = rec.calls
        # stage 1 starts at the dense weights with X at the dense weights
        np.testing.assert_array_equal(first["w_bar"], w_dense)
        np.testing.assert_array_equal(first["w_start"], w_dense)
        np.testing.assert_allclose(first["X"], np.asarray(swapjax.per_sample_grads(loss_fn, trained_mlp, prune_batch)),
                                   rtol=1e-6, atol=1e-7)
        # stage 2 starts where stage 1 ended (k_1 non-zeros), with X recomputed at those pruned weights
        assert np.count_nonzero(second["w_start"]) == _k(0.5)
        pruned_1 = pytree.unflatten(jnp.asarray(second["w_start"]), trained_mlp, lay)
        np.testing.assert_allclose(second["X"], np.asarray(swapjax.per_sample_grads(loss_fn, pruned_1, prune_batch)),
                                   rtol=1e-6, atol=1e-7)
        assert not np.allclose(second["X"], first["X"])
        if anchor == "dense":  # the published SWAP setting: w̄ stays the dense weights
            np.testing.assert_array_equal(second["w_bar"], w_dense)
        else:  # CHITA++: w̄ is reset to the stage's starting weights
            np.testing.assert_array_equal(second["w_bar"], second["w_start"])
        _check_pruned(res, trained_mlp, _k(0.8))
    kernel = {anchor: np.asarray(res.params["Dense_0"]["kernel"]) for anchor, res in results.items()}
    assert not np.array_equal(kernel["dense"], kernel["current"])
    np.testing.assert_array_equal(kernel["default"], kernel["current"])  # the default anchor is "current"


def test_finetune_between_stages_and_remasked(trained_mlp, prune_batch, loss_fn):
    calls = []

    def finetune(params, masks, stage):
        calls.append((stage, _flat_mask(masks), copy.deepcopy(jax.tree_util.tree_map(np.asarray, params))))
        # "training" that moves every weight, pruned ones included, and the biases
        return jax.tree_util.tree_map(lambda x: x + 0.5, params)

    rec = Recorder(LR)
    levels = (0.5, 0.7, 0.8)
    res = swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=rec, stages=levels,
                        finetune=finetune, progress=False)
    assert [c[0] for c in calls] == [1, 2]  # between stages, not after the last
    lay = pytree.layout(trained_mlp)
    for (stage, mask, seen), nxt in zip(calls, rec.calls[1:]):
        assert mask.sum() == _k(levels[stage - 1])
        w_seen = np.asarray(pytree.flatten(seen, lay))
        assert np.array_equal(w_seen != 0, mask)  # finetune got the stage's pruned weights and their masks
        # the next stage starts from the fine-tuned weights, re-masked (pruned ones back to exactly 0)
        np.testing.assert_allclose(nxt["w_start"], np.where(mask, w_seen + 0.5, 0), rtol=1e-6)
    # stage 2's X is computed at the fine-tuned, re-masked network (its biases moved by +0.5 as well)
    tuned_1 = jax.tree_util.tree_map(lambda x: jnp.asarray(x + 0.5), calls[0][2])
    tuned_1 = swapjax.apply_masks(tuned_1, pytree.mask_tree(calls[0][1], lay))
    np.testing.assert_allclose(rec.calls[1]["X"], np.asarray(swapjax.per_sample_grads(loss_fn, tuned_1, prune_batch)),
                               rtol=1e-5, atol=1e-6)
    assert _flat_mask(res.masks).sum() == _k(0.8)
    w = np.asarray(pytree.flatten(res.params, lay))
    assert np.array_equal(w != 0, _flat_mask(res.masks))
    _check_info(res.info, levels)
    # The fine-tuned non-prunable leaves (biases here; BatchNorm statistics in general) belong to the
    # network being pruned: the next stage and the result must carry them (two finetunes: +1.0), not
    # revert them to the input params'. No finetune runs after the last stage.
    np.testing.assert_allclose(calls[1][2]["Dense_0"]["bias"], np.asarray(trained_mlp["Dense_0"]["bias"]) + 0.5,
                               rtol=1e-6, err_msg="stage 2 did not start from the fine-tuned biases")
    for name in KERNELS:
        np.testing.assert_allclose(np.asarray(res.params[name]["bias"]), np.asarray(trained_mlp[name]["bias"]) + 1.0,
                                   rtol=1e-6, err_msg="the result lost the fine-tuned biases")


def test_progress_false_prints_nothing(trained_mlp, prune_batch, loss_fn, capsys):
    swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=LR, stages=(0.5, 0.8), progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_progress_true_one_line_per_stage(trained_mlp, prune_batch, loss_fn, capsys):
    swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=LR, stages=3, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    stage_lines = [line for line in err.splitlines() if re.search(r"stage \d+/3", line)]
    assert len(stage_lines) == 2  # stage 1 of the cubic schedule has sparsity 0 and is skipped
    assert "stage 2/3 sparsity 0.7000 k=266" in stage_lines[0]
    assert "stage 3/3 sparsity 0.8000 k=178" in stage_lines[1]


def test_half_precision_params(prune_batch):
    # A float16 network (every prunable leaf float16) must prune like any other: dtypes kept, exact k.
    r = np.random.default_rng(0)
    params = {"w": jnp.asarray(r.normal(size=(6, 5)), jnp.float16), "b": jnp.zeros(5, jnp.float16)}
    batch = {"x": jnp.asarray(r.normal(size=(8, 6)), jnp.float32), "y": jnp.asarray(r.normal(size=(8, 5)), jnp.float32)}
    res = swapjax.prune(_linear_loss, params, batch, sparsity=0.5, method=fixed_lr(max_iters=5), progress=False)
    assert res.params["w"].dtype == jnp.float16
    assert int(np.sum(np.asarray(res.masks["w"]) != 0)) == 15


def _linear_loss(params, example):
    pred = example["x"] @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return 0.5 * jnp.sum((pred - example["y"]) ** 2)


# ---------------------------------------------------------------- argument errors

SMALL_P = 100


def _quad(params, example):
    return 0.5 * (example["x"] @ params["w"] @ example["x"] + params["b"] @ example["x"] - example["y"]) ** 2


_forbidden_loss = traced_only(_quad)  # traced to find the layers (w), never run


@pytest.fixture
def small():
    """numpy inputs (mutable!) of p = 100 prunable weights, and deep copies to compare after the call."""
    r = np.random.default_rng(0)
    params = {"w": r.normal(size=(10, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    batch = {"x": r.normal(size=(4, 10)).astype(np.float32), "y": r.normal(size=(4,)).astype(np.float32)}
    return params, batch, copy.deepcopy((params, batch))


def _unchanged(small):
    params, batch, (params0, batch0) = small
    for a, b in zip(jax.tree_util.tree_leaves((params, batch)), jax.tree_util.tree_leaves((params0, batch0))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=-0.1), r"sparsity: must be in \[0, 1\), got -0.1"),
        (dict(sparsity=1.0), r"sparsity: must be in \[0, 1\), got 1.0"),
        (dict(sparsity=1.5), r"sparsity: must be the fraction of weights set to zero, in \[0, 1\), got 1.5; for 1.5 % pass 0.015"),
        (dict(sparsity=float("nan")), r"sparsity: must be in \[0, 1\)"),
        (dict(sparsity=0.9999), r"sparsity: 0.9999 keeps .* 0 of p = 100"),
        (dict(select=lambda path, leaf: False), "select: no prunable leaf"),
        (dict(noise=swapjax.GradientNoise(1.0, 0.1)), "key: a jax.random key is needed when noise is given"),
        (dict(anchor="dnese"), "anchor: must be 'dense' or 'current', got 'dnese'"),
        (dict(stages=(0.5, 0.3, 0.9)), "stages: sparsities must be non-decreasing"),
        (dict(stages=(0.3, 0.6)), "stages: the schedule must end at sparsity=0.9"),
        (dict(stages=0), "stages: must be an integer"),
        (dict(method=object()), r"method: expected a swapjax method"),
    ],
)
def test_argument_errors_before_any_gradient(small, kwargs, match):
    params, batch, _ = small
    kwargs = dict(dict(sparsity=0.9, method=LR, progress=False), **kwargs)
    with pytest.raises(ValueError, match=match):
        swapjax.prune(_forbidden_loss, params, batch, **kwargs)
    _unchanged(small)


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"x": np.zeros((0, 10), np.float32)}, "batch: N = 0"),
        ({"x": np.zeros((4, 10), np.float32), "y": np.zeros((5,), np.float32)}, "batch: every array needs the same leading axis"),
        ({"x": np.zeros((4, 10), np.float32), "t": np.float32(1.0)}, "batch: every array needs the same leading axis"),
        ({}, "batch: expected a pytree of arrays"),
    ],
)
def test_batch_errors_before_any_gradient(small, batch, match):
    params = small[0]
    with pytest.raises(ValueError, match=match):
        swapjax.prune(_forbidden_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    _unchanged(small)


def test_method_config_errors():
    with pytest.raises(ValueError, match="epsilon"):
        swapjax.SWAP(epsilon=-1)
    with pytest.raises(ValueError, match="lam"):
        swapjax.LR(lam=-0.1)
    with pytest.raises(ValueError, match="lam"):
        swapjax.SWAP(lam=-0.1)


def _nan_gradient_loss(params, example):
    # finite everywhere, but the gradient of ‖v‖ at v = 0 is 0/0: NaN for the examples whose input is 0
    return jnp.sqrt(jnp.sum((example["x"] @ params["w"]) ** 2)) - example["y"]


def test_non_finite_gradients_name_the_examples(small):
    params, batch, _ = small
    batch = copy.deepcopy(batch)
    batch["x"][[1, 3]] = 0.0
    batch_copy = copy.deepcopy(batch)
    with pytest.raises(ValueError, match=r"gradients: 2 of 4 per-sample gradients contain NaN or inf \(examples \[1, 3\]"):
        swapjax.prune(_nan_gradient_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    batch["x"][1, 3], batch["x"][3, 0] = np.nan, np.inf  # in the batch itself: named before any gradient
    with pytest.raises(ValueError, match=r"batch: NaN or inf in x \(2 of 40 entries, examples \[1, 3\]\)"):
        swapjax.prune(_nan_gradient_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    batch_copy["x"][1, 3], batch_copy["x"][3, 0] = np.nan, np.inf
    for a, b in zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(batch_copy)):
        np.testing.assert_array_equal(a, b)
    _unchanged(small)


def _quadratic_loss(params, example):
    return 0.5 * (example["x"] @ params["w"] @ example["x"] - example["y"]) ** 2


def test_numpy_inputs_not_mutated_by_a_successful_run(small):
    params, batch, _ = small
    res = swapjax.prune(_quadratic_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    _unchanged(small)
    assert int(np.sum(np.asarray(res.masks["w"]) != 0)) == 50
    assert np.count_nonzero(np.asarray(res.params["w"])) == 50
    assert res.params["b"] is params["b"]


# ---------------------------------------------------------------- issue 32: the schedule, the hooks


def _blocked_problem():
    r = np.random.default_rng(2)
    params = {"w": r.normal(size=(10, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    batch = {"x": r.normal(size=(20, 10)).astype(np.float32), "y": r.normal(size=(20,)).astype(np.float32)}
    return params, batch


def _sum_loss(params, example):
    return 0.5 * (jnp.sum(jnp.tanh(example["x"] @ params["w"] + params["b"])) - example["y"]) ** 2


@pytest.mark.parametrize("mode", ["blocked", "matrix-free"])
def test_auto_stays_one_shot_where_x_is_not_held_in_memory(mode, capsys):
    params, batch = _blocked_problem()
    method = swapjax.LR(lam_path=(1e-2, 1e-1))  # selects λ on held-out loss: "auto" would go gradual in memory
    assert method.selects
    res = swapjax.prune(_sum_loss, params, batch, sparsity=0.8, method=method, mode=mode)
    err = capsys.readouterr().err
    assert res.mode == mode and [i.stage for i in res.info] == [1] and res.one_shot is None
    assert f"stages='auto': one stage (one-shot), as X is held {mode}" in err and "stages=8 asks for" in err
    assert re.search(r"stage 1/1 sparsity 0.8000 .*s grads \+ .*s solve \(\d+\.\d+s in all\)", err)
    assert res.summary()["total"]["kept"] == 20
    res = swapjax.prune(_sum_loss, params, batch, sparsity=0.8, method=method, mode=mode, stages=(0.4, 0.6, 0.8),
                        progress=False)
    assert [i.stage for i in res.info] == [1, 2, 3] and res.one_shot is not None  # an explicit schedule runs as given
    assert [i.k for i in res.info] == [60, 40, 20]


def test_a_hook_that_would_never_run_is_a_warning():
    params, batch = _blocked_problem()
    calls = []

    def hook(params, masks, stage):
        calls.append(stage)
        return params

    for stages in (2, 1, (0.0, 0.8)):  # the cubic schedule with 2 stages is (0, 0.8): its first keeps every weight
        with pytest.warns(UserWarning, match=r"finetune: the hook is never called: it runs between pruning stages"):
            res = swapjax.prune(_sum_loss, params, batch, sparsity=0.8, method=swapjax.Magnitude(), stages=stages,
                                finetune=hook, progress=False)
        assert calls == [] and res.summary()["total"]["kept"] == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swapjax.prune(_sum_loss, params, batch, sparsity=0.8, method=swapjax.Magnitude(), stages=3, finetune=hook,
                      progress=False)
    assert calls == [2]  # stage 1 of (0, 0.45, 0.8) is skipped; the hook runs after stage 2


def test_progress_may_be_a_callable_that_receives_every_line(trained_mlp, prune_batch, loss_fn, capsys):
    lines = []
    swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=LR, stages=3, progress=lines.append)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # nothing printed: every message went to the callable, without the prefix
    assert lines[0].startswith("LR: N=") and not any(line.startswith("[swapjax]") for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("stage ")] == [
        "stage 2/3 sparsity 0.7000 k=266", "stage 3/3 sparsity 0.8000 k=178"]
    with pytest.raises(ValueError, match=r"progress: must be True or False, or a callable report\(message\), got 'no'"):
        swapjax.prune(loss_fn, trained_mlp, prune_batch, sparsity=0.8, method=LR, progress="no")
