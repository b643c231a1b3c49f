"""swapjax.io: save/load of pruned params and masks (orbax), BCOO export of the kept weights."""
from __future__ import annotations

import os
import re
from pathlib import Path

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
    for export in (lambda p, m: swapjax.save_pruned(tmp_path / "c", p, m), swapjax.to_bcoo, swapjax.to_nm):
        with pytest.raises(ValueError, match="params: expected the pytree of parameters the masks belong to, got None"):
            export(None, masks)   # was "masks: leaf 'Dense_0/kernel' is not in params (leaves: [])"


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


def _snapshot(root):
    """{relative path: bytes} of every file under root (a directory) or of root itself (a file)."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return _snapshot(root)


@pytest.mark.parametrize("force", [False, True])
def test_save_never_replaces_a_folder_or_file_that_is_not_a_checkpoint(tmp_path, force):
    """force=True replaces only a swapjax checkpoint: a folder of user files and a regular file survive
    byte for byte, with an error naming the path (before the fix, force deleted both)."""
    params, masks = _pruned_mlp()
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    before = _user_folder(folder)
    file.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=f"directory: {folder} already exists and is a directory, not a swapjax "
                                         f"checkpoint; nothing was written"):
        swapjax.save_pruned(folder, params, masks, force=force)
    with pytest.raises(ValueError, match=f"directory: {file} already exists and is a file, not a swapjax checkpoint"):
        swapjax.save_pruned(file, params, masks, force=force)
    assert _snapshot(folder) == before and file.read_text() == "not a checkpoint\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"]  # no temporary left


def test_save_force_refuses_a_checkpoint_holding_user_files(tmp_path):
    params, masks = _pruned_mlp()
    swapjax.save_pruned(tmp_path / "c", params, masks)
    (tmp_path / "c" / "notes.txt").write_text("results of run 3\n")
    before = _snapshot(tmp_path / "c")
    with pytest.raises(ValueError, match=r"is a swapjax checkpoint but also holds \['notes.txt'\]"):
        swapjax.save_pruned(tmp_path / "c", params, masks, force=True)
    assert _snapshot(tmp_path / "c") == before


def test_save_force_keeps_the_old_checkpoint_when_writing_the_new_one_fails(tmp_path, monkeypatch):
    """The new checkpoint is written beside the old one and swapped in: a write that fails (here a full
    disk after the items are written) leaves the old checkpoint whole and no temporary behind."""
    import orbax.checkpoint as ocp

    params, masks = _pruned_mlp(seed=0)
    swapjax.save_pruned(tmp_path / "c", params, masks)
    before = _snapshot(tmp_path / "c")
    save = ocp.CompositeCheckpointHandler.save

    def disk_full(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "save", disk_full)
    other, other_masks = _pruned_mlp(seed=1)
    with pytest.raises(ValueError, match=f"directory: could not write the checkpoint {tmp_path / 'c'}: .*No space"):
        swapjax.save_pruned(tmp_path / "c", other, other_masks, force=True)
    assert _snapshot(tmp_path / "c") == before and [p.name for p in tmp_path.iterdir()] == ["c"]
    monkeypatch.undo()
    _, loaded_masks = swapjax.load_pruned(tmp_path / "c", like=params)
    _assert_trees_equal(loaded_masks, masks)


def test_save_to_an_impossible_path_names_it(tmp_path, monkeypatch):
    params, masks = _pruned_mlp()
    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "runs" / "c"
    with pytest.raises(ValueError, match=f"directory: cannot create {target}: {tmp_path / 'file.txt'} is a file, "
                                         f"not a directory"):
        swapjax.save_pruned(target, params, masks)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root may write anyway: the check sees what a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(locked) and access(p, mode))
    with pytest.raises(ValueError, match=f"directory: cannot write {locked / 'c'}: no write permission in {locked}"):
        swapjax.save_pruned(locked / "c", params, masks)
    locked.chmod(0o700)
    assert list(locked.iterdir()) == [] and _snapshot(tmp_path / "file.txt") == {".": b"x"}


def test_load_names_the_path_that_holds_no_checkpoint(tmp_path):
    """Before the fix an empty or foreign folder raised orbax's KeyError 'Item "meta" was not found'."""
    (tmp_path / "empty").mkdir()
    _user_folder(tmp_path / "notes")
    (tmp_path / "file.txt").write_text("x")
    cases = {
        "empty": "{} is not a checkpoint written by swapjax.save_pruned (no swapjax metadata; it holds nothing)",
        "notes": "{} is not a checkpoint written by swapjax.save_pruned (no swapjax metadata; it holds "
                 "['notes.txt', 'sub'])",
        "missing": "no checkpoint at {}: it does not exist",
        "file.txt": "no checkpoint at {}: it is a file, not a directory",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=re.escape("directory: " + message.format(tmp_path / name))):
            swapjax.load_pruned(tmp_path / name)


def test_load_like_of_another_structure_shape_or_dtype_is_an_error(tmp_path):
    """`like` must describe the saved params: before the fix another structure raised "truth value of an
    array ... is ambiguous" or orbax's tree diff, a wrong shape came back in the stored shape and another
    dtype was cast silently."""
    params, masks = _pruned_mlp()
    swapjax.save_pruned(tmp_path / "c", params, masks)
    shapes = jax.eval_shape(lambda: params)
    with pytest.raises(ValueError, match=r"like: another structure than the params stored in .*; not in the "
                                         r"checkpoint: \['0/bias', '0/kernel', '1/bias', '1/kernel'\], missing from like: "
                                         r"\['Dense_0/bias', 'Dense_0/kernel', 'Dense_1/bias', 'Dense_1/kernel'\]"):
        swapjax.load_pruned(tmp_path / "c", like=[params["Dense_0"], params["Dense_1"]])
    with pytest.raises(ValueError, match=r"missing from like: \['Dense_1/bias', 'Dense_1/kernel'\]"):
        swapjax.load_pruned(tmp_path / "c", like={"Dense_0": shapes["Dense_0"]})
    wrong_shape = {**shapes, "Dense_1": {**shapes["Dense_1"], "kernel": jax.ShapeDtypeStruct((10, 12), jnp.float32)}}
    with pytest.raises(ValueError, match=r"like: 'Dense_1/kernel' is stored in .* as \(12, 10\) float32, like has "
                                         r"\(10, 12\) float32"):
        swapjax.load_pruned(tmp_path / "c", like=wrong_shape)
    half = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float16), shapes)
    with pytest.raises(ValueError, match=r"like: 'Dense_0/bias' is stored in .* as \(12,\) float32, like has "
                                         r"\(12,\) float16"):
        swapjax.load_pruned(tmp_path / "c", like=half)
    loaded, _ = swapjax.load_pruned(tmp_path / "c", like=shapes)  # a like of the saved model still loads
    _assert_trees_equal(loaded, swapjax.apply_masks(params, masks))
