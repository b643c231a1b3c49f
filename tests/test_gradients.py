"""Per-sample gradients X ∈ R^{N×p} and the published gradient-noise model (docs/methods.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swapjax
from swapjax import layer_grads, pytree
from swapjax.gradients import check_finite

from floats import assert_same_noise, noise_sigma_rtol

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
    target = std_scale * X.astype(np.float64).std()
    assert target == pytest.approx(std_scale * 0.5, rel=0.01)
    m = noise.size  # ≥ 20k: the sample std of m normals has relative sd ≈ 1/√(2m) (< 0.5 %)
    assert abs(noise.std() / target - 1) < 6 / np.sqrt(2 * m)
    assert abs(noise.mean()) < 6 * target / np.sqrt(m)
    # each row (sample gradient) gets its own random coordinates, not one shared pattern
    assert not np.array_equal(changed[0], changed[1])
    # hits spread evenly over the rows: the per-row counts have the binomial spread, not more
    per_row = changed.sum(axis=1)
    assert per_row.std() < 1.5 * np.sqrt(X.shape[1] * prop * (1 - prop))


def test_noise_std_of_X_is_accurate_without_a_full_size_temporary():
    # a large mean (1000) and a small spread (0.01): the naive E[x²] − E[x]² in float32 loses every digit
    X = 1000.0 + 0.01 * np.random.default_rng(0).standard_normal((300, 2000)).astype(np.float32)
    Xn = np.asarray(swapjax.add_gradient_noise(X, jax.random.key(0), 1.0, 1.0)).astype(np.float64)
    noise = Xn - X
    assert noise.std() / X.astype(np.float64).std() == pytest.approx(1.0, abs=6 / np.sqrt(2 * X.size) + 1e-3)
    from swapjax.gradients import _noise_std
    assert float(jax.jit(_noise_std)(jnp.asarray(X), 1.0)) == pytest.approx(X.astype(np.float64).std(), rel=1e-5)


def test_noise_is_deterministic_in_the_key(X_big):
    # a and b (and the add_gradient_noise call) are one compiled program on the same X: the same bits
    noise = swapjax.GradientNoise(1.0, 0.25)
    a = noise(X_big, jax.random.key(11))
    b = noise(X_big, jax.random.key(11))
    c = noise(X_big, jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(swapjax.add_gradient_noise(X_big, jax.random.key(11), 1.0, 0.25)))
    legacy = swapjax.add_gradient_noise(X_big, jax.random.PRNGKey(11), 1.0, 0.25)  # a uint32 key works too
    assert legacy.shape == X_big.shape and not np.array_equal(np.asarray(legacy), np.asarray(X_big))


def test_noise_does_not_depend_on_the_chunking(X_big):
    """Other chunk shapes and a traced call are other compiled programs: the same entries hit, bit for
    bit; the same values to float32 rounding (tests/floats.py)."""
    key, X = jax.random.key(5), X_big[:60]
    rtol = noise_sigma_rtol(*X.shape)
    ref = np.asarray(swapjax.add_gradient_noise(X, key, 2.0, 0.25))  # default: ⌊2¹⁸/500⌋ = 524 rows, one chunk
    for chunk_size in (1, 7):  # 7 does not divide N = 60: the last chunk overlaps the one before
        got = swapjax.add_gradient_noise(X, key, 2.0, 0.25, chunk_size=chunk_size)
        assert_same_noise(got, ref, X, rtol)
    # inside a trace the chunks run in a fori_loop and give the same draw
    traced = jax.jit(lambda X, k, s, p: swapjax.add_gradient_noise(X, k, s, p, chunk_size=7))(X, key, 2.0, 0.25)
    assert_same_noise(traced, ref, X, rtol)
    # the check fails on a σ beyond that rounding, and on a hit pattern that moved by one entry
    with pytest.raises(AssertionError, match="noise values differ"):
        assert_same_noise(swapjax.add_gradient_noise(X, key, 2.0 * (1 + 3 * rtol), 0.25), ref, X, rtol)
    moved, x = ref.copy(), np.asarray(X)
    j = int(np.flatnonzero(ref[0] != x[0])[0])  # the first hit entry of row 0, put back
    moved[0, j] = x[0, j]
    with pytest.raises(AssertionError, match="hit pattern"):
        assert_same_noise(moved, ref, X, rtol)
    # row i is drawn from fold_in(key, i) alone, as documented (row 0 and the last row checked)
    for i in (0, X.shape[0] - 1):
        np.testing.assert_allclose(ref[i], _row_noise(X, key, 2.0, 0.25, i), rtol=1e-6, atol=1e-6)


def _row_noise(X, key, std_scale, prop, i):
    """Row i of X plus its noise, drawn as documented: fold_in(key, i), split into (hit, value)."""
    k_hit, k_val = jax.random.split(jax.random.fold_in(key, i))
    hit = jax.random.bernoulli(k_hit, prop, (X.shape[1],))
    sigma = std_scale * np.float32(np.asarray(X, np.float64).std())
    return np.asarray(X[i] + jnp.where(hit, sigma * jax.random.normal(k_val, (X.shape[1],)), 0))


def test_noise_leaves_the_users_X_alone(X_big):
    # every call here runs the same programs on the same X (NumPy input copied, donate or not): the same bits
    X = X_big + 0  # a JAX array of our own, so that the fixture is not at stake
    before = np.asarray(X).copy()
    Xn = swapjax.add_gradient_noise(X, jax.random.key(1), 1.0, 0.5)
    assert not X.is_deleted()
    np.testing.assert_array_equal(np.asarray(X), before)
    assert not np.array_equal(np.asarray(Xn), before)
    X_np = before.copy()
    Xn_np = swapjax.GradientNoise(1.0, 0.5)(X_np, jax.random.key(1))  # NumPy input: copied, never aliased
    np.testing.assert_array_equal(X_np, before)
    np.testing.assert_array_equal(np.asarray(Xn_np), np.asarray(Xn))
    # donate=True hands X's buffer over (as prune does with its own X): same draw, X deleted
    Xd = swapjax.GradientNoise(1.0, 0.5)(X, jax.random.key(1), donate=True)
    assert X.is_deleted()
    np.testing.assert_array_equal(np.asarray(Xd), np.asarray(Xn))


@pytest.mark.parametrize("kwargs, match", [
    ({"X": np.ones(5, np.float32)}, "X: expected a float matrix"),
    ({"X": np.ones((3, 4), np.int32)}, "X: expected a float matrix"),
    ({"key": 0}, "key: expected a JAX PRNG key"),
    ({"std_scale": -1.0}, "std_scale"),
    ({"prop": 2.0}, "prop"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"donate": "yes"}, "donate"),
])
def test_add_gradient_noise_errors_name_argument(kwargs, match):
    args = dict(X=np.ones((3, 4), np.float32), key=jax.random.key(0), std_scale=1.0, prop=0.1)
    args.update(kwargs)
    X, key, std_scale, prop = (args.pop(k) for k in ("X", "key", "std_scale", "prop"))
    with pytest.raises(ValueError, match=match):
        swapjax.add_gradient_noise(X, key, std_scale, prop, **args)


_MEMORY_SCRIPT = """
import resource, jax, jax.numpy as jnp, swapjax
n, p = 500, 100_000
jnp.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
X = jax.jit(lambda: 3.0 + 0.5 * jnp.sin(jnp.arange(n, dtype=jnp.float32)[:, None] * 0.37
                                         + jnp.arange(p, dtype=jnp.float32)[None, :] * 1.3))()
