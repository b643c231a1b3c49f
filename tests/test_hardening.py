"""Hardening: bad inputs rejected before any gradient with a swapjax message; no silent NaN or
fallback; degenerate transport handled explicitly; a property test over small random problems."""
from __future__ import annotations

import copy
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forbid import traced_only
import swapjax
from swapjax import transport

from conftest import fixed_lr, fixed_swap

LR = fixed_lr()
SWAP = fixed_swap()


def _quad_loss(params, example):
    """A finite loss for ONE example {"x": (10,), "y": ()}."""
    return 0.5 * (example["x"] @ params["w"] @ example["x"] + params["b"] @ example["x"] - example["y"]) ** 2


_forbidden_loss = traced_only(_quad_loss)  # traced to find the layers (w), never run


def _small():
    r = np.random.default_rng(0)
    params = {"w": r.normal(size=(10, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    batch = {"x": r.normal(size=(6, 10)).astype(np.float32), "y": r.normal(size=(6,)).astype(np.float32)}
    return params, batch


# ---------------------------------------------------------------------------
# errors before any gradient: prune's arguments


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method=swapjax.SWAP), TypeError, r"pass an instance, e\.g\. swapjax\.SWAP\(\)"),
        (dict(method=swapjax.Magnitude), TypeError, r"swapjax\.Magnitude\(\)"),
        (dict(noise=swapjax.GradientNoise(1.0, 0.1), key=0), ValueError, "key: expected a JAX PRNG key"),
        (dict(key=np.float32(3)), ValueError, "key: expected a JAX PRNG key"),
        (dict(stages=2.5), ValueError, "stages: expected \"auto\", an integer"),
        (dict(stages="3"), ValueError, "stages: expected \"auto\", an integer"),
        (dict(stages=True), ValueError, "stages: expected \"auto\", an integer"),
        (dict(stages=(0.5, "0.9")), ValueError, r"stages \(each sparsity\)"),
        (dict(sparsity="0.5"), ValueError, r"sparsity: must be in \[0, 1\), got '0.5'"),
        (dict(sparsity=True), ValueError, "sparsity: must be in"),
        (dict(select=lambda path, leaf: "no"), ValueError, "select: must return True or False, got 'no'"),
        (dict(select=lambda path, leaf: np.ones(3, bool)), ValueError, "select: must return True or False"),
        (dict(select="w"), ValueError, "select: expected None or a function"),
        (dict(holdout=1.0), ValueError, "holdout"),
        (dict(holdout=-0.1), ValueError, "holdout"),
        (dict(holdout=True), ValueError, "holdout"),
        (dict(holdout=math.nan), ValueError, "holdout"),
        (dict(chunk_size=2.5), ValueError, "chunk_size: must be an integer ≥ 1"),
        (dict(chunk_size=0), ValueError, "chunk_size: must be an integer ≥ 1"),
        (dict(progress="no"), ValueError, "progress: must be True or False"),
        (dict(finetune="hook"), ValueError, "finetune: expected None or a function"),
        (dict(anchor=None), ValueError, "anchor: must be 'dense' or 'current'"),
        (dict(val_batch={"x": np.zeros((3, 10), np.float32)}), ValueError, "val_batch: expected the pytree structure"),
        (dict(val_batch={"x": np.zeros((3, 9), np.float32), "y": np.zeros(3, np.float32)}), ValueError,
         "val_batch: each example must look like batch's"),
        (dict(method=swapjax.SWAP(), val_batch={"x": np.zeros((3, 10), np.int32), "y": np.zeros(3, np.float32)}),
         ValueError, "val_batch: each example"),
    ],
)
def test_prune_arguments_rejected_before_any_gradient(kwargs, error, match):
    params, batch = _small()
    before = copy.deepcopy((params, batch))
    kwargs = dict(dict(sparsity=0.5, method=LR, progress=False), **kwargs)
    with pytest.raises(error, match=match):
        swapjax.prune(_forbidden_loss, params, batch, **kwargs)
    for a, b in zip(jax.tree_util.tree_leaves((params, batch)), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_nan_in_params_names_the_leaf_before_gradients():
    params, batch = _small()
    params["w"][2, 3] = np.nan
    params["b"][0] = np.inf
    with pytest.raises(ValueError, match=r"params: NaN or inf in b \(1 of 10 entries\), w \(1 of 100 entries\)"):
        swapjax.prune(_forbidden_loss, params, batch, sparsity=0.5, method=LR, progress=False)


def test_nan_or_inf_in_the_batch_names_the_leaf_before_gradients():
    params, batch = _small()
    batch["x"][1, 2], batch["y"][4] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"batch: NaN or inf in x \(1 of 60 entries, examples \[1\]\), y \(1 of 6 entries, examples \[4\]\); "
                                         r"the examples must be finite"):
        swapjax.prune(_forbidden_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    clean = _small()[1]
    with pytest.raises(ValueError, match=r"val_batch: NaN or inf in y \(1 of 6 entries, examples \[4\]\)"):
        swapjax.prune(_forbidden_loss, params, clean, sparsity=0.5, val_batch=batch | {"x": clean["x"]},
                      progress=False)


def _nan_value_loss(params, example):
    """Finite gradients, but a NaN / inf loss VALUE where y is 2 / 3 (stop_gradient hides it from grad)."""
    bad = jnp.where(example["y"] == 2.0, jnp.nan, jnp.where(example["y"] == 3.0, jnp.inf, 0.0))
    return _quad_loss(params, example) + jax.lax.stop_gradient(bad)


def test_nan_or_inf_loss_values_with_finite_gradients_name_the_examples():
    params, batch = _small()
    batch["y"][[1, 4]] = [2.0, 3.0]
    X = swapjax.per_sample_grads(_nan_value_loss, params, batch)
    assert np.all(np.isfinite(X))  # the gradients alone would pass
    with pytest.raises(ValueError, match=r"loss_fn: the loss is NaN or inf for 2 of 6 examples \(examples \[1, 4\]"):
        swapjax.prune(_nan_value_loss, params, batch, sparsity=0.5, method=LR, progress=False)


# ---------------------------------------------------------------------------
# method fields


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: swapjax.LR(max_iters=2.5), "max_iters: must be an integer ≥ 0"),
        (lambda: swapjax.LR(max_iters=True), "max_iters"),
        (lambda: swapjax.SWAP(sinkhorn_max_iters=0), "sinkhorn_max_iters: must be an integer ≥ 1"),
        (lambda: swapjax.SWAP(sinkhorn_threshold=-1), "sinkhorn_threshold: must be > 0"),
        (lambda: swapjax.SWAP(sinkhorn_threshold=math.nan), "sinkhorn_threshold"),
        (lambda: swapjax.LR(lam=True), "lam: λ must be 'auto' or a finite number ≥ 0, got True"),
        (lambda: swapjax.LR(lam=math.inf), "lam: λ must be"),
        (lambda: swapjax.LR(lam="0.1"), "lam: λ must be"),
        (lambda: swapjax.SWAP(epsilon=math.inf), "epsilon: ε must be"),
        (lambda: swapjax.SWAP(epsilon=-0.1), "epsilon: ε must be"),
        (lambda: swapjax.LR(lam_path=()), "lam_path: must be a non-empty tuple"),
        (lambda: swapjax.LR(lam_path=[0.1, 1.0]), "lam_path: must be a non-empty tuple"),
        (lambda: swapjax.LR(lam_path=(0.1, True)), "lam_path"),
        (lambda: swapjax.SWAP(epsilon_path=(0.1, math.inf)), "epsilon_path"),
        (lambda: swapjax.SWAP(epsilon_path=0.3), "epsilon_path"),
        (lambda: swapjax.LR(lam_scale="relative"), "lam_scale: must be 'fisher' or 'absolute'"),
        (lambda: swapjax.LR(patience=1.5), "patience: must be None or an integer ≥ 1"),
        (lambda: swapjax.LR(swap_rounds=-1), "swap_rounds"),
        (lambda: swapjax.LR(obs_sparsity=1.5), "obs_sparsity"),
        (lambda: swapjax.LR(backsolve="yes"), "backsolve: must be True or False"),
        (lambda: swapjax.LR(tol=math.nan), "tol"),
        (lambda: swapjax.LR(growth=1.0), "growth: must be > 1"),
        (lambda: swapjax.LR(active_set=0.5), "active_set"),
        (lambda: swapjax.SWAP(plan_update=1), "plan_update"),
        (lambda: swapjax.GradientNoise(std_scale="1"), "std_scale"),
        (lambda: swapjax.GradientNoise(prop=math.nan), "prop"),
        (lambda: swapjax.Magnitude(scope=None), "scope"),
        (lambda: swapjax.WoodFisher(block_size=True), "block_size"),
    ],
)
def test_method_fields_rejected_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_numpy_and_integral_values_are_accepted():
    method = swapjax.SWAP(lam=np.float32(0.01), epsilon=0, max_iters=np.int64(5), lam_path=(np.float64(0.1),))
    assert method.max_iters == 5
    rng = np.random.default_rng(1)
    X, w = rng.normal(size=(8, 12)).astype(np.float32), rng.normal(size=12).astype(np.float32)
    out, info = method.solve(X, w, np.int64(4))
    assert int(np.sum(out != 0)) <= 4 and np.all(np.isfinite(out)) and int(info.support.sum()) == 4


