"""The network Fisher in column blocks: X ∈ R^{N×p} held one block of columns at a time.

Where X does not fit in memory, the p prunable coordinates are cut into B
contiguous ranges of about equal width (the flat order of :mod:`swapjax.pytree`,
so a block may end inside a layer or hold several small ones) and the Fisher is
taken block-diagonal, F ≈ diag(X_1ᵀX_1, …, X_Bᵀ X_B)/N, as CHITA and WoodFisher
do. The pruning problem then splits into B independent problems

    min_{w_b}  ½‖X_b w_b − t_b‖² + (Nλ/2)‖w_b − w̄_b‖²   over the block's feasible supports,

each solved by the method as it is (LR, SWAP, Magnitude, WoodFisher, one of your
own), on X_b formed: memory N·p/B instead of N·p, at the cost of one pass of
per-sample gradients per block (every block's columns are taken at the stage's
weights w_t, so the blocks together are exactly the columns of X).

**The budget rule.** The constraint's groups may span blocks (the global top-k
spans all of them), so before any block is solved each group's count c_g is
shared by one ranking: the constraint's projection of a saliency ρ keeps the c_g
largest ρ_i of group g, and block b keeps, of group g, as many as that projection
kept in block b. ``budget="fisher"`` (the default) ranks by ρ_i = |w_i|·‖X_{:,i}‖,
the diagonal OBS saliency w_i²·(XᵀX)_ii (one more pass of gradients, without
storing X); ``budget="magnitude"`` by ρ_i = |w_i| (CHITA's global magnitude
threshold). On the ViT preset at 0.7 (4 blocks, 5 seeds) the Fisher budget kept 8–9
points more test accuracy than the magnitude one (docs/scale.md). Every
group keeps exactly its count, so the result is feasible for the constraint; each
block then chooses *which* weights within its share.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .constraints import Groups
from .contract import Method, Problem
from .gradients import batch_size, check_finite, chunk_losses_and_grads, chunk_starts
from .methods import shared_widths
from .operators import Formed, as_operator, linearize
from .progress import reporter

#: The ranking that shares a group's count between blocks (see the module docstring).
BUDGETS = ("fisher", "magnitude")


@dataclass(frozen=True, repr=False)
class Blocked(Method):
    """``method`` on X held as column blocks (the block-diagonal Fisher): a wrapper around any method on X.

    Each block's problem is solved by ``method`` as it is, with the block's share of the constraint's
    counts (:func:`split_budget`). width: columns per block (at most; the blocks are made about equal), or
    None for the widest block within the margin of the memory at hand (half of it, else 75 %;
    :func:`swapjax.memory.estimate`); one block is the in-memory prune. budget: how a constraint's counts
    are shared between blocks, ``"fisher"`` (default: |w|·‖X_{:,i}‖, one more gradient pass) or
    ``"magnitude"`` (|w|, CHITA). ``prune(method=Blocked(LR()))`` holds X in blocks; ``mode="blocked"``
    wraps the prune's method in ``Blocked(method)``, and ``mode=Blocked(width=...)`` (no method) in one of
    that width and budget. On a formed X (``solve`` on a matrix, ``swapjax.compare``), the blocks are
    its column ranges.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(8, 4)).astype("float32")}
        >>> batch = {"x": rng.normal(size=(40, 8)).astype("float32")}
        >>> loss_fn = lambda params, ex: jnp.sum(jnp.tanh(ex["x"] @ params["w"]) ** 2)
        >>> result = swapjax.prune(loss_fn, params, batch, sparsity=0.75,
        ...                        method=swapjax.Blocked(swapjax.LR(lam=1e-3), width=12), progress=False)
        >>> result.mode, len(result.info[0].method_info.blocks), result.summary()["total"]["kept"]   # 3 blocks
        ('blocked', 3, 8)
    """

    method: Optional[Method] = None
    width: Optional[int] = None
    budget: str = "fisher"

    def __post_init__(self):
        if self.method is not None and not isinstance(self.method, (Method, type)):  # the form Blocked(width, budget)
            width, budget = self.method, self.width
            object.__setattr__(self, "method", None)
            object.__setattr__(self, "width", width)
            object.__setattr__(self, "budget", self.budget if budget is None else budget)
        if self.method is not None:
            checks.method(self.method, "method (the method solved on each block)")
        if self.width is not None:
            checks.integer("width (columns per block)", self.width, 1)
        checks.choice("budget", self.budget, BUDGETS)

    def __repr__(self) -> str:
        inner = "" if self.method is None else f"{self.method!r}, "
        return f"Blocked({inner}width={self.width!r}, budget={self.budget!r})"

    @property
    def selects(self) -> bool:
        return self.method is not None and self.method.selects

    @property
    def needs_segments(self) -> bool:
        return self.method is not None and self.method.needs_segments

    def without_search(self) -> "Blocked":
        return self if self.method is None else dataclasses.replace(self, method=self.method.without_search())

    def solve_problem(self, problem: Problem) -> tuple[jax.Array, "BlockedInfo"]:
        if self.method is None:
            raise ValueError("method: Blocked() has no method to solve each block with; pass Blocked(method, ...)")
        X = problem.X
        if not isinstance(X, ColumnBlocks):  # a formed X: its column ranges
            X = _FormedBlocks(as_operator(X), block_ranges(X.shape[1], self.width or X.shape[1]))
        return solve(self.method, problem.replace(X=X), budget=self.budget)


def block_ranges(p: int, width: int) -> tuple[tuple[int, int], ...]:
    """B = ⌈p/width⌉ contiguous ranges [a_b, e_b) covering 0…p, of widths differing by at most one.

    Examples:
        >>> block_ranges(10, 4)
        ((0, 4), (4, 7), (7, 10))
    """
    count = -(-p // max(1, min(width, p)))
    edges = [-(-p * b // count) for b in range(count + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


def split_budget(groups: Groups, saliency: jax.Array, ranges) -> list[Groups]:
    """Each block's Groups: group g restricted to block b keeps as many as ``groups.project(saliency)`` keeps
    there, so the blocks' counts add up to every group's count exactly.

    Examples:
        >>> import jax.numpy as jnp
        >>> parts = split_budget(Groups.top_k(3), jnp.array([5.0, 1, 4, 2, 3, 0]), ((0, 3), (3, 6)))
        >>> [int(part.k) for part in parts]           # the 3 largest: 5 and 4 in block 0, 3 in block 1
        [2, 1]
    """
    keep = np.asarray(groups.project(saliency))
    ids = None if groups.ids is None else np.asarray(groups.ids)
    parts = []
    for a, e in ranges:
        if ids is None:
            parts.append(Groups(jnp.asarray([keep[a:e].sum()], jnp.int32), None, groups.label))
            continue
        _, local = np.unique(ids[a:e], return_inverse=True)
        counts = np.bincount(local, weights=keep[a:e], minlength=local.max() + 1).astype(np.int32)
        parts.append(Groups(jnp.asarray(counts), jnp.asarray(local.astype(np.int32)), groups.label))
    return parts


@partial(jax.jit, static_argnames=("loss_fn", "lay", "fast"), donate_argnames=("X",))
def _fill_block_chunk(loss_fn, params, examples, row, column, X, lay, fast):
    """X with rows row… replaced by the chunk's gradients in the columns column … column + width (in place)."""
    values, grads = chunk_losses_and_grads(loss_fn, params, examples, lay, fast)
    rows = jnp.concatenate([g.reshape(len(values), -1).astype(lay.dtype) for g in grads], axis=1)
    block = jax.lax.dynamic_slice_in_dim(rows, column, X.shape[1], axis=1)
    return jax.lax.dynamic_update_slice(X, block, (row, 0))