X = swapjax.add_gradient_noise(X, jax.random.key(0), 2.0, 0.25, donate=True).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / (n * p * 4))
"""


def test_noise_memory_is_bounded():
    """Peak RSS with donate=True, X included, as a multiple of X (200 MB): measured 1.2–1.4 (the old
    full-size draw: 7.2). Generous bound; a subprocess so that ru_maxrss is this computation's."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 2.5, out.stdout


@pytest.mark.parametrize("kwargs, match", [({"std_scale": -1.0}, "std_scale"), ({"prop": 1.5}, "prop"),
                                           ({"prop": -0.1}, "prop"), ({"std_scale": float("nan")}, "std_scale")])
def test_noise_config_errors_name_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swapjax.GradientNoise(**kwargs)


@pytest.mark.parametrize("name", ["scan1", "nested", "gemma"])
def test_per_sample_grads_through_scanned_and_stacked_layers_match_vmap_grad(name):
    """The fast path taps every iteration of an unrolled scan and every batched product: slice l's gradient is
    x_l against δ_l, put back at slice l of the stacked leaf. Against vmap(grad) (fast=False) on a scan with
    its layer axis in the middle, a vmapped ensemble of scanned stacks and Gemma-style einsum weights."""
    from layer_models import BUILDERS

    case = BUILDERS[name]()
    fast = swapjax.per_sample_grads(case.loss_fn, case.params, case.batch, progress=False)
    slow = swapjax.per_sample_grads(case.loss_fn, case.params, case.batch, progress=False, fast=False)
    scale = float(jnp.max(jnp.abs(slow)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-4, atol=1e-5 * scale)
    leaves, treedef = jax.tree_util.tree_flatten(case.params)
    lay = swapjax.layers.prunable(case.loss_fn, case.params, case.batch)
    selected = [i for i, chosen in enumerate(lay.selected) if chosen]
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], case.batch)
    plan = layer_grads.plan(lambda lv, ex: case.loss_fn(jax.tree_util.tree_unflatten(treedef, lv), ex), leaves, first,
                            selected)
    assert set(plan.fast) == set(selected)  # every stacked leaf through its taps, none through vmap(grad)
