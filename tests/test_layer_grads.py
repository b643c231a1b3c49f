"""swapjax.layer_grads: per-example kernel gradients from layer inputs and output cotangents.

Every figure is checked against an independent computation: ``jax.vjp`` of the convolution for
the kernel-gradient formula, and one ``jax.grad`` per example (no vmap, no taps) for whole models.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import swapjax
from swapjax import gradients, layer_grads, pytree
from swapjax.models import LeNet5, MLPNet, MobileNetV1, ResNet20, ResNet50

# ---------------------------------------------------------------- the convolution kernel gradient

CONVS = {  # (x shape, kernel shape, conv_general_dilated keyword arguments)
    "nhwc 3x3 same": ((2, 7, 6, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
    "stride 2, uneven padding": ((2, 8, 9, 3), (3, 2, 3, 5), dict(window_strides=(2, 3), padding=((0, 1), (2, 0)))),
    "atrous (rhs dilation)": ((1, 9, 9, 2), (3, 3, 2, 3), dict(window_strides=(1, 1), padding=((2, 2), (1, 1)),
                                                                 rhs_dilation=(2, 1))),
    "transposed (lhs dilation)": ((2, 5, 4, 3), (3, 3, 3, 2), dict(window_strides=(1, 1), padding=((2, 2), (1, 2)),
                                                                     lhs_dilation=(2, 2))),
    "2 feature groups": ((2, 6, 6, 4), (3, 3, 2, 6), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                                            feature_group_count=2)),
    "depthwise": ((2, 6, 6, 4), (3, 3, 1, 4), dict(window_strides=(2, 2), padding=((1, 1), (1, 1)),
                                                     feature_group_count=4)),
    "nchw / oihw": ((2, 3, 7, 6), (4, 3, 3, 2), dict(window_strides=(1, 2), padding=((1, 1), (0, 0)),
                                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "1-d, negative padding": ((2, 11, 3), (4, 3, 2), dict(window_strides=(2,), padding=((-1, 2),),
                                                            dimension_numbers=("NWC", "WIO", "NWC"))),
    "3-d": ((1, 4, 5, 4, 2), (2, 3, 2, 2, 3), dict(window_strides=(1, 2, 1), padding=((1, 0), (1, 1), (0, 1)))),
}


def _conv_params(x, k, kw):
    """The equation parameters of ``lax.conv_general_dilated(x, k, **kw)``, as a traced jaxpr records them."""
    jaxpr = jax.make_jaxpr(lambda x, k: lax.conv_general_dilated(x, k, **kw))(x, k).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    return dict(eqn.params)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_kernel_grad_equals_vjp_of_the_convolution(name):
    xs, ks, kw = CONVS[name]
    channels_last = {4: ("NHWC", "HWIO", "NHWC"), 5: ("NDHWC", "DHWIO", "NDHWC")}
    kw = {"dimension_numbers": channels_last.get(len(xs)), **kw}
    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks)
    params = _conv_params(x, k, kw)
    window = tuple(ks[i] for i in params["dimension_numbers"].rhs_spec[2:])

    @jax.jit  # one compilation each, instead of one per operation
    def both(x, k, delta):
        reference = jax.vjp(lambda k: lax.conv_general_dilated(x, k, **kw), k)[1](delta)[0]
        return layer_grads.conv_kernel_grad(x, delta, {**params, "window": window}), reference

    delta = jax.random.normal(jax.random.key(2), jax.eval_shape(lambda: lax.conv_general_dilated(x, k, **kw)).shape)
    got, reference = both(x, k, delta)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- whole models against a loop of jax.grad


def _loop_reference(loss_fn, params, batch, select=None):
    """(losses, X) from one jitted jax.grad per example: no vmap and no taps."""
    lay = pytree.layout(params, select)
    vg = jax.jit(jax.value_and_grad(loss_fn))
    rows = [vg(params, jax.tree_util.tree_map(lambda a: a[i], batch)) for i in range(gradients.batch_size(batch))]
    return np.array([float(v) for v, _ in rows]), np.stack([np.asarray(pytree.flatten(g, lay)) for _, g in rows])


def _plan(loss_fn, params, batch, select=None):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    selected = [i for i, s in enumerate(pytree.layout(params, select).selected) if s]
    return layer_grads.plan(lambda lv, ex: loss_fn(jax.tree_util.tree_unflatten(treedef, lv), ex), leaves,
                            jax.tree_util.tree_map(lambda a: a[0], batch), selected)


def _check(loss_fn, params, batch, select=None, all_fast=True, chunk_size=None):
    """Taps (the default), vmap(grad) (fast=False) and the loop agree; returns the plan.
    One chunk of all examples by default (one compiled copy of the model per path)."""
    chunk_size = chunk_size or gradients.batch_size(batch)
    ref_losses, ref = _loop_reference(loss_fn, params, batch, select)
    scale = float(np.max(np.abs(ref)))
    assert scale > 0 and not np.allclose(ref[0], ref[1])
    for fast in (True, False):
        losses, X = gradients.per_sample_losses_and_grads(loss_fn, params, batch, select, chunk_size,
                                                          progress=False, fast=fast)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(X, ref, rtol=1e-4, atol=2e-5 * scale)
    pl = _plan(loss_fn, params, batch, select)
    if all_fast:
        assert pl.slow == () and len(pl.fast) == len(pl.selected)
    return pl


def _image_batch(shape, n=3, classes=10):
    return {"x": jax.random.normal(jax.random.key(5), (n,) + shape), "y": jnp.arange(n) % classes}


def _xent(model, variables_of):
    def loss(params, ex):
        logits = model.apply(variables_of(params), ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])
    return loss


def test_mlpnet_taps_equal_the_loop():
    model = MLPNet()
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    pl = _check(_xent(model, lambda p: {"params": p}), params, _image_batch((784,)))
    assert len(pl.taps) == 3


def test_lenet5_taps_equal_the_loop():
    model = LeNet5()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    pl = _check(_xent(model, lambda p: {"params": p}), params, _image_batch((28, 28, 1)))
    assert sorted(t.primitive.name for t in pl.taps) == ["conv_general_dilated"] * 2 + ["dot_general"] * 3


def test_mobilenet_small_taps_equal_the_loop():
    """Depthwise (feature groups = channels), pointwise and strided convs, BN in inference mode."""
    model = MobileNetV1(width=0.25, num_classes=10, small_input=True, blocks=((16, 1), (32, 2), (32, 1)))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    stats = variables["batch_stats"]
    _check(_xent(model, lambda p: {"params": p, "batch_stats": stats}), variables["params"], _image_batch((16, 16, 3)))


@pytest.mark.slow  # 20 s of compilation on 2 cores; the other models cover every conv kind in CI
def test_resnet50_small_taps_equal_the_loop():
    """Bottlenecks (1×1, strided 3×3, 1×1 ×4, shortcut convs), the 7×7 stem and its max-pool."""
    model = ResNet50(num_classes=10, widths=(2, 2, 4, 4), blocks=(1, 1, 1, 1))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    stats = variables["batch_stats"]
    pl = _check(_xent(model, lambda p: {"params": p, "batch_stats": stats}), variables["params"],
                _image_batch((32, 32, 3)))
    assert len(pl.taps) == 1 + 4 * 4 + 1  # stem, 3 convs + shortcut per block, fc


def test_resnet20_every_kernel_is_tapped():
    """ResNet20's 22 kernels (19 convs, 2 shortcuts, fc) all take the fast path; the numbers of the
    default call are checked against a loop in test_models_cnn, and the two paths in a slow test."""
    model = ResNet20()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    loss = _xent(model, lambda p: {"params": p, "batch_stats": variables["batch_stats"]})
    pl = _plan(loss, variables["params"], _image_batch((32, 32, 3), n=1))
    assert len(pl.fast) == len(pl.selected) == 22 and pl.slow == () and len(pl.taps) == 22


@pytest.mark.slow
def test_resnet20_taps_equal_the_loop():
    model = ResNet20()
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = _xent(model, lambda p: {"params": p, "batch_stats": upd["batch_stats"]})
    _check(loss, variables["params"], _image_batch((32, 32, 3)))


# ---------------------------------------------------------------- user-written models


_as_f32 = jax.jit(lambda k: k.astype(jnp.float32))  # a kernel passed through a jitted helper


class _UserNet(nn.Module):
    """A conv used twice (shared kernel), a masked kernel (not a tap use), a plain `W @ x` with
    the kernel on the left (through a jitted cast), and an NCHW convolution."""

    @nn.compact
    def __call__(self, x):  # x: (8, 8, 2), ONE example
        conv = nn.Conv(3, (3, 3), padding="SAME", name="shared")
        h = jnp.tanh(conv(jnp.tanh(conv(jnp.concatenate([x, x[..., :1]], -1)))))  # 3 → 3 channels, twice
        w = self.param("nchw", nn.initializers.lecun_normal(), (4, 3, 2, 2))
        h = lax.conv_general_dilated(h.transpose(2, 0, 1)[None], w, (2, 2), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]  # (4, 4, 4)
        flat = jnp.tanh(h.reshape(-1))
        left = self.param("left", nn.initializers.lecun_normal(), (5, 64))
        mask = jnp.arange(5 * 64).reshape(5, 64) % 3 != 0
        masked = self.param("masked", nn.initializers.lecun_normal(), (5, 64))
        z = jnp.tanh(_as_f32(left) @ flat) + jnp.tanh((masked * mask) @ flat)
        return nn.Dense(4, name="head")(z)


def test_user_linen_model_taps_and_fallback():
    model = _UserNet()
    params = model.init(jax.random.key(0), jnp.zeros((8, 8, 2)))["params"]
    batch = {"x": jax.random.normal(jax.random.key(3), (5, 8, 8, 2)), "y": jnp.arange(5) % 4}

    def loss(p, ex):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, ex["x"]), ex["y"])

    # its own parameters ("nchw", "left", "masked") are not `kernel` leaves: the default leaves them dense
    assert pytree.layout(params).names == ("head/kernel", "shared/kernel")
    matrices = swapjax.allow_vectors(lambda path, leaf: leaf.ndim >= 2)
    pl = _check(loss, params, batch, select=matrices, all_fast=False)
    names = dict(zip(pl.selected, pytree.layout(params, matrices).names))
    assert sorted(names[i] for i in pl.fast) == ["head/kernel", "left", "nchw", "shared/kernel"]
    assert [names[i] for i in pl.slow] == ["masked"]
    assert sum(names[t.leaf] == "shared/kernel" for t in pl.taps) == 2
    # biases too (vmap(grad) for them, in the same pass as the taps)
    _check(loss, params, batch, select=swapjax.allow_vectors(lambda path, leaf: True), all_fast=False, chunk_size=3)


class _NnxConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), strides=(2, 2), rngs=rngs)
        self.dw = nnx.Conv(4, 4, (3, 3), feature_group_count=4, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.dw(nnx.relu(self.conv(x))))
        return self.out(h.reshape(-1))


def test_nnx_model_taps_equal_the_loop():
    graphdef, state, rest = nnx.split(_NnxConvNet(nnx.Rngs(0)), nnx.Param, ...)

    def loss(st, ex):
        return 0.5 * jnp.sum((nnx.merge(graphdef, st, rest)(ex["x"]) - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(jax.random.key(1), (4, 8, 8, 2)), "y": jax.random.normal(jax.random.key(2), (4, 3))}
    pl = _check(loss, state, batch)
    assert len(pl.taps) == 3


def test_kernel_used_at_every_step_of_a_scan_is_tapped_per_iteration():
    """A kernel used at every step of lax.scan (an RNN cell, a constant of the loop) is followed into the
    unrolled scan: one tap per iteration, its per-example gradient the sum over them (it went to vmap(grad)).
    As a layer it is tied (one weight, three uses): find_layers leaves it dense and says so. (A product with
    a state that does not depend on the example, h₀ = 0, would not be a layer's use: h₀ is data here.)"""
    params = {"cell": jax.random.normal(jax.random.key(0), (4, 4)) / 2, "head": jax.random.normal(jax.random.key(1), (4, 2))}

    def loss(p, ex):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(h @ p["cell"] + x), None), jnp.tanh(ex["x"][0]), ex["x"])
        return jnp.sum((h @ p["head"] - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(jax.random.key(2), (5, 3, 4)), "y": jax.random.normal(jax.random.key(3), (5, 2))}
    every_leaf = swapjax.allow_vectors(lambda path, leaf: True)  # the tied cell too: X's columns for it
    pl = _check(loss, params, batch, select=every_leaf, all_fast=True)
    assert pl.slow == () and [t.leaf for t in pl.taps] == [0, 0, 0, 1]
    found = swapjax.find_layers(loss, params, batch)
    assert [layer.name for layer in found.layers] == ["head"]
    assert found.left_dense == {"cell": "used by 3 products (tied or shared weights)"}


def test_interpreter_failure_warns_and_uses_vmap_grad(monkeypatch, trained_mlp, prune_batch, loss_fn):
    def broken(*args, **kwargs):
        raise NotImplementedError("a primitive this JAX cannot replay")

    monkeypatch.setattr(layer_grads, "_interpret", broken)
    batch = jax.tree_util.tree_map(lambda a: a[:4], prune_batch)
    with pytest.warns(RuntimeWarning, match="layer taps unavailable .*NotImplementedError"):
        X = gradients.per_sample_grads(lambda p, ex: loss_fn(p, ex) * 1.0, trained_mlp, batch, progress=False)
    np.testing.assert_allclose(X, _loop_reference(loss_fn, trained_mlp, batch)[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- progress


def test_progress_reports_chunks_and_is_silenced(monkeypatch, capfd, trained_mlp, prune_batch, loss_fn):
    monkeypatch.setattr(gradients._ChunkProgress, "interval", 0.0)  # every chunk
    jax.block_until_ready(gradients.per_sample_grads(loss_fn, trained_mlp, prune_batch, chunk_size=16))
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "per-sample gradients" in ln]
    assert len(lines) == 3
    for i, line in enumerate(lines, start=1):
        assert line.startswith(f"[swapjax] per-sample gradients: chunk {i}/3 ({16 * i}/48 examples), ")
        assert line.endswith(" s")
    jax.block_until_ready(gradients.per_sample_grads(loss_fn, trained_mlp, prune_batch, chunk_size=16, progress=False))
    assert "per-sample gradients" not in capfd.readouterr().err
    messages = []  # a callable gets each message, without the prefix; nothing on stderr
    jax.block_until_ready(gradients.per_sample_grads(loss_fn, trained_mlp, prune_batch, chunk_size=16,
                                                     progress=messages.append))
    assert [m.split(", ")[0] for m in messages] == [f"per-sample gradients: chunk {i}/3 ({16 * i}/48 examples)"
                                                     for i in (1, 2, 3)]
    assert "per-sample gradients" not in capfd.readouterr().err


# ---------------------------------------------------------------- the layer-wise rows A of a tap


@pytest.mark.parametrize("name", ["cast_up", "cast_down", "transposed", "out_in_einsum", "batched", "middle_contract",
                                  "conv_oihw"])
def test_layer_rows_times_the_layers_weights_give_the_product(name):
    """For every product of a leaf with the data, A_b·W_b = the product's output (up to its layout) for each of
    its layers b, with W_b = leaf.ravel()[index_b] (swapjax.layers.tap_layers): casts, a transposed kernel, an
    (out, in) einsum, batched (vmapped) kernels, a contraction over a middle axis, a convolution in OIHW. Before,
    only a kernel whose leading axes were contracted (or cast) gave rows; the others were left dense."""
    from swapjax.layers import tap_layers

    r = np.random.default_rng(0)
    cases = {  # name: (kernel, x for ONE example, use, output as (B, rows, d_out) from y)
        "cast_up": (r.normal(size=(4, 3)).astype(jnp.bfloat16), r.normal(size=(5, 4)),
                    lambda k, x: x @ k.astype(jnp.float32), lambda y: y[None]),
        "cast_down": (r.normal(size=(4, 3)), r.normal(size=(5, 4)),
                      lambda k, x: (x.astype(jnp.bfloat16) @ k.astype(jnp.bfloat16)).astype(jnp.float32),
                      lambda y: y[None]),
        "transposed": (r.normal(size=(3, 4)), r.normal(size=(5, 4)), lambda k, x: x @ k.T, lambda y: y[None]),
        "out_in_einsum": (r.normal(size=(3, 4)), r.normal(size=(4,)), lambda k, x: jnp.einsum("j,kj->k", x, k),
                          lambda y: y[None, None]),
        "batched": (r.normal(size=(2, 4, 3)), r.normal(size=(2, 5, 4)), lambda k, x: jnp.einsum("bti,bio->bto", x, k),
                    lambda y: y),
        "middle_contract": (r.normal(size=(2, 4, 3)), r.normal(size=(5, 4)),
                            lambda k, x: jnp.einsum("td,ndh->tnh", x, k), lambda y: y.reshape(1, 5, 6)),
        "conv_oihw": (r.normal(size=(3, 2, 2, 2)), r.normal(size=(1, 2, 5, 5)),
                      lambda k, x: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")),
                      lambda y: jnp.transpose(y, (0, 2, 3, 1)).reshape(1, 16, 3)),
    }
    kernel, x, use, as_rows = cases[name]
    kernel = jnp.asarray(kernel if kernel.dtype == jnp.bfloat16 else kernel.astype(np.float32))
    x = jnp.asarray(x, np.float32)
    pl = layer_grads.plan(lambda leaves, ex: jnp.sum(use(leaves[0], ex)), [kernel], x, [0])
    (tap,) = pl.taps
    (captured,) = layer_grads.layer_inputs(pl, [kernel], x)
    A = layer_grads.layer_rows(tap, captured)
    layers, why = tap_layers(tap, "k", kernel.shape)
    assert why == "" and A.shape[0] == len(layers)
    expected = np.asarray(as_rows(use(kernel, x)), np.float32)
    for b, layer in enumerate(layers):
        W = np.asarray(kernel, np.float32).ravel()[layer.index]
        got = np.asarray(A[b], np.float32) @ W
        np.testing.assert_allclose(got, expected[b], rtol=2e-2 if "cast" in name else 1e-5, atol=1e-5)
