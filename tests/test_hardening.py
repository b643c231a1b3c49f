"""Issue 10: bad inputs rejected before any gradient with a swapjax message; no silent NaN or
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

import swapjax
from swapjax import transport

from conftest import fixed_lr, fixed_swap

LR = fixed_lr()
SWAP = fixed_swap()


def _forbidden_loss(params, example):
    raise AssertionError("loss_fn was called: the argument error must be raised before any gradient")


def _quad_loss(params, example):
    """A finite loss for ONE example {"x": (10,), "y": ()}."""
    return 0.5 * (example["x"] @ params["w"] @ example["x"] + params["b"] @ example["x"] - example["y"]) ** 2


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
        (dict(stages=2.5), ValueError, "stages: expected an integer"),
        (dict(stages="3"), ValueError, "stages: expected an integer"),
        (dict(stages=True), ValueError, "stages: expected an integer"),
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


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    sparsity=st.floats(0.0, 0.95),
    dtype=st.sampled_from(["float32", "float64", "bfloat16"]),
    method=st.sampled_from(sorted(PROPERTY_METHODS)),
    stages=st.sampled_from([1, 2]),
)
def test_property_exact_k_finite_zeros_and_inputs_untouched(seed, sparsity, dtype, method, stages):
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
