"""Per-sample gradients X ∈ R^{N×p} of the prunable coordinates, and the gradient-noise model."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from . import checks, layer_grads, pytree
from .pytree import PyTree, Select

LossFn = Callable[[PyTree, PyTree], jax.Array]


def batch_size(batch: PyTree) -> int:
    """N, the common leading axis of every array in ``batch`` (ValueError if empty or ragged)."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch: expected a pytree of arrays with a leading axis N, got no arrays")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(f"batch: every array needs the same leading axis N; got shapes {shapes}")
    (n,) = sizes
    if n == 0:
        raise ValueError("batch: N = 0 examples; at least one example is needed")
    return n


# Examples per chunk. Measured on 2 CPU cores, N = 1000 (docs/benchmarks.md): ResNet20 12.7 s at 128
# against 13.7 s at 32 or 64 and 14.1 s at 256 (peak memory 2.3 / 2.8 / 3.7 GB at ≤ 64 / 128 / 256);
# MLPNet the same (0.11 s) from 32 to 1000.
DEFAULT_CHUNK = 128


@partial(jax.jit, static_argnames=("loss_fn", "lay", "fast"), donate_argnames=("X",))
def _fill_chunk(loss_fn, params, examples, start, X, lay, fast):
    """(ℓ of the chunk, X with rows start… replaced by the chunk's g_i), X updated in place.

    One call per chunk from the host: XLA on CPU ran the same convolutions 3–25× slower inside
    a while loop (``lax.map`` / ``fori_loop``) than at the top level of a computation.
    """
    values, grads = chunk_losses_and_grads(loss_fn, params, examples, lay, fast)
    for g, offset in zip(grads, lay.offsets):
        X = jax.lax.dynamic_update_slice(X, g.reshape(len(values), -1).astype(lay.dtype), (start, offset))
    return values, X


