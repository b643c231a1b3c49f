"""Layer by layer: each linear layer pruned from its own inputs (SparseGPT, Wanda, exact refits, LR).

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

:func:`prune_layerwise` runs one of these methods on every plain dense and conv layer of a network,
in forward order, each from the Gram of its inputs on a calibration batch.
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

from . import checks, layer_grads, pytree
from .constraints import NM, Constraint, Groups, LayerBudgets, final_sparsity, layer_quotas
from .gradients import DEFAULT_CHUNK, LossFn, batch_size, chunk_starts
from .contract import Method
from .loss_check import check_loss_fn
from .methods import LR
from .operators import Linear, Operator, matmul
from .prune import PruneResult
from .pytree import PyTree, Select

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
# the methods and the driver


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
        >>> from swapjax.layerwise import Refit
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


class LayerReport(NamedTuple):
    """One layer of a layer-wise prune: its leaf, d_in × d_out, the rows of A (examples × positions),
    the weights kept, and the relative reconstruction error ‖A(W̄ − W)‖²_F / ‖AW̄‖²_F."""

    name: str
    d_in: int
    d_out: int
    rows: int
    kept: int
    error: float


def prune_layerwise(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    sparsity: Optional[float] = None,
    method: Optional[LayerMethod] = None,
    constraint: Optional[Constraint] = None,
    sequential: bool = True,
    select: Optional[Select] = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
):
    """Prune ``params`` layer by layer: each prunable kernel from the Gram H = AᵀA of its own inputs.

    The layers are the kernels of plain dense (``x @ K``, K's leading axes contracted: Dense,
    DenseGeneral, attention projections) and convolution (HWIO, one feature group) layers, found by
    tracing ``loss_fn`` on one example, in the order the forward pass uses them. For each, A holds
    its input rows (examples × positions; a convolution's patches) over ``batch``, and ``method``
    solves min ‖AW̄ − AW‖²_F under the layer's rule: by default :class:`Regression` (LR on the layer's
    regression, from SparseGPT's support; the best of the layer-wise methods on the MLPNet and ViT
    presets), or :class:`SparseGPT`, :class:`Wanda`, :class:`Refit` of either. ``sequential``
    (default): each layer's inputs come from the network with the layers before it already pruned,
    as SparseGPT does; False: every layer from the dense network's activations (one pass).

    ``constraint``: a per-layer budget (default ``LayerBudgets()``, uniform at ``sparsity``, 0.5 by
    default; ``"erk"``; or a mapping {path: s_l}, taken as given: ``sparsity`` may be left out; not
    OWL, which needs the Fisher) or ``NM(n, m)`` along the inputs. Memory: one chunk's activations
    and the layer's d_in × d_in Gram, never N×p.

    Kernels of any float dtype: a bfloat16 or float16 kernel cast to the inputs' dtype before its
    product (Flax's dtype promotion) is a layer like any other; H is accumulated in float32, the
    solve runs in float32 and the result has the kernel's dtype. An input that never fires on the
    batch (H_ii = 0) gets weight 0 in every method (see the module's notes).

    Checked before ``loss_fn`` is first called (ValueError): the arguments, NaN or inf in ``params``
    or in ``batch``, the constraint on the layout (``Constraint.check``: a mapping's paths,
    ``NM(..., ragged="error")``, and a layer whose budget would keep 0 weights, an error naming it:
    lower the sparsity, give it a budget of its own or leave it out with ``select``). During the
    run: a layer whose inputs hold NaN or inf (or whose Gram overflows float32) is a ValueError
    naming it, and every ``method``'s result is checked (shape, a boolean mask, finite, pruned
    weights exactly 0, the rule kept exactly): a ValueError naming the method and the layer otherwise.
    The progress line names every prunable leaf left dense and why: left out by ``select``, ragged
    for N:M or N:M along other axes than the layer's inputs (an error with ``ragged="error"``), used
    otherwise than as one plain layer's kernel (tied, scaled, in a scan, a grouped convolution), or
    not used by ``loss_fn``.

    Compilation: the Grams are computed by one compiled function per distinct shape of a layer's
    input rows (the layer chosen by an argument; each call runs the whole forward pass), and each
    method's solve is compiled once per layer shape, so a network whose layers repeat a few shapes
    compiles a few functions. Layers that read the same rows (q, k and v of one input) share one Gram.

    Returns a :class:`swapjax.PruneResult` with ``mode="layer-wise"``, no stages, and ``layers``: a
    :class:`LayerReport` per pruned layer (its error measured on the inputs it was solved for).

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"Dense_0": {"kernel": rng.normal(size=(8, 6)).astype("float32")},
        ...           "Dense_1": {"kernel": rng.normal(size=(6, 2)).astype("float32")}}
        >>> batch = {"x": rng.normal(size=(32, 8)).astype("float32")}
        >>> loss_fn = lambda p, ex: jnp.sum(jnp.tanh(ex["x"] @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]) ** 2
        >>> result = swapjax.prune_layerwise(loss_fn, params, batch, constraint=swapjax.NM(2, 4), progress=False)
        >>> [(r.name, r.kept) for r in result.layers]     # Dense_1 has 6 inputs, not a multiple of 4: dense
        [('Dense_0/kernel', 24)]
        >>> result.summary()["total"]
        {'kept': 36, 'total': 60, 'sparsity': 0.4, 'constraint': '2:4'}
    """
    method = Regression() if method is None else method
    if isinstance(method, type):
        raise TypeError(f"method: got the class {method.__name__}; pass an instance, e.g. swapjax.{method.__name__}()")
    if not isinstance(method, LayerMethod):
        raise ValueError(f"method: expected a layer-wise method (swapjax.layerwise.SparseGPT() or Wanda()), "
                         f"got {method!r}")
    constraint = LayerBudgets() if constraint is None else constraint
    if not isinstance(constraint, (LayerBudgets, NM)) or constraint.needs_fisher:
        raise ValueError(f"constraint: layer by layer needs a budget per layer, LayerBudgets('uniform' | 'erk' | "
                         f"{{path: sparsity}}) or NM(n, m), got {constraint!r}; a global "
                         "top-k or OWL ranks weights across layers: use swapjax.prune for those")
    sparsity = final_sparsity(sparsity, constraint, default=0.5)  # a LayerBudgets mapping: None, its mean below
    sequential = checks.boolean("sequential", sequential)
    chunk_size = checks.integer("chunk_size", chunk_size, 1)
    progress = checks.boolean("progress", progress)
    lay = pytree.layout(params, select)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    n = batch_size(batch)
    checks.finite_leaves("batch", batch, hint="; the calibration examples must be finite: fix or drop them",
                         examples=True)
    w = pytree.flatten(params, lay)
    # from the layout, before loss_fn is called: a mapping's paths and mean, NM's axes and ragged="error",
    # a layer that would keep 0 weights
    sparsity = constraint.check(lay, sparsity, w)
    counts = np.asarray(constraint.resolve(lay, sparsity, w).counts)
    ragged = set(constraint.ragged_leaves(lay)) if isinstance(constraint, NM) else set()
    check_loss_fn(loss_fn, params, batch)
    log = (lambda msg: print(f"[swapjax] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    position = [i for i, chosen in enumerate(lay.selected) if chosen]  # prunable leaf l = leaves[position[l]]
    layers, reasons = _layers(loss_fn, leaves, treedef, batch, position)
    rules, rows_shape, source = {}, {}, {}
    for tap_index, leaf, shape, rows_key, inputs in layers:
        l = position.index(leaf)
        if lay.names[l] in ragged:
            reasons[leaf] = f"ragged for {constraint.label}: {shape[1]} inputs, not a multiple of {constraint.m}"
        elif isinstance(constraint, NM) and not _along_inputs(constraint, lay.names[l], lay.shapes[l], inputs):
            # layer by layer, N:M groups run along the layer's inputs: another grouping of this leaf is
            # treated as a ragged one (dense, or the error asked for)
            axes = constraint.leaf_axes(lay.names[l], lay.shapes[l])
            if constraint.ragged == "error":
                raise ValueError(f"constraint: {constraint.label} groups {lay.names[l]} {lay.shapes[l]} along axes "
                                 f"{axes}, but layer by layer the groups run along the layer's inputs, axes {inputs} "
                                 f"(the axes its product contracts); pass NM(..., axes=) with those, leave it out "
                                 f"with select, or ragged='dense' to leave it dense")
            reasons[leaf] = f"{constraint.label} along axes {axes}, not the layer's inputs {inputs}"
        else:
            rules[tap_index] = constraint if isinstance(constraint, NM) else int(counts[l])
            rows_shape[tap_index] = shape
            # layers fed the same rows A (q, k and v of one input) share one Gram: A precedes them all in the
            # forward pass, so pruning any of them leaves it unchanged
            source[tap_index] = next((t for t, _, _, key, _ in layers if key == rows_key and t in rules), tap_index)
    dense = [f"{lay.names[position.index(leaf)]} ({why})" for leaf, why in sorted(reasons.items())]
    dense += [f"{name} (left out by select)" for name in _left_out_by_select(params, lay, select)]
    log(f"{type(method).__name__} layer by layer ({'sequential' if sequential else 'from the dense network'}): "
        f"{len(rules)} layers, N={n} examples, {constraint.label}"
        + (f"; left dense: {', '.join(dense)}" if dense else ""))

    current = list(leaves)
    gram = partial(_grams, loss_fn, treedef, batch, tuple(position), chunk_size)
    # one compiled Gram per shape of the input rows: the layer is an argument, the same-shaped layers a group
    groups = {}
    for tap_index in sorted(set(source.values())):
        groups.setdefault(rows_shape[tap_index], []).append(tap_index)
    last_use = {source[t]: t for t in rules}
    grams = {} if sequential else gram(current, tuple(sorted(set(source.values()))))
    reports, masks = [], {}
    for tap_index, leaf, *_ in layers:
        if tap_index not in rules:
            continue
        name = lay.names[position.index(leaf)]
        if source[tap_index] not in grams:  # sequential: from the network pruned up to this layer
            group = tuple(groups[rows_shape[tap_index]])
            grams[source[tap_index]] = gram(current, group, group.index(source[tap_index]))
        H, rows = grams[source[tap_index]]
        if sequential and last_use[source[tap_index]] == tap_index:
            del grams[source[tap_index]]  # memory: only the Grams still to be shared are kept
        if not np.all(np.isfinite(np.asarray(H))):  # on the host: no compilation per shape
            raise ValueError(f"loss_fn: the inputs of layer {name} hold NaN or inf on the batch (or their Gram AᵀA "
                             f"overflows {H.dtype}){' after the layers before it were pruned' if sequential else ''}; "
                             "check the forward pass up to that layer (params and batch are finite)")
        kernel = current[leaf]
        W_bar = jnp.asarray(kernel).reshape(H.shape[0], -1)
        W, mask = _checked_result(method, name, rules[tap_index], W_bar.shape,
                                  method.solve_layer(W_bar, H, rules[tap_index]))
        dtype = jnp.result_type(kernel)
        W = W.astype(dtype)
        if jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max and not np.all(np.isfinite(np.asarray(W, np.float32))):
            raise ValueError(f"method: {type(method).__name__} on {name} returned weights beyond the range of the "
                             f"kernel's dtype {dtype} (inf once cast); prune this layer in float32")
        error = float(_relative_error(W_bar, W, H))
        current[leaf] = W.reshape(jnp.shape(kernel))
        masks[leaf] = np.asarray(mask).reshape(jnp.shape(kernel))
        kept = int(np.sum(mask))
        reports.append(LayerReport(name, W_bar.shape[0], W_bar.shape[1], rows, kept, error))
        log(f"{name}: {W_bar.shape[0]}×{W_bar.shape[1]}, kept {kept}, relative reconstruction error {error:.4g}")
    pruned = jax.tree_util.tree_unflatten(treedef, current)
    mask_leaves = [masks.get(i, np.ones(np.shape(leaves[i]), bool)) if chosen else None
                   for i, chosen in enumerate(lay.selected)]
    return PruneResult(pruned, jax.tree_util.tree_unflatten(treedef, mask_leaves), (), None, "layer-wise",
                       constraint.label, tuple(reports))


def _along_inputs(rule: NM, name: str, shape: tuple, inputs: tuple) -> bool:
    """The leaf's N:M axes are the layer's input axes (axes of size 1 aside: they do not change the groups)."""
    axes = rule.leaf_axes(name, shape)
    return tuple(a for a in axes if shape[a] != 1) == tuple(a for a in inputs if shape[a] != 1)


def _left_out_by_select(params, lay, select) -> list[str]:
    """The leaves the default rule prunes that ``select`` left out."""
    if select is None:
        return []
    rule = pytree.default_rule(params)
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    return [pytree.path_name(p) for (p, x), chosen in zip(with_path, lay.selected) if not chosen and rule(p, x)]


def _checked_result(method, name, rule, shape, out):
    """``method``'s (W, mask) for the layer ``name``, checked: shape (d_in, d_out) each, a boolean mask,
    W finite and exactly 0 where the mask is False, the rule kept exactly. ValueError naming both."""
    who = f"method: {type(method).__name__}.solve_layer on layer {name}"
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"{who} must return (W, kept mask), got {checks._show(out)}")
    W, mask = out
    shapes = (tuple(np.shape(W)), tuple(np.shape(mask)))
    if shapes != (tuple(shape), tuple(shape)):
        raise ValueError(f"{who} returned W of shape {shapes[0]} and a mask of shape {shapes[1]}; expected both "
                         f"{tuple(shape)} (d_in, d_out)")
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise ValueError(f"{who} returned W of dtype {W.dtype}; expected floating-point weights")
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"{who} returned a mask of dtype {mask.dtype}; expected booleans (True = kept)")
    w = np.asarray(W.astype(jnp.promote_types(W.dtype, jnp.float32)))
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{who} returned {int(np.sum(~np.isfinite(w)))} NaN or inf weights of {w.size}")
    nonzero = int(np.count_nonzero(w[~mask]))
    if nonzero:
        raise ValueError(f"{who} returned {nonzero} non-zero weights where its mask prunes; pruned weights must be "
                         "exactly 0")
    if isinstance(rule, NM):
        ids, counts = _nm_ids(rule, *shape)
        kept = np.bincount(ids, weights=mask.ravel(), minlength=counts.size)
        wrong = int(np.sum(kept != counts))
        if wrong:
            raise ValueError(f"{who} keeps {rule.label} in {counts.size - wrong} of its {counts.size} groups of "
                             f"{rule.m} inputs; every group must keep exactly {rule.n}")
    elif int(mask.sum()) != rule:
        raise ValueError(f"{who} kept {int(mask.sum())} weights; the layer's budget is exactly {rule}")
    return W, mask


@jax.jit
def _relative_error(W_bar, W, H):
    """‖A(W̄ − W)‖²_F / ‖AW̄‖²_F = tr(ΔᵀHΔ) / tr(W̄ᵀHW̄) in H's dtype."""
    W_bar, W = W_bar.astype(H.dtype), W.astype(H.dtype)
    delta = W - W_bar
    return jnp.sum(delta * matmul(H, delta)) / jnp.maximum(jnp.sum(W_bar * matmul(H, W_bar)), 1e-30)


