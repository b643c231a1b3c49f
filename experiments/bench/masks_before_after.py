"""Masks and accuracies of the default SWAP() on the presets, to compare two versions of the library.

    .venv/bin/python experiments/bench/masks_before_after.py snapshot OUT.npz [runs]  # with this tree's swapjax
    PYTHONPATH=/path/to/other/checkout .venv/bin/python experiments/bench/masks_before_after.py snapshot OTHER.npz
    .venv/bin/python experiments/bench/masks_before_after.py compare OTHER.npz OUT.npz

For the MLPNet (0.9) and LeNet-5 (0.9) presets, seeds 0–1, one-shot (``stages=1``) and gradual
(``stages=8``, the one-shot comparison on): the flat mask of the prunable weights and the test
accuracy. ``compare`` prints a markdown table: the weights whose mask differs and both accuracies.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, pytree  # noqa: E402

CASES = {"mlpnet-fashion-mnist": 0.9, "lenet5-fashion-mnist": 0.9}
SEEDS = (0, 1)
SCHEDULES = {"one-shot": 1, "gradual": 8}


def snapshot(out: Path, runs: Path = Path("runs")) -> None:
    arrays = {"swapjax": np.array(swapjax.__file__)}
    for name, sparsity in CASES.items():
        preset = R.PRESETS[name]
        train = data.load(preset.dataset, "train", flatten=preset.flatten)
        test = data.load(preset.dataset, "test", flatten=preset.flatten)
        batch, val = R.calibration(preset, train)
        for seed in SEEDS:
            model, variables = R.dense_model(preset, name, seed, train, runs / name, progress=False)
            loss_fn = R.per_example_loss(model, variables)
            for schedule, stages in SCHEDULES.items():
                result = swapjax.prune(loss_fn, variables["params"], batch, sparsity=sparsity, stages=stages,
                                       val_batch=val, progress=False)
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
    for key in sorted(k[: -len("/mask")] for k in a.files if k.endswith("/mask")):
        name, seed, schedule = key.split("/")
        differ = int(np.sum(a[key + "/mask"] != b[key + "/mask"]))
        lines.append(f"| {name} | {seed} | {schedule} | {differ} of {a[key + '/mask'].size} | "
                     f"{100 * float(a[key + '/accuracy']):.2f} | {100 * float(b[key + '/accuracy']):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        snapshot(Path(sys.argv[2]), *(Path(p) for p in sys.argv[3:4]))
    else:
        print(compare(Path(sys.argv[2]), Path(sys.argv[3])))
