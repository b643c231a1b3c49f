"""Time and peak memory of a whole GPT pruned layer by layer, against the floor (one pass and the Grams).

    .venv/bin/python experiments/bench/bench_gpt_layerwise.py [--d-model 128] [--layers 4] [--heads 4] \
        [--n 16] [--seq-len 64] [--chunk-size 128] [--dtype float32|bfloat16] [--sparsity 0.5] \
        [--methods sparsegpt sparsegpt-dense default]      # → experiments/results/gpt-layerwise.json

    # (i) ≥ 100M weights at a small N on the CPU: d=768, 15 blocks (12 heads), vocabulary 256, T=128:
    #     15·12·768² + 768·256 = 106,364,928 weights in the 91 layers (106,811,392 in all)
    .venv/bin/python experiments/bench/bench_gpt_layerwise.py --d-model 768 --layers 15 --heads 12 --n 8 --seq-len 128
    # (ii) calibration rows N·T ≥ 64·d: d=256, 4 blocks, N=64 windows of T=256 (16,384 = 64·256 rows)
    .venv/bin/python experiments/bench/bench_gpt_layerwise.py --d-model 256 --layers 4 --heads 4 --n 64 --seq-len 256

:class:`swapjax.models.GPT` (byte-level, vocabulary 256, max_len = T) at random initialisation and N
random windows of T+1 tokens: the figures are the cost of the computation, not an accuracy. Timed in
one process, each once with compilation (first) and once again (warm):

- the floor (a), written here rather than taken from the library: the model's own forward pass,
  jit-compiled per chunk of ``--chunk-size`` windows (the prune's chunks), and H += AᵀA (float32) for
  every distinct layer input A (each Dense/DenseGeneral input, caught by
  ``flax.linen.intercept_methods``; q, k and v read one: 4 per block and the head's);
- ``layer_grams`` (the library's pass and Grams; checked equal to the floor's) and one compiled
  unchunked forward pass;
- ``prune_layerwise`` with SparseGPT sequential (b), SparseGPT from the dense network (c) and the
  default method sequential (d); all layers, the head included, at ``--sparsity`` each.

Ratios of warm seconds: b/c, d/b, b/floor, d/floor, layer_grams/floor. Peak memory: the process's
maximum resident set (``resource.getrusage``) after each step (it never decreases). FLOPs (multiply
and add = 2): the forward pass 2·N·T·(weights in layers) + 4·N·T²·d·L (the attention's two products),
and the Grams 2·N·T·Σ d_in² over distinct inputs (q, k and v share one). (i) is ≈ 225 + 345 GFLOP of
floor, (ii) ≈ 120 + 165 GFLOP.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax.gradients import chunk_starts  # noqa: E402
from swapjax.models import GPT, next_token_loss  # noqa: E402

METHODS = {"sparsegpt": ("SparseGPT sequential", lambda: swapjax.SparseGPT(), True),
           "sparsegpt-dense": ("SparseGPT from the dense network", lambda: swapjax.SparseGPT(), False),
           "default": ("default sequential", lambda: None, True)}


def _peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)  # Linux: KiB


def _floor(model, chunk_size: int):
    """floor(params, tokens (N, T+1)) -> (Grams, Σ logits): the forward pass of tokens[:, :-1] chunk by chunk
    (the prune's chunks: :func:`swapjax.gradients.chunk_starts`; rows of an overlapping last chunk counted
    once) with H += AᵀA in float32 for each distinct input A of a Dense/DenseGeneral, in the order read."""

    def run(params, tokens, skip):
        inputs = []  # (A as the layer reads it, d_in)

        def grab(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)) \
                    and not any(args[0] is x for x, _ in inputs):
                axes = (-1,) if isinstance(m, nn.Dense) else np.atleast_1d(m.axis)
                inputs.append((args[0], int(np.prod([args[0].shape[a] for a in axes]))))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            logits = model.apply({"params": params}, tokens[:, :-1])
        keep = jnp.arange(tokens.shape[0]) >= skip  # the rows of an earlier chunk are not counted twice
        rows = [jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0).astype(jnp.float32).reshape(-1, d)
                for x, d in inputs]
        return rows, jnp.sum(logits.astype(jnp.float32))  # the head's product kept alive

    @jax.jit
    def step(params, tokens, skip, grams):
        rows, total = run(params, tokens, skip)
        return tuple(H + A.T @ A for H, A in zip(grams, rows)), total

    widths = []  # the inputs' widths d_in, traced in the first call

    def floor(params, tokens):
        b, starts = chunk_starts(tokens.shape[0], chunk_size)
        widths[:] = widths or [a.shape[1] for a in jax.eval_shape(lambda p, t: run(p, t, 0)[0], params, tokens[:b])]
        grams, end, total = tuple(jnp.zeros((d, d), jnp.float32) for d in widths), 0, 0.0
        for start in starts:
            grams, t = step(params, jax.lax.dynamic_slice_in_dim(tokens, start, b), end - start, grams)
            total, end = total + t, start + b
        return grams, total

    return floor


def _twice(fn) -> dict:
    """{first, warm}: wall seconds of two calls of ``fn`` (the first compiles), and the peak RSS after."""
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(round(time.perf_counter() - start, 3))
    return {"first_s": seconds[0], "warm_s": seconds[1], "peak_rss_gb": _peak_gb()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "results/gpt-layerwise.json")
    args = ap.parse_args(argv)
    d, n_layers, T, N = args.d_model, args.layers, args.seq_len, args.n
    dtype = jnp.dtype(args.dtype)
    model = GPT(vocab=256, d_model=d, n_layers=n_layers, n_heads=args.heads, max_len=T, dtype=dtype, param_dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, 256, size=(N, T + 1)).astype(np.int32)
    batch = {"tokens": tokens}
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :-1])["params"]
    loss_fn = next_token_loss(model)
    layers = swapjax.find_layers(loss_fn, params, batch).layers
    in_layers = sum(layer.d_in * layer.d_out for layer in layers)
    rows = N * T
    row = dict(model="GPT", d_model=d, layers=n_layers, heads=args.heads, vocab=256, n=N, seq_len=T, rows=rows,
               dtype=args.dtype, chunk_size=args.chunk_size, sparsity=args.sparsity, pruned_layers=len(layers),
               weights=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))), weights_in_layers=in_layers,
               forward_gflop=round((2 * rows * in_layers + 4 * N * T * T * d * n_layers) / 1e9, 2),
               gram_gflop=round(2 * rows * sum(layer.d_in ** 2 for layer in layers
                                               if not layer.path.endswith(("key/kernel", "value/kernel"))) / 1e9, 2))
    print(f"GPT d={d}, {n_layers} blocks, {row['weights']:,} weights ({in_layers:,} in {len(layers)} layers), "
          f"N={N} × T={T} = {rows:,} rows, {args.dtype}", flush=True)

    forward = jax.jit(lambda p, t: model.apply({"params": p}, t[:, :-1]))
    floor_fn, on_device = _floor(model, args.chunk_size), jnp.asarray(tokens)
    timings = {"floor (forward + Grams)": _twice(lambda: floor_fn(params, on_device)),
               "forward (unchunked)": _twice(lambda: forward(params, tokens)),
               "layer_grams": _twice(lambda: swapjax.layer_grams(loss_fn, params, batch, chunk_size=args.chunk_size))}
    # the floor computes the Grams the library does: its distinct Hs in the order of the layers
    ours, theirs = floor_fn(params, on_device)[0], []
    for H, _ in swapjax.layer_grams(loss_fn, params, batch, chunk_size=args.chunk_size).values():
        theirs += [] if any(H is G for G in theirs) else [H]
    if len(ours) != len(theirs) or any(G.shape != H.shape for G, H in zip(ours, theirs)):
        raise RuntimeError(f"the floor's Grams {[G.shape for G in ours]} are not layer_grams' {[H.shape for H in theirs]}")
    row["floor_gram_rel_diff"] = float(max(jnp.abs(G - H).max() / jnp.abs(H).max() for G, H in zip(ours, theirs)))
    for key in args.methods:
        label, method, sequential = METHODS[key]
        print(f"{label} ...", flush=True)
        timings[label] = _twice(lambda: swapjax.prune_layerwise(
            loss_fn, params, batch, sparsity=args.sparsity, method=method(), sequential=sequential,
            chunk_size=args.chunk_size, progress=False).params)
    warm = {k: v["warm_s"] for k, v in timings.items()}
    b, c, dd = (warm.get(METHODS[k][0]) for k in ("sparsegpt", "sparsegpt-dense", "default"))
    floor = warm["floor (forward + Grams)"]
    ratio = lambda x, y: None if x is None or y is None else round(x / y, 2)  # noqa: E731
    row.update(timings=timings, ratios={"b/c": ratio(b, c), "d/b": ratio(dd, b), "b/floor": ratio(b, floor),
                                        "d/floor": ratio(dd, floor), "layer_grams/floor": ratio(warm["layer_grams"], floor)},
               default_method=repr(swapjax.Swaps()), load=round(os.getloadavg()[0], 2),
               machine=platform.processor() or platform.machine(), jax=jax.__version__, devices=str(jax.devices()))

    print("\n| step | first call (s) | warm (s) | warm / floor | peak RSS (GB) |\n|---|---:|---:|---:|---:|")
    for k, v in timings.items():
        print(f"| {k} | {v['first_s']:.2f} | {v['warm_s']:.2f} | {v['warm_s'] / floor:.2f} | {v['peak_rss_gb']:.2f} |")
    print("\n" + ", ".join(f"{k} = {v}" for k, v in row["ratios"].items() if v is not None))
    print(f"forward {row['forward_gflop']} GFLOP, Grams {row['gram_gflop']} GFLOP; the floor's Grams against "
          f"layer_grams': max relative difference {row['floor_gram_rel_diff']:.1e}")
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    R.write_json(args.out, previous + [row])  # one row per run, appended atomically
    return row


if __name__ == "__main__":
    main()
