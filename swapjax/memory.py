"""Peak memory of a prune, estimated before any gradient is computed, and the memory at hand.

Two modes hold different things (b = bytes per float, c = examples per chunk,
a = bytes of one example's intermediate values in ``loss_fn``, r = the bytes
that ``jax.linearize`` keeps for one example, its inputs included):

- ``"in-memory"`` forms X: N·p·b (×1.3 on a CPU, ×2.1 on an accelerator), plus a chunk's gradients and intermediates
  c·(2p·b + a), plus the solver's N×N matrices and p-vectors;
- ``"blocked"`` forms one block of w columns at a time (:mod:`swapjax.blocks`): N·w·b (with the
  same factor), plus the in-memory mode's chunk and solver terms; w is the widest that fits in
  the memory available (at least ``MIN_BLOCK_WIDTH`` or p), or the one asked for;
- ``"matrix-free"`` never forms X (:mod:`swapjax.operators`): the linearised
  network keeps N·r, the pass for diag(XᵀX) a chunk of c' ≤ c gradients, and the
  solver about 40 p-vectors.

a and r are measured by tracing on one and on two examples (vectorised, nothing
is computed): a counts the bytes of every intermediate value of ``loss_fn`` that
grows with the examples, r the residuals of ``jax.linearize`` (abstractly
evaluated) that do.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .operators import CHUNK_BYTES, example_losses
from .pytree import Layout, PyTree

#: Solver working set in p-vectors (w, g, w̄, candidates, CG vectors, masks), a generous count.
P_VECTORS = 40
#: The in-memory peak in units of X: on a CPU X plus the solver's columns gathered for Grams (measured
#: 1.26–1.30 × X); on a GPU the solver's loops hold a second copy of X (2.02 × X measured on an H100).
CPU_IN_MEMORY_FACTOR = 1.3
ACCELERATOR_IN_MEMORY_FACTOR = 2.1
#: The narrowest block the blocked mode chooses by itself (CHITA and WoodFisher use 1,000–20,000).
MIN_BLOCK_WIDTH = 4096


class Estimate(NamedTuple):
    """Bytes: the estimated peak of each mode, and what is available on the device at hand."""

    in_memory: int
    matrix_free: int
    available: int
    blocked: int = 0  # with blocks of ``block_width`` columns
    block_width: int = 0  # 0: no block of the minimum width fits

    def describe(self) -> str:
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        blocked = f", {gb(self.blocked)} in blocks of {self.block_width:,} columns" if self.block_width else ""
        return (f"estimated peak {gb(self.in_memory)} in memory (X formed){blocked}, {gb(self.matrix_free)} "
                f"matrix-free; {gb(self.available)} available")


def available_bytes(device=None) -> int:
    """Free memory where the computation runs: ``bytes_limit − bytes_in_use`` of the device where
    JAX reports it (GPU, TPU), else the host's available RAM (MemAvailable)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory statistics)
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def example_bytes(loss_fn, params: PyTree, batch: PyTree) -> int:
    """a: bytes of the intermediate values of ``loss_fn`` that grow with each example (traced, not run)."""

    def traced(m):
        examples = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[:m], batch)
        return jax.make_jaxpr(lambda p, b: jax.vmap(lambda e: loss_fn(p, e))(b))(params, examples).jaxpr

    return max(0, _jaxpr_bytes(traced(2)) - _jaxpr_bytes(traced(1)))


def residual_bytes(loss_fn, params: PyTree, batch: PyTree, lay: Layout) -> int:
    """r: bytes per example that ``jax.linearize`` of the per-example losses keeps (the matrix-free
    mode's N·r), from its abstract evaluation on one and on two examples."""

    def kept(m):
        examples = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[:m], batch)
        w = jax.ShapeDtypeStruct((lay.size,), lay.dtype)
        jvp = jax.eval_shape(lambda w: jax.linearize(example_losses(loss_fn, params, examples, lay), w)[1], w)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(jvp))

    return max(0, kept(2) - kept(1))


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars if hasattr(v.aval, "size"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_bytes(inner)
    return total


def estimate(loss_fn, params: PyTree, batch: PyTree, lay: Layout, chunk_size: int, device=None,
             devices=None, block_width=None) -> Estimate:
    """The :class:`Estimate` for pruning ``params`` (prunable layout ``lay``) on ``batch`` (N examples).

    ``block_width``: the blocked mode's columns per block, or None for the widest that fits in
    the memory available (0 where not even ``min(p, MIN_BLOCK_WIDTH)`` does).

    ``devices``: the devices X's rows are sharded over (``prune(devices=...)``): on accelerators each
    holds N/d rows and the figures are per device (against the least free one); host CPU devices
    share one memory, so there the figures stay those of the whole X."""
    device = jax.devices()[0] if device is None else device
    shards = 1
    if devices:
        device = devices[0]
        shards = len(devices) if device.platform != "cpu" else 1
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    p, b = lay.size, jnp.dtype(lay.dtype).itemsize
    factor = CPU_IN_MEMORY_FACTOR if device.platform == "cpu" else ACCELERATOR_IN_MEMORY_FACTOR
    a = example_bytes(loss_fn, params, batch)
    c = min(chunk_size, n)
    c_free = max(1, min(c, CHUNK_BYTES // (b * p)))
    solver = P_VECTORS * p * b + 4 * n * n * b
    fixed = c * (2 * p * b + a) + solver
    in_memory = int(factor * n * p * b / shards + fixed)
    matrix_free = int(n * residual_bytes(loss_fn, params, batch, lay) + c_free * (2 * p * b + a) + solver)
    available = min(available_bytes(d) for d in devices) if shards > 1 else available_bytes(device)
    if block_width is None:
        widest = min(p, int((available - fixed) // (factor * n * b)))
        block_width = widest if widest >= min(p, MIN_BLOCK_WIDTH) else 0
    if block_width:
        block_width = -(-p // -(-p // min(block_width, p)))  # B = ⌈p/w⌉ blocks of about equal width
    return Estimate(in_memory, matrix_free, available, int(factor * n * block_width * b + fixed), block_width)
