"""Layer methods: one linear layer pruned from the Gram of its inputs (SparseGPT, Wanda, exact refits, LR).

A layer y = xW with calibration inputs A ∈ R^{n×d_in} (n rows: examples × positions, or a
conv's patches) and dense kernel W̄ ∈ R^{d_in×d_out} (Flax layout) is pruned to reproduce
AW̄: minimise ‖AW̄ − AW‖²_F under the constraint. Everything about A that the methods need is
the Gram H = AᵀA (d_in × d_in), so memory is O(d_in² + d_in·d_out), never N×p.

The constraint on one layer is either a kept count k for the whole kernel (a per-layer budget:
uniform, ERK, given) or N:M along the input axis (``swapjax.NM``): every M consecutive
inputs of each output unit keep N.

- :func:`wanda`: score S_ij = |W̄_ij|·‖A_:,i‖ (‖A_:,i‖² = H_ii), compared within each output
  unit (a count per output column, split by largest remainder) or within each N:M group; the
  kept weights keep their values.
- :class:`Refit`: any method's mask, each output unit then refitted exactly (least squares on H).
- :class:`Regression`: LR or SWAP on the layer's regression through :class:`LayerOperator`
  (X = I ⊗ Lᵀ, LLᵀ = H + δI), from SparseGPT's support by default.
- :func:`sparsegpt`: the OBS update of SparseGPT, processed in blocks of inputs. H is damped,
  H + δI with δ = ``percdamp``·mean(diag H); U is the upper Cholesky factor of (H + δI)⁻¹. At
  the start of each block of B inputs the mask of the block is chosen by w²/U_ii² (its share of
  the layer's count, exactly; N:M: at each group's first input); input by input the pruned
  weights' error e = (w_i − q_i)/U_ii is propagated to the block's later inputs (w_i' −= e·U_ii'),
  then to all later inputs in one product.

An input that never fires on the batch (H_ii = 0, so row and column i of H are 0) is treated as
SparseGPT treats it, in every method: H_ii is set to 1 and its weights W̄_i to 0 before the solve, so
it is pruned first and any of its weights the rule still keeps are exactly 0. A layer whose inputs
are all 0 (H = 0) becomes W = 0 under the rule's mask.

Every method works in float32 or wider whatever the kernel's dtype (bfloat16 and float16 kernels
are upcast; H is accumulated in float32); :func:`prune_layerwise` casts the result back.

:func:`swapjax.prune_layerwise` runs one of these methods on every layer of a network, in forward order,
each from the Gram of its inputs on a calibration batch.
"""
from __future__ import annotations

import abc
import sys
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, pytree
from .constraints import NM, Groups, layer_quotas
from .contract import Method
from .methods import LR
from .operators import Linear, Operator, matmul

#: SparseGPT's block of inputs (the published "blocksize") and dampening ("percdamp").
BLOCK = 128
PERCDAMP = 0.01

LayerRule = Union[int, NM]


def _check_layer(W, H, rule) -> tuple[int, int]:
    if jnp.ndim(W) != 2:
        raise ValueError(f"W: expected a 2-D kernel (d_in, d_out), got shape {jnp.shape(W)}")
    d_in, d_out = W.shape
    if jnp.shape(H) != (d_in, d_in):
        raise ValueError(f"H: expected the Gram AᵀA of the layer's inputs, shape ({d_in}, {d_in}), got {jnp.shape(H)}")
    if isinstance(rule, NM):
        if d_in % rule.m:
            raise ValueError(f"rule: {rule.label} groups run along the {d_in} inputs, not a multiple of m = {rule.m}; "
                             "leave this layer dense or use a kept count")
    elif not (isinstance(rule, (int, np.integer)) and not isinstance(rule, bool) and 0 <= rule <= d_in * d_out):
        raise ValueError(f"rule: expected the layer's kept count, an integer in [0, {d_in * d_out}], or NM(n, m), "
                         f"got {rule!r}")
    return d_in, d_out


