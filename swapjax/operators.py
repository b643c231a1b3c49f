"""X ∈ R^{N×p}, the per-sample gradients, as one interface for every solver, held three ways.

The solvers need X through the products Xv and Xᵀu and diag(XᵀX); where X is
formed, also its columns (Grams X_S X_Sᵀ, column blocks). :class:`Operator`
states that interface; each way of holding X is one subclass:

- :class:`Formed`: the matrix, on one device (``formed = True``);
- :class:`RowSharded`: the matrix with its rows split over devices (``formed = True``;
  diag(XᵀX) per device, then one sum);
- :class:`GradientOperator`: never formed (``formed = False``). Row i of X is
  g_i = ∇_w ℓ_i(w), so

      Xv  = d/dτ [ℓ_1(w + τv), …, ℓ_N(w + τv)] at τ = 0    (a jvp of the N losses)
      Xᵀu = ∇_w Σ_i u_i ℓ_i(w)                              (its transpose, a vjp)

  ``jax.linearize`` evaluates the network once and keeps what the products need
  (the layers' activations for the N examples), so each product costs about one
  batched forward pass, and memory is O(p + N·activations) instead of O(N·p).
  diag(XᵀX) = Σ_i g_i ⊙ g_i is accumulated over chunks of examples once, when the
  operator is built (:func:`linearized_gradients`).

Inside a trace, :func:`linear` gives the products as a :class:`Linear` (one
linearisation per call). :func:`as_operator` turns a plain matrix into the
operator for it; which way ``swapjax.prune`` holds X is chosen in one place,
:mod:`swapjax.holding`, from the memory estimate.
"""
from __future__ import annotations

import abc
from functools import partial, singledispatch
from typing import Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from . import checks, layers, pytree
from .gradients import (DEFAULT_CHUNK, _ChunkProgress, batch_size, check_finite, chunk_losses_and_grads,
                        chunk_starts, column_sq_norms, row_sharding, sharded_column_sq_norms)
from .pytree import PyTree, Select

#: Bytes of per-sample gradients one chunk of :func:`linearized_gradients` may hold (c·p·4 ≤ this).
CHUNK_BYTES = 1 << 28