# ---------------------------------------------------------------------------
# solve(X, w_bar, k, w_start, duals)


ALL_METHODS = [swapjax.Magnitude(), swapjax.WoodFisher(), LR, SWAP, swapjax.LR(), swapjax.SWAP()]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: type(m).__name__)
def test_solve_rejects_bool_k_nan_w_start_and_bad_duals(method):
    rng = np.random.default_rng(2)
    X, w = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    with pytest.raises(ValueError, match="k: must be an integer"):
        method.solve(X, w, True)
    with pytest.raises(ValueError, match="k: must be an integer"):
        method.solve(X, w, 3.0)
    bad = w.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="w_start: the starting weights contain NaN or inf"):
        method.solve(X, w, 3, w_start=bad)
    with pytest.raises(ValueError, match=r"duals: expected None or two Sinkhorn potentials \(f, g\) of shape \(6,\)"):
        method.solve(X, w, 3, duals=(np.zeros(5), np.zeros(5)))
    with pytest.raises(ValueError, match="duals"):
        method.solve(X, w, 3, duals=np.zeros(6))


@pytest.mark.parametrize("method", [LR, SWAP], ids=["LR", "SWAP"])
def test_overflow_of_y_is_an_error_not_inf_weights(method):
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(6, 10)) * 1e30).astype(np.float32)
    w = (rng.normal(size=10) * 1e10).astype(np.float32)
    with pytest.raises(ValueError, match="overflow float32"):
        method.solve(X, w, 3)


# ---------------------------------------------------------------------------
# degenerate transport: Var(y) = 0 (N = 1, identical rows) or not finite