def _nm_ids(rule: NM, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, counts) of N:M on a (d_in, d_out) kernel flattened row-major: M consecutive inputs of
    one output unit, N kept in each (NumPy, read-only). Along the inputs whatever ``rule.axes`` says (the
    driver leaves dense a kernel whose axes are others)."""
    return _nm_input_ids(rule.n, rule.m, d_in, d_out)


@lru_cache(maxsize=256)
def _nm_input_ids(n: int, m: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    rule = NM(n, m)
    groups = rule.resolve(pytree.layout({"kernel": np.zeros((d_in, d_out), np.float32)}), rule.sparsity)
    ids, counts = np.asarray(groups.ids), np.asarray(groups.counts)
    ids.flags.writeable = counts.flags.writeable = False
    return ids, counts


def _nm_groups(rule: NM, d_in: int, d_out: int) -> Groups:
    """The N:M groups of a (d_in, d_out) kernel flattened row-major: M consecutive inputs of one output unit."""
    ids, counts = _nm_ids(rule, d_in, d_out)
    return Groups(jnp.asarray(counts), jnp.asarray(ids), rule.label)


def _float(W):
    """W as a float32 (or wider) array: bfloat16 and float16 kernels are solved in float32."""
    W = jnp.asarray(W)
    return W.astype(jnp.promote_types(W.dtype, jnp.float32))


def _live(W, H):
    """SparseGPT's treatment of the inputs that never fire (H_ii = 0): W̄_i = 0 and H_ii = 1, so they are
    pruned first, any of their weights still kept is exactly 0, and H is positive definite once damped."""
    dead = jnp.diagonal(H) == 0
    return jnp.where(dead[:, None], 0, W), jnp.where(jnp.diag(dead), jnp.ones((), H.dtype), H)


def wanda(W, H, rule: LayerRule) -> tuple[jax.Array, jax.Array]:
    """Wanda (Sun et al., 2024) on one layer: (W with the pruned weights zeroed, kept mask), both (d_in, d_out).

    Keeps, in each output unit (column), the largest S_ij = |W_ij|·√H_ii: a count per column from
    the layer's count ``rule`` (largest remainder), or N per group of M inputs for ``rule = NM(n, m)``.
    Ties go to the lower input index. No weight update, except that the weights of an input that never
    fires (H_ii = 0) are 0, as in SparseGPT. W in float32 or wider.
    """
    d_in, d_out = _check_layer(W, H, rule)
    W = _float(W)
    if isinstance(rule, NM):
        ids, counts = _nm_ids(rule, d_in, d_out)
    else:  # one group per output unit, the layer's count split by largest remainder
        ids = np.broadcast_to(np.arange(d_out, dtype=np.int32)[None, :], (d_in, d_out)).ravel()
        counts = np.asarray(layer_quotas(rule, [d_in] * d_out), np.int32)
    return _wanda(W, jnp.asarray(H, W.dtype), jnp.asarray(counts), jnp.asarray(ids))


@jax.jit
def _wanda(W, H, counts, ids):
    """One compilation per shape: the counts and groups are arguments."""
    W, H = _live(W, H)
    score = jnp.abs(W) * jnp.sqrt(jnp.maximum(jnp.diagonal(H), 0))[:, None]
    mask = Groups(counts, ids).project(score.ravel()).reshape(W.shape)
    return jnp.where(mask, W, 0), mask


def sparsegpt(W, H, rule: LayerRule, block: int = BLOCK, percdamp: float = PERCDAMP) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh, 2023) on one layer: (the updated W, kept mask), both (d_in, d_out).

    ``rule``: the layer's kept count (each block of ``block`` inputs keeps its share, split by largest
    remainder, so the layer keeps exactly that many) or ``NM(n, m)`` (``block`` a multiple of m).
    ``percdamp``: δ = percdamp·mean(diag H). Ties in the score w²/U_ii² go to the lower index.
    The pruned weights are exactly 0; the kept ones carry the OBS corrections.
    """
    d_in, d_out = _check_layer(W, H, rule)
    block = checks.integer("block", block, 1)
    percdamp = checks.real("percdamp", percdamp, 0.0)
    if isinstance(rule, NM) and block % rule.m:
        raise ValueError(f"block: {block} inputs per block must be a multiple of m = {rule.m} for {rule.label}")
    W = _float(W)
    starts = tuple(range(0, d_in, block))
    if isinstance(rule, NM):
        nm, counts = (rule.n, rule.m), np.zeros(len(starts), np.int32)
    else:
        nm, counts = None, np.asarray(layer_quotas(rule, [min(block, d_in - s) * d_out for s in starts]), np.int32)
    return _sparsegpt(nm, block, W, jnp.asarray(H, W.dtype), jnp.asarray(counts), jnp.asarray(percdamp, W.dtype))


