"""First against warm calls of ``swapjax.prune_layerwise`` on a small GPT: seconds and XLA compilations.

    .venv/bin/python experiments/bench/bench_layerwise_first_call.py [method] [d_model] [blocks]

One process per call of this script (the first call must find nothing compiled): the TinyGPT of
docs/models/transformers.md with ``blocks`` pre-norm blocks of width ``d_model`` (2 heads, an MLP of
4·d_model, vocabulary 17), 64 sequences of 16 tokens as the calibration batch, per-layer uniform 0.5,
sequential, the head left dense. ``method``: wanda, sparsegpt or regression (the default). Prints one
JSON line: the first call's seconds, the best of three warm calls, and the first call's XLA
compilations (count and seconds, from JAX's monitoring events) with the jitted functions compiled
most often. The user's XLA options (the test suite's faster-compiling flags are not set here).
"""
from __future__ import annotations

import collections
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import swapjax
from swapjax import layer_methods, layerwise

compiles = collections.Counter()
seconds = collections.Counter()


def _listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles[kwargs.get("fun_name")] += 1
        seconds["compile"] += duration


class Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, h):
        causal = nn.make_causal_mask(jnp.ones(h.shape[:2]))
        h = h + nn.SelfAttention(num_heads=2, name="attn")(nn.LayerNorm()(h), mask=causal)
        return h + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(nn.LayerNorm()(h))))


class TinyGPT(nn.Module):
    vocab: int = 17
    d: int = 32
    blocks: int = 4

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.d, name="wte")(tokens)
        h = h + self.param("wpe", nn.initializers.normal(0.02), (1, tokens.shape[-1], self.d))
        for i in range(self.blocks):
            h = Block(self.d, name=f"block_{i}")(h)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(h))


def main(method: str = "regression", d: int = 128, blocks: int = 4) -> dict:
    spec = {"wanda": layer_methods.Wanda(), "sparsegpt": layer_methods.SparseGPT(), "regression": None}[method]
    gpt = TinyGPT(d=d, blocks=blocks)
    tokens = np.random.default_rng(0).integers(0, 17, size=(64, 17)).astype("int32")
    params = gpt.init(jax.random.key(0), tokens[:1, :-1])["params"]

    def loss(params, example):
        logits = gpt.apply({"params": params}, example["t"][None, :-1])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["t"][1:]).mean()

    def select(path, leaf):
        return path.endswith("kernel") and not path.startswith("head/")

    def run():
        result = swapjax.prune_layerwise(loss, params, {"t": tokens}, sparsity=0.5, method=spec, progress=False,
                                         select=select)
        jax.block_until_ready(result.params)
        return result

    jax.monitoring.register_event_duration_secs_listener(_listen)
    start = time.perf_counter()
    result = run()
    first = time.perf_counter() - start
    first_compiles = dict(compiles)
    warm = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        warm.append(time.perf_counter() - start)
    return {"method": method, "d_model": d, "blocks": blocks, "layers": len(result.layers),
            "weights": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
            "first_s": round(first, 2), "warm_s": round(min(warm), 2),
            "first_compilations": sum(first_compiles.values()), "first_compile_s": round(seconds["compile"], 2),
            "most_compiled": collections.Counter(first_compiles).most_common(5), "jax": jax.__version__}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0] if args else "regression", *(int(a) for a in args[1:3]))))