@lru_cache(maxsize=64)
def _loss_of_leaves(loss_fn, treedef):
    """loss(leaves, example), one function per (loss_fn, tree structure): the compiled Grams are reused."""
    return lambda leaves, example: loss_fn(jax.tree_util.tree_unflatten(treedef, leaves), example)


_OTHER_USE = "used otherwise than as one layer's kernel: tied, scaled, in a scan or in a regulariser"


def _layers(loss_fn, leaves, treedef, batch, position):
    """([(tap index, leaf index, (rows per example, d_in), rows key, input axes) of each prunable kernel used
    once by a plain layer, in forward order], {leaf index: why it is left dense} for the other prunable
    kernels), from a trace of the loss on one example. Layers with equal rows keys have the same rows A: one
    input x, taken apart the same way. The input axes are the kernel's leading axes that the product contracts."""
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[0], batch)
    pl = layer_grads.plan(_loss_of_leaves(loss_fn, treedef), leaves, first, position, True)
    uses = {}
    for t in pl.taps:
        uses[t.leaf] = uses.get(t.leaf, 0) + 1
    layers, reasons = [], {}
    xs = jax.eval_shape(lambda ls, ex: layer_grads.layer_inputs(pl, ls, ex), leaves, first) if pl.taps else []
    for t, (tap, x) in enumerate(zip(pl.taps, xs)):
        rows = jax.eval_shape(lambda x: layer_grads.patch_rows(tap, x, np.shape(leaves[tap.leaf])), x)
        if uses[tap.leaf] > 1:
            reasons[tap.leaf] = f"used by {uses[tap.leaf]} layers (tied or shared)"
        elif rows is None:
            reasons[tap.leaf] = ("not a plain dense or convolution kernel (batched axes, feature groups, or "
                                 "reshaped before use)")
        else:
            kernel_shape = np.shape(leaves[tap.leaf])
            contracted = (len(tap.params["dimension_numbers"][0][1]) if tap.primitive.name == "dot_general"
                          else len(kernel_shape) - 1)
            layers.append((t, tap.leaf, tuple(rows.shape), _rows_key(tap, kernel_shape), tuple(range(contracted))))
    for leaf in position:
        if leaf not in pl.fast:
            reasons[leaf] = _OTHER_USE
        elif leaf not in uses:
            reasons[leaf] = "not used by loss_fn"
    return layers, reasons


