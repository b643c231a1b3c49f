"""Layer-wise against network-wide pruning on a preset's network, one-shot: accuracy and time.

    .venv/bin/python experiments/bench/bench_layerwise.py [preset] [seeds...] [--methods NAME ...] [--tag TAG]
    # → experiments/results/layerwise-<preset>[-TAG].json

Cells: per-layer uniform 0.5, 0.7, 0.9 and 2:4. Layer-wise (``swapjax.prune_layerwise``, sequential,
the preset's N Fisher examples as the calibration batch): Wanda, SparseGPT, the exact refit on each
one's mask (``layer_methods.Refit``), LR on each layer's regression from SparseGPT's support
(``layer_methods.Regression``, the default before ``Swaps``) and ``layer_methods.Swaps`` (the default). Network-wide (``swapjax.prune``, ``stages=1``, the next val_examples for
the selection): magnitude under the same per-layer budget, and LR under it and under the global
top-k (the library's default constraint). Test accuracy on the test split; each call's seconds after
a compiling call of the same cell. A rerun adds the seeds and cells not yet in the file (written after
every cell, atomically).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, layer_methods, layerwise  # noqa: E402

CELLS = {"0.5": (swapjax.LayerBudgets(), 0.5), "0.7": (swapjax.LayerBudgets(), 0.7),
         "0.9": (swapjax.LayerBudgets(), 0.9), "2:4": (swapjax.NM(2, 4), None)}
LAYERWISE = {"Wanda": layer_methods.Wanda(), "SparseGPT": layer_methods.SparseGPT(),
             "refit on Wanda": layer_methods.Refit(layer_methods.Wanda()), "refit on SparseGPT": layer_methods.Refit(layer_methods.SparseGPT()),
             "LR layer-wise": layer_methods.Regression(), "Swaps (default)": layer_methods.Swaps()}
NETWORK = {"MP": swapjax.Magnitude(), "LR": swapjax.LR(), "LR global": swapjax.LR()}


def main(name: str = "mlpnet-fashion-mnist", seeds=(0, 1), runs: Path = Path("runs"), methods=None, tag: str = "",
         cells=None):
    preset = R.PRESETS[name]
    train = data.load(preset.dataset, "train", flatten=preset.flatten)
    test = data.load(preset.dataset, "test", flatten=preset.flatten)
    batch, val = R.calibration(preset, train)
    out = Path(__file__).parent.parent / f"results/layerwise-{name}{'-' + tag if tag else ''}.json"
    methods = methods or [*LAYERWISE, *NETWORK]
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["seed"], r["cell"], r["method"]) for r in rows}
    for seed in seeds:
        model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
        loss_fn = R.per_example_loss(model, variables)
        dense = swapjax.evaluate(model, variables, test.x, test.y)[0]
        for cell, (constraint, sparsity) in CELLS.items():
            if cells and cell not in cells:
                continue
            for method_name in methods:
                if (seed, cell, method_name) in done or (method_name == "LR global" and sparsity is None):
                    continue

                if method_name in LAYERWISE:
                    prune = lambda: swapjax.prune_layerwise(  # noqa: E731
                        loss_fn, variables["params"], batch, sparsity=sparsity, method=LAYERWISE[method_name],
                        constraint=constraint, progress=False)
                else:
                    prune = lambda: swapjax.prune(  # noqa: E731
                        loss_fn, variables["params"], batch, sparsity=sparsity, method=NETWORK[method_name], stages=1,
                        val_batch=val, progress=False, constraint=None if method_name == "LR global" else constraint)
                run = R.timed_prune(prune, model, variables, test)
                rows.append(dict(seed=seed, cell=cell, method=method_name, dense=dense, **run))
                print(f"seed {seed} {cell} {method_name}: {100 * run['accuracy']:.1f} % (sparsity {run['sparsity']:.3f}, "
                      f"{run['seconds']:.2f} s)", flush=True)
                _write(out, name, rows)
    print(table(rows, methods))


def table(rows: list, methods=None) -> str:
    """Test accuracy % (mean ± std over the seeds, both values for 2) and median seconds per cell and method."""
    seeds = sorted({r["seed"] for r in rows})
    methods = methods or [*LAYERWISE, *NETWORK]
    lines = ["| method | " + " | ".join(CELLS) + " | seconds (median) |", "|---" * (2 + len(CELLS)) + "|"]
    for m in methods:
        cells = []
        for cell in CELLS:
            acc = [100 * r["accuracy"] for r in rows if r["cell"] == cell and r["method"] == m]
            cells.append("–" if not acc else " / ".join(f"{a:.1f}" for a in acc) if len(seeds) <= 2
                         else f"{np.mean(acc):.1f} ± {np.std(acc):.1f}")
        secs = [r["seconds"] for r in rows if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.median(secs):.2f} |" if secs else "")
    return "\n".join(lines)


def _write(out: Path, name: str, rows: list) -> None:
    R.write_json(out, {"preset": name, "seeds": sorted({r["seed"] for r in rows}), "rows": rows})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="mlpnet-fashion-mnist")
    ap.add_argument("seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--methods", nargs="+", choices=[*LAYERWISE, *NETWORK])
    ap.add_argument("--cells", nargs="+", choices=list(CELLS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    main(args.preset, tuple(args.seeds), methods=args.methods, tag=args.tag, cells=args.cells)
