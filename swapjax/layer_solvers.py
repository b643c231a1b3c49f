"""The support search on one layer's Gram, every output unit at once: single swaps from several candidate
removals, and under a count per layer exchanges of kept weights between output units.

The layer's objective, damped as every layer method damps it (H_δ = H + δI, h = diag H_δ):

    f(W) = ½ tr((W − W̄)ᵀ H_δ (W − W̄)) = Σ_j f_j(w_j),  G = H_δ(W − W̄),

splits into one quadratic per output unit j (a column of W), so every change below is exact:

- removing the kept weight p of unit j changes f by c_p = ½h_p w_pj² − w_pj g_pj;
- then adding the pruned weight q at its optimal value v = −g'_q/h_q (g' = g − H_{:,p} w_pj, the gradient once
  p is removed) changes it by −g'_q²/(2h_q). A swap is the best such pair over the ``candidates`` cheapest
  removals p of the unit and every pruned q (:func:`swapjax.layer_search.swap` takes the cheapest p alone);
- under a count per layer (a per-layer budget: k of the d_in·d_out weights, ranked over the whole layer),
  the units' counts are free. At a price λ of one kept weight each unit takes the best of nothing, its swap,
  removing its cheapest weight (worth λ − c) or adding its best pruned one (worth a − λ, a = max_q
  g_q²/(2h_q)); λ by bisection so that as many units remove as add. Each removal has c < λ and each addition
  a > λ, so f falls by Σ a − Σ c and the layer keeps its count.

A step costs a few passes over d_in × d_out arrays (per candidate) and one gather of d_out rows of H_δ, O(d_in·d_out),
against 2·d_in²·d_out for one product H_δW.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

# Every array here is held one row per output unit, Wᵀ (d_out, d_in): the reductions over a column's inputs
# run along the last axis, and row p of H_δ (symmetric) is column p's coupling to every input.


def _first_min(x):
    """(min, index of its first occurrence) along the last axis: two plain reductions, which XLA runs faster on
    a CPU than its argmin (a reduction of pairs)."""
    m = jnp.min(x, axis=-1)
    at = jnp.where(x == m[..., None], jnp.arange(x.shape[-1], dtype=jnp.float32), jnp.inf)
    return m, jnp.minimum(jnp.min(at, axis=-1), x.shape[-1] - 1).astype(jnp.int32)


def _price(c, a, swap):
    """The exchange between units at a price λ of one kept weight: each unit takes the best of doing nothing
    (0), removing its cheapest kept weight (λ − c), adding its best pruned one (a − λ) or its swap (``swap``,
    the decrease of f, 0 where none); λ by bisection so that as many remove as add, the larger side then cut
    to the n = min(|R|, |Q|) that gain most. Each removal has c < λ and each addition a > λ, so the exchange
    lowers f by Σ_Q a − Σ_R c > 0. Returns (remove, add) masks over the units."""

    def sides(lam):
        best = jnp.maximum(swap, 0.0)
        remove = (lam - c > best) & (lam - c >= a - lam)
        add = (a - lam > best) & (a - lam > lam - c)
        return remove, add

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        R, Q = sides(mid)
        more = jnp.sum(R) < jnp.sum(Q)  # too few removers: raise the price
        return jnp.where(more, mid, lo), jnp.where(more, hi, mid)

    big = jnp.finfo(c.dtype).max
    c_min, a_max = jnp.min(jnp.where(jnp.isfinite(c), c, big)), jnp.max(jnp.where(jnp.isfinite(a), a, -big))
    lo, hi = jax.lax.fori_loop(0, 40, bisect, (jnp.minimum(c_min, a_max), jnp.maximum(c_min, a_max)))
    pairs = lambda lam: jnp.minimum(*(jnp.sum(s) for s in sides(lam)))  # noqa: E731
    lam = jnp.where(pairs(lo) >= pairs(hi), lo, hi)  # the end of the bracket with more pairs
    R, Q = sides(lam)
    n = jnp.minimum(jnp.sum(R), jnp.sum(Q))
    rank = lambda score, member: jnp.argsort(jnp.argsort(jnp.where(member, score, jnp.inf)))  # noqa: E731
    remove, add = R & (rank(c, R) < n), Q & (rank(-a, Q) < n)
    worth = jnp.sum(jnp.where(remove, c, 0.0)) - jnp.sum(jnp.where(add, a, 0.0)) < 0  # rounding guard
    return remove & worth, add & worth


def _step(Wt, Gt, keep, h, H, candidates: int, across: bool):
    """One step on every output unit (a row of Wt) from one state: where ``across``, the exchange between
    units (:func:`_price`: a remover drops its cheapest kept weight p, an adder takes its best pruned q at
    v = −g_q/h_q); every other unit makes its best single swap, of its ``candidates`` cheapest removals the
    one whose best exchange q lowers f most (exact from H_δ), where f falls. Returns (Wt, Gt, keep, swaps
    made, weights moved)."""
    units = jnp.arange(Wt.shape[0])
    cost = jnp.where(keep, 0.5 * h * Wt * Wt - Wt * Gt, jnp.inf)
    if candidates == 1:
        ps = _first_min(cost)[1][None]
    else:
        ps = jax.lax.top_k(-cost, candidates)[1].T  # (candidates, d_out)
    best = None
    for p in ps:  # a few candidates, unrolled
        w_p = Wt[units, p]
        g_q = Gt - H[p] * w_p[:, None]  # the gradient once p is removed
        gain, q = _first_min(jnp.where(keep, jnp.inf, -g_q * g_q / h))  # the best addition: −g_q²/h_q least
        now = (cost[units, p] + 0.5 * gain, p, q, w_p, -g_q[units, q] / h[q], g_q)
        if best is None:
            best = now
        else:
            better = now[0] < best[0]
            best = tuple(jnp.where(better if x.ndim == 1 else better[:, None], x, y) for x, y in zip(now, best))
    change, p, q, w_p, v, g_q = best
    ok = change < -1e-7 * jnp.abs(cost[units, p])  # a strict decrease beyond rounding
    row, coef = q, jnp.where(ok, v, 0.0)  # the one row of H_δ each unit's gradient takes
    moved = jnp.zeros((), jnp.int32)
    if across:  # the exchange from the same state: the units it moves make no swap this step
        gain, q_add = _first_min(jnp.where(keep, jnp.inf, -0.5 * Gt * Gt / h))
        remove, add = _price(cost[units, ps[0]], -gain, jnp.where(ok, -change, 0.0))
        ok = ok & ~(remove | add)
        row = jnp.where(remove, ps[0], jnp.where(add, q_add, q))
        coef = jnp.where(remove, -Wt[units, ps[0]], jnp.where(add, -Gt[units, q_add] / h[q_add], jnp.where(ok, v, 0.0)))
        moved = jnp.sum(remove)
    else:
        remove = add = jnp.zeros_like(ok)
    Wt = Wt.at[units, p].add(jnp.where(ok, -w_p, 0.0)).at[units, row].add(coef)  # removed weights: exactly 0
    keep = keep.at[units, p].set(keep[units, p] & ~ok)
    keep = keep.at[units, row].set((keep[units, row] | ok | add) & ~remove)
    Gt = jnp.where(ok[:, None], g_q, Gt) + H[row] * coef[:, None]
    return Wt, Gt, keep, jnp.sum(ok), moved


@partial(jax.jit, static_argnames=("steps", "across", "candidates"))
def search(W, W_bar, H, mask, steps: int, across: bool = True, candidates: int = 4):
    """At most ``steps`` rounds of the best single swap within each column of W (d_in, d_out) on ``mask``
    (from ``candidates`` removals) and, where ``across``, one exchange between columns (the layer's count
    kept, the columns' counts moved); it stops after a round that changes nothing (every later round would
    repeat it). H is damped (H_δ = H + δI); f never increases; pruned weights stay exactly 0. Returns (W,
    mask, swaps made, weights moved, rounds run)."""
    h = jnp.diagonal(H)
    Gt = (H @ (W - W_bar)).T

    def step(carry):
        i, _, Wt, Gt, keep, swaps, moved = carry
        Wt, Gt, keep, s, m = _step(Wt, Gt, keep, h, H, candidates, across)
        return i + 1, s + m > 0, Wt, Gt, keep, swaps + s.astype(swaps.dtype), moved + m.astype(moved.dtype)

    going = lambda carry: (carry[0] < steps) & carry[1]  # noqa: E731
    zero = jnp.zeros((), jnp.int32)
    rounds, _, Wt, _, keep, swaps, moved = jax.lax.while_loop(going, step, (zero, jnp.array(True), W.T, Gt, mask.T,
                                                                          zero, zero))
    return Wt.T, keep.T, swaps, moved, rounds
