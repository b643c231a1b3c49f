"""Iterative hard thresholding on "least squares with targets", shared by LR and SWAP.

    f(w) = ½‖Xw − t‖² + (Nλ/2)‖w − w̄‖²   subject to w's support feasible (‖w‖₀ ≤ k by default)

LR takes t = y = Xw̄; SWAP takes t = ỹ = N·πᵀy (docs/methods.md). The constraint is a
:class:`swapjax.constraints.Groups` (an int k is the global top-k): it owns the projection H
(the hard threshold), and every step stays feasible. Each step
follows CHITA's line search: gradient g = Xᵀ(Xw − t) + Nλ(w − w̄); the exact
minimising step τ* on the current support (f is quadratic along −g_S); the
support-change step τ_c, the largest step that keeps the top-k support of
w − τg; take τ* when τ* ≤ τ_c, else start from τ_c and grow τ geometrically
while f(H_k(w − τg)) decreases. f never increases. An optional backsolve then
solves the ridge problem on the final support exactly.

X enters only through Xv and Xᵀu, so it may be a matrix or a
:class:`swapjax.operators.GradientOperator` (never formed); the Gram-based
functions (``support_gram``, ``nearby_gram``, ``backsolve``) need the matrix,
``backsolve_cg`` does not.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from .constraints import Groups, as_groups, hard_threshold_mask  # noqa: F401  (hard_threshold_mask: re-exported)
from .operators import linear, matmul


def objective(X, w, t, w_bar, lam) -> jax.Array:
    """f(w) = ½‖Xw − t‖² + (Nλ/2)‖w − w̄‖²."""
    return _objective(linear(X).mv(w) - t, w, w_bar, lam)


def _objective(residual, w, w_bar, lam):
    n = residual.shape[0]
    return 0.5 * residual @ residual + 0.5 * n * lam * jnp.sum((w - w_bar) ** 2)


def exact_step(X, g_s, lam, xg=None) -> jax.Array:
    """τ* = ‖g_S‖² / (‖Xg_S‖² + Nλ‖g_S‖²), the minimiser of f(w − τg_S) (0 if g_S = 0).

    ``xg``: X·g_S if already computed.
    """
    A = linear(X)
    xg = A.mv(g_s) if xg is None else xg
    gg = g_s @ g_s
    curvature = xg @ xg + A.n * lam * gg
    return jnp.where(curvature > 0, gg / jnp.where(curvature > 0, curvature, 1), 0)


def support_change_step(w, g, support, groups: Optional[Groups] = None) -> jax.Array:
    """τ_c = sup{τ ≥ 0 : |w_i − τg_i| ≥ τ·max_{j∉S, j in i's group}|g_j| for all i ∈ S}.

    For i ∈ S with a = |w_i|, b = sign(w_i)·g_i the bound fails first at
    τ = a / (b + G_i), G_i = max |g_j| over the pruned j of i's group (one group
    by default); +inf when nothing outside S can enter.
    """
    G = (groups or Groups.top_k(1)).group_max(jnp.where(support, -jnp.inf, jnp.abs(g)))
    a = jnp.abs(w)
    rate = jnp.sign(w) * g + G
    limits = jnp.where(support & (rate > 0), a / jnp.where(rate > 0, rate, 1), jnp.inf)
    return jnp.min(limits)


class IHTResult(NamedTuple):
    """w (k-sparse), its support, f at the end, iterations run, f after each iteration (NaN-padded)."""

    w: jax.Array
    support: jax.Array
    objective: jax.Array
    iterations: jax.Array
    trace: jax.Array
    targets: jax.Array


class _State(NamedTuple):
    w: jax.Array
    support: jax.Array
    residual: jax.Array  # Xw − t
    obj: jax.Array
    it: jax.Array
    done: jax.Array
    stable: jax.Array  # consecutive steps that kept the support
    trace: jax.Array
    targets: jax.Array
    aux: object  # carried by `retarget` (e.g. Sinkhorn duals and counters)


def iht(
    X: jax.Array,
    targets: jax.Array,
    w_bar: jax.Array,
    w_start: jax.Array,
    k,
    lam: float,
    max_iters: int = 100,
    tol: float = 1e-5,
    growth: float = 2.0,
    max_growth: int = 30,
    patience: Optional[int] = None,
    retarget: Optional[Callable] = None,
    aux=None,
    allowed: Optional[jax.Array] = None,
    resume: Optional[IHTResult] = None,
) -> tuple[IHTResult, object]:
    """Minimise f over feasible w from H(w_start) (traceable; k, an int or a
    :class:`swapjax.constraints.Groups`, may be traced).

    Stops after ``max_iters`` steps, when a step lowers f by at most ``tol``·f,
    or (if ``patience`` is given) once the support has stayed the same for
    ``patience`` steps: with a backsolve to follow, further steps would only
    refine the values on that support, which the backsolve computes exactly.
    ``retarget(z, aux) -> (t, aux)``, if given, recomputes the targets from
    z = Xw before every step (study option: the plan re-estimated per step).
    ``allowed`` (bool (p,)) restricts the search to an active set: coordinates
    outside it stay at zero. ``resume`` continues the iteration count and trace
    of an earlier result (w_start should be its w).
    """
    A = linear(X)
    n = A.n
    groups = as_groups(k)

    def at(w, t):
        residual = A.mv(w) - t
        return residual, _objective(residual, w, w_bar, lam)

    def step(s: _State) -> _State:
        t, aux_ = s.targets, s.aux
        residual, obj = s.residual, s.obj
        if retarget is not None:
            t, aux_ = retarget(A.mv(s.w), aux_)
            residual, obj = at(s.w, t)
        g = A.rmv(residual) + n * lam * (s.w - w_bar)
        if allowed is not None:
            g = jnp.where(allowed, g, 0)
        g_s = jnp.where(s.support, g, 0)
        xg = A.mv(g_s)
        tau_star = exact_step(A, g_s, lam, xg)
        tau_c = support_change_step(s.w, g, s.support, groups)

        def along_support(tau):  # w − τg_S; its residual needs no product with X
            w = s.w - tau * g_s
            r = residual - tau * xg
            return w, s.support, r, _objective(r, w, w_bar, lam)

        def threshold_at(tau):
            support = groups.project(s.w - tau * g)
            w = jnp.where(support, s.w - tau * g, 0)
            return (w, support) + at(w, t)

        def grow(_):
            # Two candidates at the support-change step: w − τ_c·g_S (k-sparse on S, and f decreases
            # up to τ* > τ_c) and the top-k just past τ_c, where the support has changed. (Exactly
            # at τ_c the top-k is a tie, which rounding may break either way.)
            tau0 = jnp.where(tau_c > 0, tau_c, tau_star)
            kept, crossed = along_support(tau0), threshold_at(tau0 * (1 + 1e-4))
            first = jax.tree_util.tree_map(lambda a, b: jnp.where(crossed[3] < kept[3], a, b), crossed, kept)

            def cond(c):
                j, _, _, improved = c
                return (j < max_growth) & improved

            def body(c):
                j, tau, best, _ = c
                trial = threshold_at(tau * growth)
                improved = trial[3] < best[3]
                best = jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), trial, best)
                return j + 1, jnp.where(improved, tau * growth, tau), best, improved

            return jax.lax.while_loop(cond, body, (0, tau0, first, True))[2]

        w, support, r, new_obj = jax.lax.cond(tau_star <= tau_c, lambda _: along_support(tau_star), grow, None)
        better = new_obj <= obj
        pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731  f never increases
        w, support, r, new_obj = pick(w, s.w), pick(support, s.support), pick(r, residual), pick(new_obj, obj)
        decrease = obj - new_obj
        stable = jnp.where(jnp.all(support == s.support), s.stable + 1, 0)
        done = (~better) | (decrease <= tol * jnp.abs(obj))
        if patience is not None:
            done = done | (stable >= patience)
        return _State(w, support, r, new_obj, s.it + 1, done, stable, s.trace.at[s.it + 1].set(new_obj), t, aux_)

    support0 = groups.project(w_start)
    w0 = jnp.where(support0, w_start, 0)
    r0, obj0 = at(w0, targets)
    if resume is None:
        it0, trace = jnp.array(0), jnp.full((max_iters + 1,), jnp.nan, obj0.dtype).at[0].set(obj0)
    else:
        it0, trace = resume.iterations, resume.trace
    s = _State(w0, support0, r0, obj0, it0, jnp.array(False), jnp.array(0), trace, targets, aux)
    s = jax.lax.while_loop(lambda s: (s.it < max_iters) & ~s.done, step, s)
    return IHTResult(s.w, s.support, s.obj, s.it, s.trace, s.targets), s.aux


def active_set_iht(X, targets, w_bar, w_start, k, lam, grow: float, max_rounds: int = 10, aux=None, **iht_args):
    """CHITA's active-set phase: IHT restricted to an active set A, grown until no
    coordinate outside A would enter the support.

    A starts as the ⌈grow·k⌉ largest |w_start| and H(w_start). After IHT converges on A, a
    coordinate j ∉ A enters A when the exact step τ* along the full gradient
    would lift |τ*·g_j| above the smallest kept |w_i − τ*g_i| of its group; stop when none
    does or after ``max_rounds``. Each round starts where the last ended, so f
    never increases; the rounds share one budget of ``max_iters`` IHT steps
    and one trace. Returns (IHTResult, aux, rounds).
    """
    A = linear(X)
    groups = as_groups(k)
    pool = Groups.top_k(jnp.minimum(A.p, jnp.ceil(grow * groups.k)).astype(jnp.int32))
    allowed0 = pool.project(w_start) | groups.project(w_start)

    def entering(result):
        g = A.rmv(A.mv(result.w) - result.targets) + A.n * lam * (result.w - w_bar)
        tau = exact_step(A, jnp.where(result.support, g, 0), lam)
        smallest_kept = -groups.group_max(jnp.where(result.support, -jnp.abs(result.w - tau * g), -jnp.inf))
        return tau * jnp.abs(g) > smallest_kept

    def body(c):
        rounds, allowed, result, aux, _ = c
        new = entering(result) & ~allowed
        allowed = allowed | new
        result, aux = iht(A, result.targets, w_bar, result.w, groups, lam, allowed=allowed, aux=aux,
                          resume=result, **iht_args)
        return rounds + 1, allowed, result, aux, jnp.any(new)

    result, aux = iht(A, targets, w_bar, w_start, groups, lam, allowed=allowed0, aux=aux, **iht_args)
    rounds, _, result, aux, _ = jax.lax.while_loop(
        lambda c: c[4] & (c[0] < max_rounds), body, (0, allowed0, result, aux, True)
    )
    return result, aux, rounds


#: Kept columns per block of :func:`support_gram`: its working memory beyond X is N × GRAM_BLOCK.
GRAM_BLOCK = 4096
#: The most columns a Gram update exchanges at once (:func:`exchange_width`).
EXCHANGE_MAX = 1024


def support_gram(X, support, width: Optional[int] = None) -> jax.Array:
    """G_S = X_S X_Sᵀ (N×N), the Gram matrix of the kept columns.

    Accumulated over blocks of ``GRAM_BLOCK`` kept columns, gathered one block
    at a time: O(N²·|S|) time and O(N·GRAM_BLOCK) memory beyond X. ``width``
    (static, ≥ |S|; default p) bounds the list of kept columns.
    """
    n, p = X.shape
    width = p if width is None else min(width, p)
    block = min(GRAM_BLOCK, width)
    cols = jnp.nonzero(support, size=-(-width // block) * block, fill_value=0)[0]
    return _gram_of(X, cols, jnp.sum(support), width, block)


def _gram_of(X, cols, count, width: int, block: int):
    """:func:`support_gram` from the list of kept columns ``cols`` (at least ⌈width/block⌉·block long)."""
    if block == width:  # one block
        xs = _columns(X, cols[:width], count)
        return matmul(xs, xs.T)

    def add(i, gram):
        xs = _columns(X, jax.lax.dynamic_slice_in_dim(cols, i * block, block), count - i * block)
        return gram + matmul(xs, xs.T)

    n = X.shape[0]
    return jax.lax.fori_loop(0, (count + block - 1) // block, add, jnp.zeros((n, n), X.dtype))


def bucket_widths(p: int) -> tuple[int, ...]:
    """min(p, 2^i) for i = 0, 1, …: the static widths a support's Gram is formed at (the next power of two
    ≥ |S|: O(N²·|S|) work, and few widths)."""
    widths, w = [], 1
    while w < p:
        widths.append(w)
        w *= 2
    return tuple(widths) + (p,)


def bucket(count, p: int):
    """min(p, the next power of two ≥ count): an int for an int, traced for a traced count."""
    if isinstance(count, (int, np.integer)):
        return min(p, 1 << max(int(count) - 1, 0).bit_length())
    widths = jnp.asarray(bucket_widths(p))
    return widths[jnp.minimum(jnp.searchsorted(widths, count), len(widths) - 1)]


def exchange_width(width):
    """The most columns exchanged at once for a support of Gram width ``width`` (an int or traced): a
    Gram update costs O(N²) per column, so at most ⌈width/8⌉ (and ``EXCHANGE_MAX``)."""
    if isinstance(width, (int, np.integer)):
        return max(1, min(EXCHANGE_MAX, -(-int(width) // 8)))
    return jnp.clip((width + 7) // 8, 1, EXCHANGE_MAX)


def exchange_limits(p: int) -> tuple[int, ...]:
    """Every exchange width (:func:`exchange_width`) a support of p coordinates may get, ascending."""
    return tuple(sorted({exchange_width(w) for w in bucket_widths(p)}))


def bucketed_gram(X, support) -> jax.Array:
    """:func:`support_gram` at the width ``bucket(|S|, p)``, chosen at run time among the static
    :func:`bucket_widths` (``lax.switch``): one compilation serves every |S|, with the values and the
    O(N²·|S|) work of a compilation per width. The kept columns are listed once for every width; each
    width gathers its own (a slice of one wide gather changes the product's rounding)."""
    n, p = X.shape
    widths = bucket_widths(p)
    single = tuple(w for w in widths if w <= GRAM_BLOCK)  # one block each; wider ones share one blocked loop
    looped = len(single) < len(widths)
    count = jnp.sum(support)
    cols = jnp.nonzero(support, size=-(-p // GRAM_BLOCK) * GRAM_BLOCK if looped else p, fill_value=0)[0]
    branches = [lambda w=w: _gram_of(X, cols, count, w, w) for w in single]
    if looped:
        branches.append(lambda: _gram_of(X, cols, count, p, GRAM_BLOCK))
    if len(branches) == 1:
        return branches[0]()
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(single), count), branches)


def obs_support(X, w, k, lam, width) -> jax.Array:
    """The feasible support of largest OBS saliency ρ_q = w_q² / (2[H_A⁻¹]_qq) (k: an int or Groups),
    a support to start a search from.

    ρ_q is the rise of ½(v − w)ᵀH_A(v − w) when v_q = 0 and the other weights
    of the active set A are re-fitted (Optimal Brain Surgeon), with H_A =
    X_AᵀX_A + NλI over the ``width`` largest |w|; the weights outside
    A score 0. [H_A⁻¹]_qq = (1 − x_qᵀM⁻¹x_q)/(Nλ) with M = X_AX_Aᵀ + NλI
    (Woodbury): O(N²·width) time, and like :func:`support_gram` O(N·GRAM_BLOCK)
    memory beyond X and M. λ > 0. Where the factor breaks down in floating
    point, the magnitude support H_k(w). ``width``: a static int, or traced and
    one of :func:`bucket_widths` (p) (one compilation for every width; the same values).
    """
    n, p = X.shape
    nl = n * lam
    groups = as_groups(k)
    active = Groups.top_k(width).project(w)
    eye = jnp.eye(n, dtype=X.dtype)
    static = isinstance(width, (int, np.integer))
    gram = support_gram(X, active, width) if static else bucketed_gram(X, active)
    m_inv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram + nl * eye), eye)

    def saliency_of(idx):  # w_q²/(2[H_A⁻¹]_qq) for one block of A's columns
        xb = X[:, idx]
        quad = jnp.sum(xb * matmul(m_inv, xb), axis=0)  # x_qᵀM⁻¹x_q
        inverse_diag = jnp.clip((1 - quad) / nl, 1 / (jnp.sum(xb * xb, axis=0) + nl), 1 / nl)  # its exact bounds
        return w[idx] ** 2 / (2 * inverse_diag)

    def padded(width):  # (blocks, block) of A's columns
        block = min(GRAM_BLOCK, width)
        return -(-width // block), block

    widths = (int(width),) if static else bucket_widths(p)
    size = max(b * c for b, c in map(padded, widths))
    listed = jnp.nonzero(active, size=size, fill_value=0)[0]

    def at(width):
        def values():  # ρ of A's listed columns (0 on the padding, which repeats column 0: it adds nothing)
            blocks, block = padded(width)
            cols = listed[:blocks * block].reshape(blocks, block)
            valid = jnp.arange(blocks * block) < width
            rho = jax.lax.map(saliency_of, cols).reshape(-1) if blocks > 1 else saliency_of(cols[0])
            return jnp.pad(jnp.where(valid, rho, 0), (0, size - blocks * block))
        return values

    if static:
        values = at(int(width))()
    else:
        values = jax.lax.switch(jnp.searchsorted(jnp.asarray(widths), width), [at(c) for c in widths])
    saliency = jnp.zeros_like(w).at[listed].add(values)
    return jnp.where(jnp.all(jnp.isfinite(m_inv)), groups.project(saliency), groups.project(w))


def _columns(X, idx, count):
    """X[:, idx] with the columns from position ``count`` on set to zero."""
    return jnp.where(jnp.arange(idx.shape[0]) < count, X[:, idx], 0)


def _exchange(gram, X, enter, leave, count, most=None, limits=None):
    """G_S' from G_S when the first ``count`` columns of ``enter`` replace those of ``leave``: a rank-2m update.

    The update is formed at the smallest of a few widths (``most``, /8, /64) that holds ``count``, so small
    exchanges cost little. ``most``: len(enter) (default), or traced and one of the static ``limits``
    (the widths of every limit are compiled once, and the one this limit would use is taken).
    """
    if most is None:
        most = limits = enter.shape[0]
    limits = (limits,) if isinstance(limits, int) else tuple(limits)
    widths = sorted({max(1, m >> shift) for m in limits for shift in (0, 3, 6)})
    low, mid = jnp.maximum(1, most >> 6), jnp.maximum(1, most >> 3)
    width = jnp.where(count <= low, low, jnp.where(count <= mid, mid, most))

    def update(width):
        def at():
            xa, xr = _columns(X, enter[:width], count), _columns(X, leave[:width], count)
            return gram + matmul(xa, xa.T) - matmul(xr, xr.T)
        return at

    return jax.lax.switch(jnp.searchsorted(jnp.asarray(widths), width), [update(width) for width in widths])


def nearby_gram(X, support, reference, reference_gram, width: Optional[int] = None,
                diff: Optional[int] = None) -> jax.Array:
    """G_S from the Gram of a reference support R that S differs from in few columns.

    With |S∖R| = |R∖S| ≤ ``diff`` it costs O(N²·diff): G_R plus the
    entering columns' outer products minus the leaving ones'; otherwise it is
    computed afresh (:func:`support_gram` at ``width``). Both supports hold the same count.
    ``width`` and ``diff`` static; both None: ``bucket(|S|)`` and its :func:`exchange_width`, traced
    (:func:`bucketed_gram`; one compilation for every |S|).
    """
    p = X.shape[1]
    if diff is None:
        limits = exchange_limits(p)
        diff = exchange_width(bucket(jnp.sum(support), p))
    else:
        limits = (diff,)
    entering, leaving = support & ~reference, reference & ~support
    count = jnp.sum(entering)
    near = (count <= diff) & (jnp.sum(leaving) == count)
    size = max(limits)
    return jax.lax.cond(
        near,
        lambda: _exchange(reference_gram, X, jnp.nonzero(entering, size=size, fill_value=0)[0],
                          jnp.nonzero(leaving, size=size, fill_value=0)[0], count, diff, limits),
        lambda: bucketed_gram(X, support) if width is None else support_gram(X, support, width),
    )


def ridge_state(X, targets, w_bar, support, lam, gram, x_anchor=None):
    """The exact ridge solution on S (:func:`backsolve`) with f(w) and ∇f(w), from one pass over X.

    With e = t − X·w̄_S and α = (G_S + NλI)⁻¹e: w_S = w̄_S + X_Sᵀα, the residual
    r = Xw − t = G_Sα − e (= −Nλα for λ > 0, free of cancellation), f = ½‖r‖² +
    (Nλ/2)(αᵀG_Sα + ‖w̄ off S‖²) and ∇f = Xᵀr + Nλ(w − w̄): X is read once, for
    Xᵀ[α, r]. X a matrix, ``gram`` = G_S; ``x_anchor`` = X·w̄_S if known (else one
    more pass). λ ≥ 0 (λ = 0: the pseudo-inverse). Returns (w, f, ∇f).
    """
    n = X.shape[0]
    anchor = jnp.where(support, w_bar, 0)
    e = targets - (matmul(X, anchor) if x_anchor is None else x_anchor)
    alpha = jax.lax.cond(
        jnp.asarray(lam) > 0,
        lambda: solve_spd(gram + n * lam * jnp.eye(n, dtype=X.dtype), e),
        lambda: jnp.linalg.pinv(gram, hermitian=True) @ e,
    )
    g_alpha = gram @ alpha
    r = jnp.where(jnp.asarray(lam) > 0, -n * lam * alpha, g_alpha - e)
    xt_alpha, xt_r = matmul(jnp.stack([alpha, r]), X)
    w = anchor + jnp.where(support, xt_alpha, 0)
    f = 0.5 * r @ r + 0.5 * n * lam * (alpha @ g_alpha + jnp.sum(jnp.where(support, 0, w_bar) ** 2))
    return w, f, xt_r + n * lam * (w - w_bar)


def backsolve(X, targets, w_bar, support, lam: float, width: Optional[int] = None,
              gram: Optional[jax.Array] = None) -> jax.Array:
    """The ridge problem on the support S, solved exactly:

        w_S = argmin ½‖X_S w_S − t‖² + (Nλ/2)‖w_S − w̄_S‖²,  w = 0 off S.

    Written as w_S = w̄_S + X_Sᵀ(G_S + NλI_N)⁻¹(t − X_S w̄_S) with G_S = X_S X_Sᵀ
    (Woodbury's push-through form), so only an N×N system is formed, never
    k×k. ``gram``: G_S if known (see :func:`nearby_gram`); else it is formed
    with ``width`` (:func:`support_gram`). λ = 0 uses the pseudo-inverse (the
    minimum-norm least-squares solution). λ may be traced.
    """
    gram = support_gram(X, support, width) if gram is None else gram
    return ridge_state(X, targets, w_bar, support, lam, gram)[0]


def solve_spd(A, b):
    """A⁻¹b for a symmetric positive definite A by Cholesky (5× faster than LU on CPU at N = 800);
    by LU where the factor breaks down in floating point (A near singular)."""
    x = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(A), b)
    return jax.lax.cond(jnp.all(jnp.isfinite(x)), lambda: x, lambda: jnp.linalg.solve(A, b))


