"""The support search across the output units of one layer: the layer's kept count moved between columns.

On a layer whose constraint is one count for the whole layer (a per-layer budget: the layer keeps k of its
d_in·d_out weights, ranked over the whole layer as ``Regression`` ranks them), the columns' counts are
free; :func:`swapjax.layer_search.swap` keeps each column's count where ``start`` (SparseGPT's blocks)
left it. :func:`search` adds, at every step, exchanges between columns to the single swaps within each
column, on the damped objective (H_δ = H + δI)

    f(W) = ½ tr((W − W̄)ᵀ H_δ (W − W̄)) = Σ_j f_j(w_j),  G = H_δ(W − W̄).

The columns are separate quadratics, so removing the cheapest kept weight p of column j changes f by
exactly c_j = ½h_p w_pj² − w_pj g_pj (h = diag H_δ), and adding the best pruned weight q of another column
j' at its optimal value v = −g_qj'/h_q by exactly −a_j' = −g_qj'²/(2h_q). A price λ (by bisection) splits
the columns into removers R = {c_j < λ, a_j ≤ λ} and adders Q = {a_j > λ, c_j ≥ λ}; the n = min(|R|, |Q|)
cheapest removers and n best adders act, so the count is kept exactly and f falls by Σ_Q a − Σ_R c > 0
(each term c_j < λ < a_j'). Each step costs a few passes over d_in × d_out arrays and one gather of d_out
rows of H_δ (O(d_in·d_out)), as a swap step does.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _swap_within(W, G, keep, h, H, candidates: int = 1):
    """One single swap per column: of the ``candidates`` cheapest removals p, the one whose best exchange q
    (exact change of f from H_δ) lowers f most, applied where it lowers f; every column keeps its count.
    Returns (W, G, keep, swaps made)."""
    d_in, d_out = W.shape
    units = jnp.arange(d_out)
    cost = jnp.where(keep, 0.5 * h[:, None] * W * W - W * G, jnp.inf)
    if candidates == 1:
        ps = jnp.argmin(cost, axis=0)[None]
    else:
        ps = jax.lax.top_k(-cost.T, candidates)[1].T  # (candidates, d_out)
    best = None
    for p in ps:  # a few candidates: unrolled
        c_p, w_p = cost[p, units], W[p, units]
        H_p = H[p]  # (d_out, d_in): row p of H_δ per column (H_δ is symmetric)
        g_q = G - H_p.T * w_p  # the gradient once p is removed
        gain = jnp.where(keep, -jnp.inf, g_q * g_q / h[:, None])
        q = jnp.argmax(gain, axis=0)
        change = c_p - 0.5 * gain[q, units]
        ok = change < -1e-7 * jnp.abs(c_p)  # a strict decrease beyond rounding
        v = -g_q[q, units] / h[q]
        now = (jnp.where(ok, change, 0.0), ok, p, q, w_p, v)
        if best is None:
            best = now
        else:
            better = now[0] < best[0]
            best = tuple(jnp.where(better, x, y) for x, y in zip(now, best))
    _, ok, p, q, w_p, v = best
    w_p, v = jnp.where(ok, w_p, 0.0), jnp.where(ok, v, 0.0)
    W = W.at[p, units].add(-w_p).at[q, units].add(v)
    keep = keep.at[p, units].set(keep[p, units] & ~ok)
    keep = keep.at[q, units].set(keep[q, units] | ok)
    G = G - H[p].T * w_p + H[q].T * v
    return W, G, keep, jnp.sum(ok)


def _exchange(W, G, keep, h, H):
    """One exchange between columns: the cheapest removals of the removers R and the best additions of as
    many adders Q at the price λ that balances them (bisection). Returns (W, G, keep, weights moved)."""
    d_in, d_out = W.shape
    units = jnp.arange(d_out)
    cost = jnp.where(keep, 0.5 * h[:, None] * W * W - W * G, jnp.inf)
    p = jnp.argmin(cost, axis=0)
    c = cost[p, units]  # inf where a column keeps nothing
    gain = jnp.where(keep, -jnp.inf, 0.5 * G * G / h[:, None])
    q = jnp.argmax(gain, axis=0)
    a = gain[q, units]  # -inf where a column keeps everything

    def sides(lam):
        return (c < lam) & (a <= lam), (a > lam) & (c >= lam)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        R, Q = sides(mid)
        more = jnp.sum(R) < jnp.sum(Q)  # too few removers: raise the price
        return jnp.where(more, mid, lo), jnp.where(more, hi, mid)

    finite_c, finite_a = jnp.where(jnp.isfinite(c), c, jnp.inf), jnp.where(jnp.isfinite(a), a, -jnp.inf)
    lo = jnp.minimum(jnp.min(finite_c), jnp.max(finite_a))
    hi = jnp.maximum(jnp.min(finite_c), jnp.max(finite_a))
    lo, hi = jax.lax.fori_loop(0, 40, bisect, (lo, hi))
    # the side of the bracket with more pairs
    pairs = lambda lam: jnp.minimum(*(jnp.sum(s) for s in sides(lam)))  # noqa: E731
    lam = jnp.where(pairs(lo) >= pairs(hi), lo, hi)
    R, Q = sides(lam)
    n = jnp.minimum(jnp.sum(R), jnp.sum(Q))
    rank = lambda score, member: jnp.argsort(jnp.argsort(jnp.where(member, score, jnp.inf), stable=True), stable=True)  # noqa: E731
    remove = R & (rank(c, R) < n)
    add = Q & (rank(-a, Q) < n)
    # the total change Σ_R c − Σ_Q a is negative by construction; guard rounding all the same
    worth = jnp.sum(jnp.where(remove, c, 0.0)) - jnp.sum(jnp.where(add, a, 0.0)) < 0
    remove, add = remove & worth, add & worth
    row = jnp.where(remove, p, q)
    coef = jnp.where(remove, -W[p, units], jnp.where(add, -G[q, units] / h[q], 0.0))
    W = W.at[row, units].add(coef)
    keep = keep.at[row, units].set(jnp.where(remove, False, jnp.where(add, True, keep[row, units])))
    G = G + H[row].T * coef
    return W, G, keep, jnp.sum(remove)


@partial(jax.jit, static_argnames=("steps", "across", "candidates"))
def search(W, W_bar, H, mask, steps: int, across: bool = True, candidates: int = 1):
    """``steps`` rounds of the best single swap within each column of W (d_in, d_out) on ``mask`` and, where
    ``across``, one exchange between columns (the layer's count kept, the columns' counts moved). H is damped
    (H_δ = H + δI, positive diagonal); f never increases. Returns (W, mask, swaps made, weights moved)."""
    h = jnp.diagonal(H)
    G = H @ (W - W_bar)

    def step(_, carry):
        W, G, keep, swaps, moved = carry
        W, G, keep, s = _swap_within(W, G, keep, h, H, candidates)
        if across:
            W, G, keep, m = _exchange(W, G, keep, h, H)
            moved = moved + m
        return W, G, keep, swaps + s, moved

    zero = jnp.zeros((), jnp.int32)
    W, _, keep, swaps, moved = jax.lax.fori_loop(0, steps, step, (W, G, mask, zero, zero))
    return W, keep, swaps, moved
