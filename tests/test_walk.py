"""The layer-wise driver's one walk through the network (swapjax/walk.py): every equation runs once per
example, the result is the layer-by-layer (sequential) prune, and the Grams are those of the layers' inputs."""
from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax import layer_methods, layerwise
from swapjax.contract import solve_layer

SEEN = collections.Counter()  # examples that passed each counted point of the forward pass


def _count(name):
    def callback(x):
        SEEN[name] += 1  # under vmap: once per example

    return lambda x: jax.debug.callback(callback, x)


class _Block(nn.Module):
    """Pre-LN attention (q, k, v read one input) and an MLP, with residuals; counts its examples."""

    index: int

    @nn.compact
    def __call__(self, x):  # (T, d)
        h = nn.LayerNorm()(x)
        x = x + nn.SelfAttention(num_heads=2, deterministic=True)(h[None])[0]
        _count(f"attention {self.index}")(x)
        h = nn.gelu(nn.Dense(16, name="fc1")(nn.LayerNorm()(x)))
        _count(f"fc1 {self.index}")(h)
        return x + nn.Dense(8, name="fc2")(h)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        for i in range(2):
            x = _Block(i)(x)
        return nn.Dense(3, name="head")(nn.LayerNorm()(x))


_X = np.random.default_rng(0).normal(size=(12, 5, 6)).astype(np.float32)
_NET = _Net()
_PARAMS = _NET.init(jax.random.key(0), _X[0])["params"]


def _loss(params, example):
    return jnp.sum(_NET.apply({"params": params}, example["x"]) ** 2)


@pytest.mark.parametrize("sequential", [True, False])
def test_a_prune_evaluates_every_layer_once_per_example(sequential):
    """14 layers (embed, q, k, v, out, fc1, fc2 per block, head): the points counted inside the blocks see each
    of the N = 12 examples exactly once, a forward pass's worth, where a pass per layer would have seen them
    up to 14 times; chunks of 4 do not change that."""
    SEEN.clear()
    res = swapjax.prune_layerwise(_loss, _PARAMS, {"x": _X}, method=swapjax.Wanda(), sequential=sequential,
                                  chunk_size=4, progress=False)
    jax.effects_barrier()
    assert len(res.layers) == 14
    assert SEEN == {name: 12 for name in ("attention 0", "fc1 0", "attention 1", "fc1 1")}, SEEN
    assert sum(SEEN.values()) <= 1.5 * 4 * len(_X)


def test_an_overlapping_last_chunk_counts_its_examples_once_in_the_grams():
    """N = 10 in chunks of 4 (the last overlapping): the walk evaluates 12 examples, the Grams count 10."""
    SEEN.clear()
    grams = swapjax.layer_grams(_loss, _PARAMS, {"x": _X[:10]}, chunk_size=4)
    jax.effects_barrier()
    assert SEEN["fc1 1"] == 12  # ⌈10/4⌉ = 3 chunks of 4: at most 1.5 × a pass
    H, rows = grams["_Block_0/fc1/kernel"]
    h = _intermediate(_PARAMS, _X[:10], "_Block_0", "fc1")
    assert rows == 50
    np.testing.assert_allclose(np.asarray(H), h.T @ h, rtol=1e-4, atol=1e-4 * np.abs(h.T @ h).max())


def _intermediate(params, x, block, layer):
    """The input rows of ``block``'s fc1 (its second LayerNorm's outputs), float64, from flax's captured
    intermediates of the dense network."""
    rows = []
    for example in x:
        _, state = _NET.apply({"params": params}, example, capture_intermediates=True, mutable=["intermediates"])
        rows.append(np.asarray(state["intermediates"][block]["LayerNorm_1"]["__call__"][0], np.float64))
    return np.concatenate(rows)


def test_the_walk_equals_a_forward_pass_per_layer():
    """The reference: layer after layer in forward order, the Gram from a pass of the network as pruned so far
    (``layer_grams`` of the current params), SparseGPT on it, the weights written back. The walk gives the
    same weights (float32 rounding apart) from one pass."""
    res = swapjax.prune_layerwise(_loss, _PARAMS, {"x": _X}, method=swapjax.SparseGPT(), sparsity=0.6, chunk_size=5,
                                  progress=False)
    layers = {layer.name: layer for layer in swapjax.find_layers(_loss, _PARAMS, {"x": _X}).layers}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_PARAMS)
    paths = [swapjax.checks.path_name(p) for p, _ in leaves]
    current = [np.array(a) for _, a in leaves]
    for report in res.layers:
        layer = layers[report.name]
        H, _ = swapjax.layer_grams(_loss, jax.tree_util.tree_unflatten(treedef, current), {"x": _X})[layer.name]
        leaf = current[paths.index(layer.path)]
        W, _ = solve_layer(swapjax.SparseGPT(), layer.name, leaf.reshape(-1)[layer.index], H,
                           swapjax.Groups.top_k(report.kept))
        leaf.reshape(-1)[layer.index.ravel()] = np.asarray(W).ravel()
    expected = jax.tree_util.tree_unflatten(treedef, current)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(res.params)[0], jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5, err_msg=swapjax.checks.path_name(path))
    assert all(np.array_equal(np.asarray(got) == 0, want == 0) for got, want in
               zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(expected)) if np.ndim(want) >= 2)


