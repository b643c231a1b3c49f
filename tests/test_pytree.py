"""swapjax.pytree: layout, flat order, masks, summaries; prune invariants over random trees."""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import mlp_loss
import swapjax
from swapjax import pytree


def _tree():
    """Nested dict with kernels (ndim >= 2), biases (1-D) and a scalar; keys deliberately unsorted."""
    r = np.random.default_rng(0)
    return {
        "z_out": {"kernel": jnp.asarray(r.normal(size=(3, 2)), jnp.float32),
                  "bias": jnp.asarray(r.normal(size=(2,)), jnp.float32)},
        "a_in": {"kernel": jnp.asarray(r.normal(size=(4, 3)), jnp.float32),
                 "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)},
        "conv": {"kernel": jnp.asarray(r.normal(size=(2, 2, 1, 3)), jnp.float32)},
        "temperature": jnp.asarray(1.5, jnp.float32),
    }


def _np_flat(tree, select=lambda path, leaf: np.ndim(leaf) >= 2):
    """Independent flatten: tree_flatten_with_path order, each leaf raveled in C order."""
    parts = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if select(name, leaf):
            parts.append(np.ravel(np.asarray(leaf), order="C"))
    return np.concatenate(parts)


def test_layout_default_select_and_order():
    tree = _tree()
    lay = pytree.layout(tree)
    # sorted dict keys (tree_flatten_with_path order); 1-D biases and the scalar are not prunable
    assert lay.names == ("a_in/kernel", "conv/kernel", "z_out/kernel")
    assert lay.shapes == ((4, 3), (2, 2, 1, 3), (3, 2))
    assert lay.offsets == (0, 12, 24, 30)
    assert lay.size == 30
    # leaves in order: a_in/bias, a_in/kernel, conv/kernel, temperature, z_out/bias, z_out/kernel
    assert lay.selected == (False, True, True, False, False, True)
    assert lay.dtype == jnp.float32


def test_flatten_is_path_order_row_major():
    tree = _tree()
    lay = pytree.layout(tree)
    w = pytree.flatten(tree, lay)
    np.testing.assert_array_equal(np.asarray(w), _np_flat(tree))
    # spot-check row-major: entry (i, j) of a_in/kernel (shape (4, 3)) is w[3 i + j]
    np.testing.assert_array_equal(np.asarray(w[3 * 2 + 1]), np.asarray(tree["a_in"]["kernel"][2, 1]))
    # the 4-D conv kernel starts at offset 12, C order over (2, 2, 1, 3)
    np.testing.assert_array_equal(np.asarray(w[12 + 1 * 6 + 0 * 3 + 2]), np.asarray(tree["conv"]["kernel"][1, 0, 0, 2]))


def test_unflatten_round_trip_and_placement():
    tree = _tree()
    lay = pytree.layout(tree)
    back = pytree.unflatten(pytree.flatten(tree, lay), tree, lay)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # arbitrary w lands in the right leaf in the right order; non-prunable leaves are the same objects
    w = jnp.arange(lay.size, dtype=jnp.float32)
    out = pytree.unflatten(w, tree, lay)
    np.testing.assert_array_equal(out["a_in"]["kernel"], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(out["conv"]["kernel"], np.arange(12, 24).reshape(2, 2, 1, 3))
    np.testing.assert_array_equal(out["z_out"]["kernel"], np.arange(24, 30).reshape(3, 2))
    assert out["a_in"]["bias"] is tree["a_in"]["bias"]
    assert out["temperature"] is tree["temperature"]


def test_custom_select_receives_path_strings():
    tree = _tree()
    seen = []

    def select(path, leaf):
        seen.append((path, tuple(np.shape(leaf))))
        return path.endswith("bias") or path == "temperature"

    lay = pytree.layout(tree, swapjax.allow_vectors(select))
    assert seen == [("a_in/bias", (3,)), ("a_in/kernel", (4, 3)), ("conv/kernel", (2, 2, 1, 3)),
                    ("temperature", ()), ("z_out/bias", (2,)), ("z_out/kernel", (3, 2))]
    assert lay.names == ("a_in/bias", "temperature", "z_out/bias")
    assert lay.size == 3 + 1 + 2
    w = pytree.flatten(tree, lay)
    np.testing.assert_array_equal(np.asarray(w), _np_flat(tree, select=lambda p, x: p.endswith("bias") or p == "temperature"))
    out = pytree.unflatten(2 * w, tree, lay)
    np.testing.assert_array_equal(out["temperature"], 3.0)
    assert out["a_in"]["kernel"] is tree["a_in"]["kernel"]


def test_select_narrows_the_default_rule_and_a_selected_vector_is_an_error():
    tree = _tree()
    lay = pytree.layout(tree, lambda path, leaf: np.ndim(leaf) >= 2 and not path.startswith("conv"))
    assert lay.names == ("a_in/kernel", "z_out/kernel")
    # the trap: "a_in" in path also matches a_in/bias; it must not be pruned silently
    with pytest.raises(ValueError, match=r"select: chose a_in/bias \(3,\), with ndim < 2") as err:
        pytree.layout(tree, lambda path, leaf: path.startswith("a_in"))
    assert "allow_vectors" in str(err.value)
    with pytest.raises(ValueError, match=r"a_in/bias \(3,\), temperature \(\), z_out/bias \(2,\)"):
        pytree.layout(tree, lambda path, leaf: True)
    # opting in prunes them, in flat order
    lay = pytree.layout(tree, swapjax.allow_vectors(lambda path, leaf: path.startswith("a_in")))
    assert lay.names == ("a_in/bias", "a_in/kernel") and lay.size == 3 + 12


def test_prune_with_a_vector_select_fails_before_any_gradient(trained_mlp, prune_batch):
    calls = []

    def loss(params, example):  # traced to find the layers; a run is counted
        jax.debug.callback(lambda: calls.append(1))
        return mlp_loss(params, example)

    with pytest.raises(ValueError, match="Dense_1/bias"):
        swapjax.prune(loss, trained_mlp, prune_batch, sparsity=0.5, select=lambda path, leaf: "Dense_1" in path,
                      progress=False)
    assert calls == []


def test_select_nothing_and_non_float_leaf_are_errors():
    tree = _tree()
    with pytest.raises(ValueError, match="select: no prunable leaf"):
        pytree.layout(tree, lambda path, leaf: False)
    with pytest.raises(ValueError, match="select: prunable leaf 'idx' has non-float dtype"):
        pytree.layout({"idx": jnp.zeros((3, 3), jnp.int32), "w": jnp.ones((2, 2))})


def test_mask_tree_apply_masks_and_summary():
    tree = _tree()
    lay = pytree.layout(tree)
    r = np.random.default_rng(1)
    flat_mask = r.random(lay.size) < 0.4
    masks = pytree.mask_tree(flat_mask, lay)
    # None for every non-prunable leaf, bool arrays of the leaf's shape elsewhere
    assert masks["a_in"]["bias"] is None and masks["z_out"]["bias"] is None and masks["temperature"] is None
    for name, shape, (a, b) in zip(lay.names, lay.shapes, zip(lay.offsets[:-1], lay.offsets[1:])):
        m = masks
        for part in name.split("/"):
            m = m[part]
        assert m.dtype == jnp.bool_ and m.shape == shape
        np.testing.assert_array_equal(np.ravel(m), flat_mask[a:b])

    masked = swapjax.apply_masks(tree, masks)
    assert masked["a_in"]["bias"] is tree["a_in"]["bias"]
    assert masked["temperature"] is tree["temperature"]
    np.testing.assert_array_equal(np.asarray(pytree.flatten(masked, lay)), np.where(flat_mask, _np_flat(tree), 0.0))

    summary = swapjax.sparsity_summary(masks)
    assert set(summary) == {"a_in/kernel", "conv/kernel", "z_out/kernel", "total"}
    for name, (a, b) in zip(lay.names, zip(lay.offsets[:-1], lay.offsets[1:])):
        kept = int(flat_mask[a:b].sum())
        assert summary[name]["kept"] == kept and summary[name]["total"] == b - a
        assert summary[name]["sparsity"] == pytest.approx(1 - kept / (b - a))
    assert summary["total"] == {"kept": int(flat_mask.sum()), "total": 30,
                                "sparsity": pytest.approx(1 - flat_mask.sum() / 30)}


def test_apply_masks_keeps_dtypes():
    tree = {"a": jnp.ones((3, 3), jnp.float16), "b": jnp.full((2, 2), 2.0, jnp.bfloat16), "c": jnp.ones(3, jnp.float32)}
    lay = pytree.layout(tree)
    assert lay.dtype == jnp.float32  # promotion of float16 and bfloat16
    masks = pytree.mask_tree(np.arange(13) % 2 == 0, lay)
    out = swapjax.apply_masks(tree, masks)
    assert out["a"].dtype == jnp.float16 and out["b"].dtype == jnp.bfloat16 and out["c"] is tree["c"]
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32).ravel(), (np.arange(9) % 2 == 0).astype(np.float32))
    back = pytree.unflatten(pytree.flatten(tree, lay), tree, lay)
    assert back["a"].dtype == jnp.float16 and back["b"].dtype == jnp.bfloat16


