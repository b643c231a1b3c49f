"""Every method under every constraint on a preset's network: N:M (2:4, 4:8, 1:4) and per-layer budgets
(uniform, ERK) against the global top-k at 0.9, one-shot or gradual.

    .venv/bin/python experiments/bench/bench_constraints.py [preset] [seeds...]
    # → experiments/results/constraints-<preset>.json
    GRADUAL=1 .venv/bin/python experiments/bench/bench_constraints.py [preset] [seeds...]
    # → ...-<preset>-gradual.json

A rerun adds the seeds and cells not yet in the file (written after every cell, atomically); the
table of docs/constraints.md is printed at the end (mean ± std over the seeds; both values for 2).

The preset's dense model of each seed (experiments/reproduce.py, trained or restored under
runs/<preset>/), N = its Fisher examples for X and the next val_examples for the selection of the
methods that select (LR, SWAP); ``stages=1``, or with GRADUAL=1 ``stages=8`` (the cubic schedule; LR and
SWAP then also compare with one-shot on held-out loss, as ``stages="auto"`` does). Test accuracy on the test
split, the constraint's label, the sparsity reached and each call's seconds (one-shot: after a compiling
call of the same cell; gradual: compilation included, one call per cell).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data  # noqa: E402

CONSTRAINTS = {"global 0.9": (swapjax.TopK(), 0.9), "uniform 0.9": (swapjax.LayerBudgets(), 0.9),
               "ERK 0.9": (swapjax.LayerBudgets("erk"), 0.9), "2:4": (swapjax.NM(2, 4), None),
               "4:8": (swapjax.NM(4, 8), None), "1:4": (swapjax.NM(1, 4), None), "global 0.5": (swapjax.TopK(), 0.5)}
METHODS = {"MP": swapjax.Magnitude(), "WF": swapjax.WoodFisher(), "LR": swapjax.LR(), "SWAP": swapjax.SWAP()}
GRADUAL = os.environ.get("GRADUAL") == "1"
STAGES = 8 if GRADUAL else 1


def main(name: str = "mlpnet-fashion-mnist", seeds=(0, 1), runs: Path = Path("runs")):
    preset = R.PRESETS[name]
    train = data.load(preset.dataset, "train", flatten=preset.flatten)
    test = data.load(preset.dataset, "test", flatten=preset.flatten)
    batch, val = R.calibration(preset, train)
    out = Path(__file__).parent.parent / f"results/constraints-{name}{'-gradual' if GRADUAL else ''}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []  # a rerun adds seeds, skips cells done
    done = {(r["seed"], r["constraint"], r["method"]) for r in rows}
    for seed in seeds:
        model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
        loss_fn = R.per_example_loss(model, variables)
        dense = swapjax.evaluate(model, variables, test.x, test.y)[0]
        for cell, (constraint, sparsity) in CONSTRAINTS.items():
            for method_name, method in METHODS.items():
                if (seed, cell, method_name) in done:
                    continue

                run = R.timed_prune(lambda: swapjax.prune(loss_fn, variables["params"], batch, sparsity=sparsity,
                                                          method=method, constraint=constraint, stages=STAGES,
                                                          val_batch=val, progress=False),
                                    model, variables, test, warmup=not GRADUAL)
                rows.append(dict(seed=seed, constraint=cell, method=method_name, dense=dense, **run))
                print(f"seed {seed} {cell} {method_name}: {100 * run['accuracy']:.1f} % (sparsity {run['sparsity']:.3f}, "
                      f"{run['seconds']:.1f} s)", flush=True)
                _write(out, name, rows)
    print(table(rows))


def table(rows: list) -> str:
    """Test accuracy % per constraint and method: mean ± std over the seeds (the seeds' values when 2)."""
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| constraint | sparsity | " + " | ".join(METHODS) + " |", "|---" * (2 + len(METHODS)) + "|"]
    for cell in CONSTRAINTS:
        cells = [[100 * r["accuracy"] for r in rows if r["constraint"] == cell and r["method"] == m] for m in METHODS]
        sparsity = np.mean([r["sparsity"] for r in rows if r["constraint"] == cell])
        show = (lambda a: " / ".join(f"{x:.1f}" for x in a)) if len(seeds) <= 2 else \
            (lambda a: f"{np.mean(a):.1f} ± {np.std(a):.1f}")
        lines.append(f"| {cell} | {sparsity:.3f} | " + " | ".join(show(a) for a in cells) + " |")
    return "\n".join(lines)


def _write(out: Path, name: str, rows: list) -> None:
    """The rows so far, atomically (an interrupted run resumes from them)."""
    R.write_json(out, {"preset": name, "seeds": sorted({r["seed"] for r in rows}), "stages": STAGES, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlpnet-fashion-mnist",
         tuple(int(s) for s in sys.argv[2:]) or (0, 1))
