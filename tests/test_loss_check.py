"""The loss is checked on one example before any gradient: each mistake is a ValueError naming
``loss_fn``, raised after a single trace (the losses below count their calls)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import swapjax

PARAMS = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
BATCH = {"x": jnp.arange(12.0).reshape(4, 3) / 12, "y": jnp.ones((4, 2))}


def _sq(p, ex):
    return jnp.sum((ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2)


MISTAKES = {  # loss, what the error must say
    "shape (1,)": (lambda p, ex: _sq(p, ex)[None], r"loss_fn: returned an array of shape \(1,\).*loss\[0\]"),
    "(loss, updates)": (lambda p, ex: (_sq(p, ex), {"batch_stats": p["b"]}), r"loss_fn: returned a tuple of 2"),
    "dict": (lambda p, ex: {"loss": _sq(p, ex)}, r"loss_fn: returned a dict of 1"),
    "integer": (lambda p, ex: jnp.sum(ex["x"] > 0), r"loss_fn: returned a scalar of dtype int32"),
    "per-example vector": (lambda p, ex: (ex["x"] @ p["w"] - ex["y"]) ** 2, r"shape \(2,\).*ONE example"),
    "written for a batch": (lambda p, ex: jnp.sum(ex["x"].reshape(4, 3) @ p["w"]),
                            r"loss_fn raised TypeError on one example \(shapes \{'x': \(3,\), 'y': \(2,\)\}\): "
                            r"cannot reshape(.|\n)*example\['x'\]\[None\]"),
}


def _counting(loss):
    calls = []

    def counted(p, ex):
        calls.append(1)
        return loss(p, ex)

    return counted, calls


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_loss_mistake_is_caught_after_one_trace(name):
    loss, message = MISTAKES[name]
    entry_points = {
        "prune": lambda f: swapjax.prune(f, PARAMS, BATCH, sparsity=0.5, progress=False),
        "per_sample_grads": lambda f: swapjax.per_sample_grads(f, PARAMS, BATCH, progress=False),
        "linearized_gradients": lambda f: swapjax.linearized_gradients(f, PARAMS, BATCH, progress=False),
        "compare_sparsities": lambda f: swapjax.compare_sparsities(f, PARAMS, BATCH, [0.5], {"MP": swapjax.Magnitude()},
                                                                   progress=False),
    }
    for entry, call in entry_points.items():
        counted, calls = _counting(loss)
        with pytest.raises(ValueError, match=message):
            call(counted)
        assert len(calls) == 1, f"{entry}: loss_fn ran {len(calls)} times before the error"


def test_a_right_loss_is_traced_once_more_than_the_gradients_need():
    """The check is one abstract trace; prune does not repeat it per stage."""
    counted, calls = _counting(_sq)
    swapjax.prune(counted, PARAMS, BATCH, sparsity=0.5, method=swapjax.Magnitude(), stages=3, progress=False)
    checked = len(calls)
    counted, calls = _counting(_sq)
    swapjax.prune(counted, PARAMS, BATCH, sparsity=0.5, method=swapjax.Magnitude(), stages=4, progress=False)
    assert len(calls) - checked <= 2  # one more stage: its gradient traces, not another check


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(2)(nn.relu(x))


def test_linen_batchnorm_in_training_mode_is_refused_and_inference_mode_prunes():
    model = _BatchNormNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))

    def training(params, ex):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, ex["x"][None],
                             train=True, mutable=["batch_stats"])
        return jnp.sum((out[0] - ex["y"]) ** 2)

    counted, calls = _counting(training)
    with pytest.raises(ValueError, match=r"'batch_stats' collection mutable \(in BatchNorm\).*train=False"):
        swapjax.prune(counted, variables["params"], BATCH, sparsity=0.5, progress=False)
    assert len(calls) == 1

    def inference(params, ex):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, ex["x"][None])
        return jnp.sum((out[0] - ex["y"]) ** 2)

    result = swapjax.prune(inference, variables["params"], BATCH, sparsity=0.5, method=swapjax.Magnitude(),
                           progress=False)
    assert result.summary()["total"]["kept"] == 10  # of the 20 kernel weights


class _NnxBatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.dense(x))))


def test_nnx_batchnorm_in_training_mode_is_refused_and_eval_mode_is_the_inference_network():
    def split(model):
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        return state, lambda st, ex: jnp.sum((nnx.merge(graphdef, st, rest)(ex["x"][None])[0] - ex["y"]) ** 2)

    model = _NnxBatchNormNet(nnx.Rngs(0))  # NNX modules start in training mode
    state, loss = split(model)
    counted, calls = _counting(loss)
    with pytest.raises(ValueError, match=r"loss_fn: changes an NNX Variable.*model\.eval\(\) before nnx\.split"):
        swapjax.prune(counted, state, BATCH, sparsity=0.5, progress=False)
    assert len(calls) == 1

    model.eval()
    state, loss = split(model)

    def reference(p, ex):  # inference-mode BatchNorm with the initial statistics (mean 0, variance 1)
        h = (ex["x"] @ p["dense"]["kernel"].value + p["dense"]["bias"].value) / jnp.sqrt(1 + 1e-5)
        h = nnx.relu(h * p["norm"]["scale"].value + p["norm"]["bias"].value)
        return jnp.sum((h @ p["head"]["kernel"].value + p["head"]["bias"].value - ex["y"]) ** 2)

    np.testing.assert_allclose(swapjax.per_sample_grads(loss, state, BATCH, progress=False),
                               swapjax.per_sample_grads(reference, state, BATCH, progress=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value, fraction", [(90, "0.9"), (50.0, "0.5"), (99.5, "0.995")])
def test_a_percentage_sparsity_suggests_the_fraction(value, fraction):
    with pytest.raises(ValueError, match=rf"sparsity: must be the fraction .*; for {value:g} % pass {fraction}$"):
        swapjax.prune(_sq, PARAMS, BATCH, sparsity=value, progress=False)
    with pytest.raises(ValueError, match=rf"pass {fraction}$"):
        swapjax.compare_sparsities(_sq, PARAMS, BATCH, [0.5, value], {"MP": swapjax.Magnitude()}, progress=False)


@pytest.mark.parametrize("masks, message", [
    ({"w": jnp.ones((2, 3), bool), "b": None}, r"the mask of w has shape \(2, 3\), its parameter \(3, 2\)"),
    ({"w": jnp.ones((3, 2), bool)}, r"expected the pytree structure of params"),
])
def test_masked_optimizer_checks_the_masks_at_init(masks, message):
    for tx in (swapjax.masked_optimizer(optax.sgd(0.1), masks), swapjax.masked_updates(masks),
               swapjax.keep_pruned_at_zero(masks)):
        with pytest.raises(ValueError, match=message):
            tx.init(PARAMS)