class ColumnBlocks:
    """X at ``params``, held as the column blocks ``ranges``: ``block(b)`` computes X_b (one pass of per-sample
    gradients, chunked) and ``col_sq`` = diag(XᵀX) (one pass, on first use); nothing of X is kept between calls."""

    def __init__(self, loss_fn, params, batch, lay, ranges, chunk_size: int, progress: bool = True, fast: bool = True,
                 report: Optional[Callable[[str], None]] = None):
        self.loss_fn, self.params, self.batch, self.lay = loss_fn, params, batch, lay
        self.ranges, self.chunk_size, self.progress, self.fast = tuple(ranges), chunk_size, progress, fast
        self.report = reporter(progress) if report is None else report  # a line per block
        self._col_sq = None

    @property
    def col_sq(self) -> jax.Array:
        if self._col_sq is None:
            self._col_sq = linearize(self.loss_fn, self.params, self.batch, self.lay, self.chunk_size,
                                     self.progress, self.fast)[1].col_sq
        return self._col_sq

    def block(self, b: int) -> Formed:
        """X_b = X[:, a_b:e_b], formed and checked finite."""
        a, e = self.ranges[b]
        n = batch_size(self.batch)
        size, starts = chunk_starts(n, self.chunk_size)
        X = jnp.zeros((n, e - a), self.lay.dtype)
        batch = jax.tree_util.tree_map(jnp.asarray, self.batch)
        for row in starts:  # a chunk is a slice at a traced start: one compilation for every row and block
            examples = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, row, size), batch)
            X = _fill_block_chunk(self.loss_fn, self.params, examples, row, a, X, self.lay, self.fast)
        check_finite(X, f"gradients (block {b + 1}, columns {a}–{e})")
        return Formed(X)


