"""`make demo-digits`: prune an MLP trained on scikit-learn's digits with LR and SWAP.

Trains the dense 64-64-32-10 MLP (seed 0), then prunes its kernels at
0.5 / 0.9 / 0.95 sparsity with LR and SWAP, using the 1,000 training examples
for the Fisher, in three settings: one-shot; one-shot with the published
gradient noise (std_scale 2, prop 0.25); and 5 stages of the cubic schedule
(no fine-tuning). Prints test accuracy before and after, writes
runs/demo/demo.csv and runs/demo/demo.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
import digits  # noqa: E402

import swapjax  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9, 0.95])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = ap.parse_args()

    train, _, test = digits.load(args.seed)
    t0 = time.perf_counter()
    params = digits.train(train, seed=args.seed)
    acc, loss = digits.evaluate(params, test.x, test.y)
    print(f"dense MLP trained in {time.perf_counter() - t0:.1f}s: test accuracy {acc:.2%}, loss {loss:.3f} (seed {args.seed})")

    methods = {"LR": swapjax.LR(), "SWAP": swapjax.SWAP()}
    settings = {  # name: (stages, gradient noise)
        "one-shot": (1, None),
        "one-shot, noisy": (1, swapjax.GradientNoise(std_scale=2.0, prop=0.25)),
        "5 stages": (5, None),
    }
    rows = []
    for setting, (stages, noise) in settings.items():
        for s in args.sparsities:
            for name, method in methods.items():
                t = time.perf_counter()
                result = swapjax.prune(
                    digits.example_loss, params, train.batch(), sparsity=s, method=method,
                    stages=stages, key=jax.random.key(args.seed), noise=noise, progress=False,
                )
                acc_p, loss_p = digits.evaluate(result.params, test.x, test.y)
                rows.append(dict(method=name, setting=setting, sparsity=s, seed=args.seed,
                                 test_accuracy=float(acc_p), test_loss=float(loss_p),
                                 seconds=round(time.perf_counter() - t, 2)))

    print(f"\n{'setting':<16}{'sparsity':>9}" + "".join(f"{m:>12}" for m in methods) + "   (test accuracy; dense "
          f"{acc:.2%})")
    for setting in settings:
        for s in args.sparsities:
            accs = [r["test_accuracy"] for r in rows if r["setting"] == setting and r["sparsity"] == s]
            print(f"{setting:<16}{s:>9.2f}" + "".join(f"{a:>12.2%}" for a in accs))

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "demo.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, args.out / "demo.csv")
    plot(rows, list(settings), float(acc), args.out / "demo.png")
    print(f"\nwrote {args.out / 'demo.csv'} and {args.out / 'demo.png'}")


def plot(rows, settings, dense_acc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, setting in enumerate(settings):
        for method, color in (("LR", "C0"), ("SWAP", "C1")):
            pts = [(r["sparsity"], r["test_accuracy"]) for r in rows if r["method"] == method and r["setting"] == setting]
            ax.plot(*zip(*pts), color=color, ls=["-", "--", ":"][i], marker="os^"[i], label=f"{method}, {setting}")
    ax.axhline(dense_acc, color="gray", lw=0.8, label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title("Pruning a digits MLP (no fine-tuning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