def test_a_bfloat16_model_is_pruned_layer_by_layer():
    """bfloat16 params and activations: every layer pruned at exactly its budget, the result in bfloat16, the
    masks mostly those of the float32 model (the Grams are float32 sums of bfloat16 inputs)."""
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), _PARAMS)
    x16 = _X.astype(jnp.bfloat16)
    res = swapjax.prune_layerwise(_loss, params16, {"x": x16}, method=swapjax.SparseGPT(), progress=False)
    ref = swapjax.prune_layerwise(_loss, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params16),
                                  {"x": x16.astype(np.float32)}, method=swapjax.SparseGPT(), progress=False)
    assert len(res.layers) == 14
    for path, mask in jax.tree_util.tree_flatten_with_path(res.masks)[0]:
        if mask is None:
            continue
        leaf = res.params
        for key in path:
            leaf = leaf[key.key]
        assert leaf.dtype == jnp.bfloat16 and np.all(np.asarray(leaf)[~np.asarray(mask)] == 0)
    kept = [r.kept for r in res.layers]
    assert kept == [r.kept for r in ref.layers] == [r.d_in * r.d_out // 2 for r in res.layers]
    agree = np.mean(np.concatenate([np.ravel(np.asarray(a) == np.asarray(b)) for a, b in
                                    zip(jax.tree_util.tree_leaves(res.masks), jax.tree_util.tree_leaves(ref.masks))]))
    assert agree >= 0.9, agree


def _scanned_loss(params, example):
    def block(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(block, example["x"] @ params["embed"], params["blocks"])
    return jnp.sum(h @ params["head"]) ** 2


@pytest.mark.parametrize("depth", [3, 7])
def test_the_iterations_of_a_scanned_stack_share_their_compiled_segments(depth):
    """A lax.scan over a (depth, 12, 12) stack: each slice is a layer and its own stop, and the segments of
    the iterations compile as one (the slice of the stack is taken outside the compiled segment); the
    result equals the walk of the unrolled twin."""
    rng = np.random.default_rng(depth)
    params = {"embed": rng.normal(size=(6, 12)).astype(np.float32) / 3,
              "blocks": rng.normal(size=(depth, 12, 12)).astype(np.float32) / 4,
              "head": rng.normal(size=(12, 2)).astype(np.float32)}
    batch = {"x": rng.normal(size=(16, 4, 6)).astype(np.float32)}
    traced = collections.Counter()

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        res = swapjax.prune_layerwise(_scanned_loss, params, batch, method=swapjax.SparseGPT(), progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [r.name for r in res.layers] == ["embed"] + [f"blocks[{i}]" for i in range(depth)] + ["head"]
    assert traced["segment"] <= 4, traced  # the input's, the first block's, a repeated block's, the last

    def unrolled(p, example):
        h = example["x"] @ p["embed"]
        for i in range(depth):
            h = jnp.tanh(h @ p[f"block{i}"])
        return jnp.sum(h @ p["head"]) ** 2

    twin = {"embed": params["embed"], "head": params["head"]} | {f"block{i}": params["blocks"][i] for i in range(depth)}
    ref = swapjax.prune_layerwise(unrolled, twin, batch, method=swapjax.SparseGPT(), progress=False)
    for i in range(depth):
        np.testing.assert_allclose(np.asarray(res.params["blocks"][i]), np.asarray(ref.params[f"block{i}"]),
                                   rtol=1e-4, atol=1e-6)


def test_a_loss_the_interpreter_cannot_follow_is_a_clear_error(monkeypatch):
    """The walk needs the flattened program: a loss it cannot replay is a ValueError pointing to the
    network-wide prune (find_layers falls back to the name rule with a warning first)."""
    from swapjax import layer_grads

    def broken(*args, **kwargs):
        raise NotImplementedError("a primitive this JAX cannot replay")

    monkeypatch.setattr(layer_grads, "_interpret", broken)
    with pytest.warns(RuntimeWarning, match="the loss could not be followed"):
        with pytest.raises(ValueError, match=r"loss_fn: its forward pass could not be followed layer by layer "
                                             r"\(NotImplementedError: a primitive this JAX cannot replay\); "
                                             r"swapjax.prune prunes it network-wide"):
            swapjax.prune_layerwise(lambda p, ex: _loss(p, ex) * 1.0, _PARAMS, {"x": _X}, progress=False)
