"""The paper's baselines on a bare problem (X, w̄, k): magnitude pruning and WoodFisher.

Both follow the method contract (:class:`swapjax.contract.Method`):
``w, info = method.solve(X, w_bar, k, w_start=None, duals=None)`` with a
:class:`BaselineInfo`.

Which weights are pruned. Both act on the weights where the stage starts,
w_start (default w̄): in a one-shot problem that is w̄ itself; in a
multi-stage run it is the current (masked, possibly fine-tuned) model, as in
gradual magnitude pruning and in WoodFisher's own code. w̄ enters only the
reported objective.

Reported objective. Neither method minimises an objective, so ``info``
reports the LR objective with targets y = Xw̄ and λ = 0,

    f(w) = ½‖Xw − Xw̄‖²   (N times the local quadratic model ½(w − w̄)ᵀF(w − w̄)),

so that values are comparable across MP, WF and ``LR(lam=0)``. The trace
holds f at H_k(w_start) (the k largest |w_start|, the common starting point
of every method; index 0), then for WoodFisher f at w_start masked to WF's
support, then f after the OBS update.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .constraints import Groups, as_groups, layer_quotas
from .contract import Method
from .methods import prepare_problem
from .operators import linear, matmul


# ---------------------------------------------------------------------------
# shared pieces


class BaselineInfo(NamedTuple):
    """Diagnostics of a solve of Magnitude or WoodFisher (arrays): f = ½‖Xw − y‖² at the result, its
    trace (index 0: H_k(w_start)), the support, y = Xw̄, and the duals passed through."""

    objective: jax.Array
    objective_trace: jax.Array
    support: jax.Array
    targets: jax.Array
    duals: tuple

    gradient_seconds = 0.0
    held_out_loss = math.nan

    def describe(self) -> str:
        return ""

    def warnings(self, n: int) -> tuple[str, ...]:
        return ()


def _info(y, w, support, trace, duals) -> BaselineInfo:
    return BaselineInfo(trace[-1], trace, support, y, duals)


def _f(X, w, y):
    """f(w) = ½‖Xw − y‖² (the LR objective with λ = 0)."""
    r = linear(X).mv(w) - y
    return 0.5 * r @ r


# ---------------------------------------------------------------------------
# magnitude pruning


@dataclass(frozen=True)
class Magnitude(Method):
    """Magnitude pruning (MP): keep the k largest |w| of the stage's starting weights.

    scope: "global" ranks all p prunable weights together; "layer" keeps the
    same fraction k/p in every layer (counts from :func:`layer_quotas`, summing
    exactly to k) and needs the layer boundaries: ``solve(..., segments=offsets)``
    with ``offsets = swapjax.pytree.layout(params).offsets``. Ties go to the
    lower index (:func:`swapjax.iht.hard_threshold_mask`). Kept weights keep
    their values. Cost O(p) (a radix select), plus O(Np) for the reported objective.

    Examples:
        >>> import numpy as np, swapjax
        >>> X = np.eye(4, dtype="float32")                   # N = 4 examples, p = 4 weights
        >>> w_bar = np.array([3.0, -2.0, 1.0, 0.5], "float32")
        >>> w, info = swapjax.Magnitude().solve(X, w_bar, 2)  # the 2 largest |w̄|
        >>> w.tolist()
        [3.0, -2.0, 0.0, 0.0]
        >>> w, _ = swapjax.Magnitude("layer").solve(X, w_bar, 2, segments=(0, 2, 4))  # two layers of 2: 1 each
        >>> w.tolist()
        [3.0, 0.0, 1.0, 0.0]
    """

    scope: str = "global"
    matrix_free = True  # solve also takes an X that is not formed

    def __post_init__(self):
        if not isinstance(self.scope, str) or self.scope not in ("global", "layer"):
            raise ValueError(f"scope: must be 'global' or 'layer', got {self.scope!r}")

    @property
    def needs_segments(self) -> bool:
        """True when ``solve`` needs the layer offsets (``segments=``)."""
        return self.scope == "layer"

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None
              ) -> tuple[jax.Array, BaselineInfo]:
        """k-sparse w keeping the largest |w_start| (default w_start = w̄); see the class doc.

        segments: layer offsets (0 = o_0 ≤ o_1 ≤ … ≤ o_L = p), needed for scope="layer",
        ignored for scope="global". ``score`` is not used.
        """
        X, w_bar, w_start, groups, duals = prepare_problem(X, w_bar, k, w_start, duals)
        p = X.shape[1]
        if self.scope == "global":
            w, support, trace, y = _magnitude_global(X, w_bar, w_start, groups)
        else:
            if segments is None:
                raise ValueError(
                    "segments: Magnitude(scope='layer') needs the layer offsets, "
                    "solve(X, w_bar, k, segments=swapjax.pytree.layout(params).offsets)"
                )
            if groups.ids is not None:
                raise ValueError(f"k: Magnitude(scope='layer') sets its own per-layer counts; with a constraint "
                                 f"({groups.label}) use Magnitude()")
            seg = checks.segments(segments, p)
            counts = layer_quotas(int(groups.k), [b - a for a, b in zip(seg, seg[1:])])
            w, support, trace, y = _magnitude_layers(seg, X, w_bar, w_start, jnp.asarray(counts))
        return w, _info(y, w, support, trace, duals)


@jax.jit
def _magnitude_global(X, w_bar, w_start, k):
    y = linear(X).mv(w_bar)
    support = as_groups(k).project(w_start)
    w = jnp.where(support, w_start, 0)
    return w, support, _f(X, w, y)[None], y


@partial(jax.jit, static_argnums=0)
def _magnitude_layers(segments, X, w_bar, w_start, counts):
    X = linear(X)
    y = X.mv(w_bar)
    parts = [
        Groups.top_k(counts[i]).project(w_start[a:b])
        for i, (a, b) in enumerate(zip(segments[:-1], segments[1:]))
        if b > a
    ]
    support = jnp.concatenate(parts)
    w = jnp.where(support, w_start, 0)
    # trace[0] is f at the global H_k(w_start), the starting point every method shares
    start_support = Groups.top_k(jnp.sum(counts)).project(w_start)
    start = _f(X, jnp.where(start_support, w_start, 0), y)
    return w, support, jnp.stack([start, _f(X, w, y)]), y


# ---------------------------------------------------------------------------
# WoodFisher


@dataclass(frozen=True)
class WoodFisher(Method):
    """WoodFisher (Singh & Alistarh 2020): one-shot OBS with the empirical Fisher.

        F = damp·I + XᵀX/N,  ρ_q = w_q² / (2[F⁻¹]_qq),  keep the k largest ρ,
        δw = −F⁻¹ Σ_{q∈Q} e_q w_q / [F⁻¹]_qq  (Q = the p − k pruned coordinates),
        w ← (w + δw) with w_Q set to 0.

    The update is the published code's joint mode (``--woodburry-joint-sparsify``,
    docs/methods.md): each pruned weight's single-weight OBS correction, summed,
    not the exact joint solve −F⁻¹E_Q(E_QᵀF⁻¹E_Q)⁻¹E_Qᵀw.

    F⁻¹ is never formed: with XXᵀ = U diag(λ) Uᵀ (an N×N eigendecomposition),
    Woodbury gives F⁻¹ = (1/damp)[I − Xᵀ U diag(1/(N·damp + λ)) Uᵀ X], so
    diag(F⁻¹) costs O(N²p) and F⁻¹v costs O(Np). Extra memory is
    O(N² + N·block_size + p) beyond X.

    damp: the dampening of F, > 0. Default 1e-5, the value of the published
    WoodFisher code's one-shot MLPNet/MNIST sweep (its option
    ``--fisher-damp 1e-5``), with F = damp·I + (1/N)Σ g gᵀ as in that code.
    update: apply the OBS weight update (default, as published); False keeps the
    surviving weights unchanged (WF selection only). block_size: columns of X
    per block in the O(N²p) pass.

    Precision: float32 results are as accurate as cond(F) ≈ (damp + λ_max/N)/damp
    allows (the same as any float32 inverse of F); pass float64 X under
    ``jax.enable_x64`` for a reference.

    Examples:
        >>> import numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 8)).astype("float32")  # N = 32 per-sample gradients of p = 8 weights
        >>> w_bar = rng.normal(size=8).astype("float32")
        >>> w, info = swapjax.WoodFisher().solve(X, w_bar, 4)
        >>> int(np.count_nonzero(w))                          # k = 4 kept, and moved by the OBS update
        4
        >>> w_mp, _ = swapjax.Magnitude().solve(X, w_bar, 4)
        >>> f = lambda w: float(np.sum((X @ (np.asarray(w) - w_bar)) ** 2))  # N times the local quadratic model
        >>> f(w) < f(w_mp)
        True
    """

    damp: float = 1e-5
    update: bool = True
    block_size: int = 16384

    def __post_init__(self):
        real = isinstance(self.damp, numbers.Real) and not isinstance(self.damp, bool)
        if not (real and np.isfinite(self.damp) and self.damp > 0):
            raise ValueError(f"damp: the Fisher dampening must be a finite number > 0, got {self.damp!r}")
        if not isinstance(self.update, bool):
            raise ValueError(f"update: must be True or False, got {self.update!r}")
        if not (isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size >= 1):
            raise ValueError(f"block_size: must be an int ≥ 1, got {self.block_size!r}")

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None
              ) -> tuple[jax.Array, BaselineInfo]:
        """k-sparse w from one OBS step at w_start (default w̄); see the class doc. X must be formed
        (the Woodbury factors use its columns); ``score`` and ``segments`` are not used."""
        X, w_bar, w_start, k, duals = prepare_problem(X, w_bar, k, w_start, duals)
        if not X.formed:
            raise ValueError(f"X: WoodFisher needs the per-sample gradients formed (its Woodbury factors use X's "
                             f"columns), got X {X.label}; prune with mode='in-memory', or use LR, SWAP or Magnitude")
        w, support, trace, y = _woodfisher(
            float(self.damp), self.update, min(self.block_size, X.shape[1]), X.matrix, w_bar, w_start, k
        )
        return w, _info(y, w, support, trace, duals)


def _woodbury_factors(X, damp, block):
    """(U, c, diag F⁻¹): XXᵀ = U diag(λ) Uᵀ, c = 1/(N·damp + λ), and the diagonal of F⁻¹.

    [F⁻¹]_qq = (1 − Σ_j c_j (UᵀX)_jq²) / damp, clipped to its exact bounds
    [1/(damp + ‖x_q‖²/N), 1/damp] (for SPD F, (F⁻¹)_qq ≥ 1/F_qq) so rounding
    can never make it ≤ 0.
    """
    n, p = X.shape
    lam, U = jnp.linalg.eigh(matmul(X, X.T))
    c = 1.0 / (n * damp + jnp.maximum(lam, 0))

    def block_stats(Xb):  # (Σ_j c_j (UᵀX_b)_j², ‖x_q‖²) for the columns of one block
        A = matmul(U.T, Xb)
        return c @ (A * A), jnp.sum(Xb * Xb, axis=0)

    # full blocks in a sequential loop (one block's temporaries alive at a time), then the rest
    full = p // block
    s, col_sq = jax.lax.map(lambda i: block_stats(jax.lax.dynamic_slice_in_dim(X, i * block, block, axis=1)),
                            jnp.arange(full))
    s, col_sq = s.reshape(-1), col_sq.reshape(-1)
    if full * block < p:
        s_rest, col_rest = block_stats(X[:, full * block:])
        s, col_sq = jnp.concatenate([s, s_rest]), jnp.concatenate([col_sq, col_rest])
    diag = jnp.clip((1 - s) / damp, 1 / (damp + col_sq / n), 1 / damp)
    return U, c, diag


def inverse_fisher_diagonal(X, damp: float = 1e-5, block_size: int = 16384) -> jax.Array:
    """diag(F⁻¹) for F = damp·I + XᵀX/N, in O(N²p) time without forming p×p."""
    if not damp > 0:
        raise ValueError(f"damp: must be > 0, got {damp}")
    X = jnp.asarray(X)
    return _inverse_fisher_diagonal(float(damp), min(block_size, X.shape[1]), X)


@partial(jax.jit, static_argnums=(0, 1))
def _inverse_fisher_diagonal(damp, block, X):
    return _woodbury_factors(X, damp, block)[2]


def _inverse_fisher_apply(X, U, c, damp, v):
    """F⁻¹v = (v − Xᵀ U diag(c) Uᵀ X v) / damp, O(Np)."""
    t = U @ (c * (U.T @ matmul(X, v)))
    return (v - matmul(t, X)) / damp


@partial(jax.jit, static_argnums=(0, 1, 2))
def _woodfisher(damp, update, block, X, w_bar, w_start, k):
    y = matmul(X, w_bar)
    U, c, diag = _woodbury_factors(X, damp, block)
    w = w_start
    scores = w * w / (2 * diag)
    k = as_groups(k)
    support = k.project(scores)
    start = _f(X, jnp.where(k.project(w), w, 0), y)
    masked = jnp.where(support, w, 0)
    trace = [start, _f(X, masked, y)]
    if update:
        v = jnp.where(support, 0, w / diag)  # Σ_{q∈Q} e_q w_q / [F⁻¹]_qq
        w_new = jnp.where(support, w - _inverse_fisher_apply(X, U, c, damp, v), 0)
        trace.append(_f(X, w_new, y))
    else:
        w_new = masked
    return w_new, support, jnp.stack(trace), y
