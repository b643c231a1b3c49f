"""The matrix-free mode: X's products without X, against the formed matrix; memory estimates and the mode switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swapjax
from conftest import fixed_lr, fixed_swap, mlp_loss
from swapjax import iht, memory, operators, pytree
from swapjax.gradients import per_sample_losses_and_grads


@pytest.fixture(scope="module")
def problem(trained_mlp, prune_batch):
    """(operator, X formed, w̄) for the conftest MLP on its N = 48 examples."""
    losses, op = operators.linearized_gradients(mlp_loss, trained_mlp, prune_batch, chunk_size=10, progress=False)
    losses2, X = per_sample_losses_and_grads(mlp_loss, trained_mlp, prune_batch, progress=False)
    np.testing.assert_allclose(losses, losses2, rtol=1e-6)
    return op, X, pytree.flatten(trained_mlp, pytree.layout(trained_mlp))


def _lenet_problem(n=6):
    model = swapjax.models.LeNet5()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(params, example):
        logits = model.apply({"params": params}, example["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    return loss, params, {"x": x, "y": y}


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_products_equal_the_formed_matrix(model, trained_mlp, prune_batch):
    if model == "mlp":
        loss, params, batch = mlp_loss, trained_mlp, prune_batch
    else:
        loss, params, batch = _lenet_problem()
    _, op = operators.linearized_gradients(loss, params, batch, chunk_size=4, progress=False)
    _, X = per_sample_losses_and_grads(loss, params, batch, progress=False)
    X = np.asarray(X, np.float64)
    rng = np.random.default_rng(0)
    v = rng.normal(size=X.shape[1]).astype("float32")
    u = rng.normal(size=X.shape[0]).astype("float32")
    A = jax.jit(lambda op, v, u: (operators.linear(op).mv(v), operators.linear(op).rmv(u)))
    Xv, Xtu = A(op, v, u)
    assert op.shape == X.shape
    np.testing.assert_allclose(Xv, X @ v, rtol=1e-4, atol=1e-5 * np.abs(X @ v).max())
    np.testing.assert_allclose(Xtu, u @ X, rtol=1e-4, atol=1e-5 * np.abs(u @ X).max())
    np.testing.assert_allclose(op.col_sq, (X * X).sum(0), rtol=1e-4, atol=1e-6 * (X * X).sum(0).max())


def test_cg_backsolve_equals_the_woodbury_backsolve():
    """NλI + a rank-N matrix: CG is exact after N + 1 steps, to float32 rounding."""
    rng = np.random.default_rng(3)
    n, p, k = 12, 60, 25
    X = jnp.asarray(rng.normal(size=(n, p)), jnp.float32)
    w_bar = jnp.asarray(rng.normal(size=p), jnp.float32)
    t = jnp.asarray(rng.normal(size=n), jnp.float32)
    support = jnp.asarray(np.arange(p) < k)
    for lam in (0.05, 1e-3):
        exact = iht.backsolve(X, t, w_bar, support, lam)
        cg = iht.backsolve_cg(X, t, w_bar, support, lam, jnp.zeros(p), iters=4 * n)
        np.testing.assert_allclose(cg, exact, rtol=2e-3, atol=2e-4 * float(jnp.abs(exact).max()))
        assert bool(jnp.all(cg[~support] == 0))


@pytest.mark.parametrize("method", [fixed_lr(swap_rounds=3), fixed_swap(swap_rounds=3), swapjax.Magnitude()],
                         ids=["LR", "SWAP", "MP"])
def test_solve_on_the_operator_equals_the_solve_on_the_matrix(problem, method):
    op, X, w_bar = problem
    k = 200
    w1, info1 = method.solve(X, w_bar, k)
    w2, info2 = method.solve(op, w_bar, k)
    np.testing.assert_array_equal(info2.support, info1.support)
    assert int(jnp.sum(w2 != 0)) <= k and bool(jnp.all(w2[~info2.support] == 0))
    np.testing.assert_allclose(float(info2.objective), float(info1.objective), rtol=1e-4)
    np.testing.assert_allclose(w2, w1, atol=1e-4 * float(jnp.abs(w1).max()))


def test_selection_on_the_operator_picks_what_the_matrix_picks(problem):
    """Same candidates and scores along the path (the held-out score is a fixed function of w here)."""
    op, X, w_bar = problem
    probe = jnp.asarray(np.random.default_rng(5).normal(size=w_bar.shape), jnp.float32)
    score = lambda w: float(jnp.sum((w - 0.5 * w_bar - 0.01 * probe) ** 2))  # noqa: E731
    method = swapjax.SWAP(swap_rounds=2, obs_sparsity=None)  # the OBS start needs X formed
    _, info1 = method.solve(X, w_bar, 300, score=score)
    _, info2 = method.solve(op, w_bar, 300, score=score)
    assert [(c.lam, c.epsilon, c.support) for c in info2.candidates] == [
        (c.lam, c.epsilon, c.support) for c in info1.candidates]
    np.testing.assert_allclose([c.score for c in info2.candidates], [c.score for c in info1.candidates], rtol=1e-4)
    np.testing.assert_array_equal(info2.support, info1.support)


@jax.tree_util.register_pytree_node_class
class _ColumnBlocks(swapjax.Operator):
    """A toy way of holding X, written here alone: two column blocks [X₁ | X₂], never joined."""

    label = "two column blocks"

    def __init__(self, left, right):
        self.left, self.right = left, right

    @property
    def shape(self):
        return (self.left.shape[0], self.left.shape[1] + self.right.shape[1])

    @property
    def col_sq(self):
        return jnp.concatenate([jnp.sum(self.left ** 2, 0), jnp.sum(self.right ** 2, 0)])

    def products(self):
        split = self.left.shape[1]
        return operators.Linear(lambda v: self.left @ v[:split] + self.right @ v[split:],
                                lambda u: jnp.concatenate([u @ self.left, u @ self.right]),
                                lambda: self.col_sq, *self.shape, self.left.dtype, None)

    def tree_flatten(self):
        return (self.left, self.right), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@pytest.mark.parametrize("method", [fixed_lr(swap_rounds=3), fixed_swap(swap_rounds=3), swapjax.Magnitude()],
                         ids=["LR", "SWAP", "MP"])
def test_an_operator_defined_outside_the_library(problem, method):
    """Every method that needs only products solves on a new way of holding X as on the matrix."""
    _, X, w_bar = problem
    toy = _ColumnBlocks(X[:, :300], X[:, 300:])
    k = 200
    w1, info1 = method.solve(X, w_bar, k)
    w2, info2 = method.solve(toy, w_bar, k)
    np.testing.assert_array_equal(info2.support, info1.support)
    np.testing.assert_allclose(w2, w1, rtol=2e-3, atol=2e-4 * float(jnp.abs(w1).max()))
    assert np.count_nonzero(w2) == k
    with pytest.raises(ValueError, match="WoodFisher needs the per-sample gradients formed.*two column blocks"):
        swapjax.WoodFisher().solve(toy, w_bar, k)


def test_woodfisher_refuses_the_operator(problem):
    op, _, w_bar = problem
    with pytest.raises(ValueError, match="WoodFisher needs the per-sample gradients formed"):
        swapjax.WoodFisher().solve(op, w_bar, 100)


def test_matrix_free_prune_equals_the_in_memory_prune(trained_mlp, prune_batch):
    method = fixed_swap(swap_rounds=2)
    kw = dict(sparsity=0.8, method=method, stages=2, progress=False)
    dense = swapjax.prune(mlp_loss, trained_mlp, prune_batch, mode="in-memory", **kw)
    free = swapjax.prune(mlp_loss, trained_mlp, prune_batch, mode="matrix-free", **kw)
    assert (dense.mode, free.mode) == ("in-memory", "matrix-free")
    for a, b in zip(jax.tree_util.tree_leaves(dense.masks), jax.tree_util.tree_leaves(free.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(dense.info, free.info):
        np.testing.assert_allclose(b.objective, a.objective, rtol=1e-4)


def test_example_bytes_counts_the_activations(trained_mlp, prune_batch):
    """At least the hidden layer's pre- and post-activation (2·12 floats) and the logits (10) per example."""
    a = memory.example_bytes(mlp_loss, trained_mlp, prune_batch)
    assert (2 * 12 + 10) * 4 <= a < 64 * 12 * 4  # per example, never a kernel-sized value


