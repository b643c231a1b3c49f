"""GPT: a causal decoder-only language model (byte-level by default), and its next-token loss.

Tokens t ∈ {0..V−1}^T; h⁰_t = E[t_t] + P[t] (token embedding E: V × d, learned positions P: max_len × d);
per block (pre-LayerNorm), with y = LN₁(h):

    q, k, v = y W_q, y W_k, y W_v         (d → H heads × d/H each, with biases)
    a_t = Σ_{s ≤ t} softmax_s(q_t·k_s / √(d/H)) v_s      (causal: position t never reads s > t)
    h ← h + a W_o,   h ← h + gelu(LN₂(h) W₁) W₂          (W₁: d × r·d, W₂: r·d × d)

and logits = LN_f(h) W_head (untied head, d × V). Weights: 2·V·d + V + max_len·d + 2d + L·((4 + 2r)·d² +
(9 + r)·d); the layers found by use (:func:`swapjax.find_layers`) are q, k, v, out, fc1, fc2 per block
and the head (L·(4 + 2r)·d² + d·V weights); E, P, the biases and the norms stay dense.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    """h + attn(LN₁(h)), then + MLP(LN₂(h)): one pre-norm causal block on (B, T, d)."""

    n_heads: int
    mlp_ratio: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d, e = h.shape[-1], h.shape[-1] // self.n_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(name="ln1", **kw)(h)
        q, k, v = (nn.DenseGeneral((self.n_heads, e), name=n, **kw)(y) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(e).astype(jnp.float32)
        T = h.shape[-2]
        causal = jnp.tril(jnp.ones((T, T), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(v.dtype)
        a = jnp.einsum("bhqk,bkhe->bqhe", weights, v)
        h = h + nn.DenseGeneral(d, axis=(-2, -1), name="out", **kw)(a)
        y = nn.gelu(nn.Dense(self.mlp_ratio * d, name="fc1", **kw)(nn.LayerNorm(name="ln2", **kw)(h)))
        return h + nn.Dense(d, name="fc2", **kw)(y)


class GPT(nn.Module):
    """tokens (B, T) int32, T ≤ max_len → logits (B, T, vocab), in ``dtype``.

    Params: ``wte`` (vocab, d), ``wpe`` (max_len, d); ``block_i/{query,key,value}`` (d, H, d/H),
    ``block_i/out`` (H, d/H, d), ``block_i/fc1`` (d, r·d), ``block_i/fc2`` (r·d, d), ``ln1``, ``ln2``;
    ``ln_f``, ``head`` (d, vocab). The attention softmax is taken in float32 whatever ``dtype``.
    """

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 256
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if tokens.shape[-1] > self.max_len:
            raise ValueError(f"{tokens.shape[-1]} tokens, more than max_len={self.max_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Embed(self.vocab, self.d_model, embedding_init=nn.initializers.normal(0.02), name="wte", **kw)(tokens)
        pos = self.param("wpe", nn.initializers.normal(0.02), (self.max_len, self.d_model), self.param_dtype)
        h = h + pos[: tokens.shape[-1]].astype(self.dtype)
        for i in range(self.n_layers):
            h = Block(self.n_heads, self.mlp_ratio, self.dtype, self.param_dtype, name=f"block_{i}")(h)
        return nn.Dense(self.vocab, name="head", **kw)(nn.LayerNorm(name="ln_f", **kw)(h))


def next_token_loss(model: GPT):
    """loss_fn(params, example) for ONE example {"tokens": (T+1,) int}: the mean over t < T of
    −log softmax(logits_t)[tokens[t+1]], logits of tokens[:-1], in float32 (the form
    :func:`swapjax.prune_layerwise` takes, with batch = {"tokens": (N, T+1)})."""

    def loss_fn(params, example):
        tokens = example["tokens"]
        logits = model.apply({"params": params}, tokens[None, :-1])[0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[1:, None], axis=-1))

    return loss_fn
