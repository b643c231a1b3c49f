"""Per-sample gradients X ∈ R^{N×p} and the published gradient-noise model (docs/methods.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swapjax
from swapjax import pytree
from swapjax.gradients import check_finite

N_GRAD = 10  # not a multiple of the chunk sizes used below


def _loop_grads(loss_fn, params, batch, names_in_order):
    """Independent reference: one jax.grad per example, kernels concatenated in the given order."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    grad = jax.jit(jax.grad(loss_fn))  # one example at a time: no vmap, no lax.map
    rows = []
    for i in range(n):
        example = jax.tree_util.tree_map(lambda a: a[i], batch)
        g = grad(params, example)
        parts = []
        for name in names_in_order:
            leaf = g
            for key in name.split("/"):
                leaf = leaf[key]
            parts.append(np.ravel(np.asarray(leaf)))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


@pytest.fixture(scope="module")
def grad_batch(prune_batch):
    return jax.tree_util.tree_map(lambda a: a[:N_GRAD], prune_batch)


@pytest.fixture(scope="module")
def loop_ref(trained_mlp, grad_batch, loss_fn):
    return _loop_grads(loss_fn, trained_mlp, grad_batch, ["Dense_0/kernel", "Dense_1/kernel"])


def test_linen_per_sample_grads_match_loop(trained_mlp, grad_batch, loss_fn, loop_ref):
    X = swapjax.per_sample_grads(loss_fn, trained_mlp, grad_batch)
    p = 64 * 12 + 12 * 10
    assert X.shape == (N_GRAD, p) and X.dtype == jnp.float32
    ref = loop_ref
    np.testing.assert_allclose(np.asarray(X), ref, rtol=1e-5, atol=1e-5)
    # the columns follow swapjax.pytree.flatten of each example's gradient tree
    lay = pytree.layout(trained_mlp)
    g3 = jax.grad(loss_fn)(trained_mlp, jax.tree_util.tree_map(lambda a: a[3], grad_batch))
    np.testing.assert_allclose(np.asarray(X[3]), np.asarray(pytree.flatten(g3, lay)), rtol=1e-5, atol=1e-6)
    # rows are genuinely per example (not a batch mean broadcast)
    assert not np.allclose(np.asarray(X[0]), np.asarray(X[1]))


@pytest.mark.parametrize("chunk_size", [1, 3])  # 256 (> N) is the default, used above
def test_chunk_size_does_not_change_result(trained_mlp, grad_batch, loss_fn, loop_ref, chunk_size):
    X = swapjax.per_sample_grads(loss_fn, trained_mlp, grad_batch, chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(X), loop_ref, rtol=1e-5, atol=1e-5)


def test_select_all_includes_biases_in_path_order(trained_mlp, grad_batch, loss_fn):
    X = swapjax.per_sample_grads(loss_fn, trained_mlp, grad_batch, select=swapjax.allow_vectors(lambda path, leaf: True))
    order = ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
    assert X.shape == (N_GRAD, 12 + 64 * 12 + 10 + 12 * 10)
    np.testing.assert_allclose(np.asarray(X), _loop_grads(loss_fn, trained_mlp, grad_batch, order), rtol=1e-5, atol=1e-5)


