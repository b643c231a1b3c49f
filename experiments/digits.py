"""A small real task for the demo and the ε sweep: an MLP on scikit-learn's digits.

The digits (1,797 8×8 images, 10 classes) ship inside scikit-learn's wheel,
so this runs offline from a fresh clone. Split (fixed by ``seed``): 1,000
training examples (also the examples of the Fisher), 397 validation, 400 test.
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class DigitsMLP(nn.Module):
    """64-64-32-10 ReLU MLP with biases (6,464 prunable kernel weights)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


MODEL = DigitsMLP()


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray

    def batch(self):
        return {"x": jnp.asarray(self.x), "y": jnp.asarray(self.y)}


def load(seed: int = 0) -> tuple[Split, Split, Split]:
    """(train 1000, validation 397, test 400), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data / 16.0).astype(np.float32)[order]
    y = data.target.astype(np.int32)[order]
    return Split(x[:1000], y[:1000]), Split(x[1000:1397], y[1000:1397]), Split(x[1397:], y[1397:])


def example_loss(params, example):
    """Cross-entropy of ONE example (the loss_fn that swapjax.prune takes)."""
    logits = MODEL.apply({"params": params}, example["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


@jax.jit
def evaluate(params, x, y):
    """(accuracy, mean cross-entropy) on a split."""
    logits = MODEL.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.mean(jnp.argmax(logits, -1) == y), loss


def train(train: Split, seed: int = 0, epochs: int = 10, batch_size: int = 50, lr: float = 3e-3):
    """Dense training with Adam; returns params.

    10 epochs (about 95% test accuracy) by default: trained much longer, the
    network fits its 1,000 training examples exactly, their per-sample gradients
    vanish and every method degenerates to magnitude pruning.
    """
    params = MODEL.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def epoch(params, state, key):
        perm = jax.random.permutation(key, len(train.y)).reshape(-1, batch_size)

        def step(carry, idx):
            params, state = carry
            loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
                MODEL.apply({"params": p}, x[idx]), y[idx]).mean()
            updates, state = opt.update(jax.grad(loss)(params), state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), perm)[0]

    x, y = jnp.asarray(train.x), jnp.asarray(train.y)
    key = jax.random.key(seed + 1)
    for e in range(epochs):
        params, state = epoch(params, state, jax.random.fold_in(key, e))
    return params
