"""swapjax.io: save/load of pruned params and masks (orbax), BCOO export of the kept weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swapjax
from swapjax import pytree
from conftest import MLP


def _pruned_mlp(density=0.2, seed=0):
    """TinyMLP params (64-12-10, biases) with a random mask on the kernels; params NOT yet masked."""
    params = MLP.init(jax.random.key(seed), jnp.ones((1, 64)))["params"]
    lay = pytree.layout(params)
    flat = np.random.default_rng(seed).random(lay.size) < density
    return params, pytree.mask_tree(flat, lay)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a, is_leaf=lambda x: x is None) == \
        jax.tree_util.tree_structure(b, is_leaf=lambda x: x is None)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_load_round_trip_linen(tmp_path):
    params, masks = _pruned_mlp()
    path = swapjax.save_pruned(tmp_path / "ckpt", params, masks)
    assert path == str((tmp_path / "ckpt").resolve())
    loaded, loaded_masks = swapjax.load_pruned(tmp_path / "ckpt", like=params)
    # the saved params are the masked ones: pruned weights exactly 0, biases untouched
    _assert_trees_equal(loaded, swapjax.apply_masks(params, masks))
    _assert_trees_equal(loaded_masks, masks)
    assert loaded_masks["Dense_0"]["bias"] is None and loaded_masks["Dense_1"]["kernel"].dtype == jnp.bool_
    # without `like`: nested dicts with the same values and the same masks
    raw, raw_masks = swapjax.load_pruned(tmp_path / "ckpt")
    _assert_trees_equal(raw, loaded)
    _assert_trees_equal(raw_masks, masks)


def test_save_refuses_to_overwrite_unless_forced(tmp_path):
    params, masks = _pruned_mlp(seed=0)
    swapjax.save_pruned(tmp_path / "c", params, masks)
    other, other_masks = _pruned_mlp(seed=1)
    with pytest.raises(ValueError, match="already exists"):
        swapjax.save_pruned(tmp_path / "c", other, other_masks)
    swapjax.save_pruned(tmp_path / "c", other, other_masks, force=True)
    _, loaded_masks = swapjax.load_pruned(tmp_path / "c", like=other)
    _assert_trees_equal(loaded_masks, other_masks)


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_save_load_round_trip_nnx_state(tmp_path):
    graphdef, state = nnx.split(_Nnx(nnx.Rngs(0)))
    lay = pytree.layout(state)
    masks = pytree.mask_tree(np.arange(lay.size) % 3 == 0, lay)
    swapjax.save_pruned(tmp_path / "nnx", state, masks)
    loaded, loaded_masks = swapjax.load_pruned(tmp_path / "nnx", like=state)
    assert type(loaded) is type(state) and type(loaded_masks) is type(state)
    model = nnx.merge(graphdef, loaded)
    np.testing.assert_array_equal(np.asarray(model.l1.kernel[...]),
                                  np.where(np.asarray(masks["l1"]["kernel"].value), np.asarray(state["l1"]["kernel"].value), 0))
    np.testing.assert_array_equal(np.asarray(loaded_masks["l2"]["kernel"].value), np.asarray(masks["l2"]["kernel"].value))
    assert loaded_masks["l1"]["bias"].value is None


def test_masks_that_do_not_match_params_are_errors(tmp_path):
    params, masks = _pruned_mlp()
    bad = {**masks, "Dense_1": {"bias": None, "kernel": np.ones((10, 12), bool)}}
    with pytest.raises(ValueError, match="'Dense_1/kernel' has shape"):
        swapjax.save_pruned(tmp_path / "c", params, bad)
    with pytest.raises(ValueError, match="no mask array"):
        swapjax.to_bcoo(params, jax.tree_util.tree_map(lambda _: None, params))


def test_bcoo_export_gives_the_masked_model_outputs():
    params, masks = _pruned_mlp(density=0.15)
    masked = swapjax.apply_masks(params, masks)
    sparse = swapjax.to_bcoo(params, masks)
    assert set(sparse) == {"Dense_0/kernel", "Dense_1/kernel"}
    for name, m in (("Dense_0/kernel", masks["Dense_0"]["kernel"]), ("Dense_1/kernel", masks["Dense_1"]["kernel"])):
        s = sparse[name]
        assert s.shape == m.shape and s.nse == int(np.sum(m)) and s.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(s.todense()) != 0, np.asarray(m))

    x = jnp.asarray(np.random.default_rng(0).random((7, 64)), jnp.float32)
    expected = MLP.apply({"params": masked}, x)
    # densified: the same params exactly
    _assert_trees_equal(swapjax.from_bcoo(sparse, params), masked)
    # sparse matmuls for the Dense layers (TinyMLP: tanh(x W0 + b0) W1 + b1)
    h = jnp.tanh(x @ sparse["Dense_0/kernel"] + params["Dense_0"]["bias"])
    out = h @ sparse["Dense_1/kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(expected), np.asarray(MLP.apply({"params": params}, x)), atol=1e-3)


def test_bcoo_bytes_counts_values_and_indices():
    params, masks = _pruned_mlp(density=0.1)
    kept = {n: int(np.sum(masks[n.split("/")[0]]["kernel"])) for n in ("Dense_0/kernel", "Dense_1/kernel")}
    rows = swapjax.bcoo_bytes(swapjax.to_bcoo(params, masks))
    for name, k in kept.items():
        size = int(np.prod(np.shape(masks[name.split("/")[0]]["kernel"])))
        assert rows[name] == {"dense_bytes": 4 * size, "sparse_bytes": k * (4 + 2 * 4)}  # f32 value + 2 int32 indices
    assert rows["total"]["dense_bytes"] == 4 * (64 * 12 + 12 * 10)
    small = swapjax.bcoo_bytes(swapjax.to_bcoo(params, masks, index_dtype=jnp.int16))
    assert small["total"]["sparse_bytes"] == sum(kept.values()) * (4 + 2 * 2)
