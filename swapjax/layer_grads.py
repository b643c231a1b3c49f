"""Per-example kernel gradients from one batched pass, by tapping the linear layers of a traced loss.

A kernel K enters the loss through linear layers y = op(x, K) (``dot_general``: dense layers;
``conv_general_dilated``: convolutions). For one example i, ∂ℓᵢ/∂K = op(xᵢ, ·)ᵀ δᵢ with
δᵢ = ∂ℓᵢ/∂yᵢ the output cotangent: aᵢᵀδᵢ for a dense layer, the image patches of xᵢ against
δᵢ for a convolution. So the per-example kernel gradients need only the layer inputs xᵢ (from
the forward pass) and the cotangents δᵢ (from the backward pass of the data, as gradients of
zero perturbations e added to each layer's output, y + e), and one batched matrix product per
layer. ``jax.vmap(jax.grad)`` instead builds the kernel gradient of each example inside the
backward pass, which for convolutions becomes a grouped convolution with one group per example
(slow on CPU: several times a batched gradient).

How: the loss of ONE example is traced to a jaxpr with every parameter leaf as an input. A
selected leaf takes the fast path when every use of it is a *tap*: a ``dot_general`` or
``conv_general_dilated`` whose other operand does not derive from a tapped leaf, reached from
the leaf through layout-only operations (reshape, transpose, dtype casts, ...). Any other use
(the kernel multiplied by a mask, inside a ``scan``, in a regulariser) sends that leaf to the
general ``vmap(grad)`` path; both run in the same pass.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# layout-only primitives: y = f(K) is linear, moves or casts entries and nothing else
_LAYOUT = frozenset({"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims",
                     "broadcast_in_dim", "copy", "copy_p", "reduce_precision"})
# calls whose body is evaluated inline when a tapped leaf enters them: name -> param of the body
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr"}
_TAPPABLE = frozenset({"dot_general", "conv_general_dilated"})


@dataclass(frozen=True)
class Tap:
    """One linear use y = op(x, K) of leaf ``leaf``; K = chain(leaf) (layout-only steps)."""

    leaf: int
    chain: tuple  # ((primitive, params), ...) from the leaf to the kernel operand
    primitive: Any  # dot_general or conv_general_dilated
    params: dict
    kernel_pos: int  # which operand of ``primitive`` is the kernel
    out: jax.ShapeDtypeStruct  # y for ONE example
    operand: int = -1  # equal for taps whose other operand x is the same value (q, k and v of one input)
    kernel_shape: tuple = ()  # K's shape, chain(leaf)


@dataclass
class _Trace:
    """State of one interpretation: discover taps (``perts`` None) or run with perturbations."""

    perts: Optional[Sequence[jax.Array]] = None
    taps: list = field(default_factory=list)
    other_use: set = field(default_factory=set)  # leaves with a use that is not a tap
    captured: list = field(default_factory=list)  # the non-kernel operand x of each tap (run)
    operands: list = field(default_factory=list)  # the distinct non-kernel operands seen (discovery)
    emit: Optional[Callable] = None  # discovery: emit(t, invals) stands for tap t's product (a marker)


# ---------------------------------------------------------------- the interpreter
#
# Each value carries an origin (leaf, chain) where it is K = chain(leaf) for a tracked parameter leaf,
# and a flag saying whether it depends on the example (the data). A ``scan`` that a tracked leaf enters
# is unrolled: iteration i sees slice i of each stacked leaf, so each iteration's product is a tap of
# its own whose chain ends with that slice.

def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)  # older JAX: (subfuns, params)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _inline_body(eqn):
    body = eqn.params[_CALLS[eqn.primitive.name]]
    return (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())


def _run(jaxpr, consts, args, origins, data, trace: _Trace):
    """The outputs of ``jaxpr``; a kernel returned as it is counts as a use that is not a tap."""
    outs, out_origins, _ = _interpret(jaxpr, consts, args, origins, data, trace)
    trace.other_use.update(o[0] for o in out_origins if o is not None)
    return outs


def _interpret(jaxpr, consts, args, origins, data, trace: _Trace):
    """(outputs, their origins, their data flags) of ``jaxpr``; origin (leaf, chain) marks K = chain(leaf)."""
    env, origin, dep = {}, {}, set()
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, o, d in zip(jaxpr.invars, args, origins, data):
        env[v] = x
        if o is not None:
            origin[v] = o
        if d:
            dep.add(v)
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        kin = [(i, o) for i, o in enumerate(_origin(origin, v) for v in eqn.invars) if o is not None]
        din = [not isinstance(v, jcore.Literal) and v in dep for v in eqn.invars]
        outs, out_origins, out_data = _step(eqn, invals, kin, din, trace)
        for v, x, o, d in zip(eqn.outvars, outs, out_origins, out_data):
            env[v] = x
            if o is not None:
                origin[v] = o
            if d:
                dep.add(v)
    return ([_read(env, v) for v in jaxpr.outvars], [_origin(origin, v) for v in jaxpr.outvars],
            [not isinstance(v, jcore.Literal) and v in dep for v in jaxpr.outvars])


def _origin(origin, v):
    return None if isinstance(v, jcore.Literal) else origin.get(v)


def _step(eqn, invals, kin, din, trace):
    """(outputs, their origins, their data flags) of one equation."""
    name = eqn.primitive.name
    nothing = [None] * len(eqn.outvars)
    flags = [any(din)] * len(eqn.outvars)
    if not kin:
        return _bind(eqn, invals), nothing, flags
    if name in _LAYOUT and len(eqn.invars) == 1:
        leaf, chain = kin[0][1]
        return _bind(eqn, invals), [(leaf, chain + ((eqn.primitive, dict(eqn.params)),))], flags
    if name in _CALLS:
        body, consts = _inline_body(eqn)
        return _interpret(body, consts, invals, _placed(kin, len(invals)), din, trace)
    if name == "scan":
        return _unrolled_scan(eqn, invals, kin, din, trace)
    if _tappable(eqn, kin, din):
        return [_tap(eqn, invals, kin[0], trace)], nothing, flags
    trace.other_use.update(o[0] for _, o in kin)
    return _bind(eqn, invals), nothing, flags


def _placed(kin, n):
    origins = [None] * n
    for i, o in kin:
        origins[i] = o
    return origins


def _unrolled_scan(eqn, invals, kin, din, trace):
    """A ``scan`` that a tracked leaf enters, evaluated iteration by iteration: a leaf stacked along the
    scanned axis is sliced (slice i is its own layer); a leaf passed whole (a constant of the loop, or in
    the carry) is used once per iteration."""
    prm = eqn.params
    body, nc, nk, length = prm["jaxpr"], prm["num_consts"], prm["num_carry"], prm["length"]
    origins = _placed(kin, len(invals))
    consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
    c_orig, k_orig, x_orig = origins[:nc], origins[nc:nc + nk], origins[nc + nk:]
    c_dep, k_dep, x_dep = din[:nc], list(din[nc:nc + nk]), din[nc + nk:]
    trace.other_use.update(o[0] for o in k_orig if o is not None)  # a kernel in the carry: not a plain layer
    ys = [None] * length
    for step in range(length):
        i = length - 1 - step if prm["reverse"] else step
        x_i = [lax.index_in_dim(x, i, 0, keepdims=False) for x in xs]
        x_o = [None if o is None else (o[0], o[1] + _slice_steps(i, jnp.shape(x))) for o, x in zip(x_orig, xs)]
        outs, out_orig, out_dep = _interpret(body.jaxpr, body.consts, [*consts, *carry, *x_i],
                                             [*c_orig, *([None] * nk), *x_o], [*c_dep, *k_dep, *x_dep], trace)
        trace.other_use.update(o[0] for o in out_orig if o is not None)
        carry, ys[i] = outs[:nk], outs[nk:]
        k_dep = [a or b for a, b in zip(k_dep, out_dep[:nk])]
    stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(eqn.outvars) - nk)]
    return [*carry, *stacked], [None] * len(eqn.outvars), [any(din)] * len(eqn.outvars)


def _slice_steps(i, shape):
    """The chain steps taking slice i of the leading axis (a ``slice`` and a ``squeeze``)."""
    start, limit = (i,) + (0,) * (len(shape) - 1), (i + 1,) + tuple(shape[1:])
    return ((lax.slice_p, dict(start_indices=start, limit_indices=limit, strides=None)),
            (lax.squeeze_p, dict(dimensions=(0,))))


def _tappable(eqn, kin, din) -> bool:
    """A product of ONE tracked kernel with an operand that depends on the example."""
    if eqn.primitive.name not in _TAPPABLE or len(kin) != 1 or not din[1 - kin[0][0]]:
        return False
    if eqn.primitive.name == "conv_general_dilated":
        return kin[0][0] == 1 and eqn.params["batch_group_count"] == 1
    return True


def _tap(eqn, invals, k, trace):
    pos, (leaf, chain) = k
    (y,) = _bind(eqn, invals)
    if trace.perts is None:
        aval = eqn.outvars[0].aval
        x = invals[1 - pos]
        operand = next((i for i, seen in enumerate(trace.operands) if seen is x), len(trace.operands))
        if operand == len(trace.operands):
            trace.operands.append(x)
        trace.taps.append(Tap(leaf, chain, eqn.primitive, dict(eqn.params), pos,
                              jax.ShapeDtypeStruct(aval.shape, aval.dtype), operand, tuple(jnp.shape(invals[pos]))))
        return y if trace.emit is None else trace.emit(len(trace.taps) - 1, invals)
    i = len(trace.captured)
    trace.captured.append(invals[1 - pos])
    return y + trace.perts[i]


# ---------------------------------------------------------------- per-example kernel gradients

def conv_kernel_grad(x, delta, params):
    """∂⟨δ, conv(x, K)⟩/∂K for ``conv_general_dilated(x, K, **params)``: Σ_q patch_q(x) ⊗ δ_q.

    One matrix product per window offset s: G[s] = Σ_{n,q} x[n, q·stride + s·dilation] δ[n, q]ᵀ
    (channels-last; per feature group). Under ``vmap`` each is a batched matrix product, where
    differentiating the convolution would give a grouped convolution with one group per example.
    """
    dn = params["dimension_numbers"]
    g = params["feature_group_count"]
    xc = jnp.transpose(x, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # (n, *spatial, C)
    dc = jnp.transpose(delta, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))  # (n, *out, O)
    n, c, o = xc.shape[0], xc.shape[-1], dc.shape[-1]
    d = dc.reshape(n, -1, g, o // g)
    window = params["window"]
    per_offset = [
        jnp.einsum("nqgc,nqgo->cgo", xs.reshape(n, -1, g, c // g), d, precision=params.get("precision"),
                   preferred_element_type=params.get("preferred_element_type"))
        for xs in _window_slices(xc, window, params)
    ]
    kc = jnp.stack(per_offset).reshape(*window, c // g, o)  # (*window, I, O)
    return jnp.transpose(kc, np.argsort((*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])))


def _window_slices(xc, window, params):
    """For each window offset (row-major), the channels-last input xc under it: (n, *out_spatial, C)."""
    d = len(window)
    lhs_dil = params["lhs_dilation"] or (1,) * d
    rhs_dil = params["rhs_dilation"] or (1,) * d
    strides = params["window_strides"]
    pad = [(0, 0, 0)] + [(lo, hi, ld - 1) for (lo, hi), ld in zip(params["padding"], lhs_dil)] + [(0, 0, 0)]
    xp = lax.pad(xc, jnp.zeros((), xc.dtype), pad)
    out = [(size - (w - 1) * r - 1) // st + 1 for size, w, r, st in zip(xp.shape[1:-1], window, rhs_dil, strides)]
    for offset in np.ndindex(*window):
        start = [o * r for o, r in zip(offset, rhs_dil)]
        limit = [st + (m - 1) * s + 1 for st, m, s in zip(start, out, strides)]
        yield lax.slice(xp, [0, *start, 0], [xp.shape[0], *limit, xp.shape[-1]], [1, *strides, 1])


def _apply_chain(leaf, chain):
    for prim, params in chain:
        leaf = prim.bind(leaf, **params)
    return leaf


def tap_kernel_grad(tap: Tap, x, delta, leaf: jax.ShapeDtypeStruct):
    """∂ℓᵢ/∂leaf through this tap = op(xᵢ, chain(·))ᵀ δᵢ, for ONE example (vmap it)."""
    kernel = jax.eval_shape(lambda w: _apply_chain(w, tap.chain), leaf)
    if tap.primitive.name == "conv_general_dilated":
        dn = tap.params["dimension_numbers"]
        gk = conv_kernel_grad(x, delta, {**tap.params, "window": tuple(kernel.shape[i] for i in dn.rhs_spec[2:])})
    else:
        bind = lambda k: tap.primitive.bind(*((x, k) if tap.kernel_pos == 1 else (k, x)), **tap.params)  # noqa: E731
        (gk,) = jax.linear_transpose(bind, kernel)(delta)
    if not tap.chain:
        return gk
    return jax.linear_transpose(lambda w: _apply_chain(w, tap.chain), leaf)(gk.astype(kernel.dtype))[0]


# ---------------------------------------------------------------- the per-example function

@dataclass(frozen=True)
class Plan:
    """How the gradients of one traced loss are taken: ``fast`` leaves from their taps, ``slow``
    leaves by ``grad``. ``jaxpr`` is None when no leaf is fast (``loss`` is then called as is)."""

    loss: Callable  # loss(leaves, example) -> scalar, for ONE example
    selected: tuple  # indices (into the flat params leaves) of the prunable leaves, in order
    jaxpr: Any = None
    consts: tuple = ()
    taps: tuple = ()
    fast: frozenset = frozenset()

    @property
    def slow(self) -> tuple:
        return tuple(i for i in self.selected if i not in self.fast)


def trace_loss(loss: Callable, leaves: Sequence, example):
    """The closed jaxpr of ``loss(leaves, example)`` for ONE example, or None where it is not a scalar."""
    closed = jax.make_jaxpr(loss)(*jax.tree_util.tree_map(_struct, (list(leaves), example)))
    if len(closed.jaxpr.outvars) != 1 or jnp.shape(closed.jaxpr.outvars[0].aval) != ():
        return None  # not a scalar: grad gives the error
    return closed


def discover(closed, n_leaves: int, tracked: Sequence[int]):
    """(taps, leaves with another use) in a traced loss (:func:`trace_loss`; its first ``n_leaves``
    inputs are the parameter leaves), the ``tracked`` leaves followed through layout operations and
    unrolled scans. Raises what the interpreter cannot replay."""
    jaxpr = closed.jaxpr
    origins = _origins(n_leaves, len(jaxpr.invars), set(tracked))
    trace = _Trace()
    jax.eval_shape(lambda *args: _run(jaxpr, closed.consts, args, origins, _data(n_leaves, len(args)), trace),
                   *[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars])
    return tuple(trace.taps), frozenset(trace.other_use)


def plan(loss: Callable, leaves: Sequence, example, selected: Sequence[int], fast: bool = True) -> Plan:
    """Trace ``loss(leaves, example)`` for ONE example and find the taps of the ``selected`` leaves.

    With ``fast=False``, or when no selected leaf has only tap uses, every leaf takes ``grad``.
    A loss whose jaxpr the interpreter cannot follow takes ``grad`` too, with a warning.
    """
    generic = Plan(loss, tuple(selected))
    closed = trace_loss(loss, leaves, example) if fast else None
    if closed is None:
        return generic
    try:
        taps, other_use = discover(closed, len(leaves), selected)
    except Exception as err:  # noqa: BLE001 - any primitive the interpreter cannot replay
        warnings.warn(f"per-sample gradients: layer taps unavailable ({type(err).__name__}: {err}); "
                      "using vmap(grad) for every leaf", RuntimeWarning, stacklevel=3)
        return generic
    fast_leaves = frozenset(i for i in selected if i not in other_use)
    if not fast_leaves:
        return generic
    return Plan(loss, tuple(selected), closed.jaxpr, tuple(closed.consts),
                tuple(t for t in taps if t.leaf in fast_leaves), fast_leaves)


def _origins(n_leaves: int, n_args: int, tapped: set) -> list:
    return [(i, ()) if i in tapped else None for i in range(n_leaves)] + [None] * (n_args - n_leaves)


def _data(n_leaves: int, n_args: int) -> list:
    """The arguments that depend on the example: those after the parameter leaves."""
    return [False] * n_leaves + [True] * (n_args - n_leaves)


def loss_and_grads(pl: Plan, leaves: Sequence, example):
    """(ℓ, [∂ℓ/∂leaf for each selected leaf]) for ONE example, in one forward and backward pass."""
    perts = [jnp.zeros(t.out.shape, t.out.dtype) for t in pl.taps]

    def loss(slow_vals, perts):
        vals = list(leaves)
        for i, v in zip(pl.slow, slow_vals):
            vals[i] = v
        if pl.jaxpr is None:
            return pl.loss(vals, example), []
        args = vals + jax.tree_util.tree_leaves(example)
        trace = _Trace(perts=perts)
        (out,) = _run(pl.jaxpr, pl.consts, args, _origins(len(vals), len(args), pl.fast),
                      _data(len(vals), len(args)), trace)
        return out, trace.captured

    (value, xs), (g_slow, deltas) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        [leaves[i] for i in pl.slow], perts)
    grads = dict(zip(pl.slow, g_slow))
    for tap, x, d in zip(pl.taps, xs, deltas):
        g = tap_kernel_grad(tap, x, d, _struct(leaves[tap.leaf]))
        grads[tap.leaf] = grads[tap.leaf] + g if tap.leaf in grads else g
    zeros = lambda i: jnp.zeros(jnp.shape(leaves[i]), jnp.result_type(leaves[i]))  # noqa: E731 (unused leaf)
    return value, [grads[i] if i in grads else zeros(i) for i in pl.selected]


def layer_inputs(pl: Plan, leaves: Sequence, example) -> list:
    """The non-kernel operand x of each tap of ``pl`` (the layer inputs), for ONE example: one forward pass."""
    args = list(leaves) + jax.tree_util.tree_leaves(example)
    trace = _Trace(perts=[jnp.zeros(t.out.shape, t.out.dtype) for t in pl.taps])
    _run(pl.jaxpr, pl.consts, args, _origins(len(leaves), len(args), pl.fast), _data(len(leaves), len(args)), trace)
    return trace.captured


def layer_rows(tap: Tap, x):
    """A (B, rows, d_in): the input rows of each of the tap's B layers (its kernel's batch axes, row-major; B = 1
    without), with op(x, K) = A_b·W_b for layer b's weights W_b (:func:`swapjax.layers.tap_layers`), for ONE
    example; None for a convolution with several feature groups. Rows: x's other axes (positions, a
    convolution's output pixels); columns: the contracted axes in the kernel's axis order (a convolution's
    patch: window offsets, then input channels). A is in x's dtype: the caller accumulates AᵀA in float32."""
    if tap.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = tap.params["dimension_numbers"]
        x_in, k_in, x_batch = (lc, rc, lb) if tap.kernel_pos == 1 else (rc, lc, rb)
        x_in = [a for _, a in sorted(zip(k_in, x_in))]  # x's contracted axes in the kernel's order
        rest = [a for a in range(x.ndim) if a not in x_in and a not in x_batch]
        B = math.prod(x.shape[a] for a in x_batch)
        return jnp.transpose(x, (*x_batch, *rest, *x_in)).reshape(B, -1, math.prod(x.shape[a] for a in x_in))
    if tap.params["feature_group_count"] != 1:
        return None
    dn = tap.params["dimension_numbers"]
    window = tuple(int(tap.kernel_shape[i]) for i in dn.rhs_spec[2:])
    xc = jnp.transpose(x, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # (n, *spatial, C)
    slices = jnp.stack(list(_window_slices(xc, window, tap.params)), axis=-2)  # (n, *out, offsets, C)
    return slices.reshape(1, -1, slices.shape[-2] * slices.shape[-1])  # columns in the kernel's (*window, C) order


def rows_key(tap: Tap) -> tuple:
    """What the rows A of the tap's layers depend on besides its input x: which of x's axes the product
    contracts and batches, and for a convolution its window, strides, padding and dilations. Taps with
    equal keys (q, k and v of one input) have the same A."""
    if tap.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = tap.params["dimension_numbers"]
        x_in, k_in, x_batch = (lc, rc, lb) if tap.kernel_pos == 1 else (rc, lc, rb)
        return tap.operand, "dot_general", tuple(a for _, a in sorted(zip(k_in, x_in))), tuple(x_batch)
    params = tuple(sorted((k, repr(v)) for k, v in tap.params.items()
                          if k not in ("precision", "preferred_element_type", "out_sharding")))
    return tap.operand, "conv", params, tuple(int(tap.kernel_shape[i]) for i in tap.params["dimension_numbers"].rhs_spec[2:])


def _struct(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
