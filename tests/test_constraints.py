"""Sparsity constraints: the projection, feasibility and swap pairs of Groups, the per-layer rules
and N:M groups, and every method honouring them through prune.

References: NumPy sorts per group, closed-form ERK densities, explicit N:M groups built by index
arithmetic, Magnitude(scope="layer"), and the objective f in float64.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forbid import traced_only
import swapjax
from swapjax import constraints as C
from swapjax import pytree


def _np_project(a, ids, counts):
    """Per group, the counts[g] largest |a| (ties to the lower index): a stable NumPy sort."""
    mask = np.zeros(a.size, bool)
    for g, c in enumerate(counts):
        members = np.flatnonzero(ids == g)
        order = members[np.argsort(-np.abs(a[members]), kind="stable")]
        mask[order[:c]] = True
    return mask


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 60))
def test_project_keeps_the_largest_of_each_group(seed, groups, p):
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, groups, p), return_inverse=True)[1].astype(np.int32)  # labels 0..G-1
    groups = int(ids.max()) + 1
    sizes = np.bincount(ids, minlength=groups)
    counts = np.array([rng.integers(0, s + 1) for s in sizes], np.int32)
    v = np.round(rng.normal(size=p), 1).astype(np.float32)  # rounded: many ties
    g = C.Groups(jnp.asarray(counts), jnp.asarray(ids))
    mask = np.asarray(g.project(jnp.asarray(v)))
    np.testing.assert_array_equal(mask, _np_project(v, ids, counts))
    assert bool(g.feasible(jnp.asarray(mask)))
    if counts.sum() < p:  # one more kept weight breaks feasibility
        assert not bool(g.feasible(jnp.asarray(mask | ~mask & (np.arange(p) == np.flatnonzero(~mask)[0]))))


def test_one_group_is_the_hard_threshold():
    v = jnp.asarray(np.random.default_rng(0).normal(size=50).astype(np.float32))
    one = C.Groups(jnp.array([7], jnp.int32), jnp.zeros(50, jnp.int32))
    np.testing.assert_array_equal(C.Groups.top_k(7).project(v), one.project(v))
    np.testing.assert_array_equal(C.Groups.top_k(7).project(v), swapjax.iht.hard_threshold_mask(v, 7))


def test_pairs_stay_within_groups_and_rank_by_net():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(4), 6).astype(np.int32)
    support = np.tile([True, True, False, False, False, True], 4)
    gain = np.where(support, -np.inf, rng.uniform(0, 2, 24)).astype(np.float32)
    cost = np.where(support, rng.uniform(0, 2, 24), np.inf).astype(np.float32)
    g = C.Groups(jnp.full(4, 3, jnp.int32), jnp.asarray(ids))
    into, out, net = (np.asarray(a) for a in g.pairs(jnp.asarray(gain), jnp.asarray(cost), 8))
    finite = np.isfinite(net)
    assert np.all(ids[into[finite]] == ids[out[finite]]) and np.all(~support[into[finite]] & support[out[finite]])
    np.testing.assert_allclose(net[finite], gain[into[finite]] - cost[out[finite]], rtol=1e-6)
    assert np.all(np.diff(net[finite]) <= 0)
    expected = sorted((-(np.sort(gain[ids == q])[::-1][r] - np.sort(cost[ids == q])[r]) for q in range(4)
                       for r in range(3)))[:8]  # within each group: r-th best gain with r-th least cost
    np.testing.assert_allclose(net, -np.array(expected), rtol=1e-6)


def _tree(rng):
    """A dense, a conv, attention q/k/v-style (in, heads, head_dim) and output (heads, head_dim, out) kernels."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {"Dense_0": {"kernel": f(8, 6), "bias": f(6)}, "Conv_0": {"kernel": f(3, 3, 4, 4)},
            "query": {"kernel": f(8, 2, 4)}, "out": {"kernel": f(2, 4, 8)}, "patch": {"kernel": f(7, 7, 1, 2)}}


