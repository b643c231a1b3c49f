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

The memory at hand (:func:`available_bytes`) is, on a CPU, the least of what the
process may still take: the host's MemAvailable, its address-space limit
(``ulimit -v``: RLIMIT_AS − VmSize − ``ADDRESS_SPACE_RESERVE``) and its
cgroup's memory limit (limit − usage, page cache not counted, over the cgroup
and its ancestors; v2 or v1). ``prune(mode="auto")`` keeps a margin
(``MEMORY_FRACTION``, ``COMFORT_FRACTION``: :func:`swapjax.holding.choose`).
"""
from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import NamedTuple, Optional

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
#: ``mode="auto"`` takes no mode whose estimated peak exceeds this fraction of the memory available:
#: the rest covers what the estimate leaves out (XLA's temporaries and compiled code, the allocator's
#: fragmentation; measured peaks were 0.6–1.05 × the estimate) and what other processes take meanwhile.
MEMORY_FRACTION = 0.75
#: Past this fraction of the memory available a mode "would use most of it": ``mode="auto"`` then prefers
#: a mode with a lower peak (narrower blocks, or matrix-free) where one stays within it.
COMFORT_FRACTION = 0.5
#: Address space (VmSize) a prune takes beyond the resident memory it adds, on a CPU under JAX (the
#: allocator's arenas and buffers reserved before they are touched), kept out of what RLIMIT_AS leaves.
#: Measured on MLPs of 0.9M–10M weights (one-shot SWAP, 2 cores, docs/scale.md): 0.0–0.29 GiB in memory
#: and matrix-free, 0.29–0.75 GiB in blocks.
ADDRESS_SPACE_RESERVE = 1 << 30
#: A cgroup v1 "no limit" (PAGE_COUNTER_MAX) and anything above it.
_NO_LIMIT = 1 << 60

#: Where the process's memory figures are read (tests point them at files of their own).
PROC_MEMINFO = "/proc/meminfo"
PROC_STATUS = "/proc/self/status"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


class Estimate(NamedTuple):
    """Bytes: the estimated peak of each mode, and what is available on the device at hand."""

    in_memory: int
    matrix_free: int
    available: int
    blocked: int = 0  # with blocks of ``block_width`` columns
    block_width: int = 0  # 0: no block of the minimum width fits
    limit: str = ""  # what bounds ``available`` (the address-space limit, the cgroup's, MemAvailable, the device's)

    @property
    def budget(self) -> int:
        """The most ``mode="auto"`` lets a mode take: ``MEMORY_FRACTION`` of ``available``."""
        return int(MEMORY_FRACTION * self.available)

    def describe(self) -> str:
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        blocked = f", {gb(self.blocked)} in blocks of {self.block_width:,} columns" if self.block_width else ""
        limit = f" ({self.limit})" if self.limit else ""
        return (f"estimated peak {gb(self.in_memory)} in memory (X formed){blocked}, {gb(self.matrix_free)} "
                f"matrix-free; {gb(self.available)} available{limit}")


class Available(int):
    """Bytes available, with ``limit``: the bound that gave them."""

    limit: str

    def __new__(cls, value: int, limit: str = ""):
        obj = super().__new__(cls, max(0, int(value)))
        obj.limit = limit
        return obj


class Limits(NamedTuple):
    """What the process may still take, in bytes, by each bound (None: no such bound or not readable)."""

    mem_available: Optional[int]  # the host's MemAvailable
    address_space: Optional[int]  # RLIMIT_AS − VmSize − ADDRESS_SPACE_RESERVE
    cgroup: Optional[int]  # the cgroup's limit − its usage (page cache not counted)
    data: Optional[int] = None  # RLIMIT_DATA − VmData − ADDRESS_SPACE_RESERVE

    def bound(self) -> Available:
        """The least of the bounds, naming it (None of them: the machine's free pages)."""
        names = {"mem_available": "MemAvailable", "address_space": "the address-space limit, ulimit -v",
                 "cgroup": "the cgroup's memory limit", "data": "the data-segment limit, ulimit -d"}
        known = [(value, names[field]) for field, value in self._asdict().items() if value is not None]
        if not known:
            return Available(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages")
        value, name = min(known, key=lambda vn: vn[0])
        return Available(value, name)


def _read_int(path) -> Optional[int]:
    """The integer in a one-value file ("max" or a missing/unreadable file: None)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _fields(path, unit: int = 1) -> dict:
    """``key value`` or ``key: value kB`` lines as a dict of ints (times ``unit``); {} where unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * unit
    return out


def mem_available() -> Optional[int]:
    """The host's MemAvailable (``PROC_MEMINFO``), or None."""
    return _fields(PROC_MEMINFO, 1024).get("MemAvailable")


def rlimit_headroom(which: str = "AS") -> Optional[int]:
    """soft RLIMIT_AS − VmSize − ``ADDRESS_SPACE_RESERVE`` (``which="DATA"``: RLIMIT_DATA − VmData − the
    same), the resident bytes a computation may still add under the limit; None without a limit.

    The address space counts reservations as well as resident pages: at JAX's start-up a CPU process
    has VmSize − VmRSS ≈ 1.2 GiB already (threads, allocator arenas), which VmSize includes."""
    soft, _ = resource.getrlimit(getattr(resource, f"RLIMIT_{which}"))
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = _fields(PROC_STATUS, 1024).get("VmSize" if which == "AS" else "VmData")
    if used is None:
        return None
    return max(0, soft - used - ADDRESS_SPACE_RESERVE)


def cgroup_headroom() -> Optional[int]:
    """The least of limit − usage over the process's memory cgroup and its ancestors (cgroup v2:
    memory.max − memory.current; v1: memory.limit_in_bytes − memory.usage_in_bytes), the inactive page
    cache (reclaimable) not counted as usage; None where no limit is set or none is readable.

    The cgroup's path is read from ``PROC_CGROUP``; its files under ``CGROUP_ROOT`` (v2, or
    ``CGROUP_ROOT/unified`` on hybrid hosts) or ``CGROUP_ROOT/memory`` (v1). Inside a container whose
    cgroup namespace hides the path, the root of the mount is the container's own cgroup."""
    try:
        entries = [line.split(":", 2) for line in Path(PROC_CGROUP).read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    root, best = Path(CGROUP_ROOT), None
    for _, controllers, path in entries:
        if controllers == "":  # v2
            bases, files = (root, root / "unified"), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            bases, files = (root / "memory",), ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for base in bases:
            for d in _cgroup_dirs(base, path):
                limit, usage = _read_int(d / files[0]), _read_int(d / files[1])
                if limit is None or usage is None or limit >= _NO_LIMIT:
                    continue
                inactive = _fields(d / "memory.stat").get(files[2], 0)
                headroom = max(0, limit - max(0, usage - inactive))
                best = headroom if best is None else min(best, headroom)
    return best


def _cgroup_dirs(base: Path, path: str):
    """base/path and its ancestors up to base (only those that exist)."""
    d = base / path.strip("/")
    while True:
        if d.is_dir():
            yield d
        if d == base or base not in d.parents:
            return
        d = d.parent


def process_limits() -> Limits:
    """Each bound on what this process may still take (:class:`Limits`)."""
    return Limits(mem_available(), rlimit_headroom("AS"), cgroup_headroom(), rlimit_headroom("DATA"))


def available_bytes(device=None) -> int:
    """Free memory where the computation runs, as an :class:`Available` naming its bound:
    ``bytes_limit − bytes_in_use`` of the device where JAX reports it (GPU, TPU), else the least of
    the host's MemAvailable and the process's address-space and cgroup limits (:func:`process_limits`)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory statistics)
        stats = None
    if stats and "bytes_limit" in stats:
        return Available(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "the device's free memory")
    return process_limits().bound()


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

    ``block_width``: the blocked mode's columns per block, or None for the widest whose estimate is
    within ``COMFORT_FRACTION`` of the memory available, else within ``MEMORY_FRACTION`` of it (0 where
    not even ``min(p, MIN_BLOCK_WIDTH)`` is).

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
        block_width = 0
        for fraction in (COMFORT_FRACTION, MEMORY_FRACTION):
            widest = min(p, int((fraction * available - fixed) // (factor * n * b)))
            if widest >= min(p, MIN_BLOCK_WIDTH):
                block_width = widest
                break
    if block_width:
        block_width = -(-p // -(-p // min(block_width, p)))  # B = ⌈p/w⌉ blocks of about equal width
    return Estimate(in_memory, matrix_free, available, int(factor * n * block_width * b + fixed), block_width,
                    getattr(available, "limit", ""))