#: Conjugate-gradient steps of the backsolve when X is not formed.
CG_ITERS = 100


def backsolve_cg(X, targets, w_bar, support, lam, w_init, iters: int = CG_ITERS) -> jax.Array:
    """The ridge problem of :func:`backsolve` by conjugate gradients, through Xv and Xᵀu only.

    w = w̄_S + d with (X_SᵀX_S + NλI)d = X_Sᵀ(t − Xw̄_S) on S, started from
    w_init restricted to S and run for at most ``iters`` steps (relative
    residual 1e-6). The matrix is NλI plus a rank-N term, so CG is exact after
    at most N + 1 steps in exact arithmetic; with fewer it is approximate, and
    callers keep the result only where it lowers f.
    """
    A = linear(X)
    anchor = jnp.where(support, w_bar, 0)
    restrict = lambda v: jnp.where(support, v, 0)  # noqa: E731
    normal = lambda d: restrict(A.rmv(A.mv(d))) + A.n * lam * d  # noqa: E731
    rhs = restrict(A.rmv(targets - A.mv(anchor)))
    d, _ = jax.scipy.sparse.linalg.cg(normal, rhs, x0=restrict(w_init - anchor), tol=1e-6, maxiter=iters)
    return anchor + restrict(d)


def ridge(X, targets, w_bar, support, lam, gram=None, w_init=None, cg_iters: int = CG_ITERS) -> jax.Array:
    """The ridge problem on S: :func:`backsolve` (with ``gram`` if known) where X is a matrix,
    :func:`backsolve_cg` from ``w_init`` (``cg_iters`` steps) where it is an operator."""
    A = linear(X)
    if A.matrix is None:
        return backsolve_cg(A, targets, w_bar, support, lam, w_init, cg_iters)
    return backsolve(A.matrix, targets, w_bar, support, lam, gram=gram)