def test_nm_groups_run_along_the_reduction_axis():
    lay = pytree.layout(_tree(np.random.default_rng(0)))
    g = C.NM(2, 4).resolve(lay, 0.5)
    ids = np.asarray(g.ids)
    leaf = dict(zip(lay.names, zip(lay.offsets, lay.shapes)))

    def groups_of(name):
        start, shape = leaf[name]
        return ids[start:start + math.prod(shape)].reshape(shape)

    dense = groups_of("Dense_0/kernel")  # (in, out): groups of 4 consecutive inputs per output
    assert all(len(set(dense[4 * j:4 * j + 4, o])) == 1 for j in range(2) for o in range(6))
    assert len(np.unique(dense)) == 12
    conv = groups_of("Conv_0/kernel")  # (h, w, in, out): the 4 input channels of one (h, w, out)
    assert all(len(set(conv[h, w_, :, o])) == 1 for h in range(3) for w_ in range(3) for o in range(4))
    query = groups_of("query/kernel")  # (in, heads, head_dim): along in
    assert all(len(set(query[4 * j:4 * j + 4, h, d])) == 1 for j in range(2) for h in range(2) for d in range(4))
    out = groups_of("out/kernel")  # (heads, head_dim, out): along the flattened (heads, head_dim)
    assert all(len(set(out.reshape(8, 8)[4 * j:4 * j + 4, o])) == 1 for j in range(2) for o in range(8))
    patch = groups_of("patch/kernel")  # 49 inputs: ragged, one dense group keeping all
    assert len(np.unique(patch)) == 1 and int(g.counts[patch.flat[0]]) == patch.size
    assert C.NM(2, 4).ragged_leaves(lay) == ["patch/kernel"]
    with pytest.raises(ValueError, match=r"patch/kernel \(7, 7, 1, 2\) sums over 49 inputs"):
        C.NM(2, 4, ragged="error").resolve(lay, 0.5)


def test_layer_budgets_uniform_erk_cap_and_given():
    lay = pytree.layout({"a": {"kernel": np.ones((100, 50), np.float32)}, "b": {"kernel": np.ones((10, 10), np.float32)}})
    sizes = np.array([5000, 100])
    k = swapjax.kept_count(0.9, 5100)
    uniform = np.asarray(C.LayerBudgets().resolve(lay, 0.9).counts)
    assert uniform.sum() == k and list(uniform) == swapjax.baselines.layer_quotas(k, sizes)
    erk = C.LayerBudgets("erk").densities(lay, 0.9)  # ∝ (Σ dims)/(Π dims): 150/5000 and 20/100
    ratio = np.array([150 / 5000, 20 / 100])
    c = k / (ratio @ sizes)
    np.testing.assert_allclose(erk, ratio * c, rtol=1e-9)
    assert np.asarray(C.LayerBudgets("erk").resolve(lay, 0.9).counts).sum() == k
    # at 0.6, ERK's b would pass density 1: b dense, a the rest; a cap of 0.6 on a moves weights back to it
    np.testing.assert_allclose(C.LayerBudgets("erk").densities(lay, 0.6), [(0.4 * 5100 - 100) / 5000, 1.0])
    np.testing.assert_allclose(C.LayerBudgets("erk", max_sparsity=0.6).densities(lay, 0.6), [0.4, 0.4])
    with pytest.raises(ValueError, match="max_sparsity: every leaf at most 0.5 sparse cannot reach sparsity 0.9"):
        C.LayerBudgets(max_sparsity=0.5).resolve(lay, 0.9)
    given_ = C.LayerBudgets({"a/kernel": 0.95, "b/kernel": 0.5})
    final = (0.95 * 5000 + 0.5 * 100) / 5100
    np.testing.assert_allclose(1 - given_.densities(lay, final), [0.95, 0.5], atol=1e-9)
    with pytest.raises(ValueError, match=r"missing \['b/kernel'\]"):
        C.LayerBudgets({"a/kernel": 0.9}).resolve(lay, 0.9)


def test_owl_keeps_more_where_saliency_has_outliers():
    rng = np.random.default_rng(0)
    lay = pytree.layout({"a": {"kernel": np.ones((40, 25), np.float32)}, "b": {"kernel": np.ones((40, 25), np.float32)}})
    w = rng.normal(size=2000).astype(np.float32)
    w[1000:1050] *= 30  # outliers in b
    owl = C.LayerBudgets("owl", owl_spread=0.08)
    d = owl.densities(lay, 0.7, w, np.ones(2000, np.float32))
    assert d[1] > d[0] and d[1] - d[0] == pytest.approx(0.16, abs=1e-6) and d.mean() == pytest.approx(0.3)


