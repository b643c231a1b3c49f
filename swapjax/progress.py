"""Progress messages: one callback for every driver (``prune``, ``prune_layerwise``, the blocked solve).

``progress=True`` writes each message as a line on stderr prefixed ``"[swapjax] "``, ``False``
is silent, and a callable ``report(message)`` receives each message (a line of text without the
prefix) to log, collect or forward as it likes.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Union

from . import checks

#: What ``progress=`` accepts: True (stderr), False (silent) or a callable taking each message.
Progress = Union[bool, Callable[[str], None]]

PREFIX = "[swapjax] "


def _stderr(message: str, prefix: str = PREFIX) -> None:
    print(prefix + message, file=sys.stderr, flush=True)


def _silent(message: str) -> None:
    return None


def reporter(progress: Progress, name: str = "progress", prefix: str = PREFIX) -> Callable[[str], None]:
    """The callback for ``progress``: True → a line on stderr prefixed ``prefix`` (``"[swapjax] "``), False →
    silent, a callable → itself. ValueError naming ``name`` for anything else (a 0-d bool array is its bool).

    Examples:
        >>> lines = []
        >>> report = reporter(lines.append)
        >>> report("stage 1/1")
        >>> lines
        ['stage 1/1']
        >>> reporter(False)("nothing") is None
        True
        >>> reporter("yes")
        Traceback (most recent call last):
        ValueError: progress: must be True or False, or a callable report(message), got 'yes'
    """
    if callable(progress) and not isinstance(progress, type):
        return progress
    try:
        on = checks.boolean(name, progress)
    except ValueError:
        raise ValueError(f"{name}: must be True or False, or a callable report(message), "
                         f"got {checks._show(progress)}") from None
    if not on:
        return _silent
    return _stderr if prefix == PREFIX else functools.partial(_stderr, prefix=prefix)


def enabled(report: Callable[[str], None]) -> bool:
    """False for the silent reporter (what ``progress=False`` gives), True otherwise: for work done only
    to be reported (timings of candidates, per-chunk lines)."""
    return report is not _silent
