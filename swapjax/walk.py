"""One walk through the network over the calibration batch, stopping at each input of the layers pruned.

The loss of one example is flattened to a program (:func:`flatten`: the interpreter of
:mod:`swapjax.layer_grads` inlines the calls a layer's weights enter and unrolls a ``scan`` over a
stacked leaf) in which every product of a layer with the data is marked. :class:`Walk` runs that
program over the calibration batch once, chunk by chunk, in segments: it stops before the first
product that reads each layer input x and returns the Grams H = AᵀA of the layers that read x (q, k
and v of one input share one); the caller prunes them, and the next segment runs on with the leaves
it is given: pruned (sequential) or dense. Between stops only the data values a later segment reads
are kept, per chunk; the weights and whatever is computed from them alone are recomputed in each
segment from the leaves given, so a pruned layer's output is its pruned product. Every equation up
to the last stop runs once per example: the cost of one forward pass, plus the Grams.

The chunks are sharded over ``devices`` (each device walks its share of the examples and forms its
part of every H; one ``psum`` per Gram adds them); H is accumulated in float32 or wider.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.sharding import PartitionSpec as P

from . import layer_grads
from .layers import _Frozen
from .gradients import EXAMPLES, batch_size, chunk_starts, example_mesh
from .operators import matmul

# the marker standing for tap t's product in a flattened program: evaluated by the walk as the product
_product = jcore.Primitive("layer_product")
_product.def_abstract_eval(lambda *operands, tap, shape, dtype: jax.core.ShapedArray(shape, dtype))


@dataclass(frozen=True, eq=False)
class Program:
    """The loss of ONE example, flattened: ``closed`` takes (leaves..., example leaves...); the equation
    ``at[t]`` is tap t's product (``taps[t]``), marked."""

    closed: jcore.ClosedJaxpr
    taps: tuple
    n_leaves: int
    at: tuple  # the equation of each tap's product

    def operand(self, t: int):
        """The variable x that tap t multiplies its kernel with."""
        eqn = self.closed.jaxpr.eqns[self.at[t]]
        return eqn.invars[1 - self.taps[t].kernel_pos]


def flatten(loss, leaves: Sequence, example, tracked: Sequence[int]) -> Program:
    """``loss(leaves, example)`` of ONE example as a flat program with the products of the ``tracked``
    leaves marked (their taps in program order). One per (loss, shapes), the last few kept: the walk's
    compiled segments are reused across calls."""
    struct = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    example = jax.tree_util.tree_map(struct, example)
    return _flatten(loss, tuple(struct(a) for a in leaves), _Frozen(example), tuple(tracked))


@lru_cache(maxsize=8)
def _flatten(loss, leaves: tuple, example: _Frozen, tracked: tuple) -> Program:
    example = example.tree
    closed = layer_grads.trace_loss(loss, leaves, example)
    trace = layer_grads._Trace(emit=lambda t, invals: _product.bind(
        *invals, tap=t, shape=tuple(trace.taps[t].out.shape), dtype=trace.taps[t].out.dtype))
    n = len(leaves)
    jaxpr = closed.jaxpr
    origins = layer_grads._origins(n, len(jaxpr.invars), set(tracked))
    flat = jax.make_jaxpr(lambda *args: layer_grads._run(jaxpr, closed.consts, args, origins,
                                                         layer_grads._data(n, len(args)), trace))(
        *[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars])
    at = {eqn.params["tap"]: j for j, eqn in enumerate(flat.jaxpr.eqns) if eqn.primitive is _product}
    return Program(flat, tuple(trace.taps), n, tuple(at[t] for t in range(len(trace.taps))))


@dataclass(frozen=True)
class Stop:
    """Where the walk stops: before equation ``at``, the first product reading ``operand``. ``uses``: the
    (tap, slice) of each layer read here, in program order."""

    at: int
    operand: object
    uses: tuple


