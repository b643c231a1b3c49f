"""The gradient matrix X ∈ R^{N×p} as a linear operator, formed or not.

The solver needs X only through the products Xv and Xᵀu and through
diag(XᵀX). Row i of X is g_i = ∇_w ℓ_i(w), so neither product needs X:

    Xv  = d/dτ [ℓ_1(w + τv), …, ℓ_N(w + τv)] at τ = 0    (a jvp of the N losses)
    Xᵀu = ∇_w Σ_i u_i ℓ_i(w)                              (its transpose, a vjp)

``jax.linearize`` evaluates the network once and keeps what the products need
(the layers' activations for the N examples), so each product costs about one
batched forward pass, and memory is O(p + N·activations) instead of O(N·p).
diag(XᵀX) = Σ_i g_i ⊙ g_i is accumulated over chunks of examples once, when
the operator is built (:func:`linearized_gradients`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from . import checks, pytree
from .gradients import (DEFAULT_CHUNK, _ChunkProgress, batch_size, chunk_losses_and_grads, chunk_starts,
                        column_sq_norms)
from .loss_check import check_loss_fn
from .pytree import PyTree, Select

#: Bytes of per-sample gradients one chunk of :func:`linearized_gradients` may hold (c·p·4 ≤ this).
CHUNK_BYTES = 1 << 28


@jax.tree_util.register_pytree_node_class
class GradientOperator:
    """X ∈ R^{N×p}, the per-sample gradients of ``loss_fn`` at ``params`` over ``batch``, never formed.

    Built by :func:`linearized_gradients`; ``method.solve(X, w_bar, k)`` of LR,
    SWAP and Magnitude accepts it in place of the matrix. ``col_sq`` =
    diag(XᵀX). A pytree (the arrays are its leaves), so it passes through ``jit``.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(6, 3)).astype("float32")}
        >>> batch = {"x": rng.normal(size=(10, 6)).astype("float32")}
        >>> loss_fn = lambda params, ex: jnp.sum(jnp.tanh(ex["x"] @ params["w"]) ** 2)
        >>> _, X_op = swapjax.linearized_gradients(loss_fn, params, batch, progress=False)
        >>> X_op.shape                                   # (N, p), never formed
        (10, 18)
        >>> X = swapjax.per_sample_grads(loss_fn, params, batch, progress=False)
        >>> v = jnp.ones(18)
        >>> Xv = jax.jit(lambda op, v: swapjax.operators.linear(op).mv(v))(X_op, v)
        >>> bool(jnp.allclose(Xv, X @ v, rtol=1e-5, atol=1e-5))
        True
    """

    def __init__(self, loss_fn, params: PyTree, batch: PyTree, lay: pytree.Layout, col_sq: jax.Array):
        self.loss_fn, self.params, self.batch, self.lay, self.col_sq = loss_fn, params, batch, lay, col_sq

    @property
    def shape(self) -> tuple[int, int]:
        return (batch_size(self.batch), self.lay.size)

    @property
    def dtype(self):
        return self.col_sq.dtype

    def tree_flatten(self):
        return (self.params, self.batch, self.col_sq), (self.loss_fn, self.lay)

    @classmethod
    def tree_unflatten(cls, aux, children):
        params, batch, col_sq = children
        return cls(aux[0], params, batch, aux[1], col_sq)

    def __repr__(self) -> str:
        return f"GradientOperator(N={self.shape[0]}, p={self.shape[1]}, loss_fn={getattr(self.loss_fn, '__name__', '?')})"


def matmul(a, b) -> jax.Array:
    """a @ b in full float32 on every backend, for the products with X. At XLA's default precision a GPU
    rounds float32 operands to TF32, and for X·v it first writes a rounded copy of X: a second N×p array
    (measured on an H100). On a CPU both are the same product."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


class Linear(NamedTuple):
    """X through its products, inside a trace: ``mv(v)`` = Xv, ``rmv(u)`` = Xᵀu, ``col_sq()`` = diag(XᵀX).
    ``matrix`` is X where it is formed (the Gram-based backsolve needs its columns), else None."""

    mv: Callable
    rmv: Callable
    col_sq: Callable
    n: int
    p: int
    dtype: object
    matrix: Optional[jax.Array]


def example_losses(loss_fn, params: PyTree, batch: PyTree, lay: pytree.Layout) -> Callable:
    """w ↦ (ℓ_1(w), …, ℓ_N(w)): the per-example losses as a function of the flat prunable weights,
    whose linearisation gives Xv (jvp) and Xᵀu (its transpose)."""

    def losses(w):
        tree = pytree.unflatten(w, params, lay)
        return jax.vmap(lambda example: loss_fn(tree, example))(batch)

    return losses