def test_transport_targets_are_y_when_y_has_no_spread():
    y = jnp.full(5, 2.5, jnp.float32)
    z = jnp.arange(5.0, dtype=jnp.float32)
    for eps in (0.0, 0.3):
        t, duals, info = transport.transport_targets(y, z, eps)
        np.testing.assert_array_equal(t, y)
        assert bool(info.degenerate) and int(info.iterations) == 0 and duals is None
    t, _, info = transport.transport_targets(jnp.array([1.0, jnp.inf, 0.0]), z[:3], 0.3)
    assert bool(info.degenerate)
    t, _, info = transport.transport_targets(jnp.array([0.0, 1.0, 2.0]), z[:3], 0.3)  # a real spread
    assert not bool(info.degenerate) and int(info.iterations) > 0
    # inside jit (plan_update="iteration" re-plans there): selected, not branched
    t = jax.jit(lambda y, z: transport.transport_targets(y, z, 0.3)[0])(y, z)
    np.testing.assert_array_equal(t, y)


@pytest.mark.parametrize("rows", ["one", "identical"])
def test_swap_with_no_spread_regresses_on_y_like_lr(rows):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 12)).astype(np.float32)
    X = x if rows == "one" else np.repeat(x, 5, axis=0)
    w = rng.normal(size=12).astype(np.float32)
    w_swap, info = SWAP.solve(X, w, 4)
    w_lr, _ = LR.solve(X, w, 4)
    assert bool(info.plan.degenerate) and bool(info.plan.converged) and int(info.plan.iterations) == 0
    np.testing.assert_allclose(info.targets, X @ w, rtol=1e-6)  # the targets are y = X w_bar
    np.testing.assert_allclose(w_swap, w_lr, rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(X @ np.asarray(w_swap) - X @ w) < 1e-3 * max(1.0, np.linalg.norm(X @ w))


def test_prune_says_so_when_the_transport_is_degenerate():
    params, batch = _small()
    batch = {"x": np.repeat(batch["x"][:1], 6, axis=0), "y": np.repeat(batch["y"][:1], 6)}
    with pytest.warns(RuntimeWarning, match="no spread"):
        res = swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=SWAP, progress=False)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(res.params))


# ---------------------------------------------------------------------------
# the finetune hook, dtypes, progress


def test_finetune_hook_returning_none_or_nan_is_named():
    params, batch = _small()

    def returns_none(params, masks, stage):
        return None

    def returns_nan(params, masks, stage):
        return jax.tree_util.tree_map(lambda x: x * jnp.nan, params)

    with pytest.raises(ValueError, match=r"finetune: the hook 'returns_none' returned None after stage 1"):
        swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=returns_none,
                      progress=False)
    with pytest.raises(ValueError, match=r"finetune: the params returned by the hook 'returns_nan' after stage 1: NaN or inf in b"):
        swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=returns_nan,
                      progress=False)


def test_prune_progress_false_silences_the_finetune_hook(capsys):
    import optax

    params, batch = _small()
    hook = swapjax.make_finetune_hook(swapjax.batched_loss(_quad_loss), batch, optax.sgd(1e-4),
                                      key=jax.random.key(0), batch_size=3)  # progress=True by default
    swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=hook, progress=False)
    assert capsys.readouterr().err == ""
    swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=hook, progress=True)
    assert "finetune after stage 1" in capsys.readouterr().err


def test_numpy_float64_params_come_back_float64_without_x64():
    params, batch = _small()
    params = {"w": params["w"].astype(np.float64), "b": params["b"].astype(np.float64)}
    res = swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, progress=False)
    assert res.params["w"].dtype == np.float64 and res.params["b"].dtype == np.float64
    assert int(np.sum(res.params["w"] != 0)) == 50 and np.all(res.params["w"][~np.asarray(res.masks["w"])] == 0)


def test_valid_prng_keys_with_noise_give_a_finite_result():
    params, batch = _small()
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        res = swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, key=key,
                            noise=swapjax.GradientNoise(1.0, 0.5), stages=np.int64(1), progress=False)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(res.params))


# ---------------------------------------------------------------------------
# property test: random small problems, sparsities, dtypes and methods


PROPERTY_METHODS = {
    "Magnitude": swapjax.Magnitude(), "Magnitude-layer": swapjax.Magnitude("layer"), "WoodFisher": swapjax.WoodFisher(),
    "LR-fixed": LR, "SWAP-fixed": SWAP, "SWAP-eps0": fixed_swap(epsilon=0.0), "LR": swapjax.LR(), "SWAP": swapjax.SWAP(),
}


def _prop_loss(params, example):
    h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    return 0.5 * jnp.sum((h @ params["w2"] - example["y"]) ** 2)


_PROPERTY_DRAWS = dict(
    seed=st.integers(0, 2**31 - 1),
    sparsity=st.floats(0.0, 0.95),
    dtype=st.sampled_from(["float32", "float64", "bfloat16"]),
    method=st.sampled_from(sorted(PROPERTY_METHODS)),
    stages=st.sampled_from([1, 2]),
)


# Most examples compile (method, dtype, stages and the backsolve width change), about 2-4 s each:
# 6 in the default run, 16 in the slow test (`make test-all`).
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_PROPERTY_DRAWS)
def test_property_exact_k_finite_zeros_and_inputs_untouched(seed, sparsity, dtype, method, stages):
    _check_property(seed, sparsity, dtype, method, stages)


@pytest.mark.slow
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_PROPERTY_DRAWS)
def test_property_exact_k_finite_zeros_and_inputs_untouched_many(seed, sparsity, dtype, method, stages):
    _check_property(seed, sparsity, dtype, method, stages)


