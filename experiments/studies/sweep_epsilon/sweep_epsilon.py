"""Sweep SWAP's relative ε on held-out validation data (the source of the default ε).

Tasks: `digits` (the demo's MLP on scikit-learn digits; validation = 397
held-out images) and `fashion` (MLPNet 784-40-20-10 on Fashion-MNIST from
Debian's dataset-fashion-mnist; trained on 50,000 images, validation = the
other 10,000 training images; the test set is never looked at). For each seed:
train the dense model, take the first N = 1,000 training examples for the
Fisher, prune with LR and SWAP(ε) for every ε, record validation accuracy and
loss. One CSV row per run, appended atomically; a rerun skips finished rows.

    .venv/bin/python experiments/studies/sweep_epsilon/sweep_epsilon.py --task digits
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[2])]  # fashion_mnist.py, digits.py
import swapjax  # noqa: E402

FIELDS = ["task", "seed", "method", "epsilon", "sparsity", "stages", "gradients", "val_accuracy", "val_loss",
          "dense_val_accuracy", "seconds"]
NOISE = {"clean": None, "noisy": swapjax.GradientNoise(std_scale=2.0, prop=0.25)}


def task_setup(task: str, seed: int):
    """(loss_fn, params, fisher batch, evaluate(params) -> (acc, loss) on validation)."""
    if task == "digits":
        import digits

        train, val, _ = digits.load(seed)
        params = digits.train(train, seed=seed)
        return digits.example_loss, params, train.batch(), lambda p: digits.evaluate(p, val.x, val.y)
    import fashion_mnist as fm

    (x, y), _ = fm.load()
    order = np.random.default_rng(seed).permutation(len(y))
    tr, va = order[:50000], order[50000:]
    params = fm.train(x[tr], y[tr], seed=seed)
    fisher = {"x": x[tr[:1000]], "y": y[tr[:1000]]}
    return fm.example_loss, params, fisher, lambda p: fm.evaluate(p, x[va], y[va])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["digits", "fashion"], default="digits")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--stages", type=int, nargs="+", default=[1])
    ap.add_argument("--gradients", nargs="+", choices=list(NOISE), default=list(NOISE))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / f"epsilon_{args.task}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        with open(out) as f:
            done = {(r["seed"], r["method"], r["epsilon"], r["sparsity"], r["stages"], r["gradients"])
                    for r in csv.DictReader(f)}
    else:
        with open(out, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    runs = [("LR", None)] + [("SWAP", e) for e in args.epsilons]
    for seed in args.seeds:
        todo = [(m, e, s, T, g) for m, e in runs for s in args.sparsities for T in args.stages for g in args.gradients
                if (str(seed), m, str(e), str(s), str(T), g) not in done]
        if not todo:
            continue
        loss_fn, params, fisher, evaluate = task_setup(args.task, seed)
        dense_acc = float(evaluate(params)[0])
        print(f"[sweep] {args.task} seed {seed}: dense validation accuracy {dense_acc:.4f}", flush=True)
        for i, (name, eps, s, T, g) in enumerate(todo, 1):
            method = swapjax.LR() if name == "LR" else swapjax.SWAP(epsilon=eps)
            t = time.perf_counter()
            result = swapjax.prune(loss_fn, params, fisher, sparsity=s, method=method, stages=T,
                                   key=jax.random.key(seed), noise=NOISE[g], progress=False)
            acc, loss = (float(v) for v in evaluate(result.params))
            row = dict(task=args.task, seed=seed, method=name, epsilon=eps, sparsity=s, stages=T, gradients=g,
                       val_accuracy=round(acc, 5), val_loss=round(loss, 5), dense_val_accuracy=round(dense_acc, 5),
                       seconds=round(time.perf_counter() - t, 2))
            with open(out, "a", newline="") as f:  # one short append per finished run
                csv.DictWriter(f, FIELDS).writerow(row)
            print(f"[sweep] {i}/{len(todo)} {name} eps={eps} s={s} T={T} {g}: val acc {acc:.4f}", flush=True)
    summarise(out)


def summarise(path: Path):
    """Mean validation accuracy per (method, ε) and per setting, over seeds."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    settings = sorted({(r["sparsity"], r["stages"], r["gradients"]) for r in rows})
    methods = sorted({(r["method"], r["epsilon"]) for r in rows}, key=lambda m: (m[0] != "LR", float(m[1] or 0)))
    head = "".join(f"  s={s},T={T},{g}" for s, T, g in settings)
    print(f"\n{'method':<16}{head}   mean")
    for m, e in methods:
        cells, means = [], []
        for st in settings:
            accs = [float(r["val_accuracy"]) for r in rows if (r["method"], r["epsilon"]) == (m, e)
                    and (r["sparsity"], r["stages"], r["gradients"]) == st]
            means.append(np.mean(accs) if accs else np.nan)
            cells.append(f"{np.mean(accs):.3f}±{np.std(accs):.3f}" if accs else "-")
        label = m if m == "LR" else f"SWAP ε={e}"
        print(f"{label:<16}" + "".join(f"{c:>{len(f'  s={s},T={T},{g}')}}" for c, (s, T, g) in zip(cells, settings))
              + f"   {np.nanmean(means):.4f}")


if __name__ == "__main__":
    main()