# ---------------------------------------------------------------- Flax linen and NNX


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(2, use_bias=False)(x)


def test_linen_params_layout():
    params = jax.jit(_LinenNet().init)(jax.random.key(0), jnp.ones((1, 3)))["params"]
    lay = pytree.layout(params)
    assert lay.names == ("Dense_0/kernel", "Dense_1/kernel")  # LayerNorm scale/bias and biases stay
    assert lay.size == 3 * 5 + 5 * 2
    w = pytree.flatten(params, lay)
    np.testing.assert_array_equal(np.asarray(w), np.concatenate([np.ravel(params["Dense_0"]["kernel"]),
                                                                 np.ravel(params["Dense_1"]["kernel"])]))
    back = pytree.unflatten(w, params, lay)
    assert back["LayerNorm_0"]["scale"] is params["LayerNorm_0"]["scale"]
    np.testing.assert_array_equal(back["Dense_1"]["kernel"], params["Dense_1"]["kernel"])


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_state_layout_round_trip_and_prune():
    model = _NnxNet(nnx.Rngs(0))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    lay = pytree.layout(state)
    assert lay.names == ("l1/kernel/value", "l2/kernel/value")
    assert lay.size == 12 + 8
    w = pytree.flatten(state, lay)
    np.testing.assert_array_equal(np.asarray(w), np.concatenate([np.ravel(model.l1.kernel[...]), np.ravel(model.l2.kernel[...])]))
    back = pytree.unflatten(w * 0 + 7, state, lay)
    assert type(back) is type(state)
    merged = nnx.merge(graphdef, back, rest)
    np.testing.assert_array_equal(merged.l2.kernel[...], np.full((4, 2), 7.0))
    np.testing.assert_array_equal(merged.l1.bias[...], model.l1.bias[...])

    def loss(st, ex):
        m = nnx.merge(graphdef, st, rest)
        return 0.5 * jnp.sum((m(ex["x"]) - ex["y"]) ** 2)

    r = np.random.default_rng(0)
    batch = {"x": jnp.asarray(r.normal(size=(8, 3)), jnp.float32), "y": jnp.asarray(r.normal(size=(8, 2)), jnp.float32)}
    res = swapjax.prune(loss, state, batch, sparsity=0.5, method=swapjax.LR(max_iters=5), progress=False)
    assert type(res.params) is type(state) and type(res.masks) is type(state)
    pruned = nnx.merge(graphdef, res.params, rest)
    k1 = np.asarray(res.masks["l1"]["kernel"].value)
    k2 = np.asarray(res.masks["l2"]["kernel"].value)
    assert k1.sum() + k2.sum() == 10
    assert np.all((np.asarray(pruned.l1.kernel[...]) != 0) == k1)
    assert np.all((np.asarray(pruned.l2.kernel[...]) != 0) == k2)
    np.testing.assert_array_equal(pruned.l1.bias[...], model.l1.bias[...])
    assert swapjax.sparsity_summary(res.masks)["l1/kernel/value"]["kept"] == int(k1.sum())