def _loss(params, example):
    h = jnp.tanh(example["x"] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return jnp.sum((h @ params["Dense_1"]["kernel"] - example["y"]) ** 2)


@pytest.fixture(scope="module")
def mlp_problem():
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.normal(size=(16, 12)).astype(np.float32) / 4, "bias": np.zeros(12, np.float32)},
              "Dense_1": {"kernel": rng.normal(size=(12, 4)).astype(np.float32) / 3}}
    x = rng.normal(size=(40, 16)).astype(np.float32)
    y = np.tanh(x @ params["Dense_0"]["kernel"]) @ params["Dense_1"]["kernel"] + 0.1 * rng.normal(size=(40, 4))
    return params, {"x": x, "y": y.astype(np.float32)}


METHODS = {"MP": swapjax.Magnitude(), "WF": swapjax.WoodFisher(), "LR": swapjax.LR(lam=0.01),
           "SWAP": swapjax.SWAP(lam=0.01, epsilon=0.3)}
CONSTRAINTS = {"2:4": swapjax.NM(2, 4), "1:4": swapjax.NM(1, 4), "uniform": swapjax.LayerBudgets(),
               "erk": swapjax.LayerBudgets("erk"), "owl": swapjax.LayerBudgets("owl", max_sparsity=0.9)}


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=str)
def test_every_method_keeps_the_constraint_exactly(mlp_problem, method, constraint):
    params, batch = mlp_problem
    before = jax.tree_util.tree_map(np.copy, params)
    spec = CONSTRAINTS[constraint]
    sparsity = None if isinstance(spec, swapjax.NM) else 0.7
    res = swapjax.prune(_loss, params, batch, sparsity=sparsity, method=METHODS[method], constraint=spec,
                        stages=2, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # inputs unmutated
    lay = pytree.layout(params)
    w = np.asarray(pytree.flatten(res.params, lay))
    mask = np.asarray(pytree.flatten(pytree.apply_masks(jax.tree_util.tree_map(np.ones_like, params), res.masks), lay))
    groups = spec.resolve(lay, 1 - spec.n / spec.m if isinstance(spec, swapjax.NM) else 0.7, pytree.flatten(params, lay),
                          jnp.ones(lay.size))
    if constraint != "owl":  # OWL's counts follow the Fisher of the stage; the total is what is fixed
        assert bool(groups.feasible(jnp.asarray(mask > 0)))
    assert mask.sum() == int(groups.k) and np.all(w[mask == 0] == 0)
    assert res.summary()["total"]["constraint"] == spec.label
    np.testing.assert_array_equal(res.params["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_uniform_layer_budgets_reproduce_magnitude_per_layer(mlp_problem):
    params, batch = mlp_problem
    a = swapjax.prune(_loss, params, batch, sparsity=0.9, method=swapjax.Magnitude(), progress=False,
                      constraint=swapjax.LayerBudgets("uniform"))
    b = swapjax.prune(_loss, params, batch, sparsity=0.9, method=swapjax.Magnitude("layer"), progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


def test_lr_at_2_4_beats_magnitude_at_2_4(mlp_problem):
    """f of LR's 2:4 solution (float64 NumPy) is below that of the 2:4 magnitude mask refitted by nothing."""
    params, batch = mlp_problem
    lay = pytree.layout(params)
    X = np.asarray(swapjax.per_sample_grads(_loss, params, batch), np.float64)
    w_bar = np.asarray(pytree.flatten(params, lay), np.float64)
    groups = swapjax.NM(2, 4).resolve(lay, 0.5)
    f = lambda w: 0.5 * np.sum((X @ (w - w_bar)) ** 2) + 0.5 * 40 * 1e-3 * np.sum((w - w_bar) ** 2)  # noqa: E731
    w_mp, _ = swapjax.Magnitude().solve(X.astype(np.float32), w_bar.astype(np.float32), groups)
    w_lr, info = swapjax.LR(lam=1e-3, lam_scale="absolute").solve(X.astype(np.float32), w_bar.astype(np.float32),
                                                                   groups)
    assert bool(groups.feasible(info.support)) and f(np.asarray(w_lr, np.float64)) < f(np.asarray(w_mp, np.float64))


def test_nm_sparsity_and_constraint_errors(mlp_problem):
    params, batch = mlp_problem
    with pytest.raises(ValueError, match=r"sparsity: 2:4 prunes 1 - 2/4 = 0.5"):
        swapjax.prune(_loss, params, batch, sparsity=0.9, constraint=swapjax.NM(2, 4), progress=False)
    with pytest.raises(ValueError, match="constraint: expected None"):
        swapjax.prune(_loss, params, batch, constraint=4, progress=False)
    with pytest.raises(ValueError, match="n: N:M keeps n of every m weights"):
        swapjax.NM(5, 4)
    with pytest.raises(ValueError, match="rule: must be 'uniform', 'erk' or 'owl'"):
        swapjax.LayerBudgets("random")


@pytest.mark.parametrize("method", ["MP", "LR"])
def test_matrix_free_mode_keeps_the_constraint(mlp_problem, method):
    params, batch = mlp_problem
    lay = pytree.layout(params)
    for spec in (swapjax.NM(2, 4), swapjax.LayerBudgets("erk")):
        res = swapjax.prune(_loss, params, batch, sparsity=None if isinstance(spec, swapjax.NM) else 0.8,
                            method=METHODS[method], constraint=spec, stages=1, mode="matrix-free", progress=False)
        assert res.mode == "matrix-free"
        w = pytree.flatten(res.params, lay)
        mask = pytree.flatten(pytree.apply_masks(jax.tree_util.tree_map(np.ones_like, params), res.masks), lay) > 0
        assert bool(spec.resolve(lay, 0.5 if isinstance(spec, swapjax.NM) else 0.8).feasible(mask))
        assert bool(jnp.all(jnp.where(mask, True, w == 0)))


def test_nm_export_round_trips_a_pruned_network(mlp_problem):
    """prune at 2:4, export values + in-group indices, rebuild: the same kernels; each index selects
    the kept weight of its group (checked against the mask by index arithmetic)."""
    params, batch = mlp_problem
    res = swapjax.prune(_loss, params, batch, method=swapjax.LR(lam=0.01), constraint=swapjax.NM(2, 4), stages=1,
                        progress=False)
    packed = swapjax.to_nm(res.params, res.masks)
    assert set(packed) == {"Dense_0/kernel", "Dense_1/kernel"}
    rebuilt = swapjax.from_nm(packed, params)
    np.testing.assert_array_equal(rebuilt["Dense_0"]["kernel"], res.params["Dense_0"]["kernel"])
    kernel, mask = np.asarray(res.params["Dense_1"]["kernel"]), np.asarray(res.masks["Dense_1"]["kernel"])  # (12, 4)
    nm = packed["Dense_1/kernel"]
    assert nm.values.shape == (4, 6) and nm.indices.dtype == np.uint8
    for o in range(4):
        for j in range(6):
            i = 4 * (j // 2) + int(nm.indices[o, j])  # group j // 2 of output o's 12 inputs
            assert mask[i, o] and nm.values[o, j] == kernel[i, o]
    with pytest.raises(ValueError, match=r"masks: k is not 2:4: group 0 along axes \(0,\) keeps 4"):
        swapjax.to_nm({"k": np.ones((4, 1), np.float32)}, {"k": np.ones((4, 1), bool)})


class _FirstHalf(swapjax.Constraint):
    """A toy constraint written here alone: keep (1 − s) of the first half of w and nothing of the rest."""

    label = "first half"

    def resolve(self, lay, sparsity, w=None, col_sq=None):
        half = lay.size // 2
        ids = jnp.asarray(np.repeat([0, 1], [half, lay.size - half]).astype(np.int32))
        return swapjax.Groups(jnp.array([swapjax.kept_count(sparsity, half), 0], jnp.int32), ids, self.label)


def test_a_constraint_defined_outside_the_library(mlp_problem):
    params, batch = mlp_problem
    lay = pytree.layout(params)
    res = swapjax.prune(_loss, params, batch, sparsity=0.5, method=swapjax.LR(lam=0.01), constraint=_FirstHalf(),
                        stages=2, progress=False)
    w = np.asarray(pytree.flatten(res.params, lay))
    half = lay.size // 2
    assert np.count_nonzero(w[half:]) == 0 and np.count_nonzero(w[:half]) <= swapjax.kept_count(0.5, half)
    assert res.summary()["total"]["kept"] == swapjax.kept_count(0.5, half)
    assert res.summary()["total"]["constraint"] == "first half"


# ---------------------------------------------------------------------------
# property test: random trees of dense, conv and 3-D attention kernels, every method × constraint × mode


def _net_loss(params, example):
    """conv (3×3, SAME) → spatial mean → dense → attention q (in, heads, head_dim) → output (heads, head_dim, out)."""
    h = jax.lax.conv_general_dilated(example["x"][None], params["Conv_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
    h = jnp.tanh(jnp.mean(h, axis=(0, 1)) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    q = jnp.tanh(jnp.einsum("d,dhk->hk", h, params["query"]["kernel"]))
    out = jnp.einsum("hk,hkd->d", q, params["out"]["kernel"])
    return jnp.sum((out - example["y"]) ** 2)


def _net(seed, c_in, c_out, d, heads, head_dim, n=24):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.normal(size=s) / np.sqrt(np.prod(s[:-1]))).astype(np.float32)  # noqa: E731
    params = {"Conv_0": {"kernel": f(3, 3, c_in, c_out)}, "Dense_0": {"kernel": f(c_out, d), "bias": f(d)},
              "query": {"kernel": f(d, heads, head_dim)}, "out": {"kernel": f(heads, head_dim, d)}}
    batch = {"x": rng.normal(size=(n, 4, 4, c_in)).astype(np.float32), "y": rng.normal(size=(n, d)).astype(np.float32)}
    return params, batch


def _nm_holds(mask, axes, n, m) -> bool:
    """Every m consecutive weights along ``axes`` (flattened row-major) keep exactly n; a reduction size
    that m does not divide, all (the leaf left dense). An independent NumPy reading of N:M."""
    rest = [a for a in range(mask.ndim) if a not in axes]
    rows = np.transpose(mask, list(axes) + rest).reshape(int(np.prod([mask.shape[a] for a in axes])), -1)
    if rows.shape[0] % m:
        return bool(rows.all())
    return bool(np.all(rows.reshape(rows.shape[0] // m, m, -1).sum(axis=1) == n))


PROPERTY_CONSTRAINTS = {"top-k": swapjax.TopK(), "2:4": swapjax.NM(2, 4), "1:4": swapjax.NM(1, 4),
                        "4:8": swapjax.NM(4, 8), "uniform": swapjax.LayerBudgets(), "erk": swapjax.LayerBudgets("erk"),
                        "owl": swapjax.LayerBudgets("owl", max_sparsity=0.9)}
_REDUCTION = {"Conv_0": (0, 1, 2), "Dense_0": (0,), "query": (0,), "out": (0, 1)}


# Each example compiles its own gradients and solve (2-5 s): 8 in the default run.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), c_in=st.sampled_from([1, 4]), c_out=st.sampled_from([4, 6, 8]),
       d=st.sampled_from([4, 8]), heads=st.sampled_from([1, 2]), head_dim=st.sampled_from([2, 4]),
       method=st.sampled_from(sorted(METHODS)), constraint=st.sampled_from(sorted(PROPERTY_CONSTRAINTS)),
       mode=st.sampled_from(["in-memory", "matrix-free", "blocked"]), stages=st.sampled_from([1, 2]),
       sparsity=st.floats(0.3, 0.9), width=st.integers(16, 160), budget=st.sampled_from(swapjax.blocks.BUDGETS))
def test_property_every_method_constraint_and_mode_on_random_trees(seed, c_in, c_out, d, heads, head_dim, method,
                                                                   constraint, mode, stages, sparsity, width, budget):
    if method == "WF" and mode == "matrix-free":
        mode = "in-memory"  # WoodFisher needs X formed (refused matrix-free: tested in test_operators)
    params, batch = _net(seed, c_in, c_out, d, heads, head_dim)
    before, batch_before = (jax.tree_util.tree_map(np.copy, t) for t in (params, batch))
    spec = PROPERTY_CONSTRAINTS[constraint]
    nm = isinstance(spec, swapjax.NM)
    lay = pytree.layout(params)
    sizes = [int(np.prod(shape)) for shape in lay.shapes]
    call = lambda: swapjax.prune(_net_loss, params, batch, sparsity=None if nm else sparsity,  # noqa: E731
                                 method=METHODS[method], constraint=spec, stages=stages, progress=False,
                                 mode=swapjax.Blocked(width, budget) if mode == "blocked" else mode)
    # blocks cut layers and groups
    if nm and all(int(np.prod([shape[a] for a in _REDUCTION[name.split("/")[0]]])) % spec.m
                  for name, shape in zip(lay.names, lay.shapes)):  # every kernel ragged: an error, nothing pruned
        with pytest.raises(ValueError, match=f"constraint: {spec.label} leaves every prunable layer dense"):
            call()
        return
    if constraint == "uniform" and 0 in swapjax.baselines.layer_quotas(swapjax.kept_count(sparsity, lay.size), sizes):
        with pytest.raises(ValueError, match="would keep 0 weights"):  # a layer left with no weight: an error
            call()
        return
    try:
        res = call()
    except ValueError as error:  # ERK and OWL may leave the smallest leaf none at a high sparsity: named
        if constraint not in ("erk", "owl") or "would keep 0 weights" not in str(error):
            raise
        return
    for original, kept in ((params, before), (batch, batch_before)):  # inputs unmutated
        jax.tree_util.tree_map(np.testing.assert_array_equal, original, kept)
    assert res.mode == mode
    np.testing.assert_array_equal(res.params["Dense_0"]["bias"], params["Dense_0"]["bias"])
    total = 0
    for name, axes in _REDUCTION.items():
        mask, w = np.asarray(res.masks[name]["kernel"]), np.asarray(res.params[name]["kernel"])
        assert mask.shape == w.shape and np.all(w[~mask] == 0)  # pruned weights exactly 0
        total += int(mask.sum())
        if nm:
            assert _nm_holds(mask, axes, spec.n, spec.m), (name, mask.shape)
    if not nm:
        assert total == swapjax.kept_count(sparsity, lay.size)  # the budget, split across layers or not
    if constraint == "uniform":  # each layer (1 − s) of its weights, the remainders as Magnitude("layer") splits them
        quotas = swapjax.baselines.layer_quotas(total, [int(np.prod(shape)) for shape in lay.shapes])
        assert [int(res.masks[name.split("/")[0]]["kernel"].sum()) for name in lay.names] == quotas
    if constraint == "erk":  # ERK's counts depend on the shapes alone
        flat = pytree.flatten(pytree.apply_masks(jax.tree_util.tree_map(np.ones_like, params), res.masks), lay) > 0
        assert bool(spec.resolve(lay, sparsity).feasible(flat))
    assert res.summary()["total"]["constraint"] == spec.label


# ---------------------------------------------------------------------------
# issue 32: NM's axes and arguments, a LayerBudgets mapping taken as given, every check before any gradient


def _two_layer_loss(params, example):
    """x (8,) → tanh(x K0) (6,) → · K1 (2,): the layers prune_layerwise finds (x @ K)."""
    return jnp.sum((jnp.tanh(example["x"] @ params["Dense_0"]["kernel"]) @ params["Dense_1"]["kernel"]
                    - example["y"]) ** 2)


_forbidden_loss = traced_only(_two_layer_loss)  # traced to find the layers, never run


@pytest.fixture(scope="module")
def two_layers():
    rng = np.random.default_rng(3)
    params = {"Dense_0": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)},
              "Dense_1": {"kernel": rng.normal(size=(6, 2)).astype(np.float32)}}
    batch = {"x": rng.normal(size=(24, 8)).astype(np.float32), "y": rng.normal(size=(24, 2)).astype(np.float32)}
    return params, batch


def _kept(result):
    return {name: row["kept"] for name, row in result.summary().items() if name != "total"}


def test_nm_axes_as_a_tuple_are_the_same_axes_of_every_leaf(two_layers):
    params, _ = two_layers
    lay = pytree.layout(params)
    default = C.NM(2, 2).resolve(lay, 0.0)
    along_0 = C.NM(2, 2, axes=(0,)).resolve(lay, 0.0)
    np.testing.assert_array_equal(np.asarray(along_0.ids), np.asarray(default.ids))  # Dense: axis 0 either way
    assert C.NM(2, 4, axes=[0]).axes == (0,) and C.NM(2, 4, axes=np.array([1])).axes == (1,)
    # along axis 1 (the outputs): 6 and 2 are not multiples of 4, so both leaves are ragged; 2 is one of 2
    assert C.NM(2, 4, axes=(1,)).ragged_leaves(lay) == ["Dense_0/kernel", "Dense_1/kernel"]
    assert C.NM(1, 2, axes=(1,)).ragged_leaves(lay) == []
    # along the outputs of Dense_0 with m = 3: row r's groups are (r, 0..2) and (r, 3..5), row-major
    ids = np.asarray(C.NM(1, 3, axes=(-1,)).resolve(lay, 2 / 3).ids)[:48].reshape(8, 6)
    expected = np.arange(16).reshape(8, 2).repeat(3, axis=1)
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(axes=(5,)), r"NM: Dense_0/kernel \(8, 6\) has 2 axes; axes = \(5,\) must be distinct integers in \[-2, 2\)"),
    (dict(axes=(-3,)), r"NM: Dense_0/kernel \(8, 6\) has 2 axes; axes = \(-3,\)"),
    (dict(axes=lambda path, shape: (0, -2)),
     r"NM: Dense_0/kernel \(8, 6\) has 2 axes; axes\('Dense_0/kernel', \(8, 6\)\) = \(0, -2\) must be distinct"),
    (dict(axes=lambda path, shape: ()), r"axes\('Dense_0/kernel', \(8, 6\)\) = \(\) must be distinct"),
    (dict(axes=lambda path, shape: 0), r"axes\('Dense_0/kernel', \(8, 6\)\) = 0 must be distinct integers"),
    (dict(axes=lambda path, shape: (0.0,)), r"axes\('Dense_0/kernel', \(8, 6\)\) = \(0.0,\)"),
    (dict(ragged="error"), r"NM: Dense_1/kernel \(6, 2\) sums over 6 inputs \(axes \(0,\)\), not a multiple of m = 4"),
])
def test_nm_axes_and_ragged_leaves_checked_from_the_layout_before_any_gradient(two_layers, kwargs, match):
    params, batch = two_layers
    with pytest.raises(ValueError, match=match):
        swapjax.prune(_forbidden_loss, params, batch, method=swapjax.Magnitude(), constraint=C.NM(2, 4, **kwargs),
                      progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda: C.NM(2, 4, axes=(0, 0)), r"axes: expected distinct axes such as \(0,\), got \(0, 0\)"),
    (lambda: C.NM(2, 4, axes=()), r"axes: expected distinct axes"),
    (lambda: C.NM(2, 4, axes="0"), r"axes: expected None, a tuple of axes such as \(0,\), or a function"),
    (lambda: C.NM(2, 4, axes=(0.5,)), r"axes\[0\]: must be an integer"),
    (lambda: C.NM(0, 4), "n: must be an integer ≥ 1, got 0"),
    (lambda: C.NM(2, 0), "m: must be an integer ≥ 1, got 0"),
    (lambda: C.NM(2.0, 4), "n: must be an integer ≥ 1, got 2.0"),
    (lambda: C.NM(True, 4), "n: must be an integer"),
])
def test_nm_arguments_rejected_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nm_takes_0d_arrays_and_numpy_integers():
    nm = C.NM(jnp.asarray(2), np.int64(4))
    assert (nm.n, nm.m, type(nm.n), nm.label, nm.sparsity) == (2, 4, int, "2:4", 0.5)


def test_nm_leaving_every_kernel_dense_is_an_error_before_any_gradient(two_layers):
    params, batch = two_layers  # inputs 8 and 6: neither a multiple of 5
    with pytest.raises(ValueError, match=r"constraint: 2:5 leaves every prunable layer dense, none sums over a multiple "
                                         r"of m = 5 inputs \(Dense_0/kernel 8 inputs, Dense_1/kernel 6 inputs\)"):
        swapjax.prune(_forbidden_loss, params, batch, method=swapjax.Magnitude(), constraint=C.NM(2, 5),
                      progress=False)


def test_layer_budgets_mapping_is_taken_as_given(two_layers):
    params, batch = two_layers
    lay = pytree.layout(params)  # Dense_0: 48 weights, Dense_1: 12
    rule = {"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.25}
    spec = C.LayerBudgets(rule)
    assert spec.check(lay, None) == pytest.approx((0.5 * 48 + 0.25 * 12) / 60)  # s̄, the size-weighted mean
    assert np.asarray(spec.resolve(lay, None).counts).tolist() == [24, 9]
    res = swapjax.prune(_two_layer_loss, params, batch, method=swapjax.Magnitude(), constraint=spec, progress=False)
    assert _kept(res) == {"Dense_0/kernel": 24, "Dense_1/kernel": 9}  # was rescaled to the default 0.9
    assert res.summary()["total"]["kept"] == 33
    # a sparsity agreeing with s̄ within the rounding of the counts (L/(2p) = 1/60) is accepted, as given
    res = swapjax.prune(_two_layer_loss, params, batch, sparsity=0.46, method=swapjax.Magnitude(), constraint=spec,
                        stages=1, progress=False)
    assert _kept(res) == {"Dense_0/kernel": 24, "Dense_1/kernel": 9}
    assert rule == {"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.25}  # the caller's mapping unchanged
    # the stages before the last scale every s_l by s_t/s̄
    s_bar = spec.check(lay, None)
    assert np.asarray(spec.resolve(lay, s_bar / 2).counts).tolist() == [36, 10]  # round(0.75·48), round(0.875·12)


@pytest.mark.parametrize("rule, kwargs, match", [
    ({"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.5}, dict(sparsity=0.8),
     r"sparsity: 0.8 disagrees with the mapping's size-weighted mean 0.5 "),
    ({"Dense_0/kernel": 0.0, "Dense_1/kernel": 0.0}, dict(sparsity=0.5),
     r"sparsity: 0.5 disagrees with the mapping's size-weighted mean 0 "),
    ({"Dense_0/kernel": 0.5}, {}, r"rule: the mapping must give .* missing \['Dense_1/kernel'\], unknown \[\]"),
    ({"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.5, "Dense_2/kernel": 0.5}, {}, r"unknown \['Dense_2/kernel'\]"),
    ({"Dense_0/kernel": 0.99, "Dense_1/kernel": 0.99}, {},
     r"LayerBudgets: at the mapping's sparsities \(per-layer given\), Dense_0/kernel \(8, 6\), Dense_1/kernel "
     r"\(6, 2\) would keep 0 weights"),
    ("uniform", dict(sparsity=0.99),
     r"LayerBudgets: at sparsity 0.99 \(per-layer uniform\), Dense_1/kernel \(6, 2\) would keep 0 weights \(the "
     r"network's output would no longer depend on its input\); lower the sparsity, cap"),
])
def test_layer_budgets_checked_from_the_layout_before_any_gradient(two_layers, rule, kwargs, match):
    params, batch = two_layers
    with pytest.raises(ValueError, match=match):
        swapjax.prune(_forbidden_loss, params, batch, method=swapjax.Magnitude(), constraint=C.LayerBudgets(rule),
                      progress=False, **kwargs)


def test_layer_budgets_cap_checked_before_any_gradient(two_layers):
    params, batch = two_layers
    for rule in ("uniform", "erk", "owl"):
        with pytest.raises(ValueError, match="max_sparsity: every leaf at most 0.5 sparse cannot reach sparsity 0.9"):
            swapjax.prune(_forbidden_loss, params, batch, sparsity=0.9, method=swapjax.Magnitude(),
                          constraint=C.LayerBudgets(rule, max_sparsity=0.5), progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda: C.LayerBudgets({"a": 0.9, "b": 0.3}, max_sparsity=0.5),
     r"max_sparsity: 0.5 is below the sparsity given for a \(0.9\)"),
    (lambda: C.LayerBudgets({}), "rule: the mapping is empty"),
    (lambda: C.LayerBudgets({0: 0.5}), "rule: the mapping's keys must be leaf paths"),
    (lambda: C.LayerBudgets({"a": 1.0}), r"rule\['a'\] \(a leaf's sparsity\): must be in \[0, 1\)"),
])
def test_layer_budgets_arguments_rejected_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_prune_layerwise_takes_the_mapping_as_given(two_layers):
    params, batch = two_layers
    rule = {"Dense_0/kernel": 0.25, "Dense_1/kernel": 0.25}
    res = swapjax.prune_layerwise(_two_layer_loss, params, batch, constraint=C.LayerBudgets(rule), progress=False)
    assert _kept(res) == {"Dense_0/kernel": 36, "Dense_1/kernel": 9}  # 0.25 each, was 0.5 each
    assert [r.kept for r in res.layers] == [36, 9]


def test_prune_layerwise_names_a_layer_left_with_no_weight(two_layers):
    params, batch = two_layers
    with pytest.raises(ValueError, match=r"LayerBudgets: at sparsity 0.99 .*Dense_1/kernel \(6, 2\) would keep 0"):
        swapjax.prune_layerwise(_two_layer_loss, params, batch, sparsity=0.99, progress=False)


class _KeepsAll(C.Constraint):
    """A user constraint that keeps every weight whatever the sparsity."""

    label = "keeps all"

    def resolve(self, lay, sparsity, w=None, col_sq=None):
        return swapjax.Groups(jnp.array([lay.size], jnp.int32), jnp.zeros(lay.size, jnp.int32), self.label)


def test_a_constraint_that_prunes_nothing_is_an_error_before_any_gradient(two_layers):
    params, batch = two_layers
    with pytest.raises(ValueError, match=r"constraint: keeps all keeps all p = 60 prunable weights at sparsity 0.5: "
                                         r"nothing would be pruned"):
        swapjax.prune(_forbidden_loss, params, batch, sparsity=0.5, method=swapjax.Magnitude(), constraint=_KeepsAll(),
                      progress=False)
    # a sparsity whose k = round((1 − s)·p) is p prunes nothing as asked: no error
    lay = pytree.layout(params)
    assert C.TopK().check(lay, 0.005) == 0.005 and C.LayerBudgets().check(lay, 0.0) == 0.0
