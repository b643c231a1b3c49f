"""Layers found by use: on models in the layouts of JAX language-model code (tests/layer_models.py:
Gemma-style einsum weights beside a Dense, linen and NNX scanned stacks, a stack with its layer
axis in the middle, ``nn.vmap`` ensembles, an (out, in) einsum layout, NNX attention, tied weights),
``find_layers`` names every linear weight (each slice of a stacked leaf its own layer) and nothing
else, and both drivers prune exactly those: every layer keeps exactly its budget, every N:M group
along its contracting axes keeps exactly N, and ``to_nm`` takes every mask. A scanned stack and its
unrolled twin (the same weights as separate modules) prune alike.

The expected layers are written by hand in layer_models.py (``Expect``: the leaf, its slice, its
contracted axes) and their positions computed there with NumPy, not read from the library.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import layer_models as lm
import swapjax
from swapjax.pytree import path_name

S = 0.75  # every layer's size is a multiple of 4: (1 − S)·size is an integer, its exact budget
_CASES: dict = {}


# beside lm.BUILDERS, whose models every driver test runs: models of one test each
EXTRA = {"plain_scan": lm.plain_scan, "nnx_scan_graph": lambda: lm.nnx_scan(graph_updates=True)}


def case(name: str) -> lm.Case:
    """The model ``name`` of layer_models, built once per test session."""
    if name not in _CASES:
        _CASES[name] = lm.unrolled(case("scan0")) if name == "unrolled" else {**lm.BUILDERS, **EXTRA}[name]()
    return _CASES[name]


def by_path(tree) -> dict:
    """{path: leaf} with the None leaves of a mask tree kept."""
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]}


_RESULTS: dict = {}


def run(name: str, driver: str, constraint: str, method=None):
    """``driver`` ("prune": Magnitude, one stage; "layerwise": SparseGPT, or its default method where
    ``method="default"``) on model ``name`` under ``LayerBudgets()`` at S (constraint "budgets") or
    ``NM(2, 4)`` ("nm"); each run once."""
    key = (name, driver, constraint, method if method in (None, "default") else type(method).__name__)
    if key not in _RESULTS:
        c = case(name)
        kw = dict(sparsity=S, constraint=swapjax.LayerBudgets()) if constraint == "budgets" else \
            dict(constraint=swapjax.NM(2, 4))
        if driver == "prune":
            _RESULTS[key] = swapjax.prune(c.loss_fn, c.params, c.batch, method=method or swapjax.Magnitude(),
                                          stages=1, progress=False, **kw)
        elif method == "default":
            _RESULTS[key] = swapjax.prune_layerwise(c.loss_fn, c.params, c.batch, progress=False, **kw)
        else:
            _RESULTS[key] = swapjax.prune_layerwise(c.loss_fn, c.params, c.batch, method=method or swapjax.SparseGPT(),
                                                    progress=False, **kw)
    return _RESULTS[key]


NAMES = list(lm.BUILDERS)


# find_layers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES + list(EXTRA) + ["unrolled"])
def test_find_layers_names_every_linear_weight_and_nothing_else(name):
    c = case(name)
    found = swapjax.find_layers(c.loss_fn, c.params, c.batch)
    assert isinstance(found, swapjax.Layers)
    assert [layer.name for layer in found.layers] == [e.name for e in c.layers]  # forward order
    leaves = c.leaves
    for layer, e in zip(found.layers, c.layers):
        assert isinstance(layer, swapjax.Layer)
        shape = tuple(leaves[e.path].shape)
        index = e.index(shape)
        assert layer.path == e.path
        assert tuple(layer.input_axes) == e.input_axes, layer.name
        assert layer.kind == e.kind
        assert (layer.d_in, layer.d_out, layer.size) == (index.shape[0], index.shape[1], index.size), layer.name
        got = np.asarray(layer.index)
        assert np.issubdtype(got.dtype, np.integer) and got.shape == index.shape, (layer.name, got.shape)
        np.testing.assert_array_equal(got, index, err_msg=layer.name)
    assert set(found.left_dense) == set(c.left_dense)
    assert all(isinstance(why, str) and why for why in found.left_dense.values()), found.left_dense
    # every floating ndim ≥ 2 leaf is a layer's, or left dense with its reason
    matrices = {p for p, x in leaves.items() if np.ndim(x) >= 2 and np.issubdtype(x.dtype, np.floating)}
    assert matrices == c.layer_paths | set(c.left_dense)


def test_layer_index_rows_are_inputs_in_the_kernels_axis_order():
    """The hand-written account itself, on Gemma's o_w (N, H, D), inputs (N, H): row n·H + h holds
    w[n, h, :]; and on the middle-axis stack's slice 1 of (in, L, out): row i holds w[i, 1, :]."""
    w = np.arange(2 * 4 * 8).reshape(2, 4, 8)
    idx = lm.Expect("o_w", (0, 1)).index(w.shape)
    np.testing.assert_array_equal(w.ravel()[idx][1 * 4 + 2], w[1, 2])
    w = np.arange(8 * 3 * 5).reshape(8, 3, 5)
    idx = lm.Expect("k", (0,), ((1, 1),)).index(w.shape)
    np.testing.assert_array_equal(w.ravel()[idx], w[:, 1, :])
    assert lm.Expect("k", (0,), ((1, 1),)).name == "k[1]"