def _check_property(seed, sparsity, dtype, method, stages):
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-3, 1.0, 30.0])
    np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    params = {"w1": (scale * rng.normal(size=(5, 4))).astype(np_dtype), "b1": rng.normal(size=4).astype(np_dtype),
              "w2": (scale * rng.normal(size=(4, 2))).astype(np_dtype)}
    if dtype == "bfloat16":
        params = jax.tree_util.tree_map(jnp.asarray, params)
    batch = {"x": rng.normal(size=(10, 5)).astype(np.float32), "y": rng.normal(size=(10, 2)).astype(np.float32)}
    before = copy.deepcopy(jax.device_get((params, batch)))
    p = 5 * 4 + 4 * 2
    k = swapjax.kept_count(sparsity, p)
    if k < 1:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Sinkhorn convergence notes
        res = swapjax.prune(_prop_loss, params, batch, sparsity=sparsity, method=PROPERTY_METHODS[method],
                            stages=stages, progress=False)
    kept = sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(res.masks))
    assert kept == k
    for name in ("w1", "w2"):
        out, mask = np.asarray(res.params[name], np.float64), np.asarray(res.masks[name])
        assert res.params[name].dtype == params[name].dtype and out.shape == params[name].shape
        assert np.all(np.isfinite(out))
        assert np.all(out[~mask] == 0)
    assert res.masks["b1"] is None
    np.testing.assert_array_equal(np.asarray(res.params["b1"]), np.asarray(params["b1"]))
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get((params, batch))), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


# ---------------------------------------------------------------------------
# the other public entry points: compare, compare_sparsities, train, evaluate, the finetune
# helpers, save/load/export. Every bad argument is a ValueError naming it, raised before any
# method runs, any gradient or forward pass is computed, or anything is written.


class _ForbiddenMethod(swapjax.Method):
    """A method whose solve must never be reached."""

    def solve(self, X, w_bar, k, w_start=None, duals=None):
        raise AssertionError("solve was called: the argument error must come first")


def _forbidden_evaluate(model):
    raise AssertionError("evaluate was called")


