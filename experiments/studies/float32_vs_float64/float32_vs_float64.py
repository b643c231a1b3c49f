"""float32 against float64: the same pruning problems solved in each dtype, compared.

    python experiments/studies/float32_vs_float64/float32_vs_float64.py [--out DIR]

Builds three problems (X, w̄) from a 64-32-10 tanh MLP trained on scikit-learn's
digits (per-sample gradients of N = 64, 128, 256 held-out examples, p = 2,368),
solves each at sparsities 0.5, 0.8, 0.9, 0.95 with MP, WF, LR and SWAP (fixed
λ = 0.01 absolute, ε = 0.3) and the "auto" LR() and SWAP(), once in float32 and
once under ``jax_enable_x64`` in float64 (each in its own process: x64 is a
global switch), and prints per method: how many supports are identical and the
relative difference of the local objective ½‖X(w − w̄)‖²/N, evaluated in float64
on each returned w.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
SIZES = (64, 128, 256)


def make(out: Path) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from sklearn.datasets import load_digits

    import swapjax

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = (d.data / 16.0).astype(np.float32)[order]
    y = d.target.astype(np.int32)[order]

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(jnp.tanh(nn.Dense(32)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = optax.adam(3e-2)
    state = opt.init(params)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

    for _ in range(200):
        g = jax.grad(loss)(params, x[:1000], y[:1000])
        u, state = opt.update(g, state)
        params = optax.apply_updates(params, u)

    def one(p, ex):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, ex["x"]), ex["y"])

    lay = swapjax.pytree.layout(params)
    for i, n in enumerate(SIZES):
        sl = slice(1000 + i * 256, 1000 + i * 256 + n)
        X = swapjax.per_sample_grads(one, params, {"x": x[sl], "y": y[sl]})
        np.savez(out / f"problem{i}.npz", X=np.asarray(X, np.float64),
                 w=np.asarray(swapjax.pytree.flatten(params, lay), np.float64))


def solve(out: Path, dtype: str) -> None:
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import swapjax

    methods = {
        "MP": swapjax.Magnitude(), "WF": swapjax.WoodFisher(),
        "LR": swapjax.LR(lam=1e-2, lam_scale="absolute"),
        "SWAP": swapjax.SWAP(lam=1e-2, lam_scale="absolute", epsilon=0.3),
        "LR-auto": swapjax.LR(), "SWAP-auto": swapjax.SWAP(),
    }
    results = {}
    for i in range(len(SIZES)):
        z = np.load(out / f"problem{i}.npz")
        X, w_bar = z["X"].astype(dtype), z["w"].astype(dtype)
        for s in SPARSITIES:
            k = swapjax.kept_count(s, w_bar.size)
            for name, method in methods.items():
                w, _ = method.solve(X, w_bar, k)
                results[f"{i}/{s}/{name}"] = np.asarray(w, np.float64).tolist()
    (out / f"{dtype}.json").write_text(json.dumps(results))


def report(out: Path) -> str:
    a = json.loads((out / "float32.json").read_text())
    b = json.loads((out / "float64.json").read_text())
    rows: dict[str, list] = {}
    for key in a:
        i, _, name = key.split("/")
        z = np.load(out / f"problem{i}.npz")
        X, w_bar = z["X"], z["w"]
        w32, w64 = np.array(a[key]), np.array(b[key])
        f32, f64 = (0.5 * np.sum((X @ (w - w_bar)) ** 2) / X.shape[0] for w in (w32, w64))
        rows.setdefault(name, []).append((abs(f32 - f64) / f64, np.array_equal(w32 != 0, w64 != 0)))
    lines = [f"{'method':10s} {'identical supports':>18s} {'max rel. diff.':>14s} {'median':>9s}"]
    for name, r in rows.items():
        rel = [x[0] for x in r]
        lines.append(f"{name:10s} {sum(x[1] for x in r):>11d} of {len(r):<4d} {max(rel):>14.1e} {np.median(rel):>9.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/float32-vs-float64"))
    ap.add_argument("--step", choices=("all", "make", "float32", "float64"), default="all")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "make":
        return make(args.out)
    if args.step in ("float32", "float64"):
        return solve(args.out, args.step)
    for step in ("make", "float32", "float64"):
        subprocess.run([sys.executable, __file__, "--out", str(args.out), "--step", step], check=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
