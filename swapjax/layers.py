"""The layers of a model, found by use (work in progress: today the name rule of :mod:`swapjax.pytree`)."""
from __future__ import annotations

from typing import Optional

from . import pytree
from .pytree import Layout, PyTree, Select


def prunable(loss_fn, params: PyTree, batch: PyTree, select: Optional[Select] = None) -> Layout:
    """The layout of the prunable weights of ``params``: the layers of ``loss_fn`` narrowed by ``select``."""
    return pytree.layout(params, select)
