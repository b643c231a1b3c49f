"""Sparsity schedules: the sparsity s_t of each stage t = 1..T, ending at the final sparsity."""
from __future__ import annotations

from numbers import Integral
from typing import Sequence, Union

from . import checks

Schedule = Union[int, Sequence[float]]


def cubic_schedule(final: float, stages: int, initial: float = 0.0) -> tuple[float, ...]:
    """s_t = s_f + (s_0 − s_f)(1 − (t−1)/(T−1))³, t = 1..T (the published schedule; T = 1: one-shot).

    Examples:
        >>> import swapjax
        >>> swapjax.cubic_schedule(0.9, 3)  # the first stage (sparsity 0) keeps every weight: prune skips it
        (0.0, 0.7875, 0.9)
        >>> swapjax.cubic_schedule(0.9, 1)  # one-shot
        (0.9,)
    """
    return polynomial_schedule(final, stages, initial, power=3)


def linear_schedule(final: float, stages: int, initial: float = 0.0) -> tuple[float, ...]:
    """s_t evenly spaced from s_0 to s_f.

    Examples:
        >>> import swapjax
        >>> [round(s, 6) for s in swapjax.linear_schedule(0.9, 4, initial=0.3)]
        [0.3, 0.5, 0.7, 0.9]
    """
    return polynomial_schedule(final, stages, initial, power=1)


def polynomial_schedule(final: float, stages: int, initial: float = 0.0, power: float = 3) -> tuple[float, ...]:
    """s_t = s_f + (s_0 − s_f)(1 − (t−1)/(T−1))^power, t = 1..T; T = 1 gives (s_f,).

    Examples:
        >>> import swapjax
        >>> [round(s, 6) for s in swapjax.polynomial_schedule(0.9, 3, initial=0.5, power=2)]
        [0.5, 0.8, 0.9]
    """
    stages = checks.integer("stages", stages, 1)
    final = checks.real("final", final, 0.0, 1.0, hi_open=True)
    initial = checks.real("initial", initial, 0.0, 1.0, hi_open=True)
    power = checks.real("power", power, 0.0, lo_open=True)
    if initial > final:
        raise ValueError(f"initial: the first sparsity {initial} is above the final {final}")
    if stages == 1:
        return (float(final),)
    return tuple(
        float(final + (initial - final) * (1 - t / (stages - 1)) ** power) for t in range(stages)
    )


def resolve(schedule: Schedule, final: float) -> tuple[float, ...]:
    """The stage sparsities: an int T means the cubic schedule with T stages; a sequence is
    taken as given (non-decreasing, in [0, 1), ending at ``final``)."""
    if isinstance(schedule, Integral):
        return cubic_schedule(final, int(schedule))
    levels = tuple(float(s) for s in schedule)
    if not levels:
        raise ValueError("stages: an explicit schedule needs at least one sparsity")
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"stages: sparsities must be non-decreasing, got {levels}")
    if not all(0 <= s < 1 for s in levels):
        raise ValueError(f"stages: every sparsity must be in [0, 1), got {levels}")
    if abs(levels[-1] - final) > 1e-12:
        raise ValueError(f"stages: the schedule must end at sparsity={final}, got {levels[-1]}")
    return levels


#: Stages of ``prune(stages="auto")`` where it prunes gradually (the cubic schedule).
AUTO_STAGES = 8


def auto(compared: bool, finetuned: bool, mode: str) -> tuple[int, str]:
    """T for ``prune(stages="auto")``, and a progress line saying why ("" where there is nothing to say).

    ``AUTO_STAGES`` where one-shot is compared with the gradual prune on held-out loss (``compared``) or
    a hook fine-tunes between stages; else 1. Where X is not held in memory (``mode`` "blocked" or
    "matrix-free") every stage recomputes the gradients block by block or product by product, so a
    compared prune stays one-shot there (``stages=AUTO_STAGES`` asks for the gradual one); a fine-tuned
    one runs its ``AUTO_STAGES`` stages, said so.
    """
    held = mode in ("blocked", "matrix-free")
    per = "a gradient pass per block" if mode == "blocked" else "forward passes per product with X"
    if finetuned:
        return AUTO_STAGES, (f"stages='auto' with finetune: {AUTO_STAGES} stages fine-tuned between, each with {per} "
                             f"(X held {mode})" if held else "")
    if compared and held:
        return 1, (f"stages='auto': one stage (one-shot), as X is held {mode} and each stage costs {per}; "
                   f"stages={AUTO_STAGES} asks for the gradual prune, compared with one-shot on held-out loss")
    return (AUTO_STAGES if compared else 1), ""


def idle_hook(levels: Sequence[float], p: int) -> str:
    """A warning where a fine-tuning hook, run after every stage but the last that prunes, would never
    run: no stage before the last prunes (T = 1, or stages at sparsities that keep all p weights, such
    as the cubic schedule's first, s_1 = 0); "" otherwise."""
    from .constraints import kept_count

    if any(kept_count(s, p) < p for s in levels[:-1]):
        return ""
    why = ("one stage" if len(levels) == 1 else
           f"the stages before the last ({', '.join(f'{s:g}' for s in levels[:-1])}) keep all p = {p} weights and are "
           f"skipped")
    return (f"finetune: the hook is never called: it runs between pruning stages, and {why}; pass stages=3 or more "
            f"(the cubic schedule's first stage is sparsity 0) or a schedule such as stages=(0.5, {levels[-1]:g})")
