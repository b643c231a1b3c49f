"""Losses for "raised before any computation" tests: the drivers trace ``loss_fn`` to find the layers
(no computation), so a test loss may be traced but must never run."""
import jax


def traced_only(loss):
    """``loss`` as the drivers trace it, failing if it is ever evaluated (a gradient, a forward pass)."""
    def run_forbidden(params, example):
        value = loss(params, example)
        jax.debug.callback(_ran)
        return value

    return run_forbidden


def _ran():
    raise AssertionError("loss_fn was run: the argument error must be raised before any computation")