def ridge_fit(X, targets, w_bar, support, lam, gram=None, w_init=None, cg_iters: int = CG_ITERS, x_anchor=None):
    """(w, f, ∇f) of the ridge solution on S: :func:`ridge_state` (one pass over X) where X is a matrix
    and its Gram ``gram`` is known, else :func:`ridge` and two more passes."""
    A = linear(X)
    if gram is None or A.matrix is None:
        w = ridge(A, targets, w_bar, support, lam, gram, w_init, cg_iters)
        r = A.mv(w) - targets
        return w, _objective(r, w, w_bar, lam), A.rmv(r) + A.n * lam * (w - w_bar)
    return ridge_state(A.matrix, targets, w_bar, support, lam, gram, x_anchor)


def swap_search(X, targets, w_bar, w, support, lam, rounds: int, gram: Optional[jax.Array],
                most: Optional[int] = None, cg_iters: int = CG_ITERS, col_sq: Optional[jax.Array] = None,
                groups: Optional[Groups] = None):
    """Local search over k-supports around the backsolve: exchange kept and pruned weights while f falls.

    At w (the ridge solution on S, whose Gram G_S = X_S X_Sᵀ is ``gram``),
    with g = ∇f(w) and h = diag(XᵀX) + Nλ: adding a pruned j alone (at its
    best value) lowers f by g_j²/(2h_j); removing a kept i alone raises it by
    ½h_i·w_i² − g_i·w_i. Each round pairs the best additions with the
    cheapest removals, exchanges the m pairs that pay, backsolves on the new
    support (its Gram by a rank-2m update; by CG from w where X is an
    operator and ``gram`` is None) and keeps it if f fell; otherwise
    m drops to a quarter of the pairs tried. m starts at min(⌈k/8⌉, ``most``)
    (``most`` static; None: :func:`exchange_width` of bucket(k), traced, so that one compilation
    serves every k with the same values). Stops after ``rounds`` rounds, when no pair pays, or
    when m reaches 0. f never increases, |S| stays k. ``col_sq``: diag(XᵀX) if
    known. ``groups``: the constraint (default one group); pairs are formed
    within a group (:meth:`swapjax.constraints.Groups.pairs`), so every
    exchange keeps the support feasible. Returns (w, support, f, weights exchanged).
    """
    A = linear(X)
    n, p = A.n, A.p
    k = jnp.sum(support)
    groups = groups or Groups.top_k(k)
    h = (A.col_sq() if col_sq is None else col_sq) + n * lam
    limits = (most,) if most is not None else exchange_limits(p)
    if most is None:
        most = exchange_width(bucket(k, p))
    rank = jnp.arange(max(limits))  # pairs beyond ``most`` are never taken: size ≤ m ≤ most

    def body(c):
        i, w, support, gram, x_anchor, obj, g, m, swapped = c
        gain = jnp.where(support, -jnp.inf, g * g / (2 * h))
        cost = jnp.where(support, 0.5 * h * w * w - g * w, jnp.inf)
        into, out, net = groups.pairs(gain, cost, max(limits))
        size = jnp.minimum(jnp.sum(net > 0), m)  # the pairs that pay form a prefix
        enter = jnp.zeros(p, bool).at[into].set(rank < size)
        leave = jnp.zeros(p, bool).at[out].set(rank < size)
        trial = (support & ~leave) | enter
        gram_new = x_anchor_new = None
        if gram is not None:  # G_S' by a rank-2m update, X·w̄_S' from the exchanged columns
            gram_new = _exchange(gram, A.matrix, into, out, size, most, limits)
            x_anchor_new = _exchange_anchor(x_anchor, A.matrix, w_bar, into, out, size, most, limits, w.dtype)
        w_new, obj_new, g_new = ridge_fit(A, targets, w_bar, trial, lam, gram_new, jnp.where(trial, w, 0), cg_iters,
                                          x_anchor_new)
        accept = (size > 0) & (obj_new < obj)
        m = jnp.where(accept, m, size // 4)
        keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        return (i + 1, keep(w_new, w), keep(trial, support), jax.tree_util.tree_map(keep, gram_new, gram),
                jax.tree_util.tree_map(keep, x_anchor_new, x_anchor), keep(obj_new, obj), keep(g_new, g), m,
                swapped + jnp.where(accept, size, 0))

    x_anchor = None if gram is None else matmul(A.matrix, jnp.where(support, w_bar, 0))
    r = A.mv(w) - targets
    obj, g = _objective(r, w, w_bar, lam), A.rmv(r) + n * lam * (w - w_bar)
    start = (jnp.array(0), w, support, gram, x_anchor, obj, g, jnp.minimum((k + 7) // 8, most), jnp.array(0, k.dtype))
    _, w, support, _, _, obj, _, _, swapped = jax.lax.while_loop(lambda c: (c[0] < rounds) & (c[7] > 0), body, start)
    return w, support, obj, swapped


def _exchange_anchor(x_anchor, X, w_bar, into, out, size, most, limits, dtype):
    """X·w̄_S' from X·w̄_S when the first ``size`` columns of ``into`` replace those of ``out``, as a
    product over the first ``most`` pairs (``most`` traced, one of the static ``limits``)."""

    def at(width):
        def anchor():
            paired = (jnp.arange(width) < size).astype(dtype)
            return (x_anchor + matmul(_columns(X, into[:width], size), paired * w_bar[into[:width]])
                    - matmul(_columns(X, out[:width], size), paired * w_bar[out[:width]]))
        return anchor

    if len(limits) == 1:
        return at(limits[0])()
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(limits), most), [at(width) for width in limits])
