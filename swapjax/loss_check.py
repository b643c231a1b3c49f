"""The check of a user's ``loss_fn(params, example)``, on one abstract example, before any gradient.

``jax.eval_shape`` traces ``loss_fn`` once on the shapes of one example (no FLOPs): it must return a
floating-point scalar. An error raised inside it is re-raised with the one-example hint, and
BatchNorm in training mode, whose statistics would be those of a single example, is refused: a linen
model applied with a mutable ``batch_stats`` collection, an NNX model that changes a Variable.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

ONE_EXAMPLE = ("loss_fn(params, example) gets ONE example, without the batch axis: a model that needs "
               "one (convolutions, attention, BatchNorm) is applied as model.apply(variables, example['x'][None])[0]")


def one_example(batch) -> Any:
    """The shapes and dtypes of one example of ``batch`` (its leading axis removed)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), batch)


def check_loss_fn(loss_fn: Callable, params, batch, name: str = "loss_fn") -> None:
    """ValueError unless ``loss_fn(params, one example of batch)`` is a floating-point scalar.

    One trace, no computation. Also a ValueError if ``loss_fn`` raises on one example (with
    the hint for a loss written for a batch), applies a linen model with ``batch_stats`` mutable or
    changes an NNX Variable.
    ``batch`` is checked non-empty and not ragged by the caller (:func:`swapjax.gradients.batch_size`).
    """
    if not callable(loss_fn):
        raise ValueError(f"{name}: expected a function loss_fn(params, example) -> scalar, got {loss_fn!r}")
    example = one_example(batch)
    training = []

    def spot_mutable_statistics(next_fun, args, kwargs, context):
        out, module = next_fun(*args, **kwargs), context.module
        if module.scope is not None and module.is_mutable_collection("batch_stats") and \
                module.variables.get("batch_stats"):
            training.append(module)
        return out

    try:
        with nn.intercept_methods(spot_mutable_statistics):
            out = jax.eval_shape(loss_fn, params, example)
    except flax.errors.TraceContextError as err:  # NNX: a Variable changed inside loss_fn
        raise ValueError(
            f"{name}: changes an NNX Variable ({err}); in a loss this is BatchNorm in training mode, which would "
            "normalise each example by its own statistics. Call model.eval() before nnx.split"
        ) from err
    except Exception as err:
        shapes = jax.tree_util.tree_map(lambda s: s.shape, example)
        raise ValueError(f"{name} raised {type(err).__name__} on one example (shapes {shapes}): {err}\n"
                         f"Note: {ONE_EXAMPLE}") from err
    if training:
        where = next((m for m in training if isinstance(m, nn.BatchNorm)), training[0])
        raise ValueError(
            f"{name}: applies a Flax model with the 'batch_stats' collection mutable (in {type(where).__name__}): "
            "BatchNorm in training mode would normalise each example by its own statistics, and the "
            "updated statistics are discarded. Apply the model in inference mode with its statistics: "
            "model.apply({'params': params, 'batch_stats': stats}, example['x'][None], train=False)[0]"
        )
    if not isinstance(out, jax.ShapeDtypeStruct):
        kind = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list, dict)) else "")
        raise ValueError(
            f"{name}: returned {kind} ({jax.tree_util.tree_map(lambda s: s.shape, out)}); expected the loss "
            "of one example as a float scalar. A loss with auxiliary outputs, or the (output, updates) "
            "pair of model.apply(..., mutable=...), must return the scalar loss alone"
        )
    if out.shape != ():
        fix = "; index it (loss[0]) or sum it" if out.size == 1 else f"; {ONE_EXAMPLE}"
        raise ValueError(f"{name}: returned an array of shape {out.shape}; expected the loss of ONE example "
                         f"as a scalar (shape ()){fix}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{name}: returned a scalar of dtype {out.dtype}; expected a floating-point loss "
                         "(it is differentiated with respect to the weights)")