def test_bad_chunk_size_names_argument(trained_mlp, grad_batch, loss_fn):
    with pytest.raises(ValueError, match="chunk_size"):
        swapjax.per_sample_grads(loss_fn, trained_mlp, grad_batch, chunk_size=0)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 7, rngs=rngs)
        self.l2 = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_per_sample_grads_match_loop():
    graphdef, state, rest = nnx.split(_NnxMLP(nnx.Rngs(1)), nnx.Param, ...)

    def loss(st, example):
        model = nnx.merge(graphdef, st, rest)
        return 0.5 * jnp.sum((model(example["x"]) - example["y"]) ** 2)

    r = np.random.default_rng(0)
    batch = {"x": jnp.asarray(r.normal(size=(7, 5)), jnp.float32), "y": jnp.asarray(r.normal(size=(7, 3)), jnp.float32)}
    X = swapjax.per_sample_grads(loss, state, batch, chunk_size=3)
    assert X.shape == (7, 5 * 7 + 7 * 3)
    ref = []
    grad = jax.jit(jax.grad(loss))
    for i in range(7):
        g = grad(state, {"x": batch["x"][i], "y": batch["y"][i]})
        ref.append(np.concatenate([np.ravel(g["l1"]["kernel"].value), np.ravel(g["l2"]["kernel"].value)]))
    np.testing.assert_allclose(np.asarray(X), np.stack(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- check_finite


def test_check_finite_names_bad_rows():
    X = np.ones((12, 4), np.float32)
    X[2, 1] = np.nan
    X[5, 0] = np.inf
    X[9, 3] = -np.inf
    with pytest.raises(ValueError, match=r"gradients: 3 of 12 per-sample gradients .*examples \[2, 5, 9\]"):
        check_finite(jnp.asarray(X))
    check_finite(jnp.ones((3, 3)))  # finite: no error


# ---------------------------------------------------------------- the noise model

_NX = (400, 500)  # 200k entries: binomial and sampling errors are small


@pytest.fixture(scope="module")
def X_big():
    # mean 3, std 0.5: std(X) is not 1, so a noise scale tied to std(X) is distinguishable from one that is not
    return 3.0 + 0.5 * jax.random.normal(jax.random.key(7), _NX, jnp.float32)


def test_noise_prop_zero_is_identity(X_big):
    Xn = swapjax.add_gradient_noise(X_big, jax.random.key(0), 1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(Xn), np.asarray(X_big))


def test_noise_prop_one_changes_every_entry(X_big):
    Xn = swapjax.add_gradient_noise(X_big, jax.random.key(0), 1.0, 1.0)
    assert np.all(np.asarray(Xn) != np.asarray(X_big))


@pytest.mark.parametrize("std_scale, prop", [(1.0, 0.1), (2.0, 0.25), (4.0, 0.25)])
def test_noise_fraction_and_scale(X_big, std_scale, prop):
    X = np.asarray(X_big)
    Xn = np.asarray(swapjax.GradientNoise(std_scale, prop)(X_big, jax.random.key(3)))
    changed = Xn != X
    n = X.size
    # fraction of hit entries ~ Binomial(n, prop)/n: 6 standard deviations
    assert abs(changed.mean() - prop) < 6 * np.sqrt(prop * (1 - prop) / n)
    # noise ~ N(0, (std_scale·std(X))²) on the hit entries; std(X) = 0.5 here
    noise = (Xn - X)[changed].astype(np.float64)
    target = std_scale * X.std()
    assert target == pytest.approx(std_scale * 0.5, rel=0.01)
    m = noise.size  # ≥ 20k: the sample std has relative sd ≈ 1/√(2m) < 0.5%
    assert noise.std() == pytest.approx(target, rel=0.03)
    assert abs(noise.mean()) < 6 * target / np.sqrt(m)
    # each row (sample gradient) gets its own random coordinates, not one shared pattern
    assert not np.array_equal(changed[0], changed[1])


def test_noise_is_deterministic_in_the_key(X_big):
    noise = swapjax.GradientNoise(1.0, 0.25)
    a = noise(X_big, jax.random.key(11))
    b = noise(X_big, jax.random.key(11))
    c = noise(X_big, jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(swapjax.add_gradient_noise(X_big, jax.random.key(11), 1.0, 0.25)))


@pytest.mark.parametrize("kwargs, match", [({"std_scale": -1.0}, "std_scale"), ({"prop": 1.5}, "prop"),
                                           ({"prop": -0.1}, "prop"), ({"std_scale": float("nan")}, "std_scale")])
def test_noise_config_errors_name_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swapjax.GradientNoise(**kwargs)
