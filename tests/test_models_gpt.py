"""swapjax.models.GPT: causality, its weight count against the closed form, next_token_loss against a
float64 NumPy cross-entropy, the layers found by use, a bfloat16 model; swapjax.perplexity against the float64
forward pass and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax.models import GPT, next_token_loss

V, D, L, H, T = 11, 16, 2, 2, 8
MODEL = GPT(vocab=V, d_model=D, n_layers=L, n_heads=H, max_len=T)
LOSS = next_token_loss(MODEL)  # one function object: its traces and compilations are shared across tests


@pytest.fixture(scope="module")
def params():
    params = jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    # non-zero biases and norms, so that each enters the computations checked here
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda w: (w + 0.1 * rng.normal(size=w.shape)).astype(np.float32), params)


def _tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def test_logits_at_t_do_not_depend_on_tokens_after_t(params):
    tokens = _tokens(0, (1, T))
    logits = np.asarray(MODEL.apply({"params": params}, tokens))
    for t in (0, 3, T - 2):
        changed = tokens.copy()
        changed[0, t + 1:] = (changed[0, t + 1:] + 1 + np.arange(T - t - 1)) % V
        other = np.asarray(MODEL.apply({"params": params}, changed))
        np.testing.assert_array_equal(other[0, :t + 1], logits[0, :t + 1])
        assert np.abs(other[0, t + 1] - logits[0, t + 1]).max() > 1e-3  # the next position does see the change


def test_weight_count_is_the_closed_form(params):
    d, r, max_len = D, 4, T
    closed = 2 * V * d + V + max_len * d + 2 * d + L * ((4 + 2 * r) * d * d + (9 + r) * d)
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(params)) == closed == 7_083
    big = jax.eval_shape(lambda: GPT(d_model=768, n_layers=15, n_heads=12, max_len=256).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(big)) == \
        2 * 256 * 768 + 256 + 256 * 768 + 2 * 768 + 15 * (12 * 768 ** 2 + 13 * 768)


def test_loss_is_the_float64_cross_entropy_of_the_logits(params):
    example = _tokens(1, (T + 1,))
    reference = _cross_entropy64(MODEL.apply({"params": params}, example[None, :-1])[0], example[1:])
    np.testing.assert_allclose(float(LOSS(params, {"tokens": example})), reference, rtol=1e-6)


def test_find_layers_finds_six_per_block_and_the_head_not_embeddings_or_norms(params):
    found = swapjax.find_layers(LOSS, params, {"tokens": _tokens(2, (4, T + 1))})
    per_block = ("query", "key", "value", "out", "fc1", "fc2")
    assert [layer.path for layer in found.layers] == \
        [f"block_{i}/{n}/kernel" for i in range(L) for n in per_block] + ["head/kernel"]
    assert [(layer.d_in, layer.d_out) for layer in found.layers[:6]] == [(D, D)] * 4 + [(D, 4 * D), (4 * D, D)]
    assert (found.layers[-1].d_in, found.layers[-1].d_out) == (D, V)
    assert {"wte/embedding", "wpe"} <= set(found.left_dense)
    assert not any("ln" in layer.path or "bias" in layer.path for layer in found.layers)


def _cross_entropy64(logits, targets):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.mean(logz - logits[np.arange(len(targets)), targets])


def test_a_bfloat16_model_gives_bfloat16_logits_and_a_float32_loss():
    model = GPT(vocab=V, d_model=D, n_layers=1, n_heads=H, max_len=T, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    tokens = _tokens(3, (2, T + 1))
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
    assert logits.dtype == jnp.bfloat16
    # the same weights in float32: logits within bfloat16's rounding of the activations
    wide = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), params)
    reference = jax.jit(MODEL.clone(n_layers=1).apply)({"params": wide}, tokens[:, :-1])
    np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.1)
    loss = jax.jit(next_token_loss(model))(params, {"tokens": tokens[0]})
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), _cross_entropy64(logits[0], tokens[0, 1:]), rtol=1e-6)


def test_too_many_tokens_or_heads_that_do_not_divide_d_are_errors(params):
    with pytest.raises(ValueError, match=r"9 tokens, more than max_len=8"):
        MODEL.apply({"params": params}, _tokens(4, (1, T + 1)))
    with pytest.raises(ValueError, match=r"d_model=16 is not a multiple of n_heads=3"):
        GPT(vocab=V, d_model=D, n_layers=1, n_heads=3, max_len=T).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def _forward64(params, tokens):
    """The module docstring's equations in float64 NumPy: the independent reference of the logits."""
    p = jax.tree_util.tree_map(lambda w: np.asarray(w, np.float64), params)

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    n = tokens.shape[-1]
    h = p["wte"]["embedding"][tokens] + p["wpe"][:n]
    for i in range(L):
        b = p[f"block_{i}"]
        y = ln(h, b["ln1"])
        q, k, v = (np.einsum("btd,dhe->bthe", y, b[m]["kernel"]) + b[m]["bias"] for m in ("query", "key", "value"))
        s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(D // H)
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhe->bqhe", w / w.sum(-1, keepdims=True), v)
        h = h + np.einsum("bqhe,hed->bqd", a, b["out"]["kernel"]) + b["out"]["bias"]
        y = gelu(ln(h, b["ln2"]) @ b["fc1"]["kernel"] + b["fc1"]["bias"])
        h = h + y @ b["fc2"]["kernel"] + b["fc2"]["bias"]
    return ln(h, p["ln_f"]) @ p["head"]["kernel"] + p["head"]["bias"]


def test_logits_are_the_float64_forward_pass_of_the_equations(params):
    tokens = _tokens(5, (3, T))
    np.testing.assert_allclose(MODEL.apply({"params": params}, tokens), _forward64(params, tokens), rtol=1e-4, atol=1e-4)
    # causality of the reference itself: the prefix of a longer sequence has the prefix's logits
    np.testing.assert_allclose(_forward64(params, tokens[:, :5]), _forward64(params, tokens)[:, :5], atol=1e-12)


# ----------------------------------------------------------------------------------- perplexity

APPLY = lambda p, x: MODEL.apply({"params": p}, x)  # noqa: E731  (one object: one compilation per shape)


def test_perplexity_is_the_float64_mean_nll_of_the_equations(params):
    windows = _tokens(6, (7, T + 1))
    before = windows.copy()
    result = swapjax.perplexity(APPLY, params, windows, batch_size=3)  # chunks of 3, 3, 1 (padded to 3)
    logits = _forward64(params, windows[:, :-1])
    nll = np.mean([_cross_entropy64(lg, w[1:]) for lg, w in zip(logits, windows)])
    assert result.tokens == 7 * T and np.array_equal(windows, before)
    np.testing.assert_allclose(result.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(result.perplexity, np.exp(nll), rtol=1e-5)
    np.testing.assert_allclose(result.bits_per_byte, nll / np.log(2), rtol=1e-5)
    # the mean of next_token_loss over the windows, whatever the chunking
    mean_loss = np.mean([float(LOSS(params, {"tokens": w})) for w in windows])
    for b in (1, 4, 7, 64):
        np.testing.assert_allclose(swapjax.perplexity(APPLY, params, windows, batch_size=b).nll, mean_loss, rtol=1e-6)


def test_perplexity_closed_forms():
    # uniform logits over 256 bytes: perplexity 256, 8 bits per byte, whatever the text
    uniform = lambda p, x: jnp.zeros(x.shape + (256,), jnp.bfloat16)  # noqa: E731
    result = swapjax.perplexity(uniform, {}, np.random.default_rng(0).integers(0, 256, (5, 17)), batch_size=2)
    assert result.perplexity == pytest.approx(256, rel=1e-6) and result.bits_per_byte == pytest.approx(8, rel=1e-6)
    # a fixed distribution q at every position: NLL = −(1/mT) Σ log q[target], from the targets' counts
    q = np.array([0.5, 0.25, 0.125, 0.125])
    fixed = lambda p, x: jnp.broadcast_to(jnp.log(p), x.shape + (4,))  # noqa: E731
    windows = np.random.default_rng(1).integers(0, 4, (9, 6))
    counts = np.bincount(windows[:, 1:].ravel(), minlength=4)
    expected = -(counts * np.log(q)).sum() / counts.sum()
    result = swapjax.perplexity(fixed, jnp.asarray(q, jnp.float32), windows, batch_size=4)
    assert result.nll == pytest.approx(expected, rel=1e-6) and result.tokens == 9 * 5
    assert result.bits_per_byte == pytest.approx(-(counts * np.log2(q)).sum() / counts.sum(), rel=1e-6)
    # a model that is sure of every next token: perplexity 1
    ramp = np.arange(12)[None, :] + np.arange(3)[:, None]
    sure = lambda p, x: 60.0 * jax.nn.one_hot(x + 1, 16)  # noqa: E731
    assert swapjax.perplexity(sure, {}, ramp).perplexity == pytest.approx(1.0, abs=1e-6)


def test_perplexity_compiles_once_per_shape(params):
    from swapjax import text

    apply = lambda p, x: MODEL.apply({"params": p}, x)  # noqa: E731
    size = text._window_nll._cache_size()
    swapjax.perplexity(apply, params, _tokens(7, (10, T + 1)), batch_size=4)  # 4, 4, 2 + padding
    swapjax.perplexity(apply, params, _tokens(8, (5, T + 1)), batch_size=4)
    assert text._window_nll._cache_size() == size + 1
    swapjax.perplexity(apply, params, _tokens(8, (5, 5)), batch_size=4)  # another T: one more
    assert text._window_nll._cache_size() == size + 2


def test_perplexity_bad_input_is_an_error_before_any_chunk(params):
    windows = _tokens(9, (3, T + 1))
    for bad, match in ((windows[0], r"\(m, T \+ 1\)"), (windows[:, :1], r"\(m, T \+ 1\)"),
                       (windows[:0], r"\(m, T \+ 1\)"), (windows.astype(np.float32), "integer"),
                       (np.where(windows == 0, V, windows), r"\[0, 11\).*\.\.11"),
                       (windows - 1, r"\[0, 11\).*-1\.\.9")):
        with pytest.raises(ValueError, match=match):
            swapjax.perplexity(APPLY, params, bad)
    with pytest.raises(ValueError, match="batch_size"):
        swapjax.perplexity(APPLY, params, windows, batch_size=0)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        swapjax.perplexity(lambda p, x: x, params, windows)
    with pytest.raises(ValueError, match="callable"):
        swapjax.perplexity("model", params, windows)