# ---------------------------------------------------------------- property test over random trees

# A small fixed menu of leaf shapes and dtypes bounds the number of compilations.
_SHAPES = [(3,), (2, 3), (4, 2), (3, 2, 2)]
_DTYPES = [np.float32, np.float16]
_N = 8


def _feature_loss(params, example):
    """ℓ = ½(Σ_leaves ⟨leaf, feature_leaf⟩ − y)² + ¼(Σ_leaves ⟨leaf, feature_leaf⟩)⁴/10: per-sample gradients
    are generic (row i ∝ the example's features), so the pruned weights are generically non-zero."""
    s = sum(jnp.dot(p.astype(jnp.float32).ravel(), f.ravel()) for p, f in  # a product: each matrix is a layer
            zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(example["f"])))
    return 0.5 * (s - example["y"]) ** 2 + 0.025 * s ** 4


@st.composite
def _random_tree(draw):
    n_groups = draw(st.integers(1, 3))
    tree = {}
    for g in range(n_groups):
        leaves = draw(st.lists(st.tuples(st.sampled_from(range(len(_SHAPES))), st.sampled_from(range(len(_DTYPES)))),
                               min_size=1, max_size=3))
        tree[f"g{g}"] = {f"w{j}": (_SHAPES[s], _DTYPES[d]) for j, (s, d) in enumerate(leaves)}
    # at least one prunable leaf
    if all(len(spec[0]) < 2 for grp in tree.values() for spec in grp.values()):
        tree["g0"]["w_extra"] = ((2, 3), np.float32)
    return tree