class BlockedInfo(NamedTuple):
    """A blocked solve: ``blocks`` holds each block's own info (None for a block whose share is 0, left at 0).
    ``objective`` = Σ_b f_b (the objective of the block-diagonal problem) and ``objective_trace`` its start and end."""

    support: jax.Array
    objective: jax.Array
    objective_trace: jax.Array
    duals: tuple
    blocks: tuple
    gradient_seconds: float

    #: Each block's held-out loss is of its own candidates: the driver scores the whole result.
    held_out_loss = math.nan

    def describe(self) -> str:
        """The block count and each solved block's own diagnostics, where it has any."""
        parts = [f"{len(self.blocks)} block{'s' * (len(self.blocks) > 1)}"]
        parts += [f"block {b + 1}: {info.describe()}" for b, info in enumerate(self.blocks)
                  if info is not None and info.describe()]
        return "; ".join(parts)

    def warnings(self, n: int) -> tuple[str, ...]:
        return tuple(f"block {b + 1}: {message}" for b, info in enumerate(self.blocks) if info is not None
                     for message in info.warnings(n))


def solve(method, problem: Problem, budget: str = "fisher") -> tuple[jax.Array, BlockedInfo]:
    """``method`` on each block of ``problem.X`` (:class:`ColumnBlocks`) with the block's share of the
    constraint ``problem.groups``.

    ``problem.score`` (held-out loss of the whole network) scores block b's candidates with the blocks before
    it at their results and the blocks after it at w_start on the budget's support. ``problem.duals``: the
    previous stage's per-block duals (``info.duals``). The result is feasible for the groups; f sums the
    blocks' objectives.
    """
    X, w_bar, groups = problem.X, problem.w_bar, problem.groups
    w_start = w_bar if problem.w_start is None else problem.w_start
    duals, score = problem.duals, problem.score
    fisher = budget == "fisher" and len(X.ranges) > 1  # one block: the whole budget, whatever the ranking
    t0 = time.perf_counter()
    saliency = jnp.abs(w_start) * (jnp.sqrt(X.col_sq) if fisher else 1.0)
    w = jnp.where(groups.project(saliency), w_start, 0)  # the network as each block's score sees it
    infos, seconds, count = [], time.perf_counter() - t0, len(X.ranges)
    with shared_widths(count > 1):  # the blocks' counts differ: one compilation per block width serves them all
        for b, ((a, e), part) in enumerate(zip(X.ranges, split_budget(groups, saliency, X.ranges))):
            if int(part.k) == 0:
                infos.append(None)
                continue
            t0 = time.perf_counter()
            X_b = X.block(b)
            t1 = time.perf_counter()
            block_score = None
            if score is not None:
                block_score = lambda w_b, w=w, a=a, e=e: score(w.at[a:e].set(w_b))  # noqa: E731
            w_b, info = method.solve_problem(Problem(
                w_bar[a:e], part, X=X_b, w_start=w_start[a:e], duals=None if duals is None else duals[b],
                score=block_score))
            del X_b
            w = w.at[a:e].set(w_b)
            infos.append(info)
            seconds += t1 - t0
            if count > 1:
                X.report(f"  block {b + 1}/{count} (columns {a:,}–{e:,}): {int(part.k):,} kept, "
                         f"f {float(info.objective):.4g}, {t1 - t0:.2f}s grads + {time.perf_counter() - t1:.2f}s solve")
    solved = [info for info in infos if info is not None]
    support = jnp.concatenate([info.support if info is not None else jnp.zeros(e - a, bool)
                               for info, (a, e) in zip(infos, X.ranges)])
    objective = sum(info.objective for info in solved)
    start = sum(info.objective_trace[0] for info in solved)
    return w, BlockedInfo(support, objective, jnp.stack([start, objective]),
                          tuple(None if info is None else info.duals for info in infos), tuple(infos), seconds)


class _FormedBlocks:
    """A formed X seen as column blocks (``ranges``): ``block(b)`` its columns, ``col_sq`` diag(XᵀX)."""

    def __init__(self, X, ranges):
        self.X, self.ranges = X, tuple(ranges)

    @property
    def col_sq(self) -> jax.Array:
        return self.X.col_sq

    def block(self, b: int) -> Formed:
        a, e = self.ranges[b]
        return Formed(self.X.matrix[:, a:e])

    def report(self, message: str) -> None:
        return None
