"""Layer methods: one linear layer pruned from the Gram of its inputs (SparseGPT, Wanda, exact refits, LR).

A layer y = xW with calibration inputs A ∈ R^{n×d_in} (n rows: examples × positions, or a
conv's patches) and dense kernel W̄ ∈ R^{d_in×d_out} (Flax layout) is pruned to reproduce
AW̄: minimise ‖AW̄ − AW‖²_F under the constraint. Everything about A that the methods need is
the Gram H = AᵀA (d_in × d_in), so memory is O(d_in² + d_in·d_out), never N×p.

Every method here is a :class:`swapjax.Method` that needs H (``needs = "H"``; :mod:`swapjax.contract`):
``method.solve_problem(problem)`` reads the layer's Gram ``problem.H``, its shape (d_in, d_out) and
w̄ (the kernel flattened row-major), and returns (w, info) as every method does;
:func:`swapjax.contract.solve_layer` runs one on a layer. The constraint on one layer is its
:class:`swapjax.Groups` over the d_in·d_out weights, row-major: one group holding the layer's kept
count (a per-layer budget: uniform, ERK, given), N:M along the inputs (``groups.nm`` = (n, m): every
M consecutive inputs of each output unit keep N), or other groups with counts of their own (Wanda,
Refit and Regression; SparseGPT takes a count or N:M). :func:`nm_groups` builds N:M on a layer.

- :func:`wanda`: score S_ij = |W̄_ij|·‖A_:,i‖ (‖A_:,i‖² = H_ii), compared within each output
  unit (a count per output column, split by largest remainder) or within each group (N:M); the
  kept weights keep their values. :class:`LayerMagnitude`: the same with |W̄_ij| alone (no H).
- :class:`Refit`: any method's mask, each output unit then refitted exactly (least squares on H).
- :class:`Swaps` (the default of :func:`swapjax.prune_layerwise`): ``start``'s mask (SparseGPT's), then
  single swaps per output unit and exact refits on the Gram, matrix-shaped
  (:mod:`swapjax.layer_search`).
- :class:`Regression`: LR or SWAP on the layer's regression through :class:`LayerOperator`
  (X = I ⊗ Lᵀ, LLᵀ = H + δI), from SparseGPT's support by default.
- :func:`sparsegpt`: the OBS update of SparseGPT, processed in blocks of inputs. H is damped,
  H + δI with δ = ``percdamp``·mean(diag H); U is the upper Cholesky factor of (H + δI)⁻¹. At
  the start of each block of B inputs the mask of the block is chosen by w²/U_ii² (its share of
  the layer's count, exactly; N:M: at each group's first input); input by input the pruned
  weights' error e = (w_i − q_i)/U_ii is propagated to the block's later inputs (w_i' −= e·U_ii'),
  then to all later inputs in one product.

An input that never fires on the batch (H_ii = 0, so row and column i of H are 0) is treated as
SparseGPT treats it, in every method run on a layer (:func:`swapjax.contract.solve_layer`), and by the
functions here on their own: H_ii is set to 1 and its weights W̄_i to 0 before the solve, so
it is pruned first and any of its weights the rule still keeps are exactly 0. A layer whose inputs
are all 0 (H = 0) becomes W = 0 under the rule's mask.

Every method works in float32 or wider whatever the kernel's dtype (bfloat16 and float16 kernels
are upcast; H is accumulated in float32); :func:`prune_layerwise` casts the result back.

:func:`swapjax.prune_layerwise` runs one of these methods on every layer of a network, in forward order,
each from the Gram of its inputs on a calibration batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, layer_search, layer_solvers
from .constraints import NM, Groups, layer_quotas
from .contract import Method, Problem, for_layer
from .methods import LR
from .operators import PERCDAMP, LayerOperator, live as _live, matmul  # noqa: F401  (LayerOperator: re-exported)

#: SparseGPT's block of inputs (the published "blocksize").
BLOCK = 128


def _check_layer(W, H, groups) -> tuple[Groups, int, int]:
    """(the layer's Groups, d_in, d_out), checked."""
    if jnp.ndim(W) != 2:
        raise ValueError(f"W: expected a 2-D kernel (d_in, d_out), got shape {jnp.shape(W)}")
    d_in, d_out = W.shape
    if jnp.shape(H) != (d_in, d_in):
        raise ValueError(f"H: expected the Gram AᵀA of the layer's inputs, shape ({d_in}, {d_in}), got {jnp.shape(H)}")
    if not isinstance(groups, Groups):
        raise ValueError(f"groups: expected the layer's swapjax.Groups (Groups.top_k(k) for a count, "
                         f"nm_groups(n, m, d_in, d_out) for N:M), got {checks._show(groups)}")
    ids = groups.ids
    if ids is not None and tuple(np.shape(ids)) != (d_in * d_out,):
        raise ValueError(f"groups: ids of shape {tuple(np.shape(ids))}, expected ({d_in * d_out},): the layer's "
                         f"{d_in}×{d_out} weights, row-major")
    k = int(groups.k)
    if not 0 <= k <= d_in * d_out:
        raise ValueError(f"groups: keep {k} weights of the layer's {d_in * d_out}")
    return groups, d_in, d_out


def nm_groups(n: int, m: int, d_in: int, d_out: int) -> Groups:
    """N:M along the inputs of a (d_in, d_out) kernel flattened row-major: group j·d_in/m + g holds inputs
    g·m … g·m + m − 1 of output unit j and keeps n (``nm`` = (n, m)), as ``NM(n, m)`` groups a layer.
    ValueError where m does not divide d_in.

    Examples:
        >>> g = nm_groups(2, 4, 8, 3)
        >>> g.nm, g.num_groups, g.ids.reshape(8, 3)[:, 0].tolist()
        ((2, 4), 6, [0, 0, 0, 0, 1, 1, 1, 1])
    """
    if d_in % m:
        raise ValueError(f"groups: {n}:{m} groups run along the {d_in} inputs, not a multiple of m = {m}; "
                         "leave this layer dense or use a kept count")
    ids, counts = _nm_input_ids(n, m, d_in, d_out)
    return Groups(jnp.asarray(counts), jnp.asarray(ids), NM(n, m).label, (n, m))


@lru_cache(maxsize=256)
def _nm_input_ids(n: int, m: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    ids = (np.arange(d_out)[None, :] * (d_in // m) + np.arange(d_in)[:, None] // m).ravel().astype(np.int32)
    counts = np.full(d_in // m * d_out, n, np.int32)
    ids.flags.writeable = counts.flags.writeable = False
    return ids, counts


def _one_group(groups: Groups) -> bool:
    """The layer's whole count in one group (a per-layer budget), with or without ids."""
    return groups.ids is None or groups.num_groups == 1


def _float(W):
    """W as a float32 (or wider) array: bfloat16 and float16 kernels are solved in float32."""
    W = jnp.asarray(W)
    return W.astype(jnp.promote_types(W.dtype, jnp.float32))


def _per_unit(groups: Groups, d_in: int, d_out: int) -> tuple:
    """(counts, ids) of the rankings per output unit: one group per unit with the layer's count split by
    largest remainder where ``groups`` is one group, else the groups as they are."""
    if _one_group(groups):
        ids = np.broadcast_to(np.arange(d_out, dtype=np.int32)[None, :], (d_in, d_out)).ravel()
        counts = np.asarray(layer_quotas(int(groups.k), [d_in] * d_out), np.int32)
        return jnp.asarray(counts), jnp.asarray(ids)
    return groups.counts, groups.ids


def wanda(W, H, groups: Groups) -> tuple[jax.Array, jax.Array]:
    """Wanda (Sun et al., 2024) on one layer: (W with the pruned weights zeroed, kept mask), both (d_in, d_out).

    Keeps, in each output unit (column), the largest S_ij = |W_ij|·√H_ii: a count per column from
    the layer's count (``groups`` one group: largest remainder), or the counts of ``groups`` (N:M:
    N per group of M inputs). Ties go to the lower input index. No weight update, except that the
    weights of an input that never fires (H_ii = 0) are 0, as in SparseGPT. W in float32 or wider.
    """
    groups, d_in, d_out = _check_layer(W, H, groups)
    W = _float(W)
    counts, ids = _per_unit(groups, d_in, d_out)
    return _wanda(W, jnp.asarray(H, W.dtype), counts, ids)


@jax.jit
def _wanda(W, H, counts, ids):
    """One compilation per shape: the counts and groups are arguments."""
    W, H = _live(W, H)
    score = jnp.abs(W) * jnp.sqrt(jnp.maximum(jnp.diagonal(H), 0))[:, None]
    mask = Groups(counts, ids).project(score.ravel()).reshape(W.shape)
    return jnp.where(mask, W, 0), mask


def sparsegpt(W, H, groups: Groups, block: int = BLOCK, percdamp: float = PERCDAMP) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh, 2023) on one layer: (the updated W, kept mask), both (d_in, d_out).

    ``groups``: one group holding the layer's count (each block of ``block`` inputs keeps its share,
    split by largest remainder, so the layer keeps exactly that many) or N:M (``groups.nm``; ``block``
    a multiple of m). ``percdamp``: δ = percdamp·mean(diag H). Ties in the score w²/U_ii² go to the
    lower index. The pruned weights are exactly 0; the kept ones carry the OBS corrections.
    """
    groups, d_in, d_out = _check_layer(W, H, groups)
    block = checks.integer("block", block, 1)
    percdamp = checks.real("percdamp", percdamp, 0.0)
    if groups.nm is None and not _one_group(groups):
        raise ValueError(f"groups: SparseGPT keeps a count per layer or N:M (groups.nm), got {groups.num_groups} "
                         f"groups of other counts ({groups.label}); use Wanda, Refit or Regression")
    if groups.nm is not None and block % groups.nm[1]:
        raise ValueError(f"block: {block} inputs per block must be a multiple of m = {groups.nm[1]} for {groups.label}")
    W = _float(W)
    starts = tuple(range(0, d_in, block))
    if groups.nm is not None:
        nm, counts = tuple(groups.nm), np.zeros(len(starts), np.int32)
    else:
        nm = None
        counts = np.asarray(layer_quotas(int(groups.k), [min(block, d_in - s) * d_out for s in starts]), np.int32)
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


class LayerInfo:
    """A layer method's info: the kept ``support`` (d_in·d_out,), row-major; ``objective`` f = ½ tr(ΔᵀHΔ),
    Δ = W − W̄, the layer's reconstruction error on H as given to the method (computed on first use; NaN
    without H), and its trace (f alone); ``duals`` passed through. No diagnostics of its own."""

    def __init__(self, support, duals=None, W_bar=None, W=None, H=None):
        self.support, self.duals = support, duals
        self._parts = (W_bar, W, H)

    @functools.cached_property
    def objective(self) -> jax.Array:
        W_bar, W, H = self._parts
        if H is None:
            return jnp.full((), jnp.nan, jnp.float32)
        return _reconstruction(W_bar, W, H)

    @property
    def objective_trace(self) -> jax.Array:
        return self.objective[None]

    gradient_seconds = 0.0
    held_out_loss = math.nan

    def describe(self) -> str:
        return ""

    def warnings(self, n: int) -> tuple[str, ...]:
        return ()


def _layer_info(problem: Problem, W, mask) -> tuple[jax.Array, LayerInfo]:
    """(w, info) of a layer method's (W, mask) on ``problem``."""
    return W.ravel(), LayerInfo(jnp.asarray(mask).ravel(), problem.duals, problem.w_bar.reshape(W.shape), W,
                                problem.H)


@jax.jit
def _reconstruction(W_bar, W, H):
    """½ tr(ΔᵀHΔ), Δ = W − W̄."""
    delta = (W - W_bar).astype(H.dtype)
    return 0.5 * jnp.sum(delta * matmul(H, delta))


def _layer(problem: Problem, who: str) -> tuple:
    """(W̄ (d_in, d_out), H) of a layer problem; ValueError naming ``who`` where the driver gave no H."""
    if problem.H is None or problem.shape is None:
        raise ValueError(f"method: {who} needs each layer's Gram H (a layer method): prune layer by layer with "
                         "swapjax.prune_layerwise")
    return problem.w_bar.reshape(problem.shape), problem.H


class LayerMethod(Method):
    """A method on one layer's Gram: ``needs = "H"`` (:mod:`swapjax.contract`); ``solve_problem`` reads
    ``problem.H``, ``problem.shape`` and ``problem.groups``. Run one on a layer with
    :func:`swapjax.contract.solve_layer`, or on every layer with ``swapjax.prune_layerwise``."""

    needs = "H"


@dataclass(frozen=True)
class Wanda(LayerMethod):
    """Wanda: keep the largest |W_ij|·‖A_:,i‖ in each output unit (:func:`wanda`); no weight update.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> w, mask = solve_layer(swapjax.Wanda(), "dense", W, A.T @ A, swapjax.Groups.top_k(12))  # 4 per unit
        >>> mask.astype(int).sum(axis=0).tolist()
        [4, 4, 4]
        >>> bool(np.all(np.asarray(w)[mask] == W[mask]))   # kept weights unchanged
        True
    """

    def solve_problem(self, problem: Problem):
        W, H = _layer(problem, "Wanda")
        W_new, mask = wanda(W, H, problem.groups)
        return _layer_info(problem, W_new, mask)


@dataclass(frozen=True)
class LayerMagnitude(LayerMethod):
    """Magnitude on one layer: keep the largest |W̄_ij| in each output unit (the layer's count split by
    largest remainder) or in each group (N:M); no weight update, no H (``needs = "w"``). Network-wide
    (``swapjax.prune``: no layer shape) it keeps the largest |w̄_i| of each group, as ``Magnitude()``.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> W = np.array([[3.0, -1.0], [0.5, 2.0], [-4.0, 0.1]], "float32")
        >>> w, mask = solve_layer(swapjax.LayerMagnitude(), "dense", W, np.eye(3, dtype="float32"), swapjax.Groups.top_k(2))
        >>> mask.tolist()                                  # one per output unit: |-4| and |2|
        [[False, False], [False, True], [True, False]]
    """

    needs = "w"
    matrix_free = True

    def solve_problem(self, problem: Problem):
        groups = problem.groups
        w_bar = jnp.asarray(problem.w_bar)
        if problem.shape is not None:
            counts, ids = _per_unit(groups, *problem.shape)
            groups = Groups(counts, ids, groups.label)
        support = groups.project(w_bar)
        w = jnp.where(support, w_bar, 0)
        if problem.H is not None:
            return _layer_info(problem, w.reshape(problem.shape), support)
        return w, LayerInfo(support, problem.duals)  # no curvature: f is NaN


@dataclass(frozen=True)
class SparseGPT(LayerMethod):
    """SparseGPT: the mask by w²/U_ii² per block of ``block`` inputs and the OBS update (:func:`sparsegpt`).

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> k = swapjax.Groups.top_k(12)
        >>> w, mask = solve_layer(swapjax.SparseGPT(), "dense", W, A.T @ A, k)
        >>> int(mask.sum()), bool(np.all(np.asarray(w)[~mask] == 0))
        (12, True)
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))        # ‖A(W − W̄)‖_F
        >>> bool(error(w) < error(solve_layer(swapjax.Wanda(), "dense", W, A.T @ A, k)[0]))   # the update pays
        True
    """

    block: int = BLOCK
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.integer("block", self.block, 1)
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_problem(self, problem: Problem):
        W, H = _layer(problem, "SparseGPT")
        W_new, mask = sparsegpt(W, H, problem.groups, self.block, self.percdamp)
        return _layer_info(problem, W_new, mask)


@dataclass(frozen=True)
class Refit(LayerMethod):
    """``inner``'s mask (any method that runs on a layer), then each output unit refitted exactly on its kept
    inputs: w_S = (H + δI)_SS⁻¹ ((H + δI) w̄)_S, the least-squares solution of ‖A(w̄ − w)‖² on the support S
    (δ = ``percdamp``·mean diag H keeps it defined for inputs that never fire), by conjugate gradients on
    every output unit at once until the residual is 10⁻⁶ of its first. The baseline that shows what a
    mask is worth once its weights are chosen optimally.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> from swapjax.layer_methods import Refit
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> k = swapjax.Groups.top_k(12)
        >>> (w0, m0), (w1, m1) = (solve_layer(m, "dense", W, A.T @ A, k) for m in (swapjax.Wanda(), Refit(swapjax.Wanda())))
        >>> bool(np.all(m0 == m1))     # the same mask
        True
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))
        >>> bool(error(w1) < error(w0))
        True
    """

    inner: Method
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.method(self.inner, "inner (the method whose mask is refitted)")
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_problem(self, problem: Problem):
        W, H = _layer(problem, "Refit")
        _, info = self.inner.solve_problem(for_layer(self.inner, problem))
        mask = jnp.asarray(info.support, bool).reshape(W.shape)
        W_new, mask = _refit(_float(W), jnp.asarray(H, _float(W).dtype), mask,
                             jnp.asarray(self.percdamp, _float(W).dtype))
        return _layer_info(problem, W_new, mask)


@jax.jit
def _refit(W, H, mask, percdamp):
    """Each output unit's least squares on its kept inputs: conjugate gradients from W̄ on the support to
    float32 rounding (at most 4·d_in steps; a dead input's row of H is e_i and w̄_i = 0: its weight is 0)."""
    W, H = _live_damped(W, H, percdamp)
    return layer_search.refit(W, W, H, mask, 4 * H.shape[0], 1e-6), mask


@dataclass(frozen=True)
class Regression(LayerMethod):
    """A method on X (default ``LR(lam=1e-4)``) on the layer's regression: min ½Σ_j (w_j − w̄_j)ᵀ
    (H + δI)(w_j − w̄_j) + (Nλ/2)‖w − w̄‖² under the layer's groups, through
    :class:`~swapjax.operators.LayerOperator` (IHT from the support of ``start``'s solution, default
    SparseGPT's, or of w̄ where ``start`` is None; the backsolve by conjugate gradients; the swap search
    within the groups). λ is relative, as in ``LR``; no held-out selection (the method's "auto" values
    take their defaults). ``LR()`` given to ``prune_layerwise`` alone runs the same regression from w̄
    with δ = 0.01·mean diag H.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> k = swapjax.Groups.top_k(12)
        >>> (w0, _), (w1, m1) = (solve_layer(m, "dense", W, A.T @ A, k) for m in (swapjax.SparseGPT(), swapjax.Regression()))
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))
        >>> int(m1.sum()), bool(error(w1) <= error(w0) * (1 + 1e-5))   # from SparseGPT's support, never worse
        (12, True)
    """

    method: Method = field(default_factory=lambda: LR(lam=1e-4))
    start: Optional[Method] = field(default_factory=lambda: SparseGPT())
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.method(self.method)
        if self.start is not None:
            checks.method(self.start, "start (None or the method whose solution IHT starts from)")
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_problem(self, problem: Problem):
        W, H = _layer(problem, "Regression")
        d_out = problem.shape[1]
        w_bar, L = _live_cholesky(W, H, jnp.asarray(self.percdamp, W.dtype))  # inputs that never fire: w̄_i = 0
        w_start = None
        if self.start is not None:  # it damps H itself
            w_start = jnp.asarray(self.start.solve_problem(for_layer(self.start, problem))[0]).ravel()
        inner = problem.replace(w_bar=w_bar.ravel(), X=LayerOperator(L, d_out), w_start=w_start)
        w, info = self.method.solve_problem(for_layer(self.method, inner))
        return w, info


@jax.jit
def _live_cholesky(W, H, percdamp):
    """(W̄ with the rows of dead inputs 0, L with LLᵀ = H + δI after H_ii = 1 for them)."""
    W, H = _live_damped(W, H, percdamp)
    return W, jnp.linalg.cholesky(H)


@dataclass(frozen=True)
class Swaps(LayerMethod):
    """``start``'s mask (default SparseGPT's), then ``rounds`` of ``swaps`` steps of the support search, each
    round followed by the exact refit on the support (:mod:`swapjax.layer_search`): on the damped objective
    ½ tr((W − W̄)ᵀ(H + δI)(W − W̄)), δ = ``percdamp``·mean diag H, every step lowers it. A step makes one single
    swap per output unit, the best exchange for one of its ``candidates`` cheapest removals (N:M: the
    cheapest, within a group; every unit keeps its N per group); under a count per layer, where ``across``,
    it also moves weights between output units (:func:`swapjax.layer_solvers.search`: the layer keeps its
    count, ranked over the whole layer, the units' counts change). The refits run ``iterations`` steps of
    conjugate gradients on all output units at once, from ``start``'s weights.

    Cost, against SparseGPT's d_in³/3 (Cholesky) + d_in³ (inverse) + 2·d_in²·d_out (the sweep) FLOPs:
    2·d_in²·d_out per refit iteration, ((rounds + 1)·iterations of them), and O(candidates·d_in·d_out) per
    search step (at most ``swaps`` per round: a round stops after a step that changes nothing).
    ``Swaps(rounds=1, swaps=10, iterations=5)`` is the faster setting. Groups other than one count per
    layer or N:M are a ValueError.

    Examples:
        >>> import numpy as np, swapjax
        >>> from swapjax.contract import solve_layer
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> k = swapjax.Groups.top_k(12)
        >>> (w0, m0), (w1, m1) = (solve_layer(m, "dense", W, A.T @ A, k) for m in (swapjax.SparseGPT(), swapjax.Swaps()))
        >>> error = lambda w: np.linalg.norm(A @ (np.asarray(w) - W))
        >>> int(m1.sum()), bool(error(w1) < error(w0))
        (12, True)
    """

    start: Method = field(default_factory=lambda: SparseGPT())
    rounds: int = 2
    swaps: int = 25
    iterations: int = 10
    candidates: int = 4
    across: bool = True
    percdamp: float = PERCDAMP

    def __post_init__(self):
        checks.method(self.start, "start (the method whose mask and weights the search starts from)")
        checks.integer("rounds", self.rounds, 0)
        checks.integer("swaps", self.swaps, 0)
        checks.integer("iterations", self.iterations, 0)
        checks.integer("candidates", self.candidates, 1)
        checks.boolean("across", self.across)
        checks.real("percdamp", self.percdamp, 0.0)

    def solve_problem(self, problem: Problem):
        W, H = _layer(problem, "Swaps")
        d_in = problem.shape[0]
        groups = problem.groups
        if groups.nm is None and not _one_group(groups):
            raise ValueError(f"groups: Swaps keeps a count per layer or N:M (groups.nm), got {groups.num_groups} "
                             f"groups of other counts ({groups.label}); use Refit or Regression")
        w_start, info = self.start.solve_problem(for_layer(self.start, problem))
        mask = jnp.asarray(info.support, bool).reshape(W.shape)
        W_bar, H = _live_damped(_float(W), jnp.asarray(H, _float(W).dtype), jnp.asarray(self.percdamp, _float(W).dtype))
        W_new = layer_search.refit(jnp.asarray(w_start, W_bar.dtype).reshape(W.shape), W_bar, H, mask, self.iterations)
        for _ in range(self.rounds):
            if groups.nm is None:
                W_new, mask, *_ = layer_solvers.search(W_new, W_bar, H, mask, self.swaps, self.across,
                                                       min(self.candidates, d_in))
            else:
                W_new, mask, _ = layer_search.swap(W_new, W_bar, H, mask, self.swaps, groups.nm[1])
            W_new = layer_search.refit(W_new, W_bar, H, mask, self.iterations)
        return _layer_info(problem, W_new, mask)


@jax.jit
def _live_damped(W, H, percdamp):
    """(W̄ with the rows of dead inputs 0, H + δI after H_ii = 1 for them)."""
    W, H = _live(W, H)
    return W, H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
