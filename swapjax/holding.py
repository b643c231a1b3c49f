"""How ``swapjax.prune`` holds X: chosen once from the memory estimate, then built at every stage.

The one place that knows the ways of holding X (:mod:`swapjax.operators`):
``mode="in-memory"`` forms X (:class:`~swapjax.operators.Formed`, or
:class:`~swapjax.operators.RowSharded` with ``devices=``), ``"blocked"`` (or a method
wrapped in :class:`~swapjax.blocks.Blocked`) forms one block of its columns at a time
(:class:`~swapjax.blocks.ColumnBlocks`, the block-diagonal Fisher), ``"matrix-free"``
linearises the network instead (:class:`~swapjax.operators.GradientOperator`),
and ``"auto"`` takes the first that fits in memory with a margin (:func:`choose`). Everything after
the choice sees an :class:`~swapjax.operators.Operator` and ``Holding.solve``; running out of
memory there anyway is a MemoryError that names the mode and the ways out.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from . import blocks, checks, memory
from .gradients import GradientNoise, check_finite, losses_and_grads
from .operators import Formed, Operator, RowSharded, linearize
from .progress import reporter

#: The values of ``prune(mode=...)``.
MODES = ("auto", "in-memory", "blocked", "matrix-free")


def blocked_spec(mode, method=None) -> Optional[blocks.Blocked]:
    """The :class:`~swapjax.blocks.Blocked` that ``mode`` and ``method`` ask for (``method`` wrapped in
    Blocked; ``mode="blocked"``: the default one; ``mode=Blocked(width=...)``: that one), else None.
    ValueError for a mode that is none of ``MODES`` or a Blocked, or a Blocked method with another mode."""
    if isinstance(method, blocks.Blocked):
        if not (isinstance(mode, str) and mode in ("auto", "blocked")):
            raise ValueError(f"mode: {mode!r} with method=Blocked(...), which holds X in column blocks; leave mode "
                             "as 'auto' or 'blocked'")
        return method
    if isinstance(mode, blocks.Blocked):
        if mode.method is not None:
            raise ValueError("mode: a Blocked with a method of its own; pass it as method=Blocked(method, ...)")
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
    # for the error when memory runs out anyway: the figures, the other modes open here, the mode asked
    estimate: Optional[memory.Estimate] = field(default=None, compare=False)
    others: tuple = field(default=(), compare=False)
    asked: object = field(default=None, compare=False)

    def gradients(self, loss_fn, params, batch, lay, chunk_size, progress, noise=None, key=None, report=None):
        """X at ``params`` (plus ``noise`` drawn with ``key``, where X is formed) as an operator, or as
        :class:`~swapjax.blocks.ColumnBlocks` (computed block by block in ``solve``). Checked finite, losses included.
        Out of memory: a MemoryError naming the mode and the ways out (:meth:`out_of_memory`)."""
        with self.out_of_memory("computing the per-sample gradients", lay.size):
            return self._gradients(loss_fn, params, batch, lay, chunk_size, progress, noise, key, report)

    def _gradients(self, loss_fn, params, batch, lay, chunk_size, progress, noise, key, report):
        if self.mode == "matrix-free":
            return linearize(loss_fn, params, batch, lay, chunk_size, progress)[1]
        if self.mode == "blocked":
            return blocks.ColumnBlocks(loss_fn, params, batch, lay, blocks.block_ranges(lay.size, self.blocked.width),
                                       chunk_size, progress, report=report)
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

    def method(self, method):
        """The method to run on X as held: in the blocked mode, ``method`` (or the method it wraps) in
        ``Blocked`` of the width resolved; else ``method``."""
        if self.mode != "blocked":
            return method
        inner = method.method if isinstance(method, blocks.Blocked) else method
        return dataclasses.replace(self.blocked, method=inner)

    def solve(self, method, problem):
        """``method.solve_problem`` on the stage's problem, X as held (:meth:`method`). Out of memory: a
        MemoryError naming the mode and the ways out (:meth:`out_of_memory`)."""
        with self.out_of_memory(f"solving ({type(method).__name__})", int(problem.w_bar.size)):
            return self.method(method).solve_problem(problem)

    @contextlib.contextmanager
    def out_of_memory(self, during: str, p: int):
        """Re-raise running out of memory (:func:`is_out_of_memory`) as a MemoryError that names the mode,
        how it was chosen, the estimate and the ways out (``mode=`` where its estimated peak is lower,
        narrower blocks, a smaller N or chunk)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (only memory errors are replaced; the rest re-raised as they are)
            why = is_out_of_memory(e)
            if not why:
                raise
            raise MemoryError(self._out_of_memory_message(during, p, why)) from e

    def _out_of_memory_message(self, during: str, p: int, why: str) -> str:
        est = self.estimate
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        chosen = "chosen by mode='auto'" if self.asked == "auto" else f"mode={self.asked!r}" if self.asked else ""
        ways = []
        peak = {} if est is None else {"in-memory": est.in_memory, "blocked": est.blocked, "matrix-free": est.matrix_free}
        for way in self.others:  # the modes open here with a lower estimated peak than this one
            if not peak:
                ways.append(f"mode={way!r}")
            elif peak[way] < peak[self.mode]:
                ways.append(f"mode={way!r} (estimated {gb(peak[way])})")
            elif way == "blocked" and self.mode == "in-memory":  # the widest blocks were X whole: two blocks
                ways.append(f"X in blocks (mode=swapjax.Blocked(width={-(-p // 2):,}))")
        if self.mode == "blocked":
            ways.insert(0, f"narrower blocks (mode=swapjax.Blocked(width={max(1, self.blocked.width // 2):,}))")
        ways += ["a smaller N (fewer examples)", "a smaller chunk_size (examples per chunk of gradients)",
                 "fewer prunable leaves (select=)"]
        figures = f"; {est.describe()}" if est is not None else ""
        return (f"out of memory while {during} with X {self.describe(p)}"
                + (f" ({chosen}{figures})" if chosen or figures else "") + f": {why}; ways out: " + ", ".join(ways))