def test_residual_bytes_are_what_linearize_keeps(trained_mlp, prune_batch):
    """Per example, at least the hidden activation and the softmax (12 + 10 floats), and 1 to 3 floats more
    for each hidden unit added (the activation and tanh's derivative): r grows with the network's width."""
    from conftest import TinyMLP

    def residuals(hidden):
        model = TinyMLP(hidden=hidden)
        params = model.init(jax.random.key(0), prune_batch["x"][:1])["params"]
        loss = lambda p, e: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": p}, e["x"]), e["y"])
        return memory.residual_bytes(loss, params, prune_batch, pytree.layout(params))

    r = memory.residual_bytes(mlp_loss, trained_mlp, prune_batch, pytree.layout(trained_mlp))
    assert r == residuals(12) >= (12 + 10) * 4
    assert 4 * 36 <= residuals(48) - r <= 12 * 36


class FakeDevice:
    """A device as the estimate sees it: a platform and its free memory."""

    def __init__(self, platform, free=2**30):
        self.platform, self.free = platform, free

    def memory_stats(self):
        return {"bytes_limit": self.free, "bytes_in_use": 0}


def test_in_memory_estimate_counts_a_second_X_on_an_accelerator(trained_mlp, prune_batch):
    """A GPU's in-memory solve was measured at 2.02 × X; a CPU's at ≤ 1.3 × X: the estimate's X term follows."""
    lay = pytree.layout(trained_mlp)
    x_bytes = prune_batch["x"].shape[0] * lay.size * 4
    cpu, gpu = (memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128, FakeDevice(name)) for name in ("cpu", "gpu"))
    assert abs((gpu.in_memory - cpu.in_memory) - 0.8 * x_bytes) <= 2
    assert gpu.matrix_free == cpu.matrix_free and gpu.available == cpu.available == 2**30