def _problem():
    rng = np.random.default_rng(5)
    return rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(methods={"SWAP": swapjax.SWAP}), TypeError, r"methods\['SWAP'\]: got the class SWAP; pass an instance"),
        (dict(methods={"x": "LR"}), ValueError, r"methods\['x'\]: expected a swapjax method"),
        (dict(methods=[_ForbiddenMethod()]), ValueError, "methods: expected a non-empty mapping"),
        (dict(k=True), ValueError, "k: must be an integer"),
        (dict(w_start=np.full(10, np.nan, np.float32)), ValueError, "w_start: the starting weights contain NaN"),
        (dict(w_start=np.zeros(9, np.float32)), ValueError, r"w_start: expected shape \(10,\)"),
        (dict(segments=(0, 4)), ValueError, r"segments: expected None or the layer offsets.*p = 10"),
        (dict(segments=(0, 4.0, 10)), ValueError, "segments"),
        (dict(segments="0,10"), ValueError, "segments"),
        (dict(evaluate="accuracy"), ValueError, "evaluate: expected None or a function"),
        (dict(unflatten=3), ValueError, "unflatten: expected None or a function"),
        (dict(epsilon="0.1"), ValueError, r"epsilon \(the EWR objective's ε\): must be > 0"),
        (dict(epsilon=math.inf), ValueError, "epsilon"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(sinkhorn_threshold=-1.0), ValueError, "sinkhorn_threshold: must be > 0"),
        (dict(sinkhorn_max_iters=0), ValueError, "sinkhorn_max_iters: must be an integer ≥ 1"),
        (dict(sinkhorn_max_iters=10.5), ValueError, "sinkhorn_max_iters"),
        (dict(warmup="yes"), ValueError, "warmup: must be True or False"),
        (dict(progress=1), ValueError, "progress: must be True or False"),
    ],
)
def test_compare_arguments_rejected_before_any_method_runs(kwargs, error, match):
    X, w = _problem()
    args = dict(X=X, w_bar=w, k=3, methods={"spy": _ForbiddenMethod()}, evaluate=_forbidden_evaluate, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        swapjax.compare(**args)


def test_compare_with_valid_arguments_gives_k_sparse_finite_results():
    X, w = _problem()
    res = swapjax.compare(X, w, np.int64(3), {"MP": swapjax.Magnitude(), "LR": LR}, segments=[0, 4, 10],
                          epsilon=np.float32(0.5), sinkhorn_max_iters=np.int32(200), progress=False)
    for r in res.values():
        assert r.ok and r.kept == 3 and np.all(np.isfinite(np.asarray(r.w))) and math.isfinite(r.local_objective)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sparsities="0.5"), ValueError, "sparsities: expected a sequence of sparsities"),
        (dict(sparsities=0.5), ValueError, "sparsities: expected a sequence"),
        (dict(sparsities=()), ValueError, "sparsities: expected at least one"),
        (dict(sparsities=(0.5, "0.9")), ValueError, r"sparsities \(each\): must be in \[0, 1\)"),
        (dict(sparsities=(True,)), ValueError, r"sparsities \(each\)"),
        (dict(sparsities=(1.0,)), ValueError, r"sparsities \(each\)"),
        (dict(methods={"SWAP": swapjax.SWAP}), TypeError, r"methods\['SWAP'\]: got the class SWAP"),
        (dict(methods={}), ValueError, "methods: expected a non-empty mapping"),
        (dict(loss_fn="mse"), ValueError, "loss_fn: expected a function"),
        (dict(noise=swapjax.GradientNoise(1.0, 0.1)), ValueError, "key: a jax.random key is needed"),
        (dict(noise=swapjax.GradientNoise(1.0, 0.1), key=0), ValueError, "key: expected a JAX PRNG key"),
        (dict(noise=0.1, key=jax.random.key(0)), ValueError, "noise: expected None or a swapjax.GradientNoise"),
        (dict(chunk_size=0), ValueError, "chunk_size: must be an integer ≥ 1"),
        (dict(evaluate=1), ValueError, "evaluate: expected None or a function"),
        (dict(sinkhorn_threshold=math.nan), ValueError, "sinkhorn_threshold"),
        (dict(select=lambda path, leaf: True), ValueError, r"select: chose b \(10,\)"),
        (dict(batch={"x": np.zeros((3, 10), np.float32), "y": np.zeros(4, np.float32)}), ValueError,
         "batch: every array needs the same leading axis"),
        (dict(params="nan"), ValueError, r"params: NaN or inf in w \(1 of 100 entries\)"),
    ],
)
def test_compare_sparsities_arguments_rejected_before_any_gradient(kwargs, error, match):
    params, batch = _small()
    if kwargs.get("params") == "nan":
        params["w"][0, 0] = np.nan
        kwargs = {}
    args = dict(loss_fn=_forbidden_loss, params=params, batch=batch, sparsities=(0.5,),
                methods={"spy": _ForbiddenMethod()}, evaluate=_forbidden_evaluate, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        swapjax.compare_sparsities(**args)


class _ForbiddenModel:
    """A 'model' whose forward pass must never be reached."""

    def apply(self, variables, x, **kwargs):
        raise AssertionError("the model was applied: the argument error must come first")


def _classification():
    rng = np.random.default_rng(6)
    variables = {"params": {"w": rng.normal(size=(4, 3)).astype(np.float32)}}
    return variables, rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="mlp"), "model: expected a Flax linen module"),
        (dict(epochs=2.5), "epochs: must be an integer ≥ 0"),
        (dict(epochs=True), "epochs: must be an integer"),
        (dict(epochs=-1), "epochs: must be an integer ≥ 0"),
        (dict(batch_size=0), "batch_size: must be an integer ≥ 1"),
        (dict(batch_size=4.0), "batch_size: must be an integer ≥ 1"),
        (dict(optimizer="adam"), "optimizer: expected an optax GradientTransformation"),
        (dict(optimizer=__import__("optax").adam), r"optimizer: .*\(call it first, e\.g\. optax\.adam\(1e-3\)\)"),
        (dict(key=0), "key: expected a JAX PRNG key"),
        (dict(checkpoint_dir=3), r"checkpoint_dir: expected a directory path"),
        (dict(train_arg=True), "train_arg: expected None or the name"),
        (dict(max_to_keep=0), "max_to_keep: must be None or an integer ≥ 1"),
        (dict(progress="no"), "progress: must be True or False"),
        (dict(masks={"w": np.ones((4, 3), np.float32)}), r"masks: every mask must be a boolean array.*w is dtype float32"),
        (dict(masks={"w": np.ones((3, 4), bool)}), r"masks: 'w' has shape \(3, 4\), the parameter \(4, 3\)"),
        (dict(masks={"v": np.ones((4, 3), bool)}), r"masks: 'v' is not a leaf of variables\['params'\]"),
        (dict(x=[[0.0] * 4] * 8), r"x, y: expected arrays"),
        (dict(x=np.full((8, 4), np.nan, np.float32)), r"x: NaN or inf in 8 of 8 examples"),
        (dict(y=np.zeros(8, np.float32)), "y: expected integer class labels"),
        (dict(x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int32)), "x, y: need at least one example"),
        (dict(variables={"params": {"w": np.full((4, 3), np.inf, np.float32)}}), r"variables: NaN or inf in params/w"),
    ],
)
def test_train_arguments_rejected_before_any_step(kwargs, match, tmp_path):
    import optax

    variables, x, y = _classification()
    args = dict(model=_ForbiddenModel(), variables=variables, x=x, y=y, epochs=1, batch_size=4,
                optimizer=optax.sgd(0.1), key=jax.random.key(0), checkpoint_dir=None, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        swapjax.train(**args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model=swapjax.Magnitude), "model: got the class Magnitude"),
        (dict(batch_size=2.5), "batch_size: must be an integer ≥ 1"),
        (dict(batch_size=0), "batch_size: must be an integer ≥ 1"),
        (dict(train_arg=0), "train_arg: expected None or the name"),
        (dict(y=np.zeros((8, 1), np.int32)), r"y: expected integer labels of shape \(n,\)"),
        (dict(variables={"w": np.zeros((4, 3))}), "variables: expected a Flax variables dict with a 'params' entry"),
    ],
)
def test_evaluate_arguments_rejected_before_any_forward_pass(kwargs, match):
    variables, x, y = _classification()
    args = dict(model=_ForbiddenModel(), variables=variables, x=x, y=y)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        swapjax.evaluate(**args)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda o: swapjax.make_finetune_hook("loss", {"x": np.zeros((4, 2))}, key=jax.random.key(0)),
         "loss_fn: expected a function"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, key=0), "key: expected a JAX PRNG key"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, o.sgd, key=jax.random.key(0)),
         r"optimizer: .*call it first"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, key=jax.random.key(0),
                                              epochs=0.5), "epochs: must be an integer ≥ 0"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, key=jax.random.key(0),
                                              steps=True), "steps: must be None or an integer ≥ 0"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, key=jax.random.key(0),
                                              batch_size=0), "batch_size: must be an integer ≥ 1"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((4, 2))}, key=jax.random.key(0),
                                              progress=None), "progress: must be True or False"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {"x": np.zeros((0, 2))}, key=jax.random.key(0)),
         r"data: no examples"),
        (lambda o: swapjax.make_finetune_hook(_forbidden_loss, {}, key=jax.random.key(0)), "data: expected a pytree of arrays"),
        (lambda o: swapjax.masked_optimizer("sgd", {"w": np.ones(3, bool)}), "optimizer: expected an optax"),
        (lambda o: swapjax.masked_optimizer(o.sgd(0.1), {"w": np.ones(3, np.int8)}), r"masks: every mask must be .*w is dtype int8"),
        (lambda o: swapjax.keep_pruned_at_zero({"w": [1, 0, 1]}), r"masks: every mask must be"),
        (lambda o: swapjax.masked_updates(None), "masks: expected a pytree of boolean masks"),
        (lambda o: swapjax.batched_loss(None), "per_example_loss: expected a function"),
    ],
)
def test_finetune_helpers_reject_bad_arguments_when_built(call, match):
    import optax

    with pytest.raises(ValueError, match=match):
        call(optax)