def is_out_of_memory(error: BaseException) -> str:
    """Why ``error`` is taken for running out of memory (a line for the message), or "" where it is not:
    a MemoryError, an XLA RESOURCE_EXHAUSTED or "out of memory", or XLA:CPU's INTERNAL "Error dispatching
    computation" / "operation failed", which a failed allocation under an address-space limit gives."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, MemoryError):
        return f"MemoryError: {text}"
    if type(error).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return ""
    low = text.lower()
    if "resource_exhausted" in low or "out of memory" in low:
        return f"XLA: {text}"
    if "error dispatching computation" in low or ("internal" in low and "operation failed" in low):
        return f"XLA: {text} (what XLA on a CPU raises when an allocation fails, e.g. under ulimit -v)"
    return ""


def choose(mode, method, noise, estimate: memory.Estimate, devices=None, report=None) -> Holding:
    """``mode`` if its estimate fits in the memory available; for "auto", with a margin:

    - in-memory where its estimate is within ``memory.MEMORY_FRACTION`` (0.75) of the memory available
      (the fastest mode, exact, and its estimate an upper bound in every run measured);
    - else blocked (where the estimate found a block width, its blocks within the same fraction) or
      matrix-free (where ``method.matrix_free`` and the options allow it), within that fraction; blocked
      first, unless it would use most of the memory (over ``memory.COMFORT_FRACTION`` = 0.5) and the
      matrix-free mode would not: then the lower peak.

    ValueError naming the figures and the ways out where the requested way, or every way, does not fit.
    ``report``: the progress callback for the line saying a mode other than in-memory was chosen (default:
    stderr)."""
    spec = blocked_spec(mode, method)
    mode = "blocked" if spec is not None else mode
    unavailable = {}
    if noise is not None:
        unavailable["blocked"] = unavailable["matrix-free"] = "gradient noise needs X formed whole"
    elif devices is not None:
        unavailable["blocked"] = "the blocked mode runs on one device (devices= shards X's rows)"
        unavailable["matrix-free"] = "the matrix-free mode runs on one device (devices= shards X's rows)"
    elif method.needs_segments:  # (a Blocked method says what the method it wraps needs)
        unavailable["blocked"] = (f"{type(method).__name__} needs whole layers (segments); "
                                  "use constraint=swapjax.LayerBudgets() for per-layer counts")
    if "matrix-free" not in unavailable and not method.matrix_free:
        unavailable["matrix-free"] = f"{type(method).__name__} needs X formed"
    if mode in unavailable:
        raise ValueError(f"mode: {mode!r} is not available here: {unavailable[mode]}")
    peak = {"in-memory": estimate.in_memory, "blocked": estimate.blocked if estimate.block_width else None,
            "matrix-free": estimate.matrix_free}
    usable = {way: way not in unavailable and peak[way] is not None for way in peak}
    fits = {way: usable[way] and peak[way] <= estimate.available for way in peak}  # a mode asked for
    within = {way: usable[way] and peak[way] <= estimate.budget for way in peak}  # "auto": with the margin
    asked = mode if spec is None else spec
    if mode == "auto":
        comfort = memory.COMFORT_FRACTION * estimate.available
        fallbacks = [way for way in ("blocked", "matrix-free") if within[way]]
        roomy = [way for way in fallbacks if peak[way] <= comfort]
        mode = "in-memory" if within["in-memory"] else (roomy or fallbacks or ["auto"])[0]
        if mode != "in-memory" and mode != "auto":
            how = f"in blocks of {estimate.block_width:,} columns" if mode == "blocked" else "matrix-free"
            if mode == "matrix-free" and within["blocked"]:
                how += (f" (the blocks would take {peak['blocked'] / estimate.available:.0%} of it, over "
                        f"{memory.COMFORT_FRACTION:.0%}: the lower peak preferred)")
            (report or reporter(True))(f"X does not fit in memory ({estimate.describe()}; auto keeps within "
                                       f"{memory.MEMORY_FRACTION:.0%} of it): pruning {how}")
    if mode == "auto" or not fits[mode]:
        options = ["fewer examples (N)", "fewer prunable leaves (select=)", "a smaller chunk_size"]
        if mode == "blocked" and estimate.block_width == 0:
            options.insert(0, "narrower blocks (mode=swapjax.Blocked(width=...))")
        options[:0] = [f"mode={way!r}" for way in ("blocked", "matrix-free") if way != mode and fits[way]]
        why_not = "; ".join(f"{way} is not available: {why}" for way, why in unavailable.items())
        margin = (f" (mode='auto' takes a mode only where its estimate is within {memory.MEMORY_FRACTION:.0%} of "
                  "what is available; a mode named in mode= only where it is within all of it)"
                  if mode == "auto" and any(fits.values()) else "")
        raise ValueError(("mode: no mode fits in memory" if mode == "auto" else f"mode: the {mode} prune does not fit")
                         + f": {estimate.describe()}" + (f" ({why_not})" if why_not else "")
                         + "; options: " + ", ".join(options) + margin)
    blocked = None
    if mode == "blocked":
        spec = spec or blocks.Blocked()
        blocked = dataclasses.replace(spec, width=estimate.block_width)
    others = tuple(way for way in ("in-memory", "blocked", "matrix-free") if way != mode and usable[way])
    return Holding(mode, devices, blocked, estimate, others, asked)

