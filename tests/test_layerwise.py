"""The layer-wise driver, ``swapjax.prune_layerwise``: each layer from the Gram of its own inputs (the layer
methods on one layer are tested in tests/test_layer_methods.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax import layer_methods, layerwise, walk


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
    conv, _ = layer_methods.sparsegpt(params["Conv_0"]["kernel"].reshape(36, 4), (patches.T @ patches).astype(np.float32),
                                      layer_methods.nm_groups(2, 4, 36, 4))
    np.testing.assert_allclose(res.params["Conv_0"]["kernel"].reshape(36, 4), conv, rtol=1e-4, atol=1e-5)
    _, h = _np_conv_inputs(params, x, np.asarray(res.params["Conv_0"]["kernel"]) if sequential
                           else params["Conv_0"]["kernel"])
    dense, _ = layer_methods.sparsegpt(params["Dense_0"]["kernel"], (h.T @ h).astype(np.float32),
                                       layer_methods.nm_groups(2, 4, *params["Dense_0"]["kernel"].shape))
    np.testing.assert_allclose(res.params["Dense_0"]["kernel"], dense, rtol=1e-4, atol=1e-5)
    assert [r.rows for r in res.layers] == [12 * 25, 12]
    for name in ("Conv_0", "Dense_0"):
        mask = np.asarray(res.masks[name]["kernel"])
        assert np.all(np.asarray(res.params[name]["kernel"])[~mask] == 0)
        assert np.all(mask.reshape(-1, 4, mask.shape[-1]).sum(axis=1) == 2)
    np.testing.assert_array_equal(res.params["Conv_0"]["bias"], params["Conv_0"]["bias"])


def test_layer_budgets_and_the_drivers_errors():
    params, batch = _conv_net(1)
    res = layerwise.prune_layerwise(_conv_loss, params, batch, sparsity=0.7, method=layer_methods.Wanda(),
                                    constraint=swapjax.LayerBudgets("erk"), progress=False)
    lay = swapjax.pytree.layout(params)
    expected = np.asarray(swapjax.LayerBudgets("erk").resolve(lay, 0.7).counts)
    assert [r.kept for r in res.layers] == [int(expected[lay.names.index(r.name)]) for r in res.layers]
    assert res.summary()["total"]["kept"] == int(expected.sum())
    with pytest.raises(ValueError, match="constraint: global top-k ranks weights across layers, so Conv_0/kernel has "
                                         "no budget of its own"):
        layerwise.prune_layerwise(_conv_loss, params, batch, constraint=swapjax.TopK(), progress=False)
    with pytest.raises(ValueError, match=r"NM: Conv_0/kernel \(3, 3, 4, 4\) sums over 36 inputs.*not a multiple of m = 8"):
        layerwise.prune_layerwise(_conv_loss, params, batch, constraint=swapjax.NM(4, 8, ragged="error"), progress=False)
    with pytest.raises(ValueError, match="method: expected a swapjax method"):
        layerwise.prune_layerwise(_conv_loss, params, batch, method=object(), progress=False)


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

LAYER_METHODS = {"Wanda": layer_methods.Wanda(), "SparseGPT": layer_methods.SparseGPT(block=8),
                 "refit": layer_methods.Refit(layer_methods.Wanda()), "LR": layer_methods.Regression()}
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
    lay = swapjax.pytree.layout(params)
    if nm and len(spec.ragged_leaves(lay)) == len(lay.names):  # nothing to prune: an error, as in swapjax.prune
        with pytest.raises(ValueError, match=f"constraint: {spec.label} leaves every prunable layer dense"):
            swapjax.prune_layerwise(_net_loss, params, batch, method=LAYER_METHODS[method], constraint=spec,
                                    progress=False)
        return
    res = swapjax.prune_layerwise(_net_loss, params, batch, sparsity=None if nm else sparsity,
                                  method=LAYER_METHODS[method], constraint=spec, sequential=sequential, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)
    np.testing.assert_array_equal(res.params["Dense_0"]["bias"], params["Dense_0"]["bias"])
    counts = None if nm else np.asarray(spec.resolve(lay, sparsity).counts)
    for name, axes in _REDUCTION.items():
        mask, w = np.asarray(res.masks[name]["kernel"]), np.asarray(res.params[name]["kernel"])
        assert np.all(w[~mask] == 0)
        if nm:
            assert _nm_holds(mask, axes, spec.n, spec.m), (name, mask.shape)
        else:
            assert mask.sum() == counts[lay.names.index(f"{name}/kernel")], name


# ---------------------------------------------------------------------------
# other dtypes, bad data, dead inputs, the checks of every result, first calls (issue 32)

import collections  # noqa: E402

import flax.linen as nn  # noqa: E402


class _MLP(nn.Module):
    """16 → 32 → 32 → 8, computing in ``dtype`` (None: Flax's promotion of inputs and kernels)."""

    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(32, dtype=self.dtype)(x))
        return nn.Dense(8, dtype=self.dtype)(x)