def matmul(a, b) -> jax.Array:
    """a @ b in full float32 on every backend, for the products with X. At XLA's default precision a GPU
    rounds float32 operands to TF32, and for X·v it first writes a rounded copy of X: a second N×p array
    (measured on an H100). On a CPU both are the same product."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


class Linear(NamedTuple):
    """X through its products, inside a trace: ``mv(v)`` = Xv, ``rmv(u)`` = Xᵀu, ``col_sq()`` = diag(XᵀX).
    ``matrix`` is X where it is formed (Grams and column blocks need its columns), else None."""

    mv: Callable
    rmv: Callable
    col_sq: Callable
    n: int
    p: int
    dtype: object
    matrix: Optional[jax.Array]


class Operator(abc.ABC):
    """The interface of X ∈ R^{N×p} that every solver uses, and nothing else.

    A subclass states how X is held: ``shape``, ``col_sq`` = diag(XᵀX), and
    ``products()``, the :class:`Linear` of Xv and Xᵀu inside a trace. ``formed``
    (a class attribute) says whether X's columns are in memory; then ``matrix``
    is X, and the solvers use Grams and column blocks (methods that need them,
    such as WoodFisher, refuse an operator that is not formed). A subclass is a
    pytree (register it with ``jax.tree_util.register_pytree_node_class``) so it
    passes through ``jit``. ``label`` names the way in progress lines.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> X = swapjax.Formed(np.arange(6.0, dtype="float32").reshape(2, 3))
        >>> X.formed, X.shape, X.col_sq.tolist()          # diag(XᵀX)
        (True, (2, 3), [9.0, 17.0, 29.0])
        >>> A = X.products()
        >>> A.mv(jnp.ones(3)).tolist(), A.rmv(jnp.ones(2)).tolist()   # Xv, Xᵀu
        ([3.0, 12.0], [3.0, 5.0, 7.0])

        A new way of holding X is a subclass; the tests define one, X held as two
        column blocks that are never joined (``tests/test_operators.py``).
    """

    formed: ClassVar[bool] = False
    label: ClassVar[str] = "operator"

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """(N, p)."""

    @property
    def dtype(self):
        return self.col_sq.dtype

    @property
    @abc.abstractmethod
    def col_sq(self) -> jax.Array:
        """diag(XᵀX) ∈ R^p, the squared column norms."""

    @abc.abstractmethod
    def products(self) -> Linear:
        """Xv and Xᵀu (and diag(XᵀX)) for use inside a trace; call it once per traced function."""

    @property
    def matrix(self) -> jax.Array:
        """X itself, where it is formed."""
        raise ValueError(f"X: this {type(self).__name__} holds X unformed ({self.label}), so it has no columns "
                         "to read; use a method that needs only products (LR, SWAP, Magnitude), or form X")

    def check_finite(self, name: str = "X") -> None:
        """ValueError naming the rows if X has NaN or inf entries (an operator not formed checks when built)."""


@jax.tree_util.register_pytree_node_class
class Formed(Operator):
    """X formed, as one (N, p) matrix (half precisions become float32). diag(XᵀX) is computed once,
    on first use. Every method's ``solve`` wraps a plain matrix in one (:func:`as_operator`).

    Examples:
        >>> import numpy as np, swapjax
        >>> X = swapjax.Formed(np.eye(3, dtype="float16"))
        >>> X.dtype, X.matrix.shape
        (dtype('float32'), (3, 3))
        >>> swapjax.Formed(np.ones(3))
        Traceback (most recent call last):
        ValueError: X: expected a 2-D (N, p) matrix, got shape (3,)
    """

    formed = True
    label = "in-memory"

    def __init__(self, X, col_sq: Optional[jax.Array] = None):
        if jnp.ndim(X) != 2:
            raise ValueError(f"X: expected a 2-D (N, p) matrix, got shape {jnp.shape(X)}")
        X = jnp.asarray(X)  # half precisions are solved in float32 (no float16 linear algebra on CPU)
        self._X, self._col_sq = X.astype(jnp.promote_types(X.dtype, jnp.float32)), col_sq

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._X.shape)

    @property
    def dtype(self):
        return self._X.dtype

    @property
    def matrix(self) -> jax.Array:
        return self._X

    @property
    def col_sq(self) -> jax.Array:
        if self._col_sq is None:
            concrete = not isinstance(self._X, jax.core.Tracer)
            self._col_sq = sharded_column_sq_norms(self._X) if concrete else column_sq_norms(self._X)
        return self._col_sq

    def products(self) -> Linear:
        X = self._X
        return Linear(lambda v: matmul(X, v), lambda u: matmul(u, X), lambda: self.col_sq, X.shape[0], X.shape[1],
                      X.dtype, X)

    def check_finite(self, name: str = "X") -> None:
        check_finite(self._X, name)

    def tree_flatten(self):
        return (self._X, self._col_sq), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        op = object.__new__(cls)
        op._X, op._col_sq = children
        return op

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.shape[0]}, p={self.shape[1]}, dtype={self.dtype})"


@jax.tree_util.register_pytree_node_class
class RowSharded(Formed):
    """X formed with its rows split over several devices (as ``per_sample_grads(..., devices=...)``
    returns it): a solve under ``jit`` runs sharded (Xw, rᵀX and Grams as SPMD programs), and
    diag(XᵀX) is summed per device, then over the devices.

    Examples:
        >>> import jax, numpy as np, swapjax
        >>> X = np.ones((8, 3), "float32")
        >>> if jax.device_count() > 1:                   # per_sample_grads(..., devices="all") builds such an X
        ...     X = jax.device_put(X, jax.sharding.NamedSharding(
        ...         jax.sharding.Mesh(jax.devices()[:2], ("examples",)), jax.sharding.PartitionSpec("examples")))
        ...     assert type(swapjax.operators.as_operator(X)) is swapjax.RowSharded
        >>> swapjax.RowSharded(np.ones((8, 3), "float32"))   # on one device
        Traceback (most recent call last):
        ValueError: X: expected a matrix sharded over its rows on several devices (per_sample_grads(..., devices=...)); a one-device X is a Formed operator
    """

    label = "in-memory, row-sharded"

    def __init__(self, X, col_sq: Optional[jax.Array] = None):
        super().__init__(X, col_sq)
        if row_sharding(X) is None:
            raise ValueError("X: expected a matrix sharded over its rows on several devices "
                             "(per_sample_grads(..., devices=...)); a one-device X is a Formed operator")


@singledispatch
def as_operator(X) -> Operator:
    """X as an :class:`Operator`: an operator as is; a matrix as :class:`RowSharded` where its rows are
    split over devices, else :class:`Formed`."""
    X = jnp.asarray(X)
    sharded = not isinstance(X, jax.core.Tracer) and row_sharding(X) is not None
    return RowSharded(X) if sharded else Formed(X)


@as_operator.register
def _(X: Operator) -> Operator:
    return X


@singledispatch
def linear(X) -> Linear:
    """The products of X (a matrix, an :class:`Operator`, or a :class:`Linear`, returned as is);
    an operator not formed is linearised here, once per call: call it outside loops."""
    return as_operator(X).products()


@linear.register
def _(X: Linear) -> Linear:
    return X


@jax.tree_util.register_pytree_node_class
class GradientOperator(Operator):
    """X ∈ R^{N×p}, the per-sample gradients of ``loss_fn`` at ``params`` over ``batch``, never formed.

    Built by :func:`linearized_gradients`; every method that needs only
    products (LR, SWAP, Magnitude) accepts it in place of the matrix.
    ``col_sq`` = diag(XᵀX). A pytree (the arrays are its leaves), so it passes
    through ``jit``.

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

    label = "matrix-free"

    def __init__(self, loss_fn, params: PyTree, batch: PyTree, lay: pytree.Layout, col_sq: jax.Array):
        self.loss_fn, self.params, self.batch, self.lay, self._col_sq = loss_fn, params, batch, lay, col_sq

    @property
    def shape(self) -> tuple[int, int]:
        return (batch_size(self.batch), self.lay.size)

    @property
    def col_sq(self) -> jax.Array:
        return self._col_sq

    def products(self) -> Linear:
        w = pytree.flatten(self.params, self.lay)
        _, jvp = jax.linearize(example_losses(self.loss_fn, self.params, self.batch, self.lay), w)
        vjp = jax.linear_transpose(jvp, w)
        n, p = self.shape
        return Linear(jvp, lambda u: vjp(u.astype(w.dtype))[0], lambda: self._col_sq, n, p, w.dtype, None)

    def tree_flatten(self):
        return (self.params, self.batch, self._col_sq), (self.loss_fn, self.lay)

    @classmethod
    def tree_unflatten(cls, aux, children):
        params, batch, col_sq = children
        return cls(aux[0], params, batch, aux[1], col_sq)

    def __repr__(self) -> str:
        return f"GradientOperator(N={self.shape[0]}, p={self.shape[1]}, loss_fn={getattr(self.loss_fn, '__name__', '?')})"