def chunk_losses_and_grads(loss_fn, params, examples, lay, fast=True):
    """(ℓ_i, [g_i of each prunable leaf]) for a chunk of examples, inside a trace (see :func:`per_sample_grads`)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def loss_of_leaves(leaves, example):
        return loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)

    selected = [i for i, s in enumerate(lay.selected) if s]
    first = jax.tree_util.tree_map(lambda a: a[0], examples)
    plan = layer_grads.plan(loss_of_leaves, leaves, first, selected, fast)
    return jax.vmap(lambda ex: layer_grads.loss_and_grads(plan, leaves, ex))(examples)


def chunk_starts(n: int, chunk_size: int) -> tuple[int, list[int]]:
    """(b, starts): chunks of b = ⌈N / ⌈N / chunk_size⌉⌉ ≤ chunk_size examples starting at ``starts``;
    the last one ends at N (overlapping the one before when b does not divide N), so that one
    compiled chunk serves every N."""
    b = -(-n // -(-n // chunk_size))
    return b, [min(i, n - b) for i in range(0, n, b)]


def _per_sample_grads(loss_fn, params, batch, lay, chunk_size, fast, progress):
    n = batch_size(batch)
    b, starts = chunk_starts(n, chunk_size)
    report = _ChunkProgress(len(starts), n) if progress else None
    X = jnp.zeros((n, lay.size), lay.dtype)
    losses, done = [], 0
    for i, start in enumerate(starts):
        examples = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(a, start, start + b), batch)
        values, X = _fill_chunk(loss_fn, params, examples, start, X, lay, fast)
        losses.append(values[done - start:])
        done = start + b
        if report and not isinstance(values, jax.core.Tracer):
            report(i + 1, done, jax.block_until_ready(values))
    return jnp.concatenate(losses), X


class _ChunkProgress:
    """A line on stderr about every ``interval`` seconds while chunks finish (shorter runs stay
    silent), and one for the last chunk of a run that printed any."""

    interval = 5.0

    def __init__(self, chunks: int, n: int):
        self.chunks, self.n = chunks, n
        self.start, self.last, self.printed = time.perf_counter(), 0.0, False

    def __call__(self, chunk: int, examples: int, _values=None) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed - self.last >= self.interval or (chunk == self.chunks and self.printed):
            print(f"[swapjax] per-sample gradients: chunk {chunk}/{self.chunks} ({examples}/{self.n} examples), "
                  f"{elapsed:.1f} s", file=sys.stderr, flush=True)
            self.last, self.printed = elapsed, True


def per_sample_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    fast: bool = True,
) -> jax.Array:
    """X ∈ R^{N×p}, row i = g_i = ∇_w ℓ(params, example_i) over the prunable coordinates.

    ``loss_fn(params, example)`` takes ONE example (no batch axis). Columns follow
    the flat order of :mod:`swapjax.pytree`. ``select``: which leaves are prunable
    (default: the arrays with ndim ≥ 2; see :func:`swapjax.pytree.layout`).

    How (``fast=True``): a kernel K used only by dense/conv layers y = op(x, K) gets its
    per-example gradient from the layer input xᵢ and the output cotangent δᵢ of one
    vectorised forward and backward pass: xᵢᵀδᵢ for a dense layer, the image patches of xᵢ
    against δᵢ for a convolution (:mod:`swapjax.layer_grads`), about the cost of one
    batched gradient. Any other prunable leaf (and every leaf with ``fast=False``) is
    differentiated by ``jax.vmap(jax.grad)``. Both give the same X to float32 rounding.

    Examples go in equal chunks of at most ``chunk_size`` (8×125 for N = 1000; the last
    chunk ends at N, overlapping the one before if needed), one compiled call each, written
    in place into X, so working memory beyond the (N, p) result is
    O(chunk_size · (p + activations of one example)). Compiled once per (loss_fn, shapes).
    ``progress``: a line on stderr about every 5 s while chunks finish (silent for short
    runs); False for none.
    """
    return per_sample_losses_and_grads(loss_fn, params, batch, select, chunk_size, progress, fast)[1]


def per_sample_losses_and_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    fast: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(ℓ ∈ R^N, X ∈ R^{N×p}): the loss value of each example and :func:`per_sample_grads`, in one pass."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a function loss_fn(params, example) -> scalar, got {loss_fn!r}")
    batch_size(batch)  # ValueError if empty or ragged
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    progress = checks.boolean("progress", progress)
    fast = checks.boolean("fast", fast)
    losses, X = _per_sample_grads(loss_fn, params, batch, pytree.layout(params, select), chunk_size, fast, progress)
    if jnp.ndim(losses) != 1:
        raise ValueError(
            f"loss_fn: must return a scalar for ONE example, got shape {jnp.shape(losses)[1:]} per example"
        )
    return losses, X


@jax.jit
def _all_finite(X):
    return jnp.all(jnp.isfinite(X))


def check_finite(X: jax.Array, name: str = "gradients") -> None:
    """ValueError naming ``name`` and the bad rows if X has NaN or inf entries."""
    if not bool(_all_finite(X)):  # one fused pass (9 ms at 1000 × 32,360; the eager form took 41 ms)
        bad = ~jnp.all(jnp.isfinite(jnp.atleast_2d(X)), axis=1)
        rows = jnp.flatnonzero(bad)[:10].tolist()
        raise ValueError(
            f"{name}: {int(bad.sum())} of {bad.shape[0]} per-sample gradients contain NaN or inf "
            f"(examples {rows}...); check the loss function and the batch"
        )


@dataclass(frozen=True)
class GradientNoise:
    """The gradient noise of the paper's robustness study (You & Cheng, ICLR 2024).

    Each coordinate of each per-sample gradient is hit independently with
    probability ``prop`` by Gaussian noise of standard deviation
    ``std_scale · std(X)`` (std over all entries of the clean X).
    """

    std_scale: float = 1.0
    prop: float = 0.1

    def __post_init__(self):
        checks.real("std_scale", self.std_scale, 0.0)
        checks.real("prop", self.prop, 0.0, 1.0)

    def __call__(self, X: jax.Array, key: jax.Array) -> jax.Array:
        return add_gradient_noise(X, key, self.std_scale, self.prop)


@jax.jit
def add_gradient_noise(X: jax.Array, key: jax.Array, std_scale, prop) -> jax.Array:
    """X + B ⊙ E with B_ij ~ Bernoulli(prop), E_ij ~ N(0, (std_scale · std(X))²)."""
    k_hit, k_val = jax.random.split(key)
    hit = jax.random.bernoulli(k_hit, prop, X.shape)
    noise = std_scale * jnp.std(X) * jax.random.normal(k_val, X.shape, X.dtype)
    return X + jnp.where(hit, noise, 0)
