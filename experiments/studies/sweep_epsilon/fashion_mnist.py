"""MLPNet on Fashion-MNIST (swapjax.data: Debian's dataset-fashion-mnist IDX files), for the ε sweep."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swapjax import data
from swapjax.models import MLPNet

MODEL = MLPNet()


def load():
    """((x_train, y_train), (x_test, y_test)), x flattened to 784 floats in [0, 1]."""
    return tuple((d.x, d.y) for d in (data.load("fashion_mnist", split, flatten=True) for split in ("train", "test")))


def example_loss(params, example):
    logits = MODEL.apply({"params": params}, example["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


@jax.jit
def evaluate(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y), optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(x, y, seed=0, epochs=3, batch_size=128, lr=1e-3):
    params = MODEL.init(jax.random.key(seed), jnp.zeros((1, 784)))["params"]
    opt = optax.adam(lr)
    state = opt.init(params)
    steps = len(y) // batch_size

    @jax.jit
    def epoch(params, state, key):
        perm = jax.random.permutation(key, len(y))[: steps * batch_size].reshape(steps, batch_size)

        def step(carry, idx):
            params, state = carry
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                MODEL.apply({"params": p}, xs[idx]), ys[idx]).mean())(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), perm)[0]

    xs, ys = jnp.asarray(x), jnp.asarray(y)
    for e in range(epochs):
        params, state = epoch(params, state, jax.random.fold_in(jax.random.key(seed + 1), e))
    return params