def _io_params():
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    masks = {"w": rng.random((4, 3)) < 0.5, "b": None}
    return params, masks


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, p, m: swapjax.save_pruned(3, p, m), "directory: expected a directory path"),
        (lambda d, p, m: swapjax.save_pruned(d / "c", p, m, force="yes"), "force: must be True or False"),
        (lambda d, p, m: swapjax.save_pruned(d / "c", p, {"w": m["w"].astype(np.float32), "b": None}),
         r"masks: every mask must be a boolean array .*w is dtype float32"),
        (lambda d, p, m: swapjax.save_pruned(d, p, m), r"directory: .* already exists and is a directory, not a swapjax "
                                                        r"checkpoint"),
        (lambda d, p, m: swapjax.load_pruned(d / "missing"), r"directory: no checkpoint at .*missing"),
        (lambda d, p, m: swapjax.load_pruned(None), "directory: expected a directory path"),
        (lambda d, p, m: swapjax.to_bcoo(p, m, index_dtype=jnp.float32), "index_dtype: expected an integer dtype"),
        (lambda d, p, m: swapjax.to_bcoo(p, m, index_dtype=[1]), "index_dtype: expected an integer dtype"),
        (lambda d, p, m: swapjax.to_bcoo(p, None), "masks: expected a pytree of boolean masks"),
        (lambda d, p, m: swapjax.from_bcoo({"w": np.ones((4, 3))}, p), r"sparse: expected a dict \{path name: BCOO\}"),
        (lambda d, p, m: swapjax.from_bcoo([], p), "sparse: expected a dict"),
        (lambda d, p, m: swapjax.bcoo_bytes({"w": None}), "sparse: expected a dict"),
    ],
)
def test_io_arguments_rejected_before_anything_is_written(call, match, tmp_path):
    params, masks = _io_params()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        call(tmp_path, params, masks)
    assert sorted(tmp_path.rglob("*")) == before


def test_bcoo_index_dtype_too_small_for_a_dimension_is_an_error_not_wrapped_indices():
    params = {"w": np.ones((40000, 2), np.float32)}
    masks = {"w": np.zeros((40000, 2), bool)}
    masks["w"][39999, 1] = True
    with pytest.raises(ValueError, match=r"index_dtype: int16 cannot index 'w' of shape \(40000, 2\)"):
        swapjax.to_bcoo(params, masks, index_dtype=jnp.int16)
    sparse = swapjax.to_bcoo(params, masks)  # int32: the one kept weight at its true place
    np.testing.assert_array_equal(np.asarray(sparse["w"].indices), [[39999, 1]])
    small = swapjax.to_bcoo({"w": params["w"][:100]}, {"w": masks["w"][:100] | True}, index_dtype=np.int16)
    assert small["w"].indices.dtype == jnp.int16 and small["w"].nse == 200


