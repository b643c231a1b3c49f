"""How ``swapjax.prune`` holds X: chosen once from the memory estimate, then built at every stage.

The one place that knows the ways of holding X (:mod:`swapjax.operators`):
``mode="in-memory"`` forms X (:class:`~swapjax.operators.Formed`, or
:class:`~swapjax.operators.RowSharded` with ``devices=``), ``"blocked"`` (or a
:class:`~swapjax.blocks.Blocked`) forms one block of its columns at a time
(:class:`~swapjax.blocks.ColumnBlocks`, the block-diagonal Fisher), ``"matrix-free"``
linearises the network instead (:class:`~swapjax.operators.GradientOperator`),
and ``"auto"`` takes the first that fits in memory, in that order. Everything after
the choice sees an :class:`~swapjax.operators.Operator` and ``Holding.solve``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from . import blocks, checks, memory
from .gradients import GradientNoise, check_finite, losses_and_grads
from .operators import Formed, Operator, RowSharded, linearize

#: The values of ``prune(mode=...)`` (besides a :class:`swapjax.blocks.Blocked`).
MODES = ("auto", "in-memory", "blocked", "matrix-free")


def blocked_spec(mode) -> Optional[blocks.Blocked]:
    """The :class:`~swapjax.blocks.Blocked` that ``mode`` asks for ("blocked": the default one), else None;
    ValueError for a mode that is neither one of ``MODES`` nor a Blocked."""
    if isinstance(mode, blocks.Blocked):
        return mode
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: must be 'auto', 'in-memory', 'blocked', 'matrix-free' or a swapjax.Blocked(...), "
                         f"got {mode!r}")
    return blocks.Blocked() if mode == "blocked" else None


@dataclass(frozen=True)
class Holding:
    """How X is held at every stage: ``mode`` is "in-memory" (X formed; row-sharded over ``devices``
    where given), "blocked" (column blocks of ``width``, budgets shared by ``budget``) or "matrix-free"
    (never formed)."""

    mode: str
    devices: Optional[tuple] = None
    blocked: Optional[blocks.Blocked] = None  # with the width resolved, where mode is "blocked"

    def gradients(self, loss_fn, params, batch, lay, chunk_size, progress, noise=None, key=None):
        """X at ``params`` (plus ``noise`` drawn with ``key``, where X is formed) as an operator, or as
        :class:`~swapjax.blocks.ColumnBlocks` (computed block by block in ``solve``). Checked finite, losses included."""
        if self.mode == "matrix-free":
            return linearize(loss_fn, params, batch, lay, chunk_size, progress)[1]
        if self.mode == "blocked":
            return blocks.ColumnBlocks(loss_fn, params, batch, lay, blocks.block_ranges(lay.size, self.blocked.width),
                                       chunk_size, progress)
        losses, X = losses_and_grads(loss_fn, params, batch, lay, chunk_size, True, progress, self.devices)
        check_finite(X)
        checks.finite_losses(losses)  # NaN or inf loss values with finite gradients
        if noise is not None:  # X is prune's own: noised in place
            X = noise(X, key, donate=True) if isinstance(noise, GradientNoise) else noise(X, key)
        return Formed(X) if self.devices is None else RowSharded(X)

    def describe(self, p: int) -> str:
        """'in-memory', 'matrix-free' or 'blocked (3 blocks of 23,104 columns, budget: fisher)'."""
        if self.mode != "blocked":
            return self.mode
        count = len(blocks.block_ranges(p, self.blocked.width))
        return f"blocked ({count} block{'s' * (count > 1)} of ≤ {self.blocked.width:,} columns, budget: {self.blocked.budget})"

    def solve(self, method, X, w_bar, k, **kwargs):
        """``method.solve`` on the stage's X: directly, or block by block (:func:`swapjax.blocks.solve`)."""
        if self.mode == "blocked":
            return blocks.solve(method, X, w_bar, k, budget=self.blocked.budget, **kwargs)
        return method.solve(X, w_bar, k, **kwargs)


def choose(mode, method, noise, estimate: memory.Estimate, devices=None) -> Holding:
    """``mode`` if it fits in memory, or for "auto" the first way that fits of in-memory, blocked (where
    the blocked estimate found a block width) and matrix-free (where ``method.matrix_free`` and the options
    allow it); ValueError naming the figures where the requested way, or every way, does not fit."""
    spec = blocked_spec(mode)
    mode = "blocked" if spec is not None else mode
    unavailable = {}
    if noise is not None:
        unavailable["blocked"] = unavailable["matrix-free"] = "gradient noise needs X formed whole"
    elif devices is not None:
        unavailable["blocked"] = "the blocked mode runs on one device (devices= shards X's rows)"
        unavailable["matrix-free"] = "the matrix-free mode runs on one device (devices= shards X's rows)"
    elif method.needs_segments:
        unavailable["blocked"] = (f"{type(method).__name__} needs whole layers (segments); "
                                  "use constraint=swapjax.LayerBudgets() for per-layer counts")
    if "matrix-free" not in unavailable and not method.matrix_free:
        unavailable["matrix-free"] = f"{type(method).__name__} needs X formed"
    if mode in unavailable:
        raise ValueError(f"mode: {mode!r} is not available here: {unavailable[mode]}")
    fits = {"in-memory": estimate.in_memory <= estimate.available,
            "blocked": estimate.block_width > 0 and estimate.blocked <= estimate.available and "blocked" not in unavailable,
            "matrix-free": estimate.matrix_free <= estimate.available and "matrix-free" not in unavailable}
    if mode == "auto":
        mode = next((way for way in fits if fits[way]), "auto")
        if mode != "in-memory" and mode != "auto":
            how = f"in blocks of {estimate.block_width:,} columns" if mode == "blocked" else "matrix-free"
            print(f"[swapjax] X does not fit in memory ({estimate.describe()}): pruning {how}",
                  file=sys.stderr, flush=True)
    if mode == "auto" or not fits[mode]:
        options = ["fewer examples (N)", "fewer prunable leaves (select=)", "a smaller chunk_size"]
        if mode == "blocked" and estimate.block_width == 0:
            options.insert(0, "narrower blocks (mode=swapjax.Blocked(width=...))")
        options[:0] = [f"mode={way!r}" for way in ("blocked", "matrix-free") if way != mode and fits[way]]
        why_not = "; ".join(f"{way} is not available: {why}" for way, why in unavailable.items())
        raise ValueError(("mode: no mode fits in memory" if mode == "auto" else f"mode: the {mode} prune does not fit")
                         + f": {estimate.describe()}" + (f" ({why_not})" if why_not else "")
                         + "; options: " + ", ".join(options))
    blocked = None
    if mode == "blocked":
        blocked = blocks.Blocked(estimate.block_width, (spec or blocks.Blocked()).budget)
    return Holding(mode, devices, blocked)

