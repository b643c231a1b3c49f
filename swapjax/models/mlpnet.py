"""MLPNet: the 784-40-20-10 ReLU network without biases (32,360 weights).

The MNIST checkpoint architecture of WoodFisher, CBS, CHITA and SWAP
(the MNIST experiments of the SWAP paper): fc1 784→40, fc2 40→20, fc3 20→10, ReLU between layers,
no bias anywhere, so every parameter is a prunable kernel.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_FEATURES = 784  # 28 × 28 grey-scale pixels


class MLPNet(nn.Module):
    """784-40-20-10 ReLU MLP, no bias; returns logits.

    Input: one image or a batch, as (784,), (28, 28), (28, 28, 1) or any of
    these with leading batch axes, e.g. (B, 784), (B, 28, 28), (B, 28, 28, 1).
    The trailing 784 values are flattened in row-major order; output has the
    leading axes followed by ``num_classes``.
    Parameters: ``fc1/kernel`` (784, 40), ``fc2/kernel`` (40, 20),
    ``fc3/kernel`` (20, 10); 32,360 in all.
    """

    hidden: Sequence[int] = (40, 20)
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = _flatten_image(x)
        for i, width in enumerate(self.hidden, start=1):
            x = nn.relu(nn.Dense(width, use_bias=False, dtype=self.dtype, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name=f"fc{len(self.hidden) + 1}")(x)


def _flatten_image(x: jax.Array) -> jax.Array:
    """(..., 784), (..., 28, 28) or (..., 28, 28, 1) → (..., 784)."""
    shape = x.shape
    if shape[-1:] == (INPUT_FEATURES,):
        return x
    if shape[-3:] == (28, 28, 1):
        return x.reshape(shape[:-3] + (INPUT_FEATURES,))
    if shape[-2:] == (28, 28):
        return x.reshape(shape[:-2] + (INPUT_FEATURES,))
    raise ValueError(
        f"MLPNet: expected input of shape (..., 784), (..., 28, 28) or (..., 28, 28, 1), got {shape}"
    )
