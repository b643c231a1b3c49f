"""MLPNet on Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist), for the ε sweep.

Minimal on purpose: issue 4 brings the real data layer (swapjax/data.py).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swapjax.models import MLPNet

ROOT = Path("/usr/share/datasets/fashion-mnist")
MODEL = MLPNet()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(root: Path = ROOT):
    """((x_train, y_train), (x_test, y_test)), x flattened to 784 floats in [0, 1]."""
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found under {root}: `apt-get install -y dataset-fashion-mnist`"
        )
    out = []
    for split in ("train", "t10k"):
        x = _idx(root / f"{split}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
        out.append((x, _idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int32)))
    return tuple(out)


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
