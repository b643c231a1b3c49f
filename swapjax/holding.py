"""How ``swapjax.prune`` holds X: chosen once from the memory estimate, then built at every stage.

The one place that knows the ways of holding X (:mod:`swapjax.operators`):
``mode="in-memory"`` forms X (:class:`~swapjax.operators.Formed`, or
:class:`~swapjax.operators.RowSharded` with ``devices=``), ``"matrix-free"``
linearises the network instead (:class:`~swapjax.operators.GradientOperator`),
and ``"auto"`` takes the first that fits in memory. Everything after the
choice sees only the :class:`~swapjax.operators.Operator` interface.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from . import checks, memory
from .gradients import GradientNoise, check_finite, losses_and_grads
from .operators import Formed, Operator, RowSharded, linearize

#: The values of ``prune(mode=...)``.
MODES = ("auto", "in-memory", "matrix-free")


@dataclass(frozen=True)
class Holding:
    """How X is held at every stage: ``mode`` is "in-memory" (X formed; row-sharded over ``devices``
    where given) or "matrix-free" (never formed)."""

    mode: str
    devices: Optional[tuple] = None

    def gradients(self, loss_fn, params, batch, lay, chunk_size, progress, noise=None, key=None) -> Operator:
        """X at ``params`` (plus ``noise`` drawn with ``key``, where X is formed) as an operator.
        Checked finite, losses included."""
        if self.mode == "matrix-free":
            return linearize(loss_fn, params, batch, lay, chunk_size, progress)[1]
        losses, X = losses_and_grads(loss_fn, params, batch, lay, chunk_size, True, progress, self.devices)
        check_finite(X)
        checks.finite_losses(losses)  # NaN or inf loss values with finite gradients
        if noise is not None:  # X is prune's own: noised in place
            X = noise(X, key, donate=True) if isinstance(noise, GradientNoise) else noise(X, key)
        return Formed(X) if self.devices is None else RowSharded(X)


def choose(mode: str, method, noise, estimate: memory.Estimate, devices=None) -> Holding:
    """``mode`` if it fits in memory, or for "auto" the in-memory way where it fits, else the matrix-free
    one (where ``method.matrix_free`` and the options allow it); ValueError naming the figures where the
    requested way, or every way, does not fit."""
    checks.choice("mode", mode, MODES)
    why_not = None
    if noise is not None:
        why_not = "gradient noise needs X formed"
    elif not method.matrix_free:
        why_not = f"{type(method).__name__} needs X formed"
    elif devices is not None:
        why_not = "the matrix-free mode runs on one device (devices= shards X's rows)"
    if mode == "matrix-free" and why_not:
        raise ValueError(f"mode: 'matrix-free' is not available here: {why_not}")
    fits = {"in-memory": estimate.in_memory <= estimate.available,
            "matrix-free": estimate.matrix_free <= estimate.available and why_not is None}
    if mode == "auto" and (fits["in-memory"] or fits["matrix-free"]):
        mode = "in-memory" if fits["in-memory"] else "matrix-free"
        if mode == "matrix-free":
            print(f"[swapjax] X does not fit in memory ({estimate.describe()}): pruning matrix-free",
                  file=sys.stderr, flush=True)
    if mode == "auto" or not fits[mode]:
        options = ["fewer examples (N)", "fewer prunable leaves (select=)", "a smaller chunk_size"]
        if mode == "in-memory" and fits["matrix-free"]:
            options.insert(0, "mode='matrix-free'")
        raise ValueError(("mode: no mode fits in memory" if mode == "auto" else f"mode: the {mode} prune does not fit")
                         + f": {estimate.describe()}" + (f" (matrix-free is not available: {why_not})" if why_not else "")
                         + "; options: " + ", ".join(options))
    return Holding(mode, devices)

