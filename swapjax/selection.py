"""Choosing a method's values on held-out loss.

The pieces every selection shares: :func:`walk` along a sorted path,
:class:`Selection` (the candidates tried, their scores, the best so far), and
:class:`Selected`: any method with one of its fields chosen, each value a full solve.
``LR(lam="auto")`` and ``SWAP(epsilon="auto")`` walk their λ/ε path with the same pieces
(:mod:`swapjax.methods`), their later candidates ridge fits on the first one's support.

The score is the driver's: ``swapjax.prune`` passes the mean ``loss_fn`` of the
pruned network on examples it does not fit (lower is better).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import numpy as np

from . import checks
from .contract import Info, Method, Score


def walk(path, start, last_score):
    """The values of a sorted ``path`` to try, walking downhill from the one nearest ``start`` (in log).

    Yields the first value, then its lower neighbours while each scores below
    the one before (``last_score()`` reads the score of the value just
    yielded); if the first step down did not improve, the upper neighbours
    the same way. On a unimodal score this finds the path's best value in a
    few tries instead of trying every value.
    """
    i = min(range(len(path)), key=lambda j: abs(math.log(path[j] / start)))
    yield path[i]
    for direction in (-1, 1):
        current, j = last_score(), i + direction
        moved = False
        while 0 <= j < len(path):
            yield path[j]
            if not last_score() < current:
                break
            current, j, moved = last_score(), j + direction, True
        if moved:
            return


def score_value(value) -> tuple[float, Optional[np.ndarray]]:
    """(mean held-out loss, per-example losses or None) of a score's value; NaN or inf → (inf, None)."""
    losses = np.asarray(value, np.float64)
    if losses.ndim > 1 or losses.size == 0:
        raise ValueError(f"score: expected a float or a vector of per-example losses, got shape {losses.shape}")
    mean = float(np.mean(losses))
    if not math.isfinite(mean):
        return math.inf, None
    return mean, (losses if losses.ndim == 1 and losses.size > 1 else None)


def standard_error(losses, reference) -> float:
    """The standard error of mean(losses − reference), paired by example (0 without both vectors)."""
    if losses is None or reference is None or losses.shape != reference.shape:
        return 0.0
    diff = losses - reference
    return float(np.std(diff, ddof=1) / math.sqrt(diff.size))


class Selection:
    """The candidates tried, in order, and the best by held-out score.

    ``offer(w, info, candidate, challenger)`` scores w; the candidate (a NamedTuple
    with a ``score`` field) is recorded with it. A ``challenger`` must beat the best
    by more than one standard error of the paired per-example difference (where the
    score gives per-example losses): a lower mean within the held-out noise does not
    displace the best.
    """

    def __init__(self, score: Score):
        checks.callable_or_none("score", score, "a function score(w) -> float")
        self.score, self.tried, self.best, self.chosen = score, [], None, None  # best: (w, info, losses)

    def offer(self, w, info, candidate, challenger: bool = False) -> None:
        value, losses = score_value(self.score(w))
        self.tried.append(candidate._replace(score=value))
        margin = standard_error(losses, self.best[2]) if challenger and self.best is not None else 0.0
        if self.best is None or value < self.winner.score - margin:
            self.best, self.chosen = (w, info, losses), len(self.tried) - 1

    @property
    def winner(self):
        """The best candidate so far."""
        return self.tried[self.chosen]

    def last_score(self) -> float:
        return self.tried[-1].score


class Choice(NamedTuple):
    """One value tried by :class:`Selected`: the field, its value, the held-out score and the objective f."""

    field: str
    value: float
    score: float
    objective: float

    def describe(self) -> str:
        return f"{self.field}={self.value:g}"


class SelectedInfo(NamedTuple):
    """The info of the chosen solve (``inner``) with every value tried (``candidates``, the returned
    one at ``chosen``)."""

    support: jax.Array
    objective: jax.Array
    objective_trace: jax.Array
    duals: tuple
    inner: Info
    candidates: tuple
    chosen: int

    @property
    def held_out_loss(self) -> float:
        return self.candidates[self.chosen].score

    @property
    def gradient_seconds(self) -> float:
        return self.inner.gradient_seconds

    def describe(self) -> str:
        inner = self.inner.describe()
        return (inner + ", " if inner else "") + self.candidates[self.chosen].describe()

    def warnings(self, n: int) -> tuple[str, ...]:
        return self.inner.warnings(n)


@dataclass(frozen=True)
class Selected(Method):
    """``method`` with its field ``field`` chosen on held-out loss among the values of ``path``.

    With a score (``swapjax.prune`` gives one, from held-out examples), the
    values are walked downhill from ``start`` (default: the method's own value),
    each a full ``solve``, and the lowest held-out loss wins (:func:`walk`);
    without one, ``solve`` is the method's at ``start``. The method's own
    "auto" values take their defaults inside (it is given no score).

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> X, w_bar = rng.normal(size=(20, 12)).astype("float32"), rng.normal(size=12).astype("float32")
        >>> held_out = rng.normal(size=(30, 12)).astype("float32")
        >>> score = lambda w: float(np.mean((held_out @ (np.asarray(w) - w_bar)) ** 2))
        >>> method = swapjax.Selected(swapjax.WoodFisher(), "damp", (1e-4, 1e-2, 1.0, 100.0))
        >>> w, info = method.solve(X, w_bar, 4, score=score)
        >>> best = min(info.candidates, key=lambda c: c.score)
        >>> info.candidates[info.chosen] == best
        True
        >>> bool(jnp.all(w == swapjax.WoodFisher(damp=best.value).solve(X, w_bar, 4)[0]))
        True
    """

    method: Method
    field: str
    path: tuple
    start: Optional[float] = None

    def __post_init__(self):
        checks.method(self.method, "method (the method whose field is selected)")
        names = [f.name for f in dataclasses.fields(self.method)] if dataclasses.is_dataclass(self.method) else []
        if self.field not in names:
            raise ValueError(f"field: {type(self.method).__name__} has no field {self.field!r} to select "
                             f"(its fields: {', '.join(names) or 'none: it is not a dataclass'})")
        checks.path("path", self.path)
        start = getattr(self.method, self.field) if self.start is None else self.start
        checks.real(f"start (the first value of {self.field}; default {type(self.method).__name__}'s own)", start, 0.0,
                    lo_open=True)

    @property
    def selects(self) -> bool:
        return True

    @property
    def matrix_free(self) -> bool:
        return self.method.matrix_free

    @property
    def needs_segments(self) -> bool:
        return self.method.needs_segments

    def without_search(self) -> "Selected":
        return dataclasses.replace(self, method=self.method.without_search())

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score: Optional[Score] = None, segments=None):
        start = getattr(self.method, self.field) if self.start is None else self.start
        declared = {"segments": segments} if self.method.needs_segments else {}

        def at(value):
            return dataclasses.replace(self.method, **{self.field: value}).solve(X, w_bar, k, w_start, duals, **declared)

        if score is None:
            return at(start)
        selection = Selection(score)
        for value in walk(sorted(self.path), start, selection.last_score):
            w, info = at(value)
            selection.offer(w, info, Choice(self.field, float(value), math.nan, float(info.objective)))
        w, info, _ = selection.best
        return w, SelectedInfo(info.support, info.objective, info.objective_trace, info.duals, info,
                               tuple(selection.tried), selection.chosen)