_METHOD = swapjax.LR(max_iters=5)


# Every example compiles (new tree structure), so: no shrinking (a failure is reported as drawn,
# not after minutes of re-compiling shrinks) and a derandomized, reproducible sequence of examples.
# The default run draws 6 trees (about 2.5 s each); the slow test (`make test-all`) draws 20.
_RANDOM_TREES = dict(spec=_random_tree(), sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
_RANDOM_TREE_SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=6, **_RANDOM_TREE_SETTINGS)
@given(**_RANDOM_TREES)
def test_prune_invariants_on_random_trees(spec, sparsity, seed):
    _check_prune_invariants(spec, sparsity, seed)


@pytest.mark.slow
@settings(max_examples=20, **_RANDOM_TREE_SETTINGS)
@given(**_RANDOM_TREES)
def test_prune_invariants_on_random_trees_many(spec, sparsity, seed):
    _check_prune_invariants(spec, sparsity, seed)


def _check_prune_invariants(spec, sparsity, seed):
    r = np.random.default_rng(seed)
    params = {g: {n: r.normal(size=shape).astype(dt) for n, (shape, dt) in grp.items()} for g, grp in spec.items()}
    feats = {g: {n: r.normal(size=(_N,) + shape).astype(np.float32) for n, (shape, _) in grp.items()} for g, grp in spec.items()}
    batch = {"f": feats, "y": r.normal(size=(_N,)).astype(np.float32)}
    params_copy, batch_copy = copy.deepcopy(params), copy.deepcopy(batch)

    lay = pytree.layout(params)
    p = lay.size
    k = int(np.round((1 - sparsity) * p))
    if k < 1:
        return
    res = swapjax.prune(_feature_loss, params, batch, sparsity=sparsity, method=_METHOD, stages=1, progress=False)

    # the inputs are not mutated
    for a, b in zip(jax.tree_util.tree_leaves((params, batch)), jax.tree_util.tree_leaves((params_copy, batch_copy))):
        np.testing.assert_array_equal(a, b)
    # structure and dtypes preserved
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
    # exact k, masks and params agree, non-prunable leaves untouched
    flat_mask = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out, m = _get(res.params, path), _get(res.masks, path)
        if np.ndim(leaf) >= 2:
            assert m.dtype == np.bool_ and m.shape == leaf.shape
            out = np.asarray(out)
            assert np.all(out[~np.asarray(m)] == 0)
            assert np.all(out[np.asarray(m)] != 0)
            flat_mask.append(np.ravel(m))
        else:
            assert m is None
            assert out is leaf
    assert int(np.concatenate(flat_mask).sum()) == k
    assert swapjax.sparsity_summary(res.masks)["total"]["kept"] == k
    assert swapjax.sparsity_summary(res.masks)["total"]["total"] == p
    if k < p:
        assert len(res.info) == 1 and res.info[0].k == k
    else:
        assert res.info == ()  # sparsity that keeps every weight: nothing to do


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
