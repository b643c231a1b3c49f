"""LeNet-5: a small CNN for 28×28 grey-scale images (61,470 weights in its kernels).

conv1 5×5×1→6 ('SAME'), 2×2 average pool, conv2 5×5×6→16 ('VALID'), 2×2
average pool, fc1 400→120, fc2 120→84, fc3 84→10, ReLU after every layer but
the last; biases everywhere (not pruned by default: they are 1-D).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def as_images(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """(B, 28, 28, 1) float32 images from (..., 28, 28, 1) or (..., 784), and the leading axes (...)."""
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[:-1] if x.shape[-1] == 784 else x.shape[:-3]
    return x.reshape((-1, 28, 28, 1)), batch


class LeNet5(nn.Module):
    """LeNet-5 on (..., 28, 28, 1) or (..., 784) images; returns logits (..., num_classes).

    Kernels: conv1 (5, 5, 1, 6), conv2 (5, 5, 6, 16), fc1 (400, 120), fc2 (120, 84),
    fc3 (84, 10): 61,470 weights.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, batch = as_images(x)
        x = nn.avg_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x).reshape(batch + (self.num_classes,))
