"""Masks and accuracies of the default SWAP() on the presets, to compare two versions of the library.

    .venv/bin/python experiments/bench/masks_before_after.py snapshot OUT.npz [runs [seeds]]  # this tree's swapjax
    PYTHONPATH=/path/to/other/checkout .venv/bin/python experiments/bench/masks_before_after.py snapshot OTHER.npz
    .venv/bin/python experiments/bench/masks_before_after.py compare OTHER.npz OUT.npz

For the MLPNet (0.9), LeNet-5 (0.9) and ViT (0.7) presets, seeds 0–1 (``--seeds``), one-shot
(``stages=1``), gradual (``stages=8``, the one-shot comparison on; MLPNet and LeNet-5), and layer by layer
(``prune_layerwise``: SparseGPT and the default method): the flat mask of the prunable weights and the
test accuracy. ``compare`` prints a markdown table: the weights whose mask differs and both accuracies.
A prune that fails (an API the other version lacks) is recorded as missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, pytree  # noqa: E402

CASES = {"mlpnet-fashion-mnist": (0.9, ("one-shot", "gradual", "layerwise-sparsegpt", "layerwise-default")),
         "lenet5-fashion-mnist": (0.9, ("one-shot", "gradual")),
         "vit-fashion-mnist": (0.7, ("one-shot", "layerwise-sparsegpt", "layerwise-default"))}
SEEDS = (0, 1)


def _prune(schedule, loss_fn, params, batch, val, sparsity):
    if schedule == "one-shot":
        return swapjax.prune(loss_fn, params, batch, sparsity=sparsity, stages=1, val_batch=val, progress=False)
    if schedule == "gradual":
        return swapjax.prune(loss_fn, params, batch, sparsity=sparsity, stages=8, val_batch=val, progress=False)
    method = swapjax.SparseGPT() if schedule == "layerwise-sparsegpt" else None
    return swapjax.prune_layerwise(loss_fn, params, batch, sparsity=sparsity, method=method, progress=False)


def snapshot(out: Path, runs: Path = Path("runs"), seeds=SEEDS) -> None:
    arrays = {"swapjax": np.array(swapjax.__file__)}
    for name, (sparsity, schedules) in CASES.items():
        preset = R.PRESETS[name]
        train = data.load(preset.dataset, "train", flatten=preset.flatten)
        test = data.load(preset.dataset, "test", flatten=preset.flatten)
        batch, val = R.calibration(preset, train)
        for seed in seeds:
            model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
            loss_fn = R.per_example_loss(model, variables)
            for schedule in schedules:
                try:
                    result = _prune(schedule, loss_fn, variables["params"], batch, val, sparsity)
                except Exception as err:  # noqa: BLE001 - recorded as missing
                    print(f"{name}/{seed}/{schedule}: failed ({type(err).__name__}: {err})", flush=True)
                    continue
                lay = pytree.layout(variables["params"])
                ones = pytree.apply_masks(pytree.unflatten(np.ones(lay.size, np.float32), variables["params"], lay),
                                          result.masks)
                key = f"{name}/{seed}/{schedule}"
                arrays[key + "/mask"] = np.asarray(pytree.flatten(ones, lay)) > 0
                arrays[key + "/accuracy"] = np.array(swapjax.evaluate(model, {**variables, "params": result.params},
                                                                      test.x, test.y)[0])
                print(key, float(arrays[key + "/accuracy"]), flush=True)
    np.savez(out, **arrays)


def compare(before: Path, after: Path) -> str:
    a, b = np.load(before), np.load(after)
    lines = ["| preset | seed | schedule | masks differ (weights) | accuracy before | after |", "|---" * 6 + "|"]
    for key in sorted(k[: -len("/mask")] for k in set(a.files) | set(b.files) if k.endswith("/mask")):
        name, seed, schedule = key.split("/")
        if key + "/mask" not in a.files or key + "/mask" not in b.files:
            lines.append(f"| {name} | {seed} | {schedule} | missing in {'before' if key + '/mask' not in a.files else 'after'} | | |")
            continue
        differ = int(np.sum(a[key + "/mask"] != b[key + "/mask"]))
        lines.append(f"| {name} | {seed} | {schedule} | {differ} of {a[key + '/mask'].size} | "
                     f"{100 * float(a[key + '/accuracy']):.2f} | {100 * float(b[key + '/accuracy']):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        seeds = tuple(int(x) for x in sys.argv[4].split(",")) if len(sys.argv) > 4 else SEEDS
        snapshot(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else Path("runs"), seeds)
    else:
        print(compare(Path(sys.argv[2]), Path(sys.argv[3])))
