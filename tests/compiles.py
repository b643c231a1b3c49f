"""Counting XLA compilations: ``with counted() as seen: ...`` leaves in ``seen`` (a Counter) the programs
compiled inside the block, by name ("jit(_swap)"), from JAX's backend-compile events. A program found in
JAX's caches (in memory, or a persistent compilation cache) is not compiled and not counted."""
from __future__ import annotations

import collections
import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counted():
    seen = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            seen[kwargs.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