class Walk:
    """The walk of ``program`` over ``batch`` for the layers ``uses`` ((tap, slice) pairs): ``stops``, in
    program order, and :meth:`advance`, which runs up to the next stop and returns its Grams."""

    def __init__(self, program: Program, uses: Sequence[tuple], batch, chunk_size: int,
                 devices: Optional[tuple] = None):
        self.program = program
        jaxpr = program.closed.jaxpr
        at = program.at
        by_operand = {}
        for t, b in sorted(uses, key=lambda u: (at[u[0]], u[1])):
            by_operand.setdefault(program.operand(t), []).append((t, b))
        self.stops = sorted((Stop(at[uses[0][0]], x, tuple(uses)) for x, uses in by_operand.items()),
                            key=lambda s: s.at)
        self._segments = _segments(jaxpr, program.n_leaves, self.stops) if self.stops else []
        self._done = 0
        devices = devices or (jax.devices()[0],)
        self._mesh = example_mesh(devices)
        d = len(devices)
        examples = jax.tree_util.tree_leaves(batch)
        self.n = batch_size(batch)
        self.b, starts = chunk_starts(self.n // d, chunk_size)
        done, self._new = 0, []
        for start in starts:
            self._new.append(start + self.b - done)
            done = start + self.b
        rows = jax.sharding.NamedSharding(self._mesh, P(EXAMPLES))
        examples = [jax.device_put(jnp.asarray(a), rows) for a in examples]
        data_in = jaxpr.invars[program.n_leaves:]
        kept = [examples[data_in.index(v)] for v in (self._segments[0].live_in if self.stops else ())]
        self._live = [_chunk(self._mesh, self.b)(kept, start) for start in starts]  # per chunk: the live values

    def advance(self, leaves: Sequence) -> dict:
        """Run the next segment on every chunk with these ``leaves`` (the network's, as pruned so far); return
        {(tap, slice): (H = AᵀA over the batch, rows of A)} for the layers of its stop."""
        k = self._done
        seg, stop, taps = self._segments[k], self.stops[k], self.program.taps
        key = {u: layer_grads.rows_key(taps[u[0]])[1:] + (u[1],) for u in stop.uses}
        grams = tuple({key[u]: u for u in reversed(stop.uses)}.values())[::-1]  # one per distinct rows
        run = _compiled(self.program, seg, grams, self._mesh)
        jaxpr = self.program.closed.jaxpr
        env = dict(zip(jaxpr.invars, leaves)) | dict(zip(jaxpr.constvars, self.program.closed.consts))
        for j in seg.weights:  # what the segment reads of the weights: eager, once per stop (a scan's slice)
            _eval(jaxpr.eqns[j], env, taps)
        side = [env[v] for v in seg.side]
        total, live = None, []
        for values, new in zip(self._live, self._new):
            out, parts = run(side, values, jnp.asarray(new, jnp.int32))
            live.append(out)
            total = parts if total is None else [h + g for h, g in zip(total, parts)]
        self._live, self._done = live, k + 1
        H = {key[g]: (h, self.n * _rows_per_example(taps[g[0]], stop.operand)) for g, h in zip(grams, total)}
        return {u: H[key[u]] for u in stop.uses}


def _rows_per_example(tap, x) -> int:
    rows = jax.eval_shape(lambda x: layer_grads.layer_rows(tap, x), jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype))
    return int(rows.shape[1])


@dataclass(frozen=True)
class _Segment:
    """What runs between two stops: the ``weights`` equations (indices; run once, on the leaves) give the
    ``side`` values that the compiled ``eqns`` (run per example, on the data values ``live_in``) read
    besides; ``live_out`` are kept for the segments after it and ``operand`` is the stop's layer input."""

    weights: tuple
    eqns: tuple
    side: tuple
    live_in: tuple
    live_out: tuple
    operand: object


def _segments(jaxpr, n_leaves: int, stops: Sequence[Stop]) -> list:
    ats = [s.at for s in stops]
    data = set(jaxpr.invars[n_leaves:])
    producer, data_eqns = {}, set()
    for j, eqn in enumerate(jaxpr.eqns[:ats[-1]]):
        for v in eqn.outvars:
            producer[v] = j
        if any(_is_var(v) and v in data for v in eqn.invars):
            data_eqns.add(j)
            data.update(eqn.outvars)
    segment_of = lambda j: bisect.bisect_right(ats, j)  # noqa: E731 - equation j runs in segment k: ats[k-1] ≤ j < ats[k]
    last_read = {}
    for j in data_eqns:
        for v in jaxpr.eqns[j].invars:
            if _is_var(v) and v in data:
                last_read[v] = max(last_read.get(v, -1), segment_of(j))
    for k, stop in enumerate(stops):
        last_read[stop.operand] = max(last_read.get(stop.operand, -1), k)
    defined = {v: segment_of(producer[v]) if v in producer else -1 for v in last_read}
    order = sorted(last_read, key=lambda v: (defined[v], producer.get(v, -1), str(v)))
    segments, start = [], 0
    for k, stop in enumerate(stops):
        run = [j for j in range(start, stop.at) if j in data_eqns]
        side = tuple(dict.fromkeys(v for j in run for v in jaxpr.eqns[j].invars if _is_var(v) and v not in data))
        weights, needed = set(), list(side)
        while needed:  # the equations of the weights (and constants) that give them
            j = producer.get(needed.pop())
            if j is not None and j not in weights:
                weights.add(j)
                needed.extend(u for u in jaxpr.eqns[j].invars if _is_var(u))
        segments.append(_Segment(tuple(sorted(weights)), tuple(run), side,
                                 tuple(v for v in order if defined[v] < k <= last_read[v]),
                                 tuple(v for v in order if defined[v] <= k < last_read[v]), stop.operand))
        start = stop.at
    return segments