@partial(jax.jit, static_argnums=(0, 1))
def _sparsegpt(nm, block, W, H, counts, percdamp):
    """``nm`` = (n, m) (static), or ``counts``: the kept count of each block of inputs (an argument, so
    layers of one shape share one compilation whatever their counts)."""
    d_in, d_out = W.shape
    W, H = _live(W, H)
    Wt = W.T  # (d_out, d_in): columns are the inputs, as in the published code
    H = H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(d_in, dtype=H.dtype)
    H_inv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(H, lower=True), jnp.eye(d_in, dtype=H.dtype))
    U = jnp.linalg.cholesky(H_inv).T  # upper: H⁻¹ = UᵀU
    pruned = []
    for b, i1 in enumerate(range(0, d_in, block)):
        i2 = min(i1 + block, d_in)
        U1 = U[i1:i2, i1:i2]
        W1 = Wt[:, i1:i2]
        diag = jnp.diagonal(U1)
        if nm:
            mask0 = jnp.zeros_like(W1, bool)  # True = pruned; chosen at each group's first input
        else:
            keep = Groups.top_k(counts[b]).project((W1 ** 2 / diag[None, :] ** 2).ravel())
            mask0 = ~keep.reshape(W1.shape)

        def step(i, carry):
            W1, Q1, E1, mask = carry
            if nm:
                n, m = nm
                group = jax.lax.dynamic_slice_in_dim(W1, i, m, axis=1) ** 2 / jax.lax.dynamic_slice_in_dim(
                    diag, i, m)[None, :] ** 2
                order = jnp.argsort(-group, axis=1, stable=True)  # largest first, ties to the lower index
                kept = jnp.zeros_like(group, bool).at[jnp.arange(group.shape[0])[:, None], order[:, :n]].set(True)
                fresh = jax.lax.dynamic_update_slice_in_dim(mask, ~kept, i, axis=1)
                mask = jnp.where(i % m == 0, fresh, mask)
            w, d = W1[:, i], U1[i, i]
            q = jnp.where(mask[:, i], 0, w)
            err = (w - q) / d
            W1 = W1 - err[:, None] * U1[i][None, :]  # U1 is upper triangular: only inputs ≥ i change
            return W1, Q1.at[:, i].set(q), E1.at[:, i].set(err), mask

        width = i2 - i1
        _, Q1, E1, mask = jax.lax.fori_loop(0, width, step, (W1, jnp.zeros_like(W1), jnp.zeros_like(W1), mask0))
        Wt = Wt.at[:, i1:i2].set(Q1)
        Wt = Wt.at[:, i2:].add(-E1 @ U[i1:i2, i2:])
        pruned.append(mask)
    kept = ~jnp.concatenate(pruned, axis=1).T
    return jnp.where(kept, Wt.T, 0), kept


# ---------------------------------------------------------------------------
# the methods


class LayerMethod(abc.ABC):
    """A method on one layer's problem: ``solve_layer(W, H, rule) -> (W, kept mask)`` with W (d_in, d_out),
    H = AᵀA and ``rule`` the layer's kept count or ``NM(n, m)``; the result must keep exactly the rule."""

    @abc.abstractmethod
    def solve_layer(self, W, H, rule: LayerRule) -> tuple[jax.Array, jax.Array]:
        """The pruned kernel and its kept mask."""


@dataclass(frozen=True)
class Wanda(LayerMethod):
    """Wanda: keep the largest |W_ij|·‖A_:,i‖ in each output unit (:func:`wanda`); no weight update.

    Examples:
        >>> import numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> w, mask = swapjax.Wanda().solve_layer(W, A.T @ A, 12)   # 12 of 24 kept: 4 per output unit
        >>> mask.astype(int).sum(axis=0).tolist()
        [4, 4, 4]
        >>> bool(np.all(np.asarray(w)[np.asarray(mask)] == W[np.asarray(mask)]))   # kept weights unchanged
        True
    """

    def solve_layer(self, W, H, rule):
        return wanda(W, H, rule)


@dataclass(frozen=True)
class SparseGPT(LayerMethod):
    """SparseGPT: the mask by w²/U_ii² per block of ``block`` inputs and the OBS update (:func:`sparsegpt`).

    Examples:
        >>> import numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> w, mask = swapjax.SparseGPT().solve_layer(W, A.T @ A, 12)
        >>> int(mask.sum()), bool(np.all(np.asarray(w)[~np.asarray(mask)] == 0))
        (12, True)
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))        # ‖A(W − W̄)‖_F
        >>> bool(error(w) < error(swapjax.Wanda().solve_layer(W, A.T @ A, 12)[0]))   # the update pays
        True
    """

    block: int = BLOCK
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.integer("block", self.block, 1)
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_layer(self, W, H, rule):
        return sparsegpt(W, H, rule, self.block, self.percdamp)