def test_sharded_estimate_is_per_accelerator_and_whole_on_host_devices(trained_mlp, prune_batch):
    lay = pytree.layout(trained_mlp)
    x_bytes = prune_batch["x"].shape[0] * lay.size * 4
    est = lambda devices: memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128, devices=devices)  # noqa: E731
    one, four = est((FakeDevice("gpu"),)), est(tuple(FakeDevice("gpu", free) for free in (4, 3, 5, 6)))
    assert abs((one.in_memory - four.in_memory) - 2.1 * x_bytes * 3 / 4) <= 2  # each device holds N/4 rows
    assert four.available == 3 and four.matrix_free == one.matrix_free  # the least free device
    host = est(tuple(FakeDevice("cpu") for _ in range(4)))  # forced host devices share one RAM
    assert host.in_memory == est((FakeDevice("cpu"),)).in_memory


def test_auto_mode_never_goes_matrix_free_when_sharded():
    from swapjax import holding

    tight = memory.Estimate(in_memory=10, matrix_free=1, available=5)
    assert holding.choose("auto", fixed_lr(), None, tight) == holding.Holding("matrix-free")
    with pytest.raises(ValueError, match=r"no mode fits .*matrix-free is not available: the matrix-free mode runs "
                                         r"on one device"):
        holding.choose("auto", fixed_lr(), None, tight, devices=(jax.devices()[0],))


def test_auto_mode_switches_to_matrix_free_when_X_does_not_fit(trained_mlp, prune_batch, monkeypatch, capsys):
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, pytree.layout(trained_mlp), 128)
    assert est.matrix_free < est.in_memory  # N·a < N·p·b here
    available = int(est.matrix_free / memory.MEMORY_FRACTION) + 1
    assert est.in_memory > available
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: available)
    res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), progress=False)
    assert res.mode == "matrix-free"
    assert "does not fit in memory" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"the in-memory prune does not fit: estimated peak .* GiB available; "
                                         r"options: mode='matrix-free'"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=fixed_lr(), mode="in-memory", progress=False)
    # gradient noise and WoodFisher need X: nothing fits
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="matrix-free is not available: gradient noise needs X formed"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=fixed_lr(), noise=swapjax.GradientNoise(), key=key,
                      progress=False)
    with pytest.raises(ValueError, match="not available here: WoodFisher needs X formed"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=swapjax.WoodFisher(), mode="matrix-free")


def test_nothing_fits_names_the_figures(trained_mlp, prune_batch, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"no mode fits in memory: .*0\.00 GiB available; options: fewer examples"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=fixed_lr(), progress=False)
