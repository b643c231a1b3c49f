"""Layer-wise SparseGPT and Wanda against float64 NumPy transcriptions of the published algorithms.

The references follow the published code line by line (SparseGPT's ``fasterprune``: dampening,
dead inputs, the upper Cholesky factor of H⁻¹, blocks with lazy updates, N:M at each group's first
input; Wanda's |W|·‖a‖ per output unit), with this library's exact counts (a block's share of the
layer's count, by largest remainder) and ties to the lower index.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax import layerwise
from swapjax.baselines import layer_quotas


def _layer(seed=0, n=300, d_in=48, d_out=10, dead=()):
    """Correlated inputs A (n, d_in) (a shared factor) whose features differ in scale (as activations
    do: a few large ones), a dense kernel W̄ (d_in, d_out), H = AᵀA."""
    rng = np.random.default_rng(seed)
    A = (rng.normal(size=(n, d_in)) + 0.8 * rng.normal(size=(n, 1))) * rng.gamma(1.0, size=d_in)
    A[:, list(dead)] = 0
    W = rng.normal(size=(d_in, d_out))
    return A, W, A.T @ A


def _keep_top(score, count):
    """The ``count`` largest entries of a flat score (ties to the lower index), as a bool mask."""
    order = np.lexsort((np.arange(score.size), -score))
    mask = np.zeros(score.size, bool)
    mask[order[:count]] = True
    return mask


def _sparsegpt_reference(W, H, rule, block, percdamp=0.01):
    """SparseGPT's fasterprune in float64 NumPy (columns of Wt are the inputs)."""
    Wt, H = W.T.copy(), H.copy()
    d_out, d_in = Wt.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Wt[:, dead] = 0
    H += percdamp * np.mean(np.diag(H)) * np.eye(d_in)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    starts = list(range(0, d_in, block))
    counts = None if isinstance(rule, swapjax.NM) else layer_quotas(rule, [min(block, d_in - s) * d_out for s in starts])
    pruned = np.zeros((d_out, d_in), bool)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block, d_in)
        W1, U1 = Wt[:, i1:i2].copy(), U[i1:i2, i1:i2]
        Q1, E1 = np.zeros_like(W1), np.zeros_like(W1)
        mask1 = np.zeros(W1.shape, bool)
        if counts is not None:
            score = W1 ** 2 / np.diag(U1)[None, :] ** 2
            mask1 = ~_keep_top(score.ravel(), counts[b]).reshape(W1.shape)
        for i in range(i2 - i1):
            if counts is None and i % rule.m == 0:
                score = W1[:, i:i + rule.m] ** 2 / np.diag(U1)[i:i + rule.m][None, :] ** 2
                for row in range(d_out):
                    mask1[row, i:i + rule.m] = ~_keep_top(score[row], rule.n)
            w, d = W1[:, i], U1[i, i]
            q = np.where(mask1[:, i], 0, w)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        Wt[:, i1:i2] = Q1
        Wt[:, i2:] -= E1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return Wt.T, ~pruned.T


def _wanda_reference(W, H, rule):
    d_in, d_out = W.shape
    score = np.abs(W) * np.sqrt(np.diag(H))[:, None]
    kept = np.zeros(W.shape, bool)
    for j in range(d_out):
        if isinstance(rule, swapjax.NM):
            for g in range(0, d_in, rule.m):
                kept[g:g + rule.m, j] = _keep_top(score[g:g + rule.m, j], rule.n)
        else:
            kept[:, j] = _keep_top(score[:, j], layer_quotas(rule, [d_in] * d_out)[j])
    return np.where(kept, W, 0), kept