@dataclass(frozen=True)
class Refit(LayerMethod):
    """``inner``'s mask, then each output unit refitted exactly on its kept inputs:
    w_S = (H + δI)_SS⁻¹ ((H + δI) w̄)_S, the least-squares solution of ‖A(w̄ − w)‖² on the support S
    (δ = ``percdamp``·mean diag H keeps it defined for inputs that never fire). The baseline that
    shows what a mask is worth once its weights are chosen optimally.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.layer_methods import Refit
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> (w0, m0), (w1, m1) = (m.solve_layer(W, A.T @ A, 12) for m in (swapjax.Wanda(), Refit(swapjax.Wanda())))
        >>> bool(np.all(np.asarray(m0) == np.asarray(m1)))     # the same mask
        True
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))
        >>> bool(error(w1) < error(w0))
        True
    """

    inner: LayerMethod
    percdamp: float = PERCDAMP

    def __post_init__(self):
        if not isinstance(self.inner, LayerMethod):
            raise ValueError(f"inner: expected a layer-wise method (swapjax.Wanda(), swapjax.SparseGPT()), "
                             f"got {checks._show(self.inner)}")
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_layer(self, W, H, rule):
        _check_layer(W, H, rule)
        _, mask = self.inner.solve_layer(W, H, rule)
        W = _float(W)
        return _refit(W, jnp.asarray(H, W.dtype), jnp.asarray(mask, bool), jnp.asarray(self.percdamp, W.dtype))


@jax.jit
def _refit(W, H, mask, percdamp):
    W, H = _live(W, H)  # a dead input's row of H is e_i and w̄_i = 0: its weight solves to 0
    H = H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
    rhs = H @ W

    def column(w_rhs, keep):
        both = keep[:, None] & keep[None, :]
        system = jnp.where(both, H, jnp.eye(H.shape[0], dtype=H.dtype))
        return jnp.where(keep, jnp.linalg.solve(system, jnp.where(keep, w_rhs, 0)), 0)

    return jax.vmap(column, in_axes=(1, 1), out_axes=1)(rhs, mask), mask


@jax.tree_util.register_pytree_node_class
class LayerOperator(Operator):
    """X = I_{d_out} ⊗ Lᵀ for one layer, with LLᵀ = H + δI: ½‖X(w − w̄)‖² = ½ Σ_j (w_j − w̄_j)ᵀ(H + δI)(w_j − w̄_j),
    the layer's reconstruction error, so the network-wide solvers (IHT, backsolve by CG, swap search)
    solve the layer's regression. w is the kernel (d_in, d_out) flattened row-major, as the
    constraints group it. Never formed: Xv = vec(LᵀV), Xᵀu = vec(LU), diag(XᵀX) = diag(H + δI) per unit."""

    label = "a layer's Gram"

    def __init__(self, L, d_out: int):
        self.L, self.d_out = L, d_out

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


@dataclass(frozen=True)
class Regression(LayerMethod):
    """A network-wide method (default ``LR(lam=1e-4)``) on the layer's regression: min ½Σ_j (w_j − w̄_j)ᵀ
    (H + δI)(w_j − w̄_j) + (Nλ/2)‖w − w̄‖² under the layer's rule, through :class:`LayerOperator`
    (IHT from the support of ``start``'s solution, default SparseGPT's, or of w̄ where ``start`` is
    None; the backsolve by conjugate gradients; the swap search within the rule's groups). λ is
    relative, as in ``LR``; no held-out selection (the method's "auto" values take their defaults)."""

    method: Method = field(default_factory=lambda: LR(lam=1e-4))
    start: Optional[LayerMethod] = field(default_factory=lambda: SparseGPT())
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.method(self.method)
        if self.start is not None and not isinstance(self.start, LayerMethod):
            raise ValueError(f"start: expected None or a layer-wise method (swapjax.SparseGPT(), swapjax.Wanda()), "
                             f"got {checks._show(self.start)}")
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_layer(self, W, H, rule):
        d_in, d_out = _check_layer(W, H, rule)
        W = _float(W)
        H = jnp.asarray(H, W.dtype)
        if not isinstance(rule, NM) and rule == 0:  # nothing kept: the solvers need k ≥ 1
            return jnp.zeros_like(W), jnp.zeros(W.shape, bool)
        w_bar, L = _live_cholesky(W, H, jnp.asarray(self.percdamp, W.dtype))  # inputs that never fire: w̄_i = 0
        X = LayerOperator(L, d_out)
        groups = _nm_groups(rule, d_in, d_out) if isinstance(rule, NM) else Groups.top_k(rule)
        w_start = None if self.start is None else self.start.solve_layer(W, H, rule)[0].ravel()  # it damps H itself
        w, info = self.method.solve(X, w_bar.ravel(), groups, w_start=w_start)
        return w.reshape(d_in, d_out), info.support.reshape(d_in, d_out)


@jax.jit
def _live_cholesky(W, H, percdamp):
    """(W̄ with the rows of dead inputs 0, L with LLᵀ = H + δI after H_ii = 1 for them)."""
    W, H = _live(W, H)
    H = H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
    return W, jnp.linalg.cholesky(H)