def test_from_bcoo_rejects_a_shape_that_is_not_the_parameter_s():
    params, masks = _io_params()
    sparse = swapjax.to_bcoo(params, masks)
    with pytest.raises(ValueError, match=r"sparse: 'w' has shape \(4, 3\), the parameter \(3, 4\)"):
        swapjax.from_bcoo(sparse, {"w": np.zeros((3, 4), np.float32), "b": params["b"]})
    dense = swapjax.from_bcoo(sparse, params)
    np.testing.assert_array_equal(dense["w"], np.where(masks["w"], params["w"], 0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: swapjax.cubic_schedule("0.9", 3), r"final: must be in \[0, 1\)"),
        (lambda: swapjax.cubic_schedule(1.0, 3), "final"),
        (lambda: swapjax.linear_schedule(0.9, True), "stages: must be an integer ≥ 1"),
        (lambda: swapjax.linear_schedule(0.9, 2.5), "stages: must be an integer ≥ 1"),
        (lambda: swapjax.polynomial_schedule(0.9, 3, initial=math.nan), "initial"),
        (lambda: swapjax.polynomial_schedule(0.5, 3, initial=0.7), "initial: the first sparsity 0.7 is above the final 0.5"),
        (lambda: swapjax.polynomial_schedule(0.9, 3, power=0), "power: must be > 0"),
        (lambda: swapjax.apply_masks({"w": np.ones(3)}, {"w": np.array([1.0, 0.0, 1.0])}), "masks: every mask must be"),
        (lambda: swapjax.sparsity_summary({"w": np.array([1, 0])}), "masks: every mask must be.*w is dtype int"),
        (lambda: swapjax.allow_vectors("fc"), "select: expected a function"),
    ],
)
def test_schedule_and_mask_helpers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_and_mask_helpers_accept_numpy_numbers_and_bool_masks():
    assert swapjax.cubic_schedule(np.float32(0.5), np.int64(2)) == (0.0, 0.5)
    assert swapjax.linear_schedule(0.9, 3, initial=0.3) == pytest.approx((0.3, 0.6, 0.9))
    out = swapjax.apply_masks({"w": np.ones(3, np.float32), "b": np.ones(2)}, {"w": np.array([True, False, True]), "b": None})
    np.testing.assert_array_equal(out["w"], [1, 0, 1])
    assert swapjax.sparsity_summary({"w": np.array([True, False, True, True])})["total"] == \
        {"kept": 3, "total": 4, "sparsity": 0.25}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name=["mnist"]), r"name: unknown dataset \['mnist'\]"),
        (dict(split=0), "split: expected a TFDS split spec"),
        (dict(source=None), "source: must be one of"),
        (dict(download="no"), "download: must be True or False"),
        (dict(flatten=1), "flatten: must be True or False"),
        (dict(image_size=True), "image_size: must be None or an integer ≥ 1"),
        (dict(image_size=28.0), "image_size"),
        (dict(examples=2.5), r"examples \(an int n, a slice or None\): must be"),
        (dict(data_dir=7), "data_dir: expected a directory path"),
    ],
)
def test_data_load_arguments_rejected_before_any_file_is_read(kwargs, match, tmp_path):
    from swapjax import data

    args = dict(dict(name="mnist", split="train", data_dir=tmp_path), **kwargs)
    with pytest.raises(ValueError, match=match):
        data.load(**args)


# ---------------------------------------------------------------------------
# issue 32: 0-d arrays as numbers, stages bounded, hooks and noise checked by signature and output
# before any gradient, every method's result checked by the driver


class _CountingLoss:
    """``_quad_loss`` counting its runs (traces, which find the layers, do not count) and failing the run: 0 runs
    after an argument error raised in time (code that checks too late stops at the first run)."""

    def __init__(self):
        self.calls = 0
        self.__name__ = "counting_loss"

    def __call__(self, params, example):
        value = _quad_loss(params, example)
        jax.debug.callback(self._ran)
        return value

    def _ran(self):
        self.calls += 1
        raise AssertionError("loss_fn was run: the argument error must be raised before any gradient")


@pytest.mark.parametrize("value", [jnp.asarray(0.75), np.asarray(0.75), np.float32(0.75), jnp.float32(0.75)])
def test_0d_arrays_are_numbers(value):
    assert swapjax.checks.sparsity(value) == 0.75 and type(swapjax.checks.sparsity(value)) is float
    assert swapjax.checks.real("x", value, 0.0, 1.0) == 0.75


def test_0d_integer_arrays_are_integers_and_0d_floats_are_not():
    for value in (jnp.asarray(3), np.asarray(3), np.int64(3), np.int32(3)):
        assert swapjax.checks.integer("n", value, 1) == 3 and type(swapjax.checks.integer("n", value)) is int
        assert swapjax.checks.stages(value) == 3
    with pytest.raises(ValueError, match=r"n: must be an integer ≥ 1, got 3.0"):
        swapjax.checks.integer("n", jnp.asarray(3.0), 1)
    with pytest.raises(ValueError, match="sparsity: must be in"):
        swapjax.checks.sparsity(jnp.asarray(True))
    with pytest.raises(ValueError, match="sparsity: must be in"):
        swapjax.checks.sparsity(np.ones(2) * 0.5)  # an array of several numbers is not one
    assert swapjax.checks.boolean("progress", jnp.asarray(False)) is False
    assert swapjax.checks.stages(jnp.asarray([0.5, 0.9])) == (0.5, 0.9)


def test_prune_takes_0d_arrays_for_its_numbers():
    params, batch = _small()
    res = swapjax.prune(_quad_loss, params, batch, sparsity=jnp.asarray(0.75), method=swapjax.Magnitude(),
                        stages=jnp.asarray(1), chunk_size=np.int64(4), holdout=np.float32(0.0),
                        progress=jnp.asarray(False))
    assert res.summary()["total"]["kept"] == 25
    res = swapjax.prune(_quad_loss, params, batch, method=swapjax.Magnitude(), progress=False,
                        constraint=swapjax.LayerBudgets(max_sparsity=jnp.asarray(0.95)), sparsity=np.float32(0.5))
    assert res.summary()["total"]["kept"] == 50 and res.constraint == "per-layer uniform, cap 0.95"


@pytest.mark.parametrize("stages, match", [
    (10 ** 7, r"stages: at most 1000 \(each stage is a gradient pass and a solve\), got 10000000"),
    (1001, "stages: at most 1000"),
    ((0.5,) * 1001, r"stages: at most 1000 sparsities .* got 1001"),
    (jnp.asarray(0), "stages: must be an integer ≥ 1, got 0"),
])
def test_stages_bounded_before_any_gradient(stages, match):
    params, batch = _small()
    loss = _CountingLoss()
    with pytest.raises(ValueError, match=match):
        swapjax.prune(loss, params, batch, sparsity=0.5, method=LR, stages=stages, progress=False)
    assert loss.calls == 0
    assert swapjax.checks.stages(1000) == 1000


