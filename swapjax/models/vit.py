"""ViT: a small Vision Transformer for 28×28 grey-scale images (69,312 weights in its kernels).

A 7×7 patch convolution (16 patches of 64 features), a learned class token and position
embeddings (17 × 64), two pre-norm encoder blocks (4-head self-attention, an MLP 64→128→64 with
GELU, residual connections) and a linear head on the class token. The default pruning rule takes
its 14 kernels: the patch conv (7, 7, 1, 64), per block the query, key and value projections
(64, 4, 16), the output projection (4, 16, 64), fc1 (64, 128) and fc2 (128, 64), and the head
(64, 10). The class token, the position embeddings, every bias (the attention's q/k/v biases are
(4, 16)) and the LayerNorm scales stay dense.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .lenet5 import as_images


class EncoderBlock(nn.Module):
    """x + MHA(LN(x)), then + MLP(LN(x)): the pre-norm transformer block."""

    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(x.shape[-1], name="fc2")(y)


class ViT(nn.Module):
    """ViT on (..., 28, 28, 1) or (..., 784) images; returns logits (..., num_classes).

    Kernels: patch_embed (7, 7, 1, 64); per block ``block_i/attn/{query,key,value}`` (64, 4, 16),
    ``block_i/attn/out`` (4, 16, 64), ``block_i/fc1`` (64, 128), ``block_i/fc2`` (128, 64);
    head (64, 10): 69,312 weights.
    """

    num_classes: int = 10
    patch: int = 7
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, batch = as_images(x)
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    name="patch_embed")(x)
        x = x.reshape((x.shape[0], -1, self.dim))  # (B, 16, dim): the patches in raster order
        cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, self.dim)), (x.shape[0], 1, self.dim))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln")(x[:, 0])
        return nn.Dense(self.num_classes, name="head")(x).reshape(batch + (self.num_classes,))