_MLP_X = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)
_MLP_PARAMS = _MLP().init(jax.random.key(0), _MLP_X[:1])["params"]
_MLP_NAMES = ("Dense_0", "Dense_1", "Dense_2")


def _mlp_loss(params, example):
    return jnp.sum(_MLP().apply({"params": params}, example["x"][None]).astype(jnp.float32) ** 2)


def _mlp_bf16_loss(params, example):
    return jnp.sum(_MLP(jnp.bfloat16).apply({"params": params}, example["x"][None]).astype(jnp.float32) ** 2)


class _Counting:
    """A loss that counts how often it runs (a debug callback: the traces that find the layers do not count)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, params, example):
        jax.debug.callback(self._ran)
        return self.fn(params, example)

    def _ran(self):
        self.calls += 1


def _small_net(seed=0):
    """The docstring's two dense layers: 8 → 6 (48 weights) → 2 (12 weights)."""
    rng = np.random.default_rng(seed)
    params = {"Dense_0": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)},
              "Dense_1": {"kernel": rng.normal(size=(6, 2)).astype(np.float32)}}
    return params, {"x": rng.normal(size=(32, 8)).astype(np.float32)}


def _small_loss(params, example):
    return jnp.sum(jnp.tanh(example["x"] @ params["Dense_0"]["kernel"]) @ params["Dense_1"]["kernel"]) ** 2


@pytest.mark.parametrize("dtype, method", [("bfloat16", "SparseGPT"), ("bfloat16", "Regression"),
                                           ("float16", "SparseGPT")])
def test_low_precision_kernels_are_found_and_pruned_in_their_dtype(dtype, method):
    """bfloat16 / float16 kernels that Flax casts to float32 before the product: every layer found and
    pruned, the result in the kernels' dtype with the rule exactly, against the float32 prune of the same
    values. The first layer sees the same inputs, so the same H: the same mask, and weights within the
    dtype's rounding (2⁻⁸ relative for bfloat16, 2⁻¹¹ for float16); the later layers see inputs that
    differ by that rounding: masks agree on ≥ 90 % of the weights."""
    low = jax.tree_util.tree_map(lambda a: a.astype(dtype), _MLP_PARAMS)
    same_values = jax.tree_util.tree_map(lambda a: a.astype(np.float32), low)
    spec = {"SparseGPT": layer_methods.SparseGPT(), "Regression": None}[method]
    res = swapjax.prune_layerwise(_mlp_loss, low, {"x": _MLP_X}, sparsity=0.5, method=spec, progress=False)
    ref = swapjax.prune_layerwise(_mlp_loss, same_values, {"x": _MLP_X}, sparsity=0.5, method=spec, progress=False)
    assert [r.name for r in res.layers] == [f"{name}/kernel" for name in _MLP_NAMES]
    rounding = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[dtype]
    for i, name in enumerate(_MLP_NAMES):
        w, mask = res.params[name]["kernel"], np.asarray(res.masks[name]["kernel"])
        assert w.dtype == jnp.dtype(dtype) and res.params[name]["bias"].dtype == jnp.dtype(dtype)
        w = np.asarray(w.astype(np.float32))
        assert mask.sum() == mask.size // 2 and np.all(w[~mask] == 0)
        ref_mask, ref_w = np.asarray(ref.masks[name]["kernel"]), np.asarray(ref.params[name]["kernel"])
        if i == 0:
            np.testing.assert_array_equal(mask, ref_mask)
            np.testing.assert_allclose(w, ref_w, rtol=0, atol=rounding * np.abs(ref_w).max())
        else:
            assert np.mean(mask == ref_mask) >= 0.9, (name, np.mean(mask == ref_mask))


