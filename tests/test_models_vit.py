"""swapjax.models.ViT: the forward pass against a float64 NumPy transformer written from the
formulas, its kernel count, and what the default call prunes of it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swapjax
from swapjax.models import ViT


@pytest.fixture(scope="module")
def params():
    params = ViT().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    # non-zero class token and biases, so that the reference checks where each one enters
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [w + 0.05 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])


def _layer_norm(x, p):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x * p["scale"] + p["bias"]


def _gelu(x):  # Flax's default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference(params, image):
    """Logits of ONE (28, 28) image, in float64, from the transformer's formulas."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    patches = image.reshape(4, 7, 4, 7).transpose(0, 2, 1, 3).reshape(16, 49)  # raster order, 7×7 each
    h = patches @ p["patch_embed"]["kernel"].reshape(49, 64) + p["patch_embed"]["bias"]
    h = np.concatenate([p["cls"][0], h]) + p["pos_embedding"][0]  # (17, 64)
    for i in range(2):
        b = p[f"block_{i}"]
        y = _layer_norm(h, b["ln1"])
        q, k, v = (np.einsum("td,dhe->the", y, b["attn"][n]["kernel"]) + b["attn"][n]["bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("qhe,khe->hqk", q, k) / np.sqrt(16)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads = np.einsum("hqk,khe->qhe", weights, v)
        h = h + np.einsum("qhe,hed->qd", heads, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        y = _gelu(_layer_norm(h, b["ln2"]) @ b["fc1"]["kernel"] + b["fc1"]["bias"])
        h = h + y @ b["fc2"]["kernel"] + b["fc2"]["bias"]
    return _layer_norm(h[0], p["ln"]) @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_equals_a_numpy_transformer(params):
    images = np.asarray(jax.random.uniform(jax.random.key(2), (3, 28, 28, 1)))
    logits = ViT().apply({"params": params}, images)
    reference = np.stack([_reference(params, im[..., 0].astype(np.float64)) for im in images])
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=2e-4, atol=2e-5)
    # one image, flat or not, without a batch axis
    np.testing.assert_allclose(ViT().apply({"params": params}, images[0].reshape(784)), reference[0], rtol=2e-4, atol=2e-5)


def test_the_default_prunes_the_14_kernels_and_leaves_tokens_and_biases(params):
    lay = swapjax.pytree.layout(params)
    assert lay.size == 69_312 == 7 * 7 * 64 + 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 128) + 64 * 10
    assert len(lay.names) == 14 and all(name.endswith("kernel") for name in lay.names)
    assert lay.describe() == "14 kernels (69,312 weights); left dense: 6 biases, cls, pos_embedding"


def test_pruning_the_vit_keeps_exactly_k_and_leaves_the_rest(params):
    images = np.asarray(jax.random.uniform(jax.random.key(3), (12, 28, 28, 1)))
    batch = {"x": images, "y": np.arange(12) % 10}

    def loss_fn(p, ex):
        return optax.softmax_cross_entropy_with_integer_labels(ViT().apply({"params": p}, ex["x"]), ex["y"])

    result = swapjax.prune(loss_fn, params, batch, sparsity=0.7, method=swapjax.Magnitude(), progress=False)
    assert result.summary()["total"]["kept"] == round(0.3 * 69_312)
    assert result.masks["cls"] is None and result.masks["block_0"]["attn"]["query"]["bias"] is None
    np.testing.assert_array_equal(result.params["pos_embedding"], params["pos_embedding"])
