"""swapjax.models: ResNet20 (CIFAR-10) and MobileNetV1 (ImageNet, and the 32×32 variant).

Published counts (the SWAP paper's experiments): ResNet20 has 270,896 conv+fc weights, which
this ResNet20 matches exactly as the 3×3 convs + the two 1×1 downsample convs
+ the fc kernel (fc bias excluded). MobileNetV1 1.0 has "4.2M" parameters
(Howard et al. 2017): exactly 4,231,976 here (4,209,088 of them prunable
kernels). MobileNet-224 is only ever traced (jax.eval_shape), never run.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swapjax
from swapjax.models import MobileNetV1, ResNet20, ResNet50
from swapjax.models.resnet20 import BasicBlock

CIFAR = (32, 32, 3)


def init_key(seed: int) -> jax.Array:
    """An "rbg" key for the real initialisations: compiling the initialisers of the ~50 kernel shapes
    with the default threefry costs 6–9 s of CPU per model here, rbg about a third of that."""
    return jax.random.key(seed, impl="rbg")


def n_params(tree, pred=lambda x: True) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree) if pred(x))


def names(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in leaves}


def tree_equal(a, b) -> bool:
    return jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


# ---------------------------------------------------------------- ResNet20

RESNET = ResNet20()


@pytest.fixture(scope="module")
def resnet_vars():
    """ResNet20 variables with non-trivial running statistics (one train-mode pass on random data)."""
    variables = jax.jit(RESNET.init)(init_key(0), jnp.zeros((1,) + CIFAR))
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(1), (3,) + CIFAR)
    _, upd = RESNET.apply(variables, x, train=True, mutable=["batch_stats"])
    return {"params": variables["params"], "batch_stats": upd["batch_stats"]}


def test_resnet20_weight_count_is_papers_270896(resnet_vars):
    params = resnet_vars["params"]
    shapes = names(params)
    kernels = {n: s for n, s in shapes.items() if n.endswith("kernel")}
    shortcut = {n: s for n, s in kernels.items() if "shortcut" in n}
    assert shortcut == {"layer2_0/shortcut_conv/kernel": (1, 1, 16, 32), "layer3_0/shortcut_conv/kernel": (1, 1, 32, 64)}
    assert len(kernels) == 1 + 18 + 2 + 1  # conv1, 9 blocks × 2 convs, 2 shortcuts, fc
    conv3x3 = sum(int(np.prod(s)) for n, s in kernels.items() if n != "fc/kernel" and "shortcut" not in n)
    assert conv3x3 == 432 + 6 * 2304 + (4608 + 5 * 9216) + (18432 + 5 * 36864) == 267_696
    assert conv3x3 + 640 == 268_336  # without the 1×1 downsample convs (option A): no match
    assert conv3x3 + 640 + 2_560 == 270_896  # with them (option B): the published figure
    assert n_params(params, lambda x: x.ndim >= 2) == 270_896
    # Not pruned: fc bias (10) and the BN scales/biases (2 × 784 channels).
    assert shapes["fc/kernel"] == (64, 10) and shapes["fc/bias"] == (10,)
    assert not any(n.endswith("bias") and "conv" in n for n in shapes)  # convs have no bias
    assert n_params(params) == 270_896 + 10 + 1_568 == 272_474
    assert n_params(resnet_vars["batch_stats"]) == 1_568


def test_resnet20_default_select_prunes_exactly_the_kernels(resnet_vars):
    lay = swapjax.pytree.layout(resnet_vars["params"])
    assert lay.size == 270_896
    assert all(n.endswith("/kernel") for n in lay.names) and len(lay.names) == 22
    assert not any("bn" in n for n in lay.names) and "fc/bias" not in lay.names


def test_resnet20_stage_shapes(resnet_vars):
    # Stride 2 at the start of stages 2 and 3: 32×32×16 → 16×16×32 → 8×8×64.
    _, state = RESNET.apply(
        resnet_vars, jnp.ones((3,) + CIFAR),
        capture_intermediates=lambda mdl, _: isinstance(mdl, BasicBlock), mutable=["intermediates"],
    )
    out = {k: v["__call__"][0].shape for k, v in state["intermediates"].items()}
    assert out == {
        **{f"layer1_{b}": (3, 32, 32, 16) for b in range(3)},
        **{f"layer2_{b}": (3, 16, 16, 32) for b in range(3)},
        **{f"layer3_{b}": (3, 8, 8, 64) for b in range(3)},
    }


@pytest.mark.parametrize("shape, out", [(CIFAR, (10,)), ((1,) + CIFAR, (1, 10)), ((3,) + CIFAR, (3, 10))])
def test_resnet20_output_shape(resnet_vars, shape, out):
    y = RESNET.apply(resnet_vars, jnp.ones(shape))
    assert y.shape == out and y.dtype == jnp.float32


def test_resnet20_inference_is_per_example_and_keeps_batch_stats(resnet_vars):
    x = jax.random.normal(jax.random.key(2), (3,) + CIFAR)
    y, upd = RESNET.apply(resnet_vars, x, train=False, mutable=["batch_stats"])
    assert tree_equal(upd["batch_stats"], resnet_vars["batch_stats"])  # nothing updated
    # Running statistics, not batch statistics: each example alone (batch axis 1, or none) gives the same logits.
    single = jnp.concatenate([RESNET.apply(resnet_vars, x[i : i + 1]) for i in range(3)])
    bare = jnp.stack([RESNET.apply(resnet_vars, x[i]) for i in range(3)])
    np.testing.assert_allclose(single, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bare, y, rtol=1e-5, atol=1e-5)


def test_resnet20_train_mode_updates_batch_stats(resnet_vars):
    x = 3.0 + jax.random.normal(jax.random.key(3), (3,) + CIFAR)
    y_train, upd = RESNET.apply(resnet_vars, x, train=True, mutable=["batch_stats"])
    old, new = resnet_vars["batch_stats"], upd["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    changed = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), old, new))
    assert all(changed)  # every BN's running mean and variance moved
    # Train mode normalises with this batch's statistics: logits differ from inference mode.
    assert not np.allclose(y_train, RESNET.apply(resnet_vars, x), atol=1e-3)
    with pytest.raises(flax.errors.ModifyScopeVariableError):  # batch_stats not declared mutable
        RESNET.apply(resnet_vars, x, train=True)


def test_resnet20_per_sample_grads_equal_a_loop_of_jax_grad(resnet_vars):
    params, stats = resnet_vars["params"], resnet_vars["batch_stats"]

    def loss_fn(p, ex):  # ONE example; the model sees a batch axis of 1, BN in inference mode
        logits = RESNET.apply({"params": p, "batch_stats": stats}, ex["x"][None], train=False)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    batch = {"x": jax.random.normal(jax.random.key(4), (3,) + CIFAR), "y": jnp.array([0, 3, 7])}
    X = swapjax.per_sample_grads(loss_fn, params, batch)
    lay = swapjax.pytree.layout(params)
    assert X.shape == (3, 270_896)
    grad = jax.jit(jax.grad(loss_fn))
    ref = jnp.stack([swapjax.pytree.flatten(grad(params, {"x": batch["x"][i], "y": batch["y"][i]}), lay) for i in range(3)])
    assert float(jnp.min(jnp.linalg.norm(ref, axis=1))) > 0 and not np.allclose(ref[0], ref[1])
    np.testing.assert_allclose(X, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


# ---------------------------------------------------------------- MobileNetV1


@pytest.fixture(scope="module")
def mobilenet224():
    """Shapes only (jax.eval_shape: nothing is computed) of MobileNetV1 1.0 at 224×224: (logits, variables)."""
    model = MobileNetV1()
    return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 224, 224, 3))))


def test_mobilenet_v1_count_is_published_4_2M(mobilenet224):
    logits, variables = mobilenet224
    params = variables["params"]
    total = n_params(params)
    kernels = n_params(params, lambda x: x.ndim >= 2)
    assert total == 4_231_976  # = Keras' MobileNet (alpha 1.0) trainable parameters
    assert kernels == 4_209_088 == total - 1_000 - 21_888  # minus fc bias and BN scales/biases
    assert abs(total - 4.2e6) / 4.2e6 < 0.01  # Howard et al.: 4.2M
    assert abs(kernels - 4.2e6) / 4.2e6 < 0.01
    assert n_params(variables["batch_stats"]) == 21_888
    assert logits.shape == (2, 1000)


def test_mobilenet_v1_default_select_prunes_exactly_the_kernels(mobilenet224):
    lay = swapjax.pytree.layout(mobilenet224[1]["params"])
    assert lay.size == 4_209_088
    assert len(lay.names) == 1 + 13 * 2 + 1 and all(n.endswith("/kernel") for n in lay.names)


def test_mobilenet_v1_layers(mobilenet224):
    shapes = names(mobilenet224[1]["params"])
    assert shapes["conv0/kernel"] == (3, 3, 3, 32)
    # Depthwise: feature_group_count = channels, kernel (3, 3, 1, C); pointwise 1×1.
    assert shapes["block1/dw_conv/kernel"] == (3, 3, 1, 32)
    assert shapes["block1/pw_conv/kernel"] == (1, 1, 32, 64)
    assert shapes["block13/dw_conv/kernel"] == (3, 3, 1, 1024)
    assert shapes["block13/pw_conv/kernel"] == (1, 1, 1024, 1024)
    assert shapes["fc/kernel"] == (1024, 1000) and shapes["fc/bias"] == (1000,)
    assert sum(1 for n in shapes if n.endswith("bn/scale") or n == "bn0/scale") == 27


@pytest.mark.parametrize("width, published", [(1.0, 4.2), (0.75, 2.6), (0.5, 1.3), (0.25, 0.5)])
def test_mobilenet_v1_width_multiplier_counts(width, published):
    # Howard et al. Table 6 gives the counts to 0.1M; ours round to the same figure.
    variables = jax.eval_shape(lambda: MobileNetV1(width=width).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert round(n_params(variables["params"]) / 1e6, 1) == published


def test_mobilenet_v1_224_feature_map_is_7x7():
    model = MobileNetV1(width=0.25)
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), capture_intermediates=lambda mdl, _: mdl.name == "block13"
        )
    )
    assert state["intermediates"]["block13"]["__call__"][0].shape == (1, 7, 7, 256)


@pytest.fixture(scope="module")
def small_mobilenet():
    # Width 0.25 and batch sizes 1 and 3 throughout: the cost is compiling each conv shape once.
    model = MobileNetV1(width=0.25, num_classes=10, small_input=True)
    return model, jax.jit(model.init)(init_key(5), jnp.zeros((1,) + CIFAR))


def test_mobilenet_v1_small_input_variant(small_mobilenet):
    model, variables = small_mobilenet
    # Same parameters as the ImageNet model with 10 classes; only conv0's stride differs.
    big = jax.eval_shape(lambda: MobileNetV1(width=0.25, num_classes=10).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert names(variables) == names(big)
    assert swapjax.pytree.layout(variables["params"]).size == n_params(variables["params"], lambda x: x.ndim >= 2)
    # Four downsamplings: 32 → 2×2 before the pool.
    x = jax.random.normal(jax.random.key(6), (3,) + CIFAR)
    y, state = model.apply(
        variables, x, capture_intermediates=lambda mdl, _: mdl.name == "block13", mutable=["intermediates"]
    )
    assert state["intermediates"]["block13"]["__call__"][0].shape == (3, 2, 2, 256)
    assert y.shape == (3, 10)
    assert model.apply(variables, x[0]).shape == (10,)
    np.testing.assert_allclose(model.apply(variables, x[:1]), y[:1], rtol=1e-5, atol=1e-5)


def test_mobilenet_v1_batch_stats_modes(small_mobilenet):
    model, variables = small_mobilenet
    x = 2.0 + jax.random.normal(jax.random.key(7), (3,) + CIFAR)
    _, kept = model.apply(variables, x, train=False, mutable=["batch_stats"])
    assert tree_equal(kept["batch_stats"], variables["batch_stats"])
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], upd["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))


def test_bad_input_rank_is_rejected(resnet_vars):
    with pytest.raises(ValueError, match="ResNet20"):
        RESNET.apply(resnet_vars, jnp.ones((32, 32)))
    with pytest.raises(ValueError, match="MobileNetV1"):
        MobileNetV1().init(jax.random.key(0), jnp.ones((2, 1, 32, 32, 3)))


# ---------------------------------------------------------------- ResNet50 (only traced)


def test_resnet50_count_is_torchvisions():
    model = ResNet50()
    logits, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 224, 224, 3))))
    params = variables["params"]
    assert n_params(params) == 25_557_032  # torchvision.models.resnet50().parameters()
    assert swapjax.pytree.layout(params).size == 25_502_912 == 25_557_032 - 1_000 - 53_120
    assert n_params(variables["batch_stats"]) == 53_120 and logits.shape == (2, 1000)
    shapes = names(params)
    assert shapes["conv1/kernel"] == (7, 7, 3, 64) and shapes["fc/kernel"] == (2048, 1000)
    # v1.5: the stride sits in the 3×3 conv; the first block of each layer has a 1×1 shortcut.
    assert shapes["layer2_0/conv1/kernel"] == (1, 1, 256, 128) and shapes["layer2_0/conv2/kernel"] == (3, 3, 128, 128)
    assert shapes["layer4_2/conv3/kernel"] == (1, 1, 512, 2048)
    assert {n.split("/")[0] for n in shapes if "shortcut" in n} == {"layer1_0", "layer2_0", "layer3_0", "layer4_0"}


def test_resnet50_strides_give_7x7_at_224():
    capture = lambda mdl, _: mdl.name in ("layer1_2", "layer2_0", "layer4_2")  # noqa: E731
    _, state = jax.eval_shape(lambda: ResNet50().init_with_output(
        jax.random.key(0), jnp.zeros((1, 224, 224, 3)), capture_intermediates=capture))
    shape = lambda name: state["intermediates"][name]["__call__"][0].shape  # noqa: E731
    assert shape("layer1_2") == (1, 56, 56, 256) and shape("layer2_0") == (1, 28, 28, 512)
    assert shape("layer4_2") == (1, 7, 7, 2048)
