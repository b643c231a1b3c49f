"""The blocked mode against X in memory on a preset's network, one-shot: accuracy, time and their ratio.

    .venv/bin/python experiments/bench/bench_blocked.py [preset] [seeds...]
    # → experiments/results/blocked-<preset>.json

Cells: the global top-k at 0.7 and 2:4. Methods: LR() and SWAP() with their defaults (λ, ε chosen on
the next val_examples), ``stages=1``. Modes: X in memory (the reference), and X in B = 2 and 4 column
blocks (``swapjax.Blocked(width=⌈p/B⌉)``) with the magnitude budget, and B = 4 with the Fisher budget.
Test accuracy of every seed. Time on the first seed only: the median of REPEATS calls after a
compiling one, and its ratio to the in-memory call of the same cell and method, timed in the same
run. A rerun adds the seeds and rows not yet in the file (written after every row, atomically).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # bench_core.py, reproduce.py
import reproduce as R  # noqa: E402
from bench_core import machine_info  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, pytree  # noqa: E402

CELLS = {"0.7": (None, 0.7), "2:4": (swapjax.NM(2, 4), None)}
METHODS = {"LR": swapjax.LR(), "SWAP": swapjax.SWAP()}
MODES = {"in-memory": (1, "magnitude"), "2 blocks": (2, "magnitude"), "4 blocks": (4, "magnitude"),
         "4 blocks, Fisher budget": (4, "fisher")}
REPEATS = 3


def main(name: str = "vit-fashion-mnist", seeds=(0, 1, 2, 3, 4), runs: Path = Path("runs")):
    preset = R.PRESETS[name]
    train = data.load(preset.dataset, "train", flatten=preset.flatten)
    test = data.load(preset.dataset, "test", flatten=preset.flatten)
    batch, val = R.calibration(preset, train)
    out = Path(__file__).parent.parent / f"results/blocked-{name}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["seed"], r["cell"], r["method"], r["mode"]) for r in rows}
    timed_seed = min(seeds)
    for seed in seeds:
        model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
        loss_fn = R.per_example_loss(model, variables)
        p = pytree.layout(variables["params"]).size
        dense = swapjax.evaluate(model, variables, test.x, test.y)[0]
        for cell, (constraint, sparsity) in CELLS.items():
            for method_name, method in METHODS.items():
                for mode_name, (count, budget) in MODES.items():
                    if (seed, cell, method_name, mode_name) in done:
                        continue
                    mode = "in-memory" if count == 1 else swapjax.Blocked(width=-(-p // count), budget=budget)
                    prune = lambda: swapjax.prune(  # noqa: E731
                        loss_fn, variables["params"], batch, sparsity=sparsity, method=method, constraint=constraint,
                        stages=1, val_batch=val, mode=mode, progress=False)
                    result = prune()  # compiles
                    jax.block_until_ready(result.params)
                    seconds = []
                    for _ in range(REPEATS if seed == timed_seed else 0):
                        t0 = time.perf_counter()
                        jax.block_until_ready(prune().params)
                        seconds.append(time.perf_counter() - t0)
                    accuracy = swapjax.evaluate(model, {**variables, "params": result.params}, test.x, test.y)[0]
                    rows.append(dict(seed=seed, cell=cell, method=method_name, mode=mode_name, blocks=count,
                                     dense=dense, accuracy=accuracy, sparsity=result.summary()["total"]["sparsity"],
                                     seconds=float(np.median(seconds)) if seconds else None, repeats=seconds))
                    print(f"seed {seed} {cell} {method_name} {mode_name}: {100 * accuracy:.1f} %"
                          + (f", {rows[-1]['seconds']:.2f} s" if seconds else ""), flush=True)
                    R.write_json(out, {"preset": name, "seeds": sorted({r["seed"] for r in rows}),
                                       "machine": machine_info(), "rows": rows})
    print(table(rows))


def table(rows: list) -> str:
    """Accuracy % (mean ± std over the seeds) per cell; median seconds of the timed seed and the ratio to in memory."""
    lines = ["| method | X held | " + " | ".join(f"{c}: accuracy | {c}: seconds (× in-memory)" for c in CELLS) + " |",
             "|---" * (2 + 2 * len(CELLS)) + "|"]
    for method in METHODS:
        for mode in MODES:
            cells = []
            for cell in CELLS:
                picked = [r for r in rows if (r["cell"], r["method"], r["mode"]) == (cell, method, mode)]
                acc = [100 * r["accuracy"] for r in picked]
                cells.append(f"{np.mean(acc):.1f} ± {np.std(acc):.1f}" if acc else "–")
                timed = [r["seconds"] for r in picked if r["seconds"] is not None]
                base = [r["seconds"] for r in rows if (r["cell"], r["method"], r["mode"]) == (cell, method, "in-memory")
                        and r["seconds"] is not None]
                cells.append(f"{timed[0]:.2f} ({timed[0] / base[0]:.1f}×)" if timed and base else "–")
            lines.append(f"| {method} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vit-fashion-mnist", tuple(int(s) for s in sys.argv[2:]) or (0, 1, 2, 3, 4))