def _rows_key(tap, kernel_shape):
    """What A depends on besides x: the product's layout (its precision aside) and a convolution's window."""
    params = tuple(sorted((k, repr(v)) for k, v in tap.params.items()
                          if k not in ("precision", "preferred_element_type", "out_sharding")))
    window = ()
    if tap.primitive.name == "conv_general_dilated":
        window = tuple(int(kernel_shape[i]) for i in tap.params["dimension_numbers"].rhs_spec[2:])
    return tap.operand, tap.primitive.name, params, window


def _grams(loss_fn, treedef, batch, position, chunk_size, leaves, taps, index=None) -> dict:
    """{tap: (H = AᵀA, rows of A)} over ``batch``, chunk by chunk (an overlapping last chunk counts its
    new examples only); with ``index``, (H, rows) of ``taps[index]`` alone, from a function compiled once
    for all of ``taps`` (layers whose input rows share one shape). H in float32 or wider."""
    n = batch_size(batch)
    b, starts = chunk_starts(n, chunk_size)
    loss = _loss_of_leaves(loss_fn, treedef)
    total, done = None, 0
    for start in starts:
        examples = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(jnp.asarray(a), start, start + b), batch)
        if index is None:
            part = _chunk_grams(loss, tuple(leaves), examples, start + b - done, position, taps)
        else:
            part = [_chunk_gram(loss, tuple(leaves), examples, start + b - done, jnp.asarray(index, jnp.int32),
                                position, taps)]
        total = part if total is None else [(h + g, r + q) for (h, r), (g, q) in zip(total, part)]
        done = start + b
    out = [(h, int(r)) for h, r in total]
    return out[0] if index is not None else dict(zip(taps, out))