def example_losses(loss_fn, params: PyTree, batch: PyTree, lay: pytree.Layout) -> Callable:
    """w ↦ (ℓ_1(w), …, ℓ_N(w)): the per-example losses as a function of the flat prunable weights,
    whose linearisation gives Xv (jvp) and Xᵀu (its transpose)."""

    def losses(w):
        tree = pytree.unflatten(w, params, lay)
        return jax.vmap(lambda example: loss_fn(tree, example))(batch)

    return losses


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
    lay = layers.prunable(loss_fn, params, batch, select)  # the layers loss_fn uses, as prune takes them
    loss_fn = layers.staged(loss_fn, params, batch)  # its program, run from its jaxpr under every transform
    return linearize(loss_fn, params, batch, lay, chunk_size, progress, fast)


def linearize(loss_fn, params, batch, lay, chunk_size, progress=True, fast=True):
    """:func:`linearized_gradients` on checked arguments (``swapjax.prune`` checks them once)."""
    n = batch_size(batch)
    itemsize = jnp.dtype(lay.dtype).itemsize
    b, starts = chunk_starts(n, max(1, min(chunk_size, CHUNK_BYTES // (itemsize * lay.size))))
    report = _ChunkProgress(len(starts), n, progress) if progress else None
    losses, col_sq, done = [], jnp.zeros(lay.size, lay.dtype), 0
    arrays = jax.tree_util.tree_map(jnp.asarray, batch)  # once; a chunk is a slice at a traced start (one compilation)
    for i, start in enumerate(starts):
        examples = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, b), arrays)
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


#: The dampening of a layer's Gram, δ = PERCDAMP·mean(diag H) (SparseGPT's "percdamp").
PERCDAMP = 0.01


@jax.jit
def live(W, H):
    """SparseGPT's treatment of a layer's inputs that never fire (H_ii = 0): W̄_i = 0 and H_ii = 1, so they are
    pruned first, any of their weights still kept is exactly 0, and H is positive definite once damped.
    Idempotent: the inputs it revives are not dead a second time."""
    dead = jnp.diagonal(H) == 0
    return jnp.where(dead[:, None], 0, W), jnp.where(jnp.diag(dead), jnp.ones((), H.dtype), H)


@jax.tree_util.register_pytree_node_class
class LayerOperator(Operator):
    """X = I_{d_out} ⊗ Lᵀ for one layer, with LLᵀ = H + δI: ½‖X(w − w̄)‖² = ½ Σ_j (w_j − w̄_j)ᵀ(H + δI)(w_j − w̄_j),
    the layer's reconstruction error, so the network-wide solvers (IHT, backsolve by CG, swap search)
    solve the layer's regression. w is the kernel (d_in, d_out) flattened row-major, as the
    constraints group it. Never formed: Xv = vec(LᵀV), Xᵀu = vec(LU), diag(XᵀX) = diag(H + δI) per unit."""

    label = "a layer's Gram"

    def __init__(self, L, d_out: int):
        self.L, self.d_out = L, d_out

    @classmethod
    def from_gram(cls, H, d_out: int, percdamp: float = PERCDAMP) -> "LayerOperator":
        """The operator of the Gram H (inputs that never fire revived, :func:`live`) damped by δ = percdamp·mean diag H."""
        return cls(_damped_cholesky(jnp.asarray(H), jnp.asarray(percdamp, jnp.result_type(H))), d_out)

    @property
    def shape(self):
        size = self.L.shape[0] * self.d_out
        return (size, size)

    @property
    def col_sq(self):
        return jnp.repeat(jnp.sum(self.L * self.L, axis=1), self.d_out)

    def products(self):
        d_in, d_out = self.L.shape[0], self.d_out
        n = d_in * d_out
        return Linear(lambda v: matmul(self.L.T, v.reshape(d_in, d_out)).ravel(),
                      lambda u: matmul(self.L, u.reshape(d_in, d_out)).ravel(), lambda: self.col_sq, n, n,
                      self.L.dtype, None)

    def tree_flatten(self):
        return (self.L,), self.d_out

    @classmethod
    def tree_unflatten(cls, d_out, children):
        return cls(children[0], d_out)


@jax.jit
def _damped_cholesky(H, percdamp):
    """L with LLᵀ = H + δI, δ = percdamp·mean diag H, after H_ii = 1 for the inputs that never fire."""
    _, H = live(jnp.zeros((H.shape[0], 1), H.dtype), H)
    H = H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
    return jnp.linalg.cholesky(H)