def test_tied_weights_are_named_left_dense():
    c = case("tied")
    found = swapjax.find_layers(c.loss_fn, c.params, c.batch)
    assert [layer.name for layer in found.layers] == ["first/kernel"]
    for path in c.tied:  # the reason says why: tied (two products, or a product and a gather)
        assert "tied" in found.left_dense[path], (path, found.left_dense)


def test_a_shared_input_ensemble_is_one_layer_of_all_members_outputs():
    """``nn.vmap(in_axes=None)``: every member reads the same x, so x·K over the stacked hidden kernels
    (E, IN, W) is one product: one layer, d_out = E·W, named by the leaf (no slice)."""
    c = case("shared_ensemble")
    found = swapjax.find_layers(c.loss_fn, c.params, c.batch)
    hidden = found.layers[0]
    assert (hidden.name, hidden.path, hidden.d_in, hidden.d_out) == ("Ens_0/hidden/kernel", "Ens_0/hidden/kernel",
                                                                     lm.IN, lm.E * lm.W)
    assert [layer.name for layer in found.layers[1:]] == [f"Ens_0/head/kernel[{i}]" for i in range(lm.E)]


# both drivers -------------------------------------------------------------------------------------

def _pruned_as_masked(c, result, paths=None):
    """Masks on the layers' leaves (``paths``, default all) only (bool, the leaf's shape); pruned
    weights exactly 0; every other leaf unchanged. Returns {path: mask}."""
    masks, params, before = by_path(result.masks), by_path(result.params), c.leaves
    assert set(masks) == set(before) == set(params)
    pruned = {p for p, m in masks.items() if m is not None}
    paths = c.layer_paths if paths is None else paths
    assert pruned == paths, sorted(pruned ^ paths)
    for p in before:
        if p in pruned:
            m = np.asarray(masks[p])
            assert m.dtype == bool and m.shape == before[p].shape, p
            assert np.all(np.asarray(params[p])[~m] == 0), p
        else:
            np.testing.assert_array_equal(np.asarray(params[p]), np.asarray(before[p]), err_msg=p)
    return {p: np.asarray(masks[p]) for p in pruned}


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
@pytest.mark.parametrize("name", NAMES)
def test_every_layer_every_slice_keeps_exactly_its_budget(name, driver):
    c = case(name)
    masks = _pruned_as_masked(c, run(name, driver, "budgets"))
    leaves = c.leaves
    kept = {e.name: int(masks[e.path].ravel()[e.index(leaves[e.path].shape)].sum()) for e in c.layers}
    budgets = {e.name: round((1 - S) * e.index(leaves[e.path].shape).size) for e in c.layers}
    assert kept == budgets
    # the layers cover their leaves: nothing is kept outside them
    assert sum(int(m.sum()) for m in masks.values()) == sum(budgets.values())


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
@pytest.mark.parametrize("name", NAMES)
def test_nm_groups_run_along_each_layers_contracting_axes(name, driver):
    c = case(name)
    result = run(name, driver, "nm")
    masks = _pruned_as_masked(c, result)
    leaves = c.leaves
    for e in c.layers:
        index = e.index(leaves[e.path].shape)
        d_in, d_out = index.shape
        per_group = masks[e.path].ravel()[index].reshape(d_in // 4, 4, d_out).sum(1)
        assert np.all(per_group == 2), (e.name, np.unique(per_group))
    assert {p: tuple(a) for p, a in result.input_axes.items()} == {e.path: e.input_axes for e in c.layers}
    packed = swapjax.to_nm(result.params, result.masks, 2, 4, axes=result.input_axes)
    assert set(packed) == c.layer_paths
    rebuilt, params = by_path(swapjax.from_nm(packed, c.params)), by_path(result.params)
    for p in c.layer_paths:
        np.testing.assert_array_equal(np.asarray(rebuilt[p]), np.where(masks[p], np.asarray(params[p]), 0), err_msg=p)


def test_prune_with_lr_keeps_nnx_attentions_nm_groups():
    """LR (the Fisher's solver, not a per-weight score) under 2:4 on NNX attention: q/k/v grouped
    along their inputs (axis 0, not the flattened (in, heads)), the output along (heads, head_dim)."""
    c = case("nnx_mha")
    masks = _pruned_as_masked(c, run("nnx_mha", "prune", "nm", swapjax.LR(patience=None, swap_rounds=0)))
    for e in c.layers:
        index = e.index(c.leaves[e.path].shape)
        per_group = masks[e.path].ravel()[index].reshape(index.shape[0] // 4, 4, -1).sum(1)
        assert np.all(per_group == 2), (e.name, np.unique(per_group))


ATTN = {"Attn_0/q_w", "Attn_0/kv_w", "Attn_0/o_w"}


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
def test_select_narrows_the_found_layers(driver):
    """select(path, leaf) chooses among the layers' leaves: Gemma's attention weights alone, each
    keeping exactly its budget; the Dense projection and the MLP stay as they were."""
    c = case("gemma")
    kw = dict(sparsity=S, constraint=swapjax.LayerBudgets(), select=lambda path, leaf: path.startswith("Attn_0/"),
              progress=False)
    result = (swapjax.prune(c.loss_fn, c.params, c.batch, method=swapjax.Magnitude(), stages=1, **kw)
              if driver == "prune" else swapjax.prune_layerwise(c.loss_fn, c.params, c.batch,
                                                                method=swapjax.SparseGPT(), **kw))
    masks = _pruned_as_masked(c, result, ATTN)
    for e in c.layers:
        if e.path in ATTN:
            index = e.index(c.leaves[e.path].shape)
            assert masks[e.path].ravel()[index].sum() == index.size // 4, e.name


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
def test_select_cannot_choose_a_leaf_that_is_no_layer(driver):
    """Gemma's embedding table, chosen by select, is a ValueError naming it (select only narrows)."""
    c = case("gemma")
    fn = swapjax.prune if driver == "prune" else swapjax.prune_layerwise
    with pytest.raises(ValueError, match="select: chose input_embedding"):
        fn(c.loss_fn, c.params, c.batch, sparsity=S, progress=False,
           select=lambda path, leaf: path == "input_embedding" or path.startswith("Attn_0/"))


@pytest.mark.parametrize("name", ["gemma", "scan0", "nested"])
def test_layerwise_solves_the_layers_in_forward_order(name):
    """The sequential driver's reports come in forward order (the stack's slices after the input
    projection that feeds them), one per layer, each keeping its budget."""
    c = case(name)
    reports = run(name, "layerwise", "budgets").layers
    assert [r.name for r in reports] == [e.name for e in c.layers]
    assert [r.kept for r in reports] == [round((1 - S) * e.index(c.leaves[e.path].shape).size) for e in c.layers]


def test_layerwise_solves_a_slice_on_the_inputs_of_the_pruned_layers_before_it():
    """Sequential: inp is solved on the dense network, then slice 0 on the outputs of the pruned inp.
    The same two solves run one at a time (select) give the same weights."""
    c = case("scan0")
    whole = by_path(run("scan0", "layerwise", "budgets").params)
    kw = dict(sparsity=S, constraint=swapjax.LayerBudgets(), method=swapjax.SparseGPT(), progress=False)
    first = swapjax.prune_layerwise(c.loss_fn, c.params, c.batch, select=lambda path, leaf: path == "inp/kernel", **kw)
    np.testing.assert_allclose(by_path(first.params)["inp/kernel"], whole["inp/kernel"], rtol=1e-4, atol=1e-5)
    k = "ScanBlock_0/Dense_0/kernel"
    then = swapjax.prune_layerwise(c.loss_fn, first.params, c.batch, select=lambda path, leaf: path == k, **kw)
    np.testing.assert_allclose(by_path(then.params)[k], whole[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
def test_nm_never_groups_across_the_slices_of_a_stack(driver):
    """A (2, 6, 6) stack under lax.scan: each slice has 6 inputs, so 2:4 is ragged there (left dense:
    a mask keeping all, as for the 6-input output layer; only inp is pruned; an error with
    ragged="error"), not groups of 4 over the 12 entries of the leaf's first two axes; 1:2 groups
    each slice's inputs."""
    c = case("plain_scan")
    fn = swapjax.prune if driver == "prune" else swapjax.prune_layerwise
    kw = dict(method=swapjax.Magnitude(), stages=1) if driver == "prune" else dict(method=swapjax.SparseGPT())
    masks = _pruned_as_masked(c, fn(c.loss_fn, c.params, c.batch, constraint=swapjax.NM(2, 4), progress=False, **kw))
    assert masks["stack"].all() and masks["out"].all()
    assert np.all(masks["inp"].reshape(2, 4, 6).sum(1) == 2)
    with pytest.raises(ValueError, match=r"NM: stack\[0\] .*over 6 inputs"):  # the slice, not the leaf's 12
        fn(c.loss_fn, c.params, c.batch, constraint=swapjax.NM(2, 4, ragged="error"), progress=False,
           select=lambda path, leaf: path != "out", **kw)
    result = fn(c.loss_fn, c.params, c.batch, constraint=swapjax.NM(1, 2), progress=False, **kw)
    masks = _pruned_as_masked(c, result)
    for e in c.layers:
        index = e.index(c.leaves[e.path].shape)
        per_group = masks[e.path].ravel()[index].reshape(index.shape[0] // 2, 2, -1).sum(1)
        assert np.all(per_group == 1), (e.name, np.unique(per_group))
    packed = swapjax.to_nm(result.params, result.masks, 1, 2, axes=result.input_axes)
    assert set(packed) == {"inp", "stack", "out"}


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
def test_an_nnx_scan_with_graph_updates_is_pruned_slice_by_slice(driver):
    """NNX's scan over layers as its guide writes it (``nnx.scan`` with graph updates, which NNX
    refuses to run under ``jax.vmap`` of the Python loss): each slice keeps exactly its budget in
    both drivers."""
    c = case("nnx_scan_graph")
    kw = dict(sparsity=S, constraint=swapjax.LayerBudgets(), progress=False)
    result = (swapjax.prune(c.loss_fn, c.params, c.batch, method=swapjax.Magnitude(), stages=1, **kw)
              if driver == "prune" else swapjax.prune_layerwise(c.loss_fn, c.params, c.batch,
                                                                method=swapjax.SparseGPT(), **kw))
    masks = _pruned_as_masked(c, result)
    k = np.asarray(masks["blocks/linear/kernel/value"])
    assert [int(k[i].sum()) for i in range(lm.L)] == [round((1 - S) * lm.W * lm.W)] * lm.L


# a scanned stack and its unrolled twin --------------------------------------------------------------

def _twin_leaves(stack: str, result) -> dict:
    """{unrolled path: array} of a scanned result: slice i of the stacked kernel as Dense_i/kernel."""
    params, masks = by_path(result.params), by_path(result.masks)
    axis = 0 if stack == "scan0" else 1
    out = {}
    for tree, suffix in ((params, ""), (masks, "#mask")):
        k = np.asarray(tree["ScanBlock_0/Dense_0/kernel"])
        for i in range(lm.L):
            out[f"Dense_{i}/kernel{suffix}"] = np.take(k, i, axis=axis)
        for p in ("inp/kernel", "out/kernel"):
            out[p + suffix] = np.asarray(tree[p])
    return out


def _unrolled_leaves(result) -> dict:
    params, masks = by_path(result.params), by_path(result.masks)
    paths = [f"Dense_{i}/kernel" for i in range(lm.L)] + ["inp/kernel", "out/kernel"]
    return {**{p: np.asarray(params[p]) for p in paths}, **{p + "#mask": np.asarray(masks[p]) for p in paths}}


@pytest.mark.parametrize("stack", ["scan0", "scan1"])
@pytest.mark.parametrize("method", ["default", "sparsegpt"])
def test_layerwise_prunes_a_scanned_stack_as_its_unrolled_twin(stack, method):
    """prune_layerwise (its default method, and SparseGPT) solves slice i from the inputs of iteration i
    (the slices before it pruned): the unrolled twin's Dense_i, the same weights to float32 rounding."""
    method = "default" if method == "default" else None
    got, want = (_twin_leaves(stack, run(stack, "layerwise", "budgets", method)),
                 _unrolled_leaves(run("unrolled", "layerwise", "budgets", method)))
    assert set(got) == set(want)
    for p in want:
        if p.endswith("#mask"):
            np.testing.assert_array_equal(got[p], want[p], err_msg=p)
        else:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-5, err_msg=p)


@pytest.mark.parametrize("stack", ["scan0", "scan1"])
def test_prune_gives_a_scanned_stack_its_unrolled_twins_budgets(stack):
    """prune (Magnitude, LayerBudgets, one stage): slice i keeps what Dense_i keeps, the same weights."""
    got = _twin_leaves(stack, run(stack, "prune", "budgets"))
    want = _unrolled_leaves(run("unrolled", "prune", "budgets"))
    for i in range(lm.L):
        p = f"Dense_{i}/kernel#mask"
        assert got[p].sum() == want[p].sum() == (1 - S) * lm.W * lm.W, p
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)


def test_a_gradual_prune_keeps_each_slices_budget_at_every_stage():
    """Two stages (s = 0.5, then S): each stage's k is the sum of the layers' own counts
    round((1 − s_t)·p_l), and after the last every slice keeps exactly (1 − S)·W²."""
    c = case("scan0")
    result = swapjax.prune(c.loss_fn, c.params, c.batch, sparsity=S, method=swapjax.Magnitude(), stages=[0.5, S],
                           constraint=swapjax.LayerBudgets(), progress=False)
    sizes = [e.index(c.leaves[e.path].shape).size for e in c.layers]
    assert [int(info.k) for info in result.info] == [sum(round((1 - s) * p) for p in sizes) for s in (0.5, S)]
    k = np.asarray(by_path(result.masks)["ScanBlock_0/Dense_0/kernel"])
    assert [int(k[i].sum()) for i in range(lm.L)] == [round((1 - S) * lm.W * lm.W)] * lm.L


@pytest.mark.parametrize("driver", ["prune", "layerwise"])
def test_erk_budgets_of_a_scanned_stack_are_its_unrolled_twins(driver):
    """ERK gives each layer a density from its own shape: slice i of the (L, W, W) stack is a W×W
    layer like Dense_i, not a third of an L·W·W leaf, so both keep the same count (and, by
    magnitude or SparseGPT on the same inputs, the same weights)."""
    results = []
    for name in ("scan0", "unrolled"):
        c = case(name)
        kw = dict(sparsity=S, constraint=swapjax.LayerBudgets("erk"), progress=False)
        results.append(swapjax.prune(c.loss_fn, c.params, c.batch, method=swapjax.Magnitude(), stages=1, **kw)
                       if driver == "prune" else
                       swapjax.prune_layerwise(c.loss_fn, c.params, c.batch, method=swapjax.SparseGPT(), **kw))
    got, want = _twin_leaves("scan0", results[0]), _unrolled_leaves(results[1])
    # ERK: d_l ∝ (d_in + d_out)/(d_in·d_out), so layer l keeps c·(d_in + d_out): 12×8, 3 of 8×8, 8×4 keep
    # c·(20, 16, 16, 16, 12) of (1 − S)·320 = 80, c = 1 (a stack taken as one (3, 8, 8) leaf would keep 19)
    paths = ["inp/kernel", *(f"Dense_{i}/kernel" for i in range(lm.L)), "out/kernel"]
    assert [int(got[p + "#mask"].sum()) for p in paths] == [20, 16, 16, 16, 12]
    for p in want:
        if p.endswith("#mask"):
            np.testing.assert_array_equal(got[p], want[p], err_msg=p)
        else:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-5, err_msg=p)


def test_a_weight_broadcast_before_its_product_is_left_dense_and_a_plain_one_is_a_layer():
    """A (4, 1) leaf broadcast to (4, 3) is used 3 times per product: left dense with the reason; the (4, 3) leaf
    beside it, read once per entry, is a layer."""
    params = {"col": np.ones((4, 1), np.float32), "w": np.arange(12, dtype=np.float32).reshape(4, 3)}
    loss_fn = lambda p, ex: (ex["x"] @ jax.numpy.broadcast_to(p["col"], (4, 3)) + ex["x"] @ p["w"]).sum()  # noqa: E731
    found = swapjax.find_layers(loss_fn, params, {"x": np.ones((2, 4), np.float32)})
    assert [layer.name for layer in found.layers] == ["w"]
    assert "broadcast" in found.left_dense["col"], found.left_dense