def _layer_grams(loss, leaves, examples, new_rows, position):
    """gram(t) -> (AᵀA of tap t over the examples counted, rows), inside a trace: one forward pass."""
    first = jax.tree_util.tree_map(lambda a: a[0], examples)
    pl = layer_grads.plan(loss, list(leaves), first, list(position), True)
    xs = jax.vmap(lambda ex: layer_grads.layer_inputs(pl, list(leaves), ex))(examples)
    c = jax.tree_util.tree_leaves(examples)[0].shape[0]
    counted = jnp.arange(c) >= c - new_rows

    def gram(t):
        tap = pl.taps[t]
        x = jnp.where(counted.reshape((c,) + (1,) * (xs[t].ndim - 1)), xs[t], 0)
        A = jax.vmap(lambda x: layer_grads.patch_rows(tap, x, np.shape(leaves[tap.leaf])))(x)
        A = A.reshape(-1, A.shape[-1])
        A = A.astype(jnp.promote_types(A.dtype, jnp.float32))  # bfloat16 inputs: H accumulated in float32
        return matmul(A.T, A), jnp.sum(counted) * (A.shape[0] // c)

    return gram


@partial(jax.jit, static_argnames=("loss", "position", "taps"))
def _chunk_grams(loss, leaves, examples, new_rows, position, taps):
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    return [gram(t) for t in taps]


@partial(jax.jit, static_argnames=("loss", "position", "taps"))
def _chunk_gram(loss, leaves, examples, new_rows, index, position, taps):
    """The Gram of ``taps[index]``: ``index`` is traced, so one compilation serves every layer of ``taps``."""
    gram = _layer_grams(loss, leaves, examples, new_rows, position)
    if len(taps) == 1:
        return gram(taps[0])
    return jax.lax.switch(index, [partial(gram, t) for t in taps])