def test_float32_kernels_used_in_bfloat16_are_found_and_their_gram_is_float32():
    """Dense(dtype=bfloat16) on float32 params: kernels cast to bfloat16, inputs bfloat16. Every layer is
    found, the result stays float32, the masks agree with the float32 network's on ≥ 90 % of the weights;
    H is the float32 Gram of the bfloat16 inputs (float64 NumPy reference), not a bfloat16 one."""
    res = swapjax.prune_layerwise(_mlp_bf16_loss, _MLP_PARAMS, {"x": _MLP_X}, sparsity=0.5,
                                  method=layer_methods.SparseGPT(), progress=False)
    ref = swapjax.prune_layerwise(_mlp_loss, _MLP_PARAMS, {"x": _MLP_X}, sparsity=0.5, method=layer_methods.SparseGPT(),
                                  progress=False)
    assert [r.name for r in res.layers] == [f"{name}/kernel" for name in _MLP_NAMES]
    for name in _MLP_NAMES:
        mask = np.asarray(res.masks[name]["kernel"])
        assert res.params[name]["kernel"].dtype == jnp.float32 and mask.sum() == mask.size // 2
        assert np.mean(mask == np.asarray(ref.masks[name]["kernel"])) >= 0.9
    H, rows = swapjax.layer_grams(_mlp_bf16_loss, _MLP_PARAMS, {"x": _MLP_X}, chunk_size=20)["Dense_0/kernel"]
    A = np.asarray(jnp.asarray(_MLP_X, jnp.bfloat16)).astype(np.float64)
    assert H.dtype == jnp.float32 and rows == 48
    np.testing.assert_allclose(np.asarray(H), A.T @ A, rtol=1e-5, atol=1e-5 * np.abs(A.T @ A).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("method", ["SparseGPT", "Regression"])
def test_nan_or_inf_in_the_batch_is_refused_before_any_trace(bad, method):
    params, batch = _small_net()
    batch["x"][3, 2] = bad
    loss = _Counting(_small_loss)
    with pytest.raises(ValueError, match=r"batch: NaN or inf in x \(1 of 256 entries, examples \[3\]\); the calibration examples "
                                         r"must be finite"):
        swapjax.prune_layerwise(loss, params, batch, method={"SparseGPT": layer_methods.SparseGPT(),
                                                             "Regression": None}[method], progress=False)
    assert loss.calls == 0


def test_non_finite_layer_inputs_name_the_layer():
    """Finite params and batch, but a forward pass that overflows before Dense_1: a ValueError naming
    Dense_1/kernel, after Dense_0 was solved (the inputs of a layer are known only from the pass)."""
    params, batch = _small_net()

    def overflowing(params, example):
        h = jnp.exp(80.0 * (example["x"] @ params["Dense_0"]["kernel"]))  # inf for some examples in float32
        return jnp.sum(h @ params["Dense_1"]["kernel"]) ** 2

    with pytest.raises(ValueError, match=r"loss_fn: the inputs of layer Dense_1/kernel hold NaN or inf on the batch"):
        swapjax.prune_layerwise(overflowing, params, batch, method=layer_methods.SparseGPT(), progress=False)


def test_the_driver_prunes_a_layer_whose_inputs_never_fire():
    """All-zero calibration inputs under the default method: both layers W = 0 (the second's inputs are
    tanh(0) = 0 too), the budget kept exactly; before, "X: ... overflow float32"."""
    params, batch = _small_net()
    batch = {"x": np.zeros_like(batch["x"])}
    res = swapjax.prune_layerwise(_small_loss, params, batch, progress=False)
    assert [r.kept for r in res.layers] == [24, 6] and [r.error for r in res.layers] == [0.0, 0.0]
    for name in ("Dense_0", "Dense_1"):
        assert np.all(np.asarray(res.params[name]["kernel"]) == 0)


class _LayerResult(swapjax.Method):
    """A method on the layer's Gram returning ``result(W̄, H, groups) -> (W, mask)`` as (w, info) as it is."""

    needs = "H"

    def solve_problem(self, problem):
        W, mask = self.result(problem.w_bar.reshape(problem.shape), problem.H, problem.groups)
        return W, SimpleNamespace(support=mask)


class _KeepAll(_LayerResult):
    def result(self, W, H, groups):
        return W.ravel(), jnp.ones(W.size, bool)


class _NaNs(_LayerResult):
    def result(self, W, H, groups):
        w, mask = layer_methods.wanda(W, H, groups)
        return jnp.where(mask, jnp.nan, 0.0).ravel(), mask.ravel()


class _Transposed(_LayerResult):
    def result(self, W, H, groups):
        w, mask = layer_methods.wanda(W, H, groups)
        return w.T[:-1], mask.T[:-1]


class _DenseUnderMask(_LayerResult):
    def result(self, W, H, groups):
        return W.ravel(), layer_methods.wanda(W, H, groups)[1].ravel()


class _IntMask(_LayerResult):
    def result(self, W, H, groups):
        w, mask = layer_methods.wanda(W, H, groups)
        return w.ravel(), mask.ravel().astype(jnp.int32)


class _FirstInputs(_LayerResult):
    """Keeps the layer's count, but as its first rows: 4 of 4 in the first group of each unit, 0 in the next."""

    def result(self, W, H, groups):
        mask = np.zeros(W.size, bool)
        mask[:W.size // 2] = True
        return jnp.where(mask, W.ravel(), 0), jnp.asarray(mask)


@pytest.mark.parametrize("method, constraint, message", [
    (_KeepAll(), None, r"method: _KeepAll on layer Dense_0/kernel keeps 48 weights with 1 of its 1 groups off their "
                       r"counts \(per-layer uniform\)"),
    (_NaNs(), None, r"method: _NaNs on layer Dense_0/kernel returned 24 NaN or inf weights of 48"),
    (_Transposed(), None, r"method: _Transposed on layer Dense_0/kernel returned w of shape \(5, 8\) and info.support "
                          r"of shape \(5, 8\); expected 48 entries each, the layer \(8, 6\) row-major"),
    (_DenseUnderMask(), None, r"method: _DenseUnderMask on layer Dense_0/kernel returned 24 non-zero weights where "
                              r"its mask prunes; pruned weights must be exactly 0"),
    (_IntMask(), None, r"method: _IntMask on layer Dense_0/kernel returned a mask of dtype int32; expected booleans"),
    (_FirstInputs(), swapjax.NM(2, 4), r"method: _FirstInputs on layer Dense_0/kernel keeps 2:4 in 0 of its 12 groups "
                                       r"of 4 inputs; every group must keep exactly 2"),
])
def test_the_driver_checks_every_methods_result(method, constraint, message):
    params, batch = _small_net()
    with pytest.raises(ValueError, match=message):
        swapjax.prune_layerwise(_small_loss, params, batch, method=method, constraint=constraint, progress=False)


def test_a_layer_that_would_keep_nothing_is_refused_before_any_trace():
    """At 0.99 the 12-weight Dense_1 gets 0 of k = 1: refused, naming it, before loss_fn is called (it
    raised "k: every group's count ... got k = 0 (global top-k)" after the first layer's solve). The
    way out the message names, a budget of its own, then prunes both layers as given."""
    params, batch = _small_net()
    loss = _Counting(_small_loss)
    with pytest.raises(ValueError, match=r"Dense_1/kernel \(6, 2\) would keep 0 weights .*lower the sparsity"):
        swapjax.prune_layerwise(loss, params, batch, sparsity=0.99, progress=False)
    assert loss.calls == 0
    own = swapjax.LayerBudgets({"Dense_0/kernel": 0.98, "Dense_1/kernel": 0.9})  # round(0.96) and round(1.2)
    res = swapjax.prune_layerwise(loss, params, batch, method=layer_methods.Wanda(), constraint=own, progress=False)
    assert [r.kept for r in res.layers] == [1, 1]


def test_a_mapping_of_layer_sparsities_is_taken_as_given():
    """LayerBudgets({path: 0.25, ...}) without a sparsity: each layer keeps 75 % (36 of 48, 9 of 12), not
    the default 0.5's half; a sparsity that disagrees with the mapping's mean is refused before any trace."""
    params, batch = _small_net()
    given = swapjax.LayerBudgets({"Dense_0/kernel": 0.25, "Dense_1/kernel": 0.25})
    res = swapjax.prune_layerwise(_small_loss, params, batch, method=layer_methods.Wanda(), constraint=given,
                                  progress=False)
    assert [r.kept for r in res.layers] == [36, 9] and res.summary()["total"]["sparsity"] == 0.25
    loss = _Counting(_small_loss)
    with pytest.raises(ValueError, match=r"sparsity: 0.5 disagrees with the mapping's size-weighted mean 0.25"):
        swapjax.prune_layerwise(loss, params, batch, sparsity=0.5, constraint=given, progress=False)
    assert loss.calls == 0


@pytest.mark.parametrize("case", ["ragged error", "class"])
def test_argument_errors_come_before_any_trace(case):
    params, batch = _small_net()
    kwargs, error, message = {}, ValueError, None
    if case == "ragged error":
        kwargs["constraint"] = swapjax.NM(2, 4, ragged="error")
        message = r"NM: Dense_1/kernel \(6, 2\) sums over 6 inputs"
    else:
        kwargs["method"], error, message = layer_methods.Wanda, TypeError, r"method: got the class Wanda; pass an instance"
    loss = _Counting(_small_loss)
    with pytest.raises(error, match=message):
        swapjax.prune_layerwise(loss, params, batch, progress=False, **kwargs)
    assert loss.calls == 0


def _leftovers_params():
    rng = np.random.default_rng(3)
    f = lambda *s: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    return {"a": {"kernel": f(8, 8)}, "b": {"kernel": f(6, 8)}, "tied": {"kernel": f(8, 8)},
            "scaled": {"kernel": f(8, 8)}, "unused": {"kernel": f(8, 8)}, "head": {"kernel": f(8, 4)}}


def _leftovers_loss(params, example):
    h = jnp.tanh(example["x"] @ params["a"]["kernel"])
    h = jnp.concatenate([h[:6] @ params["b"]["kernel"], h[6:]])[:8]  # b: 6 inputs, ragged for 2:4
    h = jnp.tanh(h @ params["tied"]["kernel"])
    h = jnp.tanh(h @ params["tied"]["kernel"])  # used twice
    h = h @ (2.0 * params["scaled"]["kernel"])  # not a layer's kernel as it is
    return jnp.sum((h @ params["head"]["kernel"]) ** 2)


def test_the_progress_line_names_every_leaf_left_dense_and_why(capsys):
    params = _leftovers_params()
    batch = {"x": np.random.default_rng(4).normal(size=(16, 8)).astype(np.float32)}
    res = swapjax.prune_layerwise(_leftovers_loss, params, batch, method=layer_methods.Wanda(), constraint=swapjax.NM(2, 4),
                                  select=swapjax.exclude("head"))
    assert [r.name for r in res.layers] == ["a/kernel"]
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("[swapjax] Wanda layer by layer (sequential): 1 layers, N=16 examples, 2:4; left dense: ")
    dense = line.split("; left dense: ", 1)[1]
    assert dense == ("b/kernel (ragged for 2:4: 6 inputs), scaled/kernel (not a layer: used otherwise than as an "
                     "operand of a product with the data (gathered, added or scaled)), tied/kernel (used by 2 products "
                     "(tied or shared weights)), unused/kernel (not used by loss_fn), head/kernel (left out by select)"), dense
    with pytest.raises(ValueError, match=r"select: chose tied/kernel \(8, 8\) \(used by 2 products \(tied or shared "
                                         r"weights\)\), which are not layers' weights"):
        swapjax.prune_layerwise(_leftovers_loss, params, batch, select=lambda path, leaf: path == "tied/kernel")
    for name in ("b", "tied", "scaled", "unused", "head"):
        np.testing.assert_array_equal(res.params[name]["kernel"], params[name]["kernel"])


def _stack_loss(params, example):
    h = example["x"]
    for name in sorted(params):
        h = jnp.tanh(h @ params[name]["kernel"])
    return jnp.sum(h ** 2)


def _stack(depth, seed=0):
    """In 11 → 13, then ``depth`` layers 13 → 13, then 13 → 7: three layer shapes, two input widths.
    Dimensions no other test uses, so the compilations counted are this test's."""
    rng = np.random.default_rng(seed)
    dims = [11] + [13] * (depth + 1) + [7]
    return {f"Dense_{i:02d}": {"kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)}
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}


class _Traces:
    """Counts the traces of each jitted function by name (JAX's monitoring events), in a ``with`` block.
    A trace precedes every compilation (even one read back from a persistent compilation cache)."""

    def __enter__(self):
        self.counts = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self.counts

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            self.counts[kwargs.get("fun_name")] += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.mark.parametrize("method", ["Wanda", "SparseGPT"])
def test_compilations_are_per_layer_shape_not_per_layer(method):
    """A network whose layers repeat three shapes: the walk's segments (a layer and its activation up to the
    next layer's input) are compiled once per structure, the solve once per layer shape, and a deeper
    network with the same shapes compiles no segment and no solve at all (segments are shared by
    structure, across loss functions). Before, each layer's Gram compiled a function of its own and
    SparseGPT one per kept count."""
    spec = {"Wanda": layer_methods.Wanda(), "SparseGPT": layer_methods.SparseGPT()}[method]
    batch = {"x": np.random.default_rng(1).normal(size=(20, 11)).astype(np.float32)}
    grams, solves = [], []
    for depth in (2, 5):
        with _Traces() as traces:  # a new loss function: its Grams compile anew
            res = swapjax.prune_layerwise(lambda p, ex: _stack_loss(p, ex), _stack(depth), batch, sparsity=0.5,
                                          method=spec, progress=False)
        assert len(res.layers) == depth + 2
        grams.append(traces["segment"])
        solves.append(traces[f"_{method.lower()}"])
    assert grams[0] <= 4 and grams[1] == 0, grams  # the input's, the first, the repeated and the last layer's
    assert solves[1] == 0 and solves[0] <= 3, solves  # 11×13, 13×13, 13×7 (fewer where an earlier test compiled one)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (T, 8)
        h = x + nn.SelfAttention(num_heads=2, name="attn")(x[None])[0]
        return nn.Dense(8, name="fc")(jnp.tanh(h))


def test_projections_of_one_input_share_one_gram(monkeypatch):
    """q, k and v read the same rows A: sequential pruning computes their Gram once (pruning q cannot change
    the input it reads), so the five layers take three Gram passes; the result is the same as from a Gram
    per layer (sequential=False computes each from the dense network, which for q, k, v is the same A)."""
    x = np.random.default_rng(2).normal(size=(12, 5, 8)).astype(np.float32)
    model = _Attention()
    params = model.init(jax.random.key(0), x[0])["params"]
    loss = lambda p, ex: jnp.sum(model.apply({"params": p}, ex["x"]) ** 2)  # noqa: E731
    calls = []
    advance = walk.Walk.advance
    monkeypatch.setattr(walk.Walk, "advance", lambda *a, **k: calls.append(1) or advance(*a, **k))
    res = swapjax.prune_layerwise(loss, params, {"x": x}, method=layer_methods.Wanda(), progress=False)
    assert [r.name for r in res.layers] == ["attn/query/kernel", "attn/key/kernel", "attn/value/kernel",
                                            "attn/out/kernel", "fc/kernel"]
    assert len(calls) == 3, calls
    dense = swapjax.prune_layerwise(loss, params, {"x": x}, method=layer_methods.Wanda(), sequential=False, progress=False)
    for name in ("query", "key", "value"):
        np.testing.assert_array_equal(res.masks["attn"][name]["kernel"], dense.masks["attn"][name]["kernel"])


def _proj_loss(params, example):
    h = jnp.tanh(jnp.einsum("d,dhk->hk", example["x"], params["proj"]["kernel"]))  # contracts axis 0 alone
    return jnp.sum(h.reshape(-1) @ params["head"]["kernel"]) ** 2


def test_nm_runs_along_the_axes_each_layer_contracts(monkeypatch, capsys):
    """A 3-D kernel (8, 2, 4) used as einsum("d,dhk->hk"): its product contracts axis 0 alone, so its 2:4
    groups run along axis 0 (the name rule, which guessed (0, 1) for a 3-D kernel, is not used where the
    loss says). NM(axes=(0, 1)), the groups of other axes than the layer's inputs, leaves it dense and named
    layer by layer, an error under ragged="error" (before any Gram pass)."""
    rng = np.random.default_rng(6)
    params = {"proj": {"kernel": rng.normal(size=(8, 2, 4)).astype(np.float32)},
              "head": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}
    batch = {"x": rng.normal(size=(16, 8)).astype(np.float32)}
    res = swapjax.prune_layerwise(_proj_loss, params, batch, method=layer_methods.Wanda(), constraint=swapjax.NM(2, 4))
    assert [r.name for r in res.layers] == ["proj/kernel", "head/kernel"] and res.input_axes["proj/kernel"] == (0,)
    mask = np.asarray(res.masks["proj"]["kernel"])
    assert np.all(mask.reshape(2, 4, 2, 4).sum(axis=1) == 2)  # every 4 consecutive inputs (axis 0) keep 2
    per_leaf = swapjax.NM(2, 4, axes=lambda path, shape: (0, 1) if len(shape) == 3 else (0,))
    capsys.readouterr()
    res = swapjax.prune_layerwise(_proj_loss, params, batch, method=layer_methods.Wanda(), constraint=per_leaf)
    assert [r.name for r in res.layers] == ["head/kernel"]
    np.testing.assert_array_equal(res.params["proj"]["kernel"], params["proj"]["kernel"])
    assert "left dense: proj/kernel (2:4 along other axes than its inputs (0,))" in capsys.readouterr().err
    passes = []
    advance = walk.Walk.advance
    monkeypatch.setattr(walk.Walk, "advance", lambda *a, **k: passes.append(1) or advance(*a, **k))
    with pytest.raises(ValueError, match=r"constraint: 2:4 groups proj/kernel along other axes than the layer's "
                                         r"inputs \(0,\) \(the axes its product contracts\)"):
        swapjax.prune_layerwise(_proj_loss, params, batch, constraint=swapjax.NM(2, 4, axes=per_leaf.axes,
                                                                                  ragged="error"), progress=False)
    assert passes == []