def linear(X) -> Linear:
    """The products of X: a matrix, a :class:`GradientOperator` (linearised here, once per call:
    call it outside loops), or a :class:`Linear` (returned as is)."""
    if isinstance(X, Linear):
        return X
    if isinstance(X, GradientOperator):
        w = pytree.flatten(X.params, X.lay)
        _, jvp = jax.linearize(example_losses(X.loss_fn, X.params, X.batch, X.lay), w)
        vjp = jax.linear_transpose(jvp, w)
        n, p = X.shape
        return Linear(jvp, lambda u: vjp(u.astype(w.dtype))[0], lambda: X.col_sq, n, p, w.dtype, None)
    n, p = X.shape
    return Linear(lambda v: matmul(X, v), lambda u: matmul(u, X), lambda: column_sq_norms(X), n, p, X.dtype, X)


@partial(jax.jit, static_argnames=("loss_fn", "lay", "fast"))
def _chunk_sq_norms(loss_fn, params, examples, new_rows, lay, fast):
    """(ℓ_i of the chunk, Σ_i m_i g_i ⊙ g_i) with m_i = 1 for the rows not counted by an earlier chunk."""
    values, grads = chunk_losses_and_grads(loss_fn, params, examples, lay, fast)
    weight = (jnp.arange(len(values)) >= len(values) - new_rows).astype(lay.dtype)
    sq = [weight @ jnp.square(g.reshape(len(values), -1).astype(lay.dtype)) for g in grads]
    return values, jnp.concatenate(sq)


def linearized_gradients(
    loss_fn,
    params: PyTree,
    batch: PyTree,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    fast: bool = True,
) -> tuple[jax.Array, GradientOperator]:
    """(ℓ ∈ R^N, X as a :class:`GradientOperator`): the per-sample gradients without the N×p matrix.

    One pass over ``batch`` in chunks computes the losses and diag(XᵀX) (and
    checks both are finite); the chunk holds at most ``chunk_size`` examples
    and at most ``CHUNK_BYTES`` of gradients, so memory stays O(p) beyond the
    model. Arguments as :func:`swapjax.per_sample_grads`. ``swapjax.prune(...,
    mode="matrix-free")`` builds one per stage.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(6, 3)).astype("float32")}
        >>> batch = {"x": rng.normal(size=(10, 6)).astype("float32")}
        >>> loss_fn = lambda params, ex: jnp.sum(jnp.tanh(ex["x"] @ params["w"]) ** 2)
        >>> losses, X_op = swapjax.linearized_gradients(loss_fn, params, batch, progress=False)
        >>> X = swapjax.per_sample_grads(loss_fn, params, batch, progress=False)
        >>> w_bar = jnp.ravel(params["w"])
        >>> lr = swapjax.LR(lam=0.01)
        >>> on_X, on_op = lr.solve(X, w_bar, 5)[1], lr.solve(X_op, w_bar, 5)[1]
        >>> bool(jnp.all(on_X.support == on_op.support)), int(on_op.support.sum())
        (True, 5)
    """
    batch_size(batch)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    lay = pytree.layout(params, select)
    check_loss_fn(loss_fn, params, batch)
    return linearize(loss_fn, params, batch, lay, chunk_size, progress, fast)


def linearize(loss_fn, params, batch, lay, chunk_size, progress=True, fast=True):
    """:func:`linearized_gradients` on checked arguments (``swapjax.prune`` checks them once)."""
    n = batch_size(batch)
    itemsize = jnp.dtype(lay.dtype).itemsize
    b, starts = chunk_starts(n, max(1, min(chunk_size, CHUNK_BYTES // (itemsize * lay.size))))
    report = _ChunkProgress(len(starts), n) if progress else None
    losses, col_sq, done = [], jnp.zeros(lay.size, lay.dtype), 0
    for i, start in enumerate(starts):
        examples = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(jnp.asarray(a), start, start + b), batch)
        values, sq = _chunk_sq_norms(loss_fn, params, examples, start + b - done, lay, fast)
        losses.append(values[done - start:])
        col_sq, done = col_sq + sq, start + b
        if report:
            report(i + 1, done)
    losses = jnp.concatenate(losses)
    checks.finite_losses(losses)
    if not bool(jnp.all(jnp.isfinite(col_sq))):
        raise ValueError("gradients: the per-sample gradients contain NaN or inf (or overflow when squared); "
                         "check the loss function and the batch")
    return losses, GradientOperator(loss_fn, params, batch, lay, col_sq)