RULES = {"count": 173, "2:4": swapjax.NM(2, 4), "1:4": swapjax.NM(1, 4)}


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_sparsegpt_matches_the_published_algorithm_in_float64(rule):
    A, W, H = _layer(dead=(5,))
    spec = RULES[rule]
    expected_w, expected_mask = _sparsegpt_reference(W, H, spec, block=16)
    with jax.enable_x64(True):
        w, mask = layerwise.sparsegpt(W, H, spec, block=16)
        w, mask = np.asarray(w), np.asarray(mask)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(w, expected_w, rtol=1e-5, atol=1e-5 * np.abs(expected_w).max())
    w32, mask32 = layerwise.sparsegpt(W.astype(np.float32), H.astype(np.float32), spec, block=16)
    assert w32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mask32), expected_mask)  # well conditioned: the same masks
    np.testing.assert_allclose(np.asarray(w32), expected_w, atol=1e-3 * np.abs(expected_w).max())


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_wanda_matches_the_published_rule(rule):
    A, W, H = _layer(1)
    expected_w, expected_mask = _wanda_reference(W, H, RULES[rule])
    w, mask = layerwise.wanda(W.astype(np.float32), H.astype(np.float32), RULES[rule])
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(w), expected_w.astype(np.float32))


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_both_keep_the_constraint_exactly_and_sparsegpt_reconstructs_better(rule):
    A, W, H = _layer(2, d_in=64, d_out=12)
    spec = RULES[rule]
    errors = {}
    for name, fn in (("wanda", layerwise.wanda), ("sparsegpt", layerwise.sparsegpt)):
        w, mask = (np.asarray(a) for a in fn(W.astype(np.float32), H.astype(np.float32), spec))
        assert np.all(w[~mask] == 0)
        if isinstance(spec, swapjax.NM):
            groups = mask.reshape(64 // spec.m, spec.m, 12).sum(axis=1)
            assert np.all(groups == spec.n)
        else:
            assert mask.sum() == spec
        errors[name] = np.linalg.norm(A @ (w - W))
    magnitude, _ = _wanda_reference(W, np.eye(64), spec)  # |W| alone, compared the same way
    errors["magnitude"] = np.linalg.norm(A @ (magnitude - W))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_layer_errors_name_the_argument():
    A, W, H = _layer()
    with pytest.raises(ValueError, match=r"H: expected the Gram AᵀA of the layer's inputs, shape \(48, 48\)"):
        layerwise.sparsegpt(W, H[:4, :4], 10)
    with pytest.raises(ValueError, match="rule: 2:4 groups run along the 50 inputs, not a multiple of m = 4"):
        layerwise.wanda(np.ones((50, 3)), np.eye(50), swapjax.NM(2, 4))
    with pytest.raises(ValueError, match="block: 6 inputs per block must be a multiple of m = 4"):
        layerwise.sparsegpt(W, H, swapjax.NM(2, 4), block=6)
    with pytest.raises(ValueError, match="rule"):
        layerwise.wanda(W, H, W.size + 1)


# ---------------------------------------------------------------------------
# the driver: each layer's Gram from its own inputs, in forward order


def _conv_net(seed=0, n=12):
    rng = np.random.default_rng(seed)
    params = {"Conv_0": {"kernel": (rng.normal(size=(3, 3, 4, 4)) / 6).astype(np.float32),
                         "bias": np.zeros(4, np.float32)},
              "Dense_0": {"kernel": (rng.normal(size=(100, 8)) / 10).astype(np.float32)}}
    batch = {"x": rng.normal(size=(n, 5, 5, 4)).astype(np.float32), "y": rng.normal(size=(n, 8)).astype(np.float32)}
    return params, batch


def _conv_loss(params, example):
    h = jax.lax.conv_general_dilated(example["x"][None], params["Conv_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))[0] + params["Conv_0"]["bias"]
    return jnp.sum((jnp.tanh(h).reshape(-1) @ params["Dense_0"]["kernel"] - example["y"]) ** 2)


def _np_conv_inputs(params, x, kernel):
    """(patches of x in the HWIO kernel's (kh, kw, C) order, the dense layer's input), float64 NumPy."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([xp[:, i:i + 3, j:j + 3, :].reshape(len(x), -1) for i in range(5) for j in range(5)], 1)
    h = np.tanh(patches @ kernel.reshape(36, 4).astype(np.float64) + params["Conv_0"]["bias"])  # (n, 25, 4)
    return patches.reshape(-1, 36), h.reshape(len(x), -1)


@pytest.mark.parametrize("sequential", [False, True])
def test_each_layer_is_solved_on_the_gram_of_its_own_inputs(sequential):
    """Conv patches and dense inputs rebuilt in NumPy: the driver's result equals SparseGPT run by hand on
    AᵀA, layer after layer (sequential: the dense layer's inputs from the pruned conv)."""
    params, batch = _conv_net()
    before = jax.tree_util.tree_map(np.copy, params)
    res = layerwise.prune_layerwise(_conv_loss, params, batch, method=swapjax.SparseGPT(), constraint=swapjax.NM(2, 4),
                                    sequential=sequential, chunk_size=5, progress=False)  # chunks of 5 over 12: the last one overlaps
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)
    assert [r.name for r in res.layers] == ["Conv_0/kernel", "Dense_0/kernel"] and res.mode == "layer-wise"
    x = batch["x"].astype(np.float64)
    patches, _ = _np_conv_inputs(params, x, params["Conv_0"]["kernel"])
    conv, _ = layerwise.sparsegpt(params["Conv_0"]["kernel"].reshape(36, 4), (patches.T @ patches).astype(np.float32),
                                  swapjax.NM(2, 4))
    np.testing.assert_allclose(res.params["Conv_0"]["kernel"].reshape(36, 4), conv, rtol=1e-4, atol=1e-5)
    _, h = _np_conv_inputs(params, x, np.asarray(res.params["Conv_0"]["kernel"]) if sequential
                           else params["Conv_0"]["kernel"])
    dense, _ = layerwise.sparsegpt(params["Dense_0"]["kernel"], (h.T @ h).astype(np.float32), swapjax.NM(2, 4))
    np.testing.assert_allclose(res.params["Dense_0"]["kernel"], dense, rtol=1e-4, atol=1e-5)
    assert [r.rows for r in res.layers] == [12 * 25, 12]
    for name in ("Conv_0", "Dense_0"):
        mask = np.asarray(res.masks[name]["kernel"])
        assert np.all(np.asarray(res.params[name]["kernel"])[~mask] == 0)
        assert np.all(mask.reshape(-1, 4, mask.shape[-1]).sum(axis=1) == 2)
    np.testing.assert_array_equal(res.params["Conv_0"]["bias"], params["Conv_0"]["bias"])


def test_layer_budgets_and_the_drivers_errors():
    params, batch = _conv_net(1)
    res = layerwise.prune_layerwise(_conv_loss, params, batch, sparsity=0.7, method=layerwise.Wanda(),
                                    constraint=swapjax.LayerBudgets("erk"), progress=False)
    lay = swapjax.pytree.layout(params)
    expected = np.asarray(swapjax.LayerBudgets("erk").resolve(lay, 0.7).counts)
    assert [r.kept for r in res.layers] == [int(expected[lay.names.index(r.name)]) for r in res.layers]
    assert res.summary()["total"]["kept"] == int(expected.sum())
    with pytest.raises(ValueError, match="constraint: layer by layer needs a budget per layer"):
        layerwise.prune_layerwise(_conv_loss, params, batch, constraint=swapjax.TopK(), progress=False)
    with pytest.raises(ValueError, match=r"NM: Conv_0/kernel \(3, 3, 4, 4\) sums over 36 inputs.*not a multiple of m = 8"):
        layerwise.prune_layerwise(_conv_loss, params, batch, constraint=swapjax.NM(4, 8, ragged="error"), progress=False)
    with pytest.raises(ValueError, match="method: expected a layer-wise method"):
        layerwise.prune_layerwise(_conv_loss, params, batch, method=swapjax.LR(), progress=False)


def test_refit_is_the_least_squares_solution_on_each_units_support():
    A, W, H = _layer(3)
    w, mask = layerwise.Refit(layerwise.Wanda(), percdamp=0.0).solve_layer(W.astype(np.float32), H.astype(np.float32),
                                                                          200)
    w, mask = np.asarray(w, np.float64), np.asarray(mask)
    np.testing.assert_array_equal(mask, np.asarray(layerwise.wanda(W, H, 200)[1]))
    for j in range(W.shape[1]):
        keep = mask[:, j]
        expected = np.linalg.lstsq(A[:, keep], A @ W[:, j], rcond=None)[0]
        np.testing.assert_allclose(w[keep, j], expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        assert np.all(w[~keep, j] == 0)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_regression_on_the_layer_starts_from_sparsegpt_and_only_improves(rule):
    """LR on the layer's operator from SparseGPT's support: the rule exactly, and a reconstruction error
    no higher than SparseGPT's (IHT, the backsolve and the swap search never raise f)."""
    A, W, H = _layer(4, d_in=32, d_out=8)
    spec = RULES[rule] if not isinstance(RULES[rule], int) else 90
    err = lambda w: np.linalg.norm(A @ (np.asarray(w, np.float64) - W)) ** 2  # noqa: E731
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    w_gpt, _ = layerwise.SparseGPT().solve_layer(W32, H32, spec)
    w, mask = (np.asarray(a) for a in layerwise.Regression().solve_layer(W32, H32, spec))
    assert np.all(w[~mask] == 0)
    if isinstance(spec, swapjax.NM):
        assert np.all(mask.reshape(32 // spec.m, spec.m, 8).sum(axis=1) == spec.n)
    else:
        assert mask.sum() == spec
    assert err(w) <= err(w_gpt) * (1 + 1e-5)


def test_layer_operator_products_are_the_kronecker_of_the_cholesky_factor():
    rng = np.random.default_rng(0)
    L = np.tril(rng.normal(size=(5, 5))).astype(np.float32)
    op = layerwise.LayerOperator(jnp.asarray(L), 3)
    X = np.kron(L.T.astype(np.float64), np.eye(3))  # row-major vec of Lᵀ V, V (5, 3)
    v, u = rng.normal(size=15), rng.normal(size=15)
    A = op.products()
    np.testing.assert_allclose(A.mv(jnp.asarray(v, jnp.float32)), X @ v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(A.rmv(jnp.asarray(u, jnp.float32)), X.T @ u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(op.col_sq, (X * X).sum(0), rtol=1e-5)


def test_a_vit_is_pruned_layer_by_layer_through_its_attention_projections(capsys):
    """The preset ViT at 2:4: the 14 kernels are found in forward order; q/k/v (in, heads, head_dim) group
    along their input, the output projection along (heads, head_dim), the MLP along its input; the 7×7×1
    patch conv (49 inputs) is left dense and named; tokens, biases and norms untouched."""
    import optax

    model = swapjax.models.ViT()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 28, 28, 1)).astype(np.float32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(params, example):
        logits = model.apply({"params": params}, example["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    batch = {"x": x, "y": rng.integers(0, 10, 6).astype(np.int32)}
    res = swapjax.prune_layerwise(loss, params, batch, method=swapjax.SparseGPT(), constraint=swapjax.NM(2, 4))
    names = [r.name for r in res.layers]
    assert names[:4] == ["block_0/attn/query/kernel", "block_0/attn/key/kernel", "block_0/attn/value/kernel",
                         "block_0/attn/out/kernel"] and len(names) == 13 and "patch_embed/kernel" not in names
    assert "left dense: patch_embed/kernel" in capsys.readouterr().err
    flat = dict(zip([r.name for r in res.layers], res.layers))
    assert flat["block_0/attn/out/kernel"].d_in == 64 and flat["block_0/attn/query/kernel"].d_out == 64
    for path, kernel in jax.tree_util.tree_flatten_with_path(res.masks)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name == "patch_embed/kernel":
            assert kernel.all()
        else:
            axes = swapjax.constraints.reduction_axes(name, kernel.shape)
            rest = [a for a in range(kernel.ndim) if a not in axes]
            rows = np.transpose(kernel, list(axes) + rest).reshape(-1, 4, int(np.prod([kernel.shape[a] for a in rest])))
            assert np.all(rows.sum(axis=1) == 2), name
    for leaf in ("cls", "pos_embedding"):
        np.testing.assert_array_equal(res.params[leaf], params[leaf])


# ---------------------------------------------------------------------------
# property test: random conv / dense / attention trees, every layer-wise method and rule

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_constraints import _REDUCTION, _net, _net_loss, _nm_holds  # noqa: E402

LAYER_METHODS = {"Wanda": layerwise.Wanda(), "SparseGPT": layerwise.SparseGPT(block=8),
                 "refit": layerwise.Refit(layerwise.Wanda()), "LR": layerwise.Regression()}
LAYER_RULES = {"uniform": swapjax.LayerBudgets(), "erk": swapjax.LayerBudgets("erk"), "2:4": swapjax.NM(2, 4),
               "1:4": swapjax.NM(1, 4), "4:8": swapjax.NM(4, 8)}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), c_in=st.sampled_from([1, 4]), c_out=st.sampled_from([4, 8]),
       d=st.sampled_from([4, 8]), heads=st.sampled_from([1, 2]), head_dim=st.sampled_from([2, 4]),
       method=st.sampled_from(sorted(LAYER_METHODS)), rule=st.sampled_from(sorted(LAYER_RULES)),
       sequential=st.booleans(), sparsity=st.floats(0.3, 0.9))
def test_property_layerwise_methods_keep_every_rule_exactly(seed, c_in, c_out, d, heads, head_dim, method, rule,
                                                           sequential, sparsity):
    params, batch = _net(seed, c_in, c_out, d, heads, head_dim)
    before = jax.tree_util.tree_map(np.copy, params)
    spec = LAYER_RULES[rule]
    nm = isinstance(spec, swapjax.NM)
    res = swapjax.prune_layerwise(_net_loss, params, batch, sparsity=None if nm else sparsity,
                                  method=LAYER_METHODS[method], constraint=spec, sequential=sequential, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)
    np.testing.assert_array_equal(res.params["Dense_0"]["bias"], params["Dense_0"]["bias"])
    lay = swapjax.pytree.layout(params)
    counts = None if nm else np.asarray(spec.resolve(lay, sparsity).counts)
    for name, axes in _REDUCTION.items():
        mask, w = np.asarray(res.masks[name]["kernel"]), np.asarray(res.params[name]["kernel"])
        assert np.all(w[~mask] == 0)
        if nm:
            assert _nm_holds(mask, axes, spec.n, spec.m), (name, mask.shape)
        else:
            assert mask.sum() == counts[lay.names.index(f"{name}/kernel")], name