def test_finetune_hook_with_a_wrong_signature_is_named_before_any_gradient():
    params, batch = _small()
    loss = _CountingLoss()

    def two_args(params, masks):
        return params

    with pytest.raises(ValueError, match=r"finetune: 'two_args' cannot be called as finetune\(params, masks, stage\) "
                                         r"-> params: too many positional arguments"):
        swapjax.prune(loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=two_args,
                      progress=False)
    with pytest.raises(ValueError, match=r"finetune: '<lambda>' cannot be called as .*missing a required argument: 'extra'"):
        swapjax.prune(loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5),
                      finetune=lambda params, masks, stage, extra: params, progress=False)
    assert loss.calls == 0


def test_finetune_hook_returning_another_leaf_shape_is_named():
    params, batch = _small()

    def transposes(params, masks, stage):
        return {"w": params["w"][:5], "b": params["b"]}

    with pytest.raises(ValueError, match=r"finetune: the hook 'transposes' returned w of shape \(5, 10\) after stage 1, "
                                         r"expected \(10, 10\)"):
        swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, stages=(0.3, 0.5), finetune=transposes,
                      progress=False)


def _nan_noise(X, key):
    return X * jnp.nan


def _short_noise(X, key):
    return X[:-1]


def _one_arg_noise(X):
    return X


def _nan_on_many_rows(X, key):
    """Finite on the small test matrix prune calls it on first, NaN on the whole X."""
    return X * (jnp.nan if X.shape[0] > 4 else 1.0)


@pytest.mark.parametrize("noise, match", [
    (_nan_noise, r"noise: _nan_noise\(X, key\) on a \(4, 100\) test matrix of standard normal entries returned NaN "
                 r"or inf in 400 of 400 entries"),
    (_short_noise, r"noise: _short_noise\(X, key\) on a \(4, 100\) test matrix .* returned shape \(3, 100\), "
                   r"expected \(4, 100\)"),
    (_one_arg_noise, r"noise: '_one_arg_noise' cannot be called as noise\(X, key\) -> X: too many positional"),
])
def test_noise_callable_checked_before_any_gradient(noise, match):
    params, batch = _small()
    batch = jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), batch)  # N = 12
    loss = _CountingLoss()
    with pytest.raises(ValueError, match=match):
        swapjax.prune(loss, params, batch, sparsity=0.5, method=LR, noise=noise, key=jax.random.key(0), progress=False)
    assert loss.calls == 0


def test_noise_output_on_the_whole_x_names_the_noise_not_the_loss():
    params, batch = _small()
    with pytest.raises(ValueError, match=r"noise: _nan_on_many_rows\(X, key\) at stage 1 returned NaN or inf in 600 of "
                                         r"600 entries"):
        swapjax.prune(_quad_loss, params, batch, sparsity=0.5, method=LR, noise=_nan_on_many_rows,
                      key=jax.random.key(0), progress=False)


class _Tampered(swapjax.Method):
    """Magnitude's solve, its result changed as ``how`` says (the mistakes a user-written method makes)."""

    def __init__(self, how):
        self.how = how

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None):
        w, info = swapjax.Magnitude().solve(X, w_bar, k, w_start=w_start, duals=duals)
        if self.how == "keep every weight":
            return jnp.asarray(w_bar), info._replace(support=jnp.ones_like(info.support))
        if self.how == "dense w, k-support":
            return jnp.asarray(w_bar), info
        if self.how == "NaN weights":
            return jnp.where(info.support, jnp.nan, 0.0), info
        if self.how == "wrong shape":
            return w[:-1], info
        if self.how == "integer w":
            return w.astype(jnp.int32), info
        if self.how == "float support":
            return w, info._replace(support=info.support.astype(jnp.float32))
        if self.how == "global top-k":  # ignores the constraint's groups
            support = swapjax.Groups.top_k(int(swapjax.constraints.as_groups(k).k)).project(w_bar)
            return jnp.where(support, w_bar, 0), info._replace(support=support)
        return w, info


@pytest.mark.parametrize("how, constraint, match", [
    ("keep every weight", None,
     r"method: _Tampered.solve returned a support that keeps 100 weights where the constraint \(global top-k\) keeps 10$"),
    ("dense w, k-support", None,
     r"method: _Tampered.solve returned 90 non-zero weights outside info.support \(which keeps 10\); the pruned weights "
     r"must be exactly 0"),
    ("NaN weights", None, r"method: _Tampered.solve returned NaN or inf in 10 of 100 weights"),
    ("wrong shape", None, r"method: _Tampered.solve returned w of shape \(99,\); expected \(100,\)"),
    ("integer w", None, r"method: _Tampered.solve returned w of dtype int32; expected a real floating dtype"),
    ("float support", None, r"method: _Tampered.solve returned info.support float32\(100,\); expected a \(100,\) "
                            r"boolean mask"),
    ("global top-k", swapjax.NM(1, 2),
     r"method: _Tampered.solve returned a support that keeps 50 weights where the constraint \(1:2\) keeps 50, "
     r"\d+ of 50 groups off their count"),
])
def test_the_driver_checks_every_method_result(how, constraint, match):
    params, batch = _small()
    sparsity = None if constraint is not None else 0.9
    with pytest.raises(ValueError, match=match):
        swapjax.prune(_quad_loss, params, batch, sparsity=sparsity, method=_Tampered(how), constraint=constraint,
                      progress=False)
    res = swapjax.prune(_quad_loss, params, batch, sparsity=sparsity, method=_Tampered("as is"),
                        constraint=constraint, progress=False)  # the untampered result passes
    assert res.summary()["total"]["kept"] == (50 if constraint is not None else 10)
