"""Layer-wise pruning of one linear layer from its inputs: SparseGPT and Wanda.

A layer y = xW with calibration inputs A ∈ R^{n×d_in} (n rows: examples × positions, or a
conv's patches) and dense kernel W̄ ∈ R^{d_in×d_out} (Flax layout) is pruned to reproduce
AW̄: minimise ‖AW̄ − AW‖²_F under the constraint. Everything about A that the methods need is
the Gram H = AᵀA (d_in × d_in), so memory is O(d_in² + d_in·d_out), never N×p.

The constraint on one layer is either a kept count k for the whole kernel (a per-layer budget:
uniform, ERK, OWL, given) or N:M along the input axis (``swapjax.NM``): every M consecutive
inputs of each output unit keep N.

- :func:`wanda`: score S_ij = |W̄_ij|·‖A_:,i‖ (‖A_:,i‖² = H_ii), compared within each output
  unit (a count per output column, split by largest remainder) or within each N:M group; the
  kept weights keep their values.
- :func:`sparsegpt`: the OBS update of SparseGPT, processed in blocks of inputs. H is damped,
  H + δI with δ = ``percdamp``·mean(diag H); U is the upper Cholesky factor of (H + δI)⁻¹. At
  the start of each block of B inputs the mask of the block is chosen by w²/U_ii² (its share of
  the layer's count, exactly; N:M: at each group's first input); input by input the pruned
  weights' error e = (w_i − q_i)/U_ii is propagated to the block's later inputs (w_i' −= e·U_ii'),
  then to all later inputs in one product. An input that never fires (H_ii = 0) is pruned first
  (its weights are 0 in the result where the count allows).
"""
from __future__ import annotations

from functools import partial
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .baselines import layer_quotas
from .constraints import NM, Groups

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


def _per_output_counts(rule, d_in: int, d_out: int) -> np.ndarray:
    """Kept inputs per output unit: the layer's count split by largest remainder (N:M: N·d_in/M each)."""
    if isinstance(rule, NM):
        return np.full(d_out, rule.n * d_in // rule.m, np.int32)
    return np.asarray(layer_quotas(rule, [d_in] * d_out), np.int32)


def wanda(W, H, rule: LayerRule) -> tuple[jax.Array, jax.Array]:
    """Wanda (Sun et al., 2024) on one layer: (W with the pruned weights zeroed, kept mask), both (d_in, d_out).

    Keeps, in each output unit (column), the largest S_ij = |W_ij|·√H_ii: a count per column from
    the layer's count ``rule`` (largest remainder), or N per group of M inputs for ``rule = NM(n, m)``.
    Ties go to the lower input index. No weight update.
    """
    d_in, d_out = _check_layer(W, H, rule)
    W = jnp.asarray(W)
    score = jnp.abs(W) * jnp.sqrt(jnp.maximum(jnp.diagonal(jnp.asarray(H, W.dtype)), 0))[:, None]
    if isinstance(rule, NM):
        ids = (jnp.arange(d_out)[None, :] * (d_in // rule.m) + jnp.arange(d_in)[:, None] // rule.m).ravel()
        counts = jnp.full(d_out * d_in // rule.m, rule.n, jnp.int32)
    else:
        ids = jnp.broadcast_to(jnp.arange(d_out)[None, :], (d_in, d_out)).ravel()
        counts = jnp.asarray(_per_output_counts(rule, d_in, d_out))
    mask = Groups(counts, ids.astype(jnp.int32)).project(score.ravel()).reshape(d_in, d_out)
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
    W = jnp.asarray(W)
    W = W.astype(jnp.promote_types(W.dtype, jnp.float32))
    starts = tuple(range(0, d_in, block))
    if isinstance(rule, NM):
        nm, counts = (rule.n, rule.m), None
    else:
        nm, counts = None, tuple(layer_quotas(rule, [min(block, d_in - s) * d_out for s in starts]))
    return _sparsegpt(nm, counts, block, float(percdamp), W, jnp.asarray(H, W.dtype))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sparsegpt(nm, counts, block, percdamp, W, H):
    """``nm`` = (n, m), or ``counts``: the kept count of each block of inputs (static)."""
    d_in, d_out = W.shape
    dead = jnp.diagonal(H) == 0
    H = jnp.where(jnp.diag(dead), 1.0, H)
    Wt = jnp.where(dead[None, :], 0, W.T)  # (d_out, d_in): columns are the inputs, as in the published code
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
