"""The paper's table on the demo's model: MP, WF, LR and SWAP (with and without backsolve) on one X.

For each seed: train the digits MLP (experiments/digits.py), compute the
per-sample gradients of the 1,000 training examples once, and prune one-shot
at every sparsity with every method through `swapjax.compare_sparsities`
(clean gradients, and with the published noise std_scale 2, prop 0.25); test
accuracy and loss of each pruned network. A check at the end runs each method
once through `swapjax.prune` and verifies it returns the same weights.

    .venv/bin/python experiments/studies/compare_digits/compare_digits.py   # writes compare_digits.csv beside it
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/: digits.py
import digits  # noqa: E402

import swapjax  # noqa: E402
from swapjax import pytree  # noqa: E402

METHODS = {
    "MP": swapjax.Magnitude(),
    "MP-layer": swapjax.Magnitude(scope="layer"),
    "WF": swapjax.WoodFisher(),
    "LR-noBS": swapjax.LR(backsolve=False),
    "LR": swapjax.LR(),
    "SWAP-noBS": swapjax.SWAP(backsolve=False),
    "SWAP": swapjax.SWAP(),
}
NOISE = {"clean": None, "noisy": swapjax.GradientNoise(std_scale=2.0, prop=0.25)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.98])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "compare_digits.csv")
    args = ap.parse_args()

    rows = []
    for seed in args.seeds:
        train, _, test = digits.load(seed)
        params = digits.train(train, seed=seed)
        dense = digits.evaluate(params, test.x, test.y)
        print(f"[compare] seed {seed}: dense test accuracy {float(dense[0]):.4f}", file=sys.stderr)
        tables = {}
        for gradients, noise in NOISE.items():
            table = tables[gradients] = swapjax.compare_sparsities(
                digits.example_loss, params, train.batch(), args.sparsities, METHODS,
                evaluate=lambda p: digits.evaluate(p, test.x, test.y), noise=noise,
                key=jax.random.key(seed), progress=False,
            )
            for s, results in table.items():
                for name, r in results.items():
                    rows.append(dict(seed=seed, gradients=gradients, sparsity=s, method=name,
                                     test_accuracy=r.accuracy, test_loss=r.loss,
                                     local_objective=r.local_objective, ewr_objective=r.ewr_objective,
                                     seconds=round(r.seconds, 3), dense_test_accuracy=float(dense[0]), error=r.error))
        if seed == args.seeds[0]:
            check_prune_agrees(params, train, tables["clean"][args.sparsities[-2]], args.sparsities[-2])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, args.out)
    print(markdown(rows, args.sparsities))


def check_prune_agrees(params, train, results, sparsity):
    """swapjax.prune (one stage, clean gradients) gives the same w as the comparison."""
    lay = pytree.layout(params)
    for name, method in METHODS.items():
        pruned = swapjax.prune(digits.example_loss, params, train.batch(), sparsity=sparsity, method=method,
                               progress=False)
        w = pytree.flatten(pruned.params, lay)
        gap = float(np.max(np.abs(np.asarray(w) - np.asarray(results[name].w))))
        print(f"[compare] prune vs compare, {name} at {sparsity}: max |Δw| = {gap:.2e}", file=sys.stderr)


def markdown(rows, sparsities):
    """Mean ± std over seeds of test accuracy, one table per gradient setting."""
    out = []
    for gradients in NOISE:
        out.append(f"\n{gradients} gradients, test accuracy (mean ± std over seeds)\n")
        out.append("| method | " + " | ".join(f"{s}" for s in sparsities) + " |")
        out.append("|---|" + "---|" * len(sparsities))
        for name in METHODS:
            cells = []
            for s in sparsities:
                acc = [r["test_accuracy"] for r in rows if (r["gradients"], r["method"], r["sparsity"]) ==
                       (gradients, name, s) and r["test_accuracy"] is not None]
                cells.append(f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc):.1f}" if acc else "failed")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
