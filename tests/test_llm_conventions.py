"""The conventions of language-model pruning: the first/last layer kept dense (``dense_ends``) in both drivers,
and OWL layer by layer from the dense network's Wanda scores, against a float64 NumPy account of the published
rule (OWL, Yin et al. 2024: D_l = share of S = |W|·‖a‖ above M × mean, s_l = s − (2Λ(D_l − min D)/(max D − min D) − Λ)
shifted to mean s)."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax import layer_methods, walk
from swapjax.models import GPT, next_token_loss

M, LAM = 5.0, 0.08
PRUNE_MODULE = importlib.import_module("swapjax.prune")  # swapjax.prune is the function


# ---------------------------------------------------------------- a 3-layer MLP with planted outliers

def _mlp_loss(params, example):
    h = jnp.tanh(example["x"] @ params["a"]["kernel"])
    h = jnp.tanh(h @ params["b"]["kernel"])
    return jnp.sum((h @ params["c"]["kernel"]) ** 2)


def _mlp(widths=(12, 12, 12, 12), outliers=(12, 4, 0), seed=0):
    """Layers a, b, c (widths[i] → widths[i+1]); ``outliers[l]`` weights of layer l scaled ×25; inputs with
    columns of unequal scale (Wanda's ‖a_i‖ matters)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, d_in, d_out, count in zip("abc", widths[:-1], widths[1:], outliers):
        w = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
        w.ravel()[rng.choice(w.size, count, replace=False)] *= 25
        params[name] = {"kernel": w.astype(np.float32)}
    x = rng.normal(size=(32, widths[0])) * np.linspace(0.5, 3.0, widths[0])
    return params, {"x": x.astype(np.float32)}


def _dense_scores(params, x):
    """{layer: S = |W|·√(Σ_rows a_i²)} in float64 from the DENSE network's inputs."""
    a, out = np.asarray(x, np.float64), {}
    for name in "abc":
        W = np.asarray(params[name]["kernel"], np.float64)
        out[name] = np.abs(W) * np.sqrt(np.sum(a ** 2, axis=0))[:, None]
        a = np.tanh(a @ W)
    return out


def _published_densities(D, s, lam=LAM):
    """The published code's densities (equal-size layers): 2Λ(D − min)/(max − min), minus its mean, plus 1 − s."""
    ratio = (D - D.min()) / (D.max() - D.min()) * lam * 2
    return ratio - ratio.mean() + (1 - s)


def _owl_line(messages):
    line = next(m for m in messages if m.startswith("OWL from the dense network"))
    return {name: (float(d), float(s)) for name, d, s in re.findall(r"(\S+) D=(\S+) s=([0-9.]+)", line)}


@pytest.mark.parametrize("sequential", [True, False])
def test_owl_layer_by_layer_is_the_published_rule_on_the_dense_networks_wanda_scores(sequential):
    params, batch = _mlp()
    scores = _dense_scores(params, batch["x"])
    D = np.array([np.mean(S > M * S.mean()) for S in scores.values()])
    assert D[0] > D[1] > D[2]  # the premise: three distinct ratios, b strictly between
    s = 0.7
    density = _published_densities(D, s)
    before = jax.tree_util.tree_map(np.copy, params)
    messages = []
    res = swapjax.prune_layerwise(_mlp_loss, params, batch, sparsity=s, method=layer_methods.Wanda(),
                                  constraint=swapjax.LayerBudgets("owl"), sequential=sequential,
                                  progress=messages.append)
    reported = _owl_line(messages)
    np.testing.assert_allclose([reported[f"{n}/kernel"][0] for n in "abc"], D, rtol=1e-3)  # .4g in the line
    kept = np.array([r.kept for r in res.layers])
    p_l = np.array([r.d_in * r.d_out for r in res.layers])
    assert np.all(np.abs(kept - density * p_l) < 1.0), (kept, density * p_l)  # largest-remainder rounding
    assert kept.sum() == round((1 - s) * p_l.sum())  # the mean sparsity is s
    assert kept[0] > kept[1] > kept[2]  # more outliers, lower sparsity
    np.testing.assert_allclose(1 - density, [reported[f"{n}/kernel"][1] for n in "abc"], atol=1 / p_l.min())
    for name in "abc":
        mask = np.asarray(res.masks[name]["kernel"])
        assert np.all(np.asarray(res.params[name]["kernel"])[~mask] == 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # the input is never changed


def _layout(sizes):
    return swapjax.pytree.layout({f"l{i}": {"kernel": np.ones(shape, np.float32)} for i, shape in enumerate(sizes)})


def _planted_scores(lay, counts, seed=1):
    """Scores per coordinate: |normal| with ``counts[l]`` entries of layer l × 30 (its outliers)."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.normal(size=lay.size))
    for layer, count in zip(lay.layers, counts):
        at = lay.positions(layer).ravel()
        scores[rng.choice(at, count, replace=False)] *= 30
    return scores


def test_owl_ratios_budgets_and_size_weighted_mean_on_layers_of_unequal_size():
    lay = _layout([(40, 30), (20, 10), (30, 30), (10, 25)])
    scores = _planted_scores(lay, [60, 30, 9, 1])
    sizes = np.array([layer.size for layer in lay.layers], np.float64)
    parts = [scores[lay.positions(layer).ravel()] for layer in lay.layers]
    D = np.array([np.mean(S > M * S.mean()) for S in parts])
    owl = swapjax.LayerBudgets("owl")
    np.testing.assert_array_equal(owl.outlier_ratios(lay, scores), D)
    s = 0.6
    raw = s - (2 * LAM * (D - D.min()) / (D.max() - D.min()) - LAM)  # s_l before the shift
    expected = raw + (s - raw @ sizes / sizes.sum())  # one constant: Σ s_l·p_l/p = s (closed form, no cap binds)
    got = 1 - owl.densities(lay, s, scores=scores)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got @ sizes / sizes.sum() == pytest.approx(s, abs=1e-12)
    counts = np.asarray(owl.resolve(lay, s, scores=scores).counts)
    assert counts.sum() == round((1 - s) * sizes.sum()) and np.all(np.abs(counts - (1 - expected) * sizes) < 1)
    # owl_group pools the scores of the layers with one key into one ratio, so they share one sparsity
    grouped = swapjax.LayerBudgets("owl", owl_group=lambda name: "front" if name in ("l0/kernel", "l1/kernel") else name)
    pooled = np.concatenate(parts[:2])
    D_front = np.mean(pooled > M * pooled.mean())
    np.testing.assert_array_equal(grouped.outlier_ratios(lay, scores), [D_front, D_front, D[2], D[3]])
    got = 1 - grouped.densities(lay, s, scores=scores)
    assert got[0] == pytest.approx(got[1], abs=1e-12) and got @ sizes / sizes.sum() == pytest.approx(s, abs=1e-12)


def test_owl_caps_bind_and_the_free_layers_share_one_shift():
    lay = _layout([(40, 30), (20, 10), (30, 30), (10, 25), (16, 16)])
    scores = _planted_scores(lay, [80, 12, 20, 1, 0])
    sizes = np.array([layer.size for layer in lay.layers], np.float64)
    s, low, high = 0.7, 0.66, 0.75
    owl = swapjax.LayerBudgets("owl", min_sparsity=low, max_sparsity=high)
    got = 1 - owl.densities(lay, s, scores=scores)
    assert np.all(got >= low - 1e-12) and np.all(got <= high + 1e-12)
    assert got @ sizes / sizes.sum() == pytest.approx(s, abs=1e-9)
    unclipped = 1 - swapjax.LayerBudgets("owl").densities(lay, s, scores=scores)
    assert unclipped.min() < low and unclipped.max() > high  # the premise: both caps bind
    free = (got > low + 1e-9) & (got < high - 1e-9)
    assert free.sum() >= 2
    shift = got[free] - unclipped[free]
    np.testing.assert_allclose(shift, shift[0], atol=1e-9)  # one constant for every layer the caps leave free
    D = owl.outlier_ratios(lay, scores)
    order = np.argsort(D)
    assert np.all(np.diff(got[order]) <= 1e-12)  # more outliers, never a higher sparsity
    assert owl.label == "per-layer OWL, cap 0.75, floor 0.66"


def test_owl_caps_in_the_driver_and_their_errors_before_any_pass(monkeypatch):
    params, batch = _mlp()
    res = swapjax.prune_layerwise(_mlp_loss, params, batch, sparsity=0.7, method=layer_methods.Wanda(),
                                  constraint=swapjax.LayerBudgets("owl", max_sparsity=0.72, min_sparsity=0.66),
                                  progress=False)
    for r in res.layers:
        assert 0.66 - 1 / (r.d_in * r.d_out) <= 1 - r.kept / (r.d_in * r.d_out) <= 0.72 + 1 / (r.d_in * r.d_out)
    assert res.summary()["total"]["kept"] == round(0.3 * 3 * 144)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the batch ran")

    monkeypatch.setattr(walk, "Walk", no_pass)
    with pytest.raises(ValueError, match="min_sparsity: every leaf at least 0.8 sparse cannot reach sparsity 0.7"):
        swapjax.prune_layerwise(_mlp_loss, params, batch, sparsity=0.7,
                                constraint=swapjax.LayerBudgets("owl", min_sparsity=0.8), progress=False)
    with pytest.raises(ValueError, match="max_sparsity: every leaf at most 0.6 sparse cannot reach sparsity 0.7"):
        swapjax.prune_layerwise(_mlp_loss, params, batch, sparsity=0.7,
                                constraint=swapjax.LayerBudgets("owl", max_sparsity=0.6), progress=False)
    with pytest.raises(ValueError, match="min_sparsity: 0.8 is above max_sparsity 0.7"):
        swapjax.LayerBudgets("owl", min_sparsity=0.8, max_sparsity=0.7)
    with pytest.raises(ValueError, match=r"min_sparsity: 0.5 is above the sparsity given for b/kernel \(0.3\)"):
        swapjax.LayerBudgets({"a/kernel": 0.6, "b/kernel": 0.3}, min_sparsity=0.5)
    with pytest.raises(ValueError, match="owl_group: expected None or a function"):
        swapjax.LayerBudgets("owl", owl_group="blocks")

    class FisherBudgets(swapjax.LayerBudgets):  # any other constraint on the Fisher is still refused
        needs_fisher = True

    with pytest.raises(ValueError, match="needs the Fisher"):
        swapjax.prune_layerwise(_mlp_loss, params, batch, constraint=FisherBudgets(), progress=False)


# ---------------------------------------------------------------- dense_ends

V, T = 11, 8
GPT_MODEL = GPT(vocab=V, d_model=16, n_layers=2, n_heads=2, max_len=T)
GPT_LOSS = next_token_loss(GPT_MODEL)


@pytest.fixture(scope="module")
def gpt():
    params = jax.jit(GPT_MODEL.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    tokens = np.random.default_rng(0).integers(0, V, (8, T + 1)).astype(np.int32)
    return params, {"tokens": tokens}


def test_the_lm_head_kept_dense_layer_by_layer_is_the_head_left_out(gpt, capsys):
    params, batch = gpt
    found = swapjax.find_layers(GPT_LOSS, params, batch)
    assert found.layers[-1].name == "head/kernel"
    res = swapjax.prune_layerwise(GPT_LOSS, params, batch, method=layer_methods.Wanda(), dense_ends="last")
    line = capsys.readouterr().err.splitlines()[0]
    assert "left dense: " in line and "head/kernel (the last layer, dense_ends)" in line, line
    assert "head/kernel" not in [r.name for r in res.layers] and len(res.layers) == len(found.layers) - 1
    np.testing.assert_array_equal(res.params["head"]["kernel"], params["head"]["kernel"])
    assert res.masks["head"]["kernel"] is None
    total = res.summary()["total"]  # over the layers pruned: each at s = 0.5
    assert total["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert total["total"] == sum(layer.size for layer in found.layers[:-1])
    out = swapjax.prune_layerwise(GPT_LOSS, params, batch, method=layer_methods.Wanda(),
                                  select=swapjax.exclude("head"), progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, res.params, out.params)


def test_the_first_layer_kept_dense_and_both_ends():
    params, batch = _mlp()
    res = swapjax.prune_layerwise(_mlp_loss, params, batch, method=layer_methods.Wanda(), dense_ends="first",
                                  progress=False)
    assert [r.name for r in res.layers] == ["b/kernel", "c/kernel"]
    np.testing.assert_array_equal(res.params["a"]["kernel"], params["a"]["kernel"])
    messages = []
    res = swapjax.prune_layerwise(_mlp_loss, params, batch, method=layer_methods.Wanda(), dense_ends=("last", "first"),
                                  progress=messages.append)
    assert [r.name for r in res.layers] == ["b/kernel"]
    assert messages[0].endswith("left dense: a/kernel (the first layer, dense_ends), c/kernel (the last layer, "
                                "dense_ends)"), messages[0]
    # an end that select leaves out already: nothing more is kept dense
    res = swapjax.prune_layerwise(_mlp_loss, params, batch, method=layer_methods.Wanda(), dense_ends="last",
                                  select=swapjax.exclude("c"), progress=False)
    assert [r.name for r in res.layers] == ["a/kernel", "b/kernel"]


def test_the_network_wide_driver_keeps_the_ends_dense(capsys):
    params, batch = _mlp()
    res = swapjax.prune(_mlp_loss, params, batch, sparsity=0.5, method=swapjax.Magnitude(), dense_ends="last")
    err = capsys.readouterr().err
    assert "kept dense (dense_ends): c/kernel (the last layer)" in err, err
    assert res.masks["c"]["kernel"] is None
    np.testing.assert_array_equal(res.params["c"]["kernel"], params["c"]["kernel"])
    assert res.summary()["total"]["total"] == 288 and res.summary()["total"]["kept"] == 144
    out = swapjax.prune(_mlp_loss, params, batch, sparsity=0.5, method=swapjax.Magnitude(),
                        select=swapjax.exclude("c"), progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, res.params, out.params)
    res = swapjax.prune(_mlp_loss, params, batch, sparsity=0.5, method=swapjax.Magnitude(),
                        dense_ends=["first", "last"], progress=False)
    assert res.masks["a"]["kernel"] is None and res.summary()["total"]["total"] == 144


def _stack_loss(params, example):
    ys = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), example["x"], params["w"])[0]
    return jnp.sum((ys @ params["head"]["kernel"]) ** 2)


@pytest.mark.parametrize("driver", ["layerwise", "prune"])
def test_dense_ends_errors_come_before_any_pass(driver, monkeypatch):
    run = (swapjax.prune_layerwise if driver == "layerwise" else
           lambda *a, **k: swapjax.prune(*a, method=swapjax.Magnitude(), **k))
    params, batch = _mlp()
    for bad in ("middle", ("first", "fist"), 1, {"last"}):
        with pytest.raises(ValueError, match=r"dense_ends: expected None, 'first', 'last' or \('first', 'last'\)"):
            run(_mlp_loss, params, batch, dense_ends=bad, progress=False)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the batch ran")

    monkeypatch.setattr(walk, "Walk", no_pass)
    monkeypatch.setattr(PRUNE_MODULE.memory, "estimate", no_pass)
    with pytest.raises(ValueError, match=r"dense_ends: \('first', 'last'\) keeps every prunable layer dense "
                                         r"\(a/kernel, c/kernel\): nothing left to prune"):
        run(_mlp_loss, params, batch, dense_ends=("first", "last"), select=swapjax.exclude("b"), progress=False)
    one = {"w": params["a"]["kernel"]}
    with pytest.raises(ValueError, match="nothing left to prune"):
        run(lambda p, ex: jnp.sum(ex["x"] @ p["w"]), one, batch, dense_ends="last", progress=False)
    rng = np.random.default_rng(2)
    stacked = {"w": rng.normal(size=(3, 12, 12)).astype(np.float32), "head": {"kernel": params["c"]["kernel"]}}
    with pytest.raises(ValueError, match=r"dense_ends: the first layer w\[0\] is one of several layers of the leaf w "
                                         r"\(w\[1\], w\[2\] would be pruned\).*select=swapjax.exclude\('w'\)"):
        run(_stack_loss, stacked, batch, dense_ends="first", progress=False)
