"""Which leaves the default call prunes, by role: the kernels of linear maps, never a token, a
position embedding, an embedding table, a bias of any rank or a norm scale.

The transformers are written here (not the library's), in linen, in NNX and as a plain dict, so
that each rule of :func:`swapjax.pytree.default_rule` is checked on a tree it was not written for.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import swapjax
from swapjax import pytree

DIM, HEADS, CLASSES, N = 16, 4, 3, 8


class _LinenViT(nn.Module):
    """Patch conv, class token, learned position embeddings, one attention block with an MLP."""

    @nn.compact
    def __call__(self, image):  # (8, 8, 1): ONE example
        h = nn.Conv(DIM, (4, 4), strides=(4, 4), name="patch")(image[None])[0].reshape(-1, DIM)  # 4 patches
        h = jnp.concatenate([self.param("cls", nn.initializers.normal(0.02), (1, DIM)), h])
        h = h + self.param("pos_embedding", nn.initializers.normal(0.02), (5, DIM))
        y = nn.LayerNorm()(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(y, y)
        h = h + nn.Dense(DIM, name="fc2")(nn.gelu(nn.Dense(2 * DIM, name="fc1")(nn.LayerNorm()(h))))
        return nn.Dense(CLASSES, name="head")(nn.LayerNorm()(h)[0])


class _NnxViT(nnx.Module):
    """The same in NNX, with the positions as an ``nnx.Embed`` table."""

    def __init__(self, rngs):
        self.patch = nnx.Linear(16, DIM, rngs=rngs)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, DIM)))
        self.positions = nnx.Embed(5, DIM, rngs=rngs)
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=DIM, decode=False, rngs=rngs)
        self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, image):  # (8, 8, 1)
        patches = image.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
        h = jnp.concatenate([self.cls_token[...], self.patch(patches)]) + self.positions(jnp.arange(5))
        h = h + self.attn(self.norm(h))
        return self.head(h[0])


def _batch():
    r = np.random.default_rng(0)
    return {"x": jnp.asarray(r.normal(size=(N, 8, 8, 1)), jnp.float32), "y": jnp.asarray(np.arange(N) % CLASSES)}


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _linen():
    model = _LinenViT()
    params = model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))["params"]
    return params, lambda p, ex: _xent(model.apply({"params": p}, ex["x"]), ex["y"])


def _nnx():
    graphdef, state, rest = nnx.split(_NnxViT(nnx.Rngs(0)), nnx.Param, ...)
    return state, lambda st, ex: _xent(nnx.merge(graphdef, st, rest)(ex["x"]), ex["y"])


def _plain():
    """A dict transformer with the names people write by hand (no ``kernel``)."""
    r = np.random.default_rng(1)
    shapes = {"patch_w": (16, DIM), "cls_token": (1, DIM), "pos_embed": (5, DIM), "wq": (DIM, DIM),
              "wk": (DIM, DIM), "wv": (DIM, DIM), "qkv_bias": (3, DIM), "ln_scale": (DIM,), "head": (DIM, CLASSES)}
    params = {name: jnp.asarray(r.normal(size=shape) / np.sqrt(shape[0]), jnp.float32) for name, shape in shapes.items()}

    def loss(p, ex):
        patches = ex["x"].reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
        h = jnp.concatenate([p["cls_token"], patches @ p["patch_w"]]) + p["pos_embed"]
        q, k, v = (h @ p[w] + b for w, b in zip(("wq", "wk", "wv"), p["qkv_bias"]))
        h = h + jax.nn.softmax(q @ k.T / np.sqrt(DIM)) @ v
        return _xent((h[0] * p["ln_scale"]) @ p["head"], ex["y"])

    return params, loss


MODELS = {  # the leaves the default must prune, and what the progress line says of them
    "linen": (_linen, ["attn/key/kernel", "attn/out/kernel", "attn/query/kernel", "attn/value/kernel",
                       "fc1/kernel", "fc2/kernel", "head/kernel", "patch/kernel"],
              "8 kernels (2,352 weights); left dense: 3 biases, cls, pos_embedding"),
    "nnx": (_nnx, ["attn/key/kernel/value", "attn/out/kernel/value", "attn/query/kernel/value",
                   "attn/value/kernel/value", "head/kernel/value", "patch/kernel/value"],
            "6 kernels (1,328 weights); left dense: 3 biases, cls_token, positions/embedding"),
    "plain dict": (_plain, ["head", "patch_w", "wk", "wq", "wv"], "5 leaves (1,072 weights); left dense: cls_token, pos_embed, qkv_bias"),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_default_prunes_every_kernel_and_nothing_else(kind, capsys):
    make, kernels, described = MODELS[kind]
    params, loss = make()
    assert pytree.layout(params).names == tuple(kernels)
    before = jax.tree_util.tree_map(np.array, params)
    result = swapjax.prune(loss, params, _batch(), sparsity=0.5, method=swapjax.LR(max_iters=5))
    assert f"pruning {described}\n" in capsys.readouterr().err

    masks = dict(jax.tree_util.tree_flatten_with_path(result.masks, is_leaf=lambda m: m is None)[0])
    pruned = dict(jax.tree_util.tree_flatten_with_path(result.params)[0])
    p = sum(int(np.size(leaf)) for path, leaf in pruned.items() if pytree.path_name(path) in kernels)
    kept = 0
    for path, old in jax.tree_util.tree_flatten_with_path(before)[0]:
        name, mask, new = pytree.path_name(path), masks[path], np.asarray(pruned[path])
        if name in kernels:
            assert mask is not None and np.all((new != 0) == np.asarray(mask)), name
            assert 0 < mask.sum() < mask.size, f"{name}: a kernel neither pruned nor kept"
            kept += int(mask.sum())
        else:  # tokens, positions, tables, biases, norm scales: untouched
            assert mask is None, name
            np.testing.assert_array_equal(new, old, err_msg=name)
    assert kept == round(0.5 * p)


def test_a_select_that_reaches_a_token_is_an_error_naming_it():
    params, loss = _linen()
    with pytest.raises(ValueError, match=r"cls \(1, 16\).*pos_embedding .*allow_vectors"):
        pytree.layout(params, lambda path, leaf: leaf.ndim >= 2)
    chosen = pytree.layout(params, swapjax.allow_vectors(lambda path, leaf: leaf.ndim >= 2)).names
    assert {"cls", "pos_embedding", "attn/query/bias"} <= set(chosen)
    assert pytree.layout(params, lambda path, leaf: "fc" in path and leaf.ndim >= 2).names == ("fc1/kernel", "fc2/kernel")


def test_a_flax_models_own_matrix_is_left_dense_and_named():
    """In a tree with kernels, a ``self.param`` matrix is not one: dense, and listed."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "w": jnp.ones((4, 2))}
    lay = pytree.layout(params)
    assert lay.names == ("Dense_0/kernel",) and lay.left_dense == ("w",)
    assert lay.describe() == "1 kernel (12 weights); left dense: w"


@pytest.mark.parametrize("name, prunable", [
    ("w1", True), ("W_out", True), ("transposed", True), ("proj", True), ("kernel", True),
    ("bias", False), ("qkv_bias", False), ("qbias", False), ("pos_embedding", False), ("positions", False),
    ("W_pos", False), ("clsToken", False), ("cls", False), ("register_tokens", False), ("embedding", False),
    ("wte_table", False), ("ln1_scale", False), ("layernorm", False), ("norm.weight", False)])
def test_plain_dict_names(name, prunable):
    assert bool(pytree.default_rule({name: 0})((jax.tree_util.DictKey(name),), jnp.ones((2, 2)))) == prunable