def _is_var(v) -> bool:
    return not isinstance(v, jcore.Literal)


@lru_cache(maxsize=16)
def _chunk(mesh, b):
    """(values, start) -> each device's rows start … start + b − 1 of every value (sharded over examples)."""
    local = lambda values, start: [jax.lax.dynamic_slice_in_dim(a, start, b) for a in values]  # noqa: E731
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(EXAMPLES), P()), out_specs=P(EXAMPLES),
                                 check_vma=False))


def _compiled(program: Program, seg: _Segment, grams: tuple, mesh):
    """The compiled segment: one per structure (a block repeated at the same shapes compiles once)."""
    key = (_structure(program, seg, grams), mesh)
    if key not in _COMPILED:
        if len(_COMPILED) >= 512:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = _segment(program, seg, grams, mesh)
    return _COMPILED[key]


_COMPILED: dict = {}


def _structure(program: Program, seg: _Segment, grams: tuple) -> tuple:
    """The segment with its variables numbered by role and order: equal for segments that compute the same
    function of their arguments (the blocks of a deep network)."""
    jaxpr, taps = program.closed.jaxpr, program.taps
    ref = {v: ("side", k) for k, v in enumerate(seg.side)}
    ref.update({v: ("in", k) for k, v in enumerate(seg.live_in)})
    eqns = []
    for e, j in enumerate(seg.eqns):
        eqn = jaxpr.eqns[j]
        ins = tuple((repr(v.val), str(v.aval)) if isinstance(v, jcore.Literal) else ref[v] for v in eqn.invars)
        what = (_tap_structure(taps[eqn.params["tap"]]) if eqn.primitive is _product
                else (eqn.primitive.name, repr(sorted(eqn.params.items()))))
        eqns.append((what, ins, tuple(str(v.aval) for v in eqn.outvars)))
        ref.update({v: ("eqn", e, o) for o, v in enumerate(eqn.outvars)})
    avals = tuple(str(v.aval) for v in seg.side + seg.live_in)
    return (tuple(eqns), avals, tuple(ref[v] for v in seg.live_out), ref[seg.operand],
            tuple(_tap_structure(taps[t]) + (b,) for t, b in grams))


def _tap_structure(tap) -> tuple:
    return tap.primitive.name, repr(sorted(tap.params.items())), tap.kernel_pos, tap.kernel_shape


def _segment(program: Program, seg: _Segment, grams: tuple, mesh):
    """The segment over one chunk, on each device: (side values, live values, new rows) -> (live values kept,
    the stop's Grams summed over the devices)."""
    jaxpr, taps = program.closed.jaxpr, program.taps

    def segment(side, live, new_rows):
        def example(live):
            env = dict(zip(seg.side, side)) | dict(zip(seg.live_in, live))
            for j in seg.eqns:
                _eval(jaxpr.eqns[j], env, taps)
            return [env[v] for v in seg.live_out], env[seg.operand]

        out, x = jax.vmap(example)(live)
        c = x.shape[0]
        counted = (jnp.arange(c) >= c - new_rows).astype(jnp.float32)
        hs = []
        for t, b in grams:
            A = jax.vmap(lambda x: layer_grads.layer_rows(taps[t], x)[b])(x)
            A = A.astype(jnp.promote_types(A.dtype, jnp.float32)) * counted[:, None, None]
            A = A.reshape(-1, A.shape[-1])
            hs.append(jax.lax.psum(matmul(A.T, A), EXAMPLES))
        return out, hs

    return jax.jit(jax.shard_map(segment, mesh=mesh, in_specs=(P(), P(EXAMPLES), P()),
                                 out_specs=(P(EXAMPLES), P()), check_vma=False))


def _eval(eqn, env, taps):
    invals = [v.val if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars]
    if eqn.primitive is _product:
        tap = taps[eqn.params["tap"]]
        outs = [tap.primitive.bind(*invals, **tap.params)]
    else:
        outs = layer_grads._bind(eqn, invals)
    env.update(zip(eqn.outvars, outs))
