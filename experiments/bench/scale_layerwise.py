"""Time and peak memory of a layer-wise prune of ResNet50 (25.5M weights) on synthetic inputs.

    .venv/bin/python experiments/bench/scale_layerwise.py [--n 128] [--image-size 224] [--sequential] \
        [--method sparsegpt|lr] [--chunk-size 8]   # → experiments/results/scale-layerwise.json

Random weights (``ResNet50().init``, BatchNorm in inference mode) and random N(0, 1) images with
random labels: the figures are the cost of the computation, not an accuracy. Peak memory is the
process's maximum resident set (``resource.getrusage``), which includes the model, the batch and
the compilations; seconds are wall time of the whole call, compilation included (one call).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import layer_methods, layerwise  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--method", choices=("sparsegpt", "lr"), default="sparsegpt")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "results/scale-layerwise.json")
    args = ap.parse_args()
    model = swapjax.models.ResNet50()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.image_size, args.image_size, 3)).astype(np.float32)
    y = rng.integers(0, 1000, args.n).astype(np.int32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)))
    loss_fn = R.per_example_loss(model, variables)
    method = layer_methods.SparseGPT() if args.method == "sparsegpt" else layer_methods.Regression()
    t0 = time.perf_counter()
    result = swapjax.prune_layerwise(loss_fn, variables["params"], {"x": x, "y": y}, sparsity=0.5, method=method,
                                     sequential=args.sequential, chunk_size=args.chunk_size)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = dict(model="ResNet50", n=args.n, image_size=args.image_size, chunk_size=args.chunk_size,
               sequential=args.sequential, method=args.method, layers=len(result.layers),
               kept=result.summary()["total"]["kept"], total=result.summary()["total"]["total"],
               seconds=round(seconds, 1), peak_rss_gb=round(peak / 2**30, 2), machine=platform.processor() or
               platform.machine(), jax=jax.__version__, devices=str(jax.devices()))
    print(json.dumps(row, indent=1))
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    R.write_json(args.out, rows + [row])  # one row per run, appended


if __name__ == "__main__":
    main()
