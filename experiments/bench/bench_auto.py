"""What the default schedule (``stages="auto"``) buys and costs: one-shot, 8-stage gradual, and auto.

    .venv/bin/python experiments/bench/bench_auto.py          # → experiments/results/bench_auto.json (CPU, ~25 min)

For the MLPNet preset at 0.9 and the ViT preset at 0.7 (experiments/reproduce.py: Fashion-MNIST,
the dense model of each seed trained or restored under runs/<preset>/, N = 1000 examples for X and
the next 200 for the selection), prune with the default method ``SWAP()`` three ways:

- ``one-shot``: ``stages=1``, the one-shot prune of the papers (the floor of the time ratios);
- ``gradual``: 8 stages of the cubic schedule alone (an identity ``finetune`` turns off the
  one-shot comparison), to know the better of the two;
- ``auto``: the default call (8 stages, λ alone chosen before the last, compared with one-shot on the
  held-out loss).

Test accuracy on the 10,000 test images per seed; seconds of each call after a compiling call of
the same schedule on the same seed (excluded: each seed's loss_fn is a new function, compiled anew),
and auto's time as a ratio to one-shot's in the same run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data  # noqa: E402

CASES = {"mlpnet-fashion-mnist": 0.9, "vit-fashion-mnist": 0.7}
SEEDS = (0, 1, 2)
SCHEDULES = {"one-shot": dict(stages=1), "gradual": dict(stages=8, finetune=lambda params, masks, stage: params),
             "auto": {}}


def main(out: Path = Path(__file__).parent.parent / "results/bench_auto.json", runs: Path = Path("runs")):
    results = {"machine": {"cpu": _cpu(), "devices": [str(d) for d in jax.devices()]}, "seeds": list(SEEDS)}
    for name, sparsity in CASES.items():
        preset = R.PRESETS[name]
        train = data.load(preset.dataset, "train", flatten=preset.flatten)
        test = data.load(preset.dataset, "test", flatten=preset.flatten)
        batch, val = R.calibration(preset, train)
        rows = []
        for seed in SEEDS:
            model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
            loss_fn = R.per_example_loss(model, variables)

            def call(**kw):
                t0 = time.perf_counter()
                result = swapjax.prune(loss_fn, variables["params"], batch, sparsity=sparsity, val_batch=val,
                                       progress=False, **kw)
                jax.block_until_ready(result.params)
                return result, time.perf_counter() - t0

            for kw in SCHEDULES.values():
                call(**kw)  # compile: the gradients of each seed's loss_fn (a new function) and every width
            dense = swapjax.evaluate(model, variables, test.x, test.y)[0]
            row = {"seed": seed, "dense": dense}
            for schedule, kw in SCHEDULES.items():
                result, seconds = call(**kw)
                row[schedule] = {"accuracy": swapjax.evaluate(model, {**variables, "params": result.params},
                                                              test.x, test.y)[0],
                                 "seconds": seconds, "kept": (result.one_shot or {}).get("kept")}
            row["auto_over_one_shot"] = row["auto"]["seconds"] / row["one-shot"]["seconds"]
            print(f"{name} seed {seed}: " + ", ".join(f"{s} {100 * row[s]['accuracy']:.1f} % {row[s]['seconds']:.1f} s"
                                                       for s in SCHEDULES)
                  + f", auto kept {row['auto']['kept']}, auto/one-shot {row['auto_over_one_shot']:.2f}×", flush=True)
            rows.append(row)
        results[name] = {"sparsity": sparsity, "rows": rows, "summary": _summary(rows)}
        print(json.dumps(results[name]["summary"]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)


def _summary(rows):
    mean = {s: 100 * float(np.mean([r[s]["accuracy"] for r in rows])) for s in SCHEDULES}
    return {"accuracy_mean": mean, "auto_minus_better": mean["auto"] - max(mean["one-shot"], mean["gradual"]),
            "median_seconds": {s: float(np.median([r[s]["seconds"] for r in rows])) for s in SCHEDULES},
            "median_auto_over_one_shot": float(np.median([r["auto_over_one_shot"] for r in rows]))}


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:2]))
