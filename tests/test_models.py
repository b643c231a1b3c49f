"""swapjax.models: MLPNet's architecture (784-40-20-10, ReLU, no bias)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax.models import MLPNet


@pytest.fixture(scope="module")
def params():
    return MLPNet().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]


def test_parameter_count_is_32360(params):
    sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)]
    assert sum(sizes) == 32_360 == 784 * 40 + 40 * 20 + 20 * 10


def test_layer_shapes(params):
    shapes = {name: params[name]["kernel"].shape for name in ("fc1", "fc2", "fc3")}
    assert shapes == {"fc1": (784, 40), "fc2": (40, 20), "fc3": (20, 10)}


def test_no_bias_anywhere(params):
    # Every leaf is a 2-D kernel; a bias (1-D) would be found here and change the count.
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    assert sorted(names) == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    assert all(x.ndim == 2 for _, x in leaves)
    assert not any("bias" in n for n in names)


def test_zero_input_gives_zero_logits(params):
    # Without bias the network is positively homogeneous: f(0) = 0, f(c·x) = c·f(x) for c > 0.
    model = MLPNet()
    assert jnp.all(model.apply({"params": params}, jnp.zeros(784)) == 0)
    x = jax.random.normal(jax.random.key(1), (784,))
    np.testing.assert_allclose(
        model.apply({"params": params}, 3.0 * x), 3.0 * model.apply({"params": params}, x), rtol=1e-5, atol=1e-6
    )


def test_all_weights_prunable_by_default(params):
    # The default selection (the kernels) takes all 32,360 weights: nothing is left unpruned.
    assert swapjax.pytree.layout(params).size == 32_360


@pytest.mark.parametrize(
    "shape, out",
    [
        ((784,), (10,)),
        ((28, 28), (10,)),
        ((28, 28, 1), (10,)),
        ((5, 784), (5, 10)),
        ((5, 28, 28), (5, 10)),
        ((5, 28, 28, 1), (5, 10)),
        ((2, 3, 28, 28, 1), (2, 3, 10)),
    ],
)
def test_output_shape(params, shape, out):
    y = MLPNet().apply({"params": params}, jnp.ones(shape))
    assert y.shape == out
    assert y.dtype == jnp.float32


def test_input_layouts_agree(params):
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    model = MLPNet()
    a = model.apply({"params": params}, x)
    b = model.apply({"params": params}, x.reshape(4, 784))
    c = model.apply({"params": params}, x[..., 0])
    d = jnp.stack([model.apply({"params": params}, xi) for xi in x])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-6)
    np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-6)


def test_bad_input_shape_is_rejected(params):
    with pytest.raises(ValueError, match="MLPNet"):
        MLPNet().apply({"params": params}, jnp.ones((5, 100)))


def test_per_sample_grads_shape(params):
    def loss_fn(p, ex):
        logits = MLPNet().apply({"params": p}, ex["x"])
        return -jax.nn.log_softmax(logits)[ex["y"]]

    batch = {"x": jnp.ones((3, 28, 28)), "y": jnp.array([0, 1, 2])}
    X = swapjax.per_sample_grads(loss_fn, params, batch)
    assert X.shape == (3, 32_360)


def test_lenet5_kernels_and_layouts():
    """LeNet-5: 61,470 prunable kernel weights (biases are 1-D, not pruned); flat and image inputs agree."""
    from swapjax import pytree
    from swapjax.models import LeNet5

    model = LeNet5()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 784)))
    lay = pytree.layout(variables["params"])
    shapes = dict(zip(lay.names, lay.shapes))
    assert shapes == {"conv1/kernel": (5, 5, 1, 6), "conv2/kernel": (5, 5, 6, 16), "fc1/kernel": (400, 120),
                      "fc2/kernel": (120, 84), "fc3/kernel": (84, 10)}
    assert lay.size == 25 * 6 + 25 * 6 * 16 + 400 * 120 + 120 * 84 + 84 * 10 == 61_470
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    flat = model.apply(variables, x.reshape(3, 784))
    np.testing.assert_allclose(model.apply(variables, x), flat, rtol=1e-6)
    np.testing.assert_allclose(model.apply(variables, x[0]), flat[0], rtol=1e-5, atol=1e-6)
