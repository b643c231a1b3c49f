"""The layer methods on one layer: seconds, FLOPs and reconstruction error against SparseGPT and a matmul floor.

    .venv/bin/python experiments/bench/bench_layer_solvers.py [--shapes 1024x1024 4096x1024 1024x4096] \
        [--rules 0.5 0.7 2:4] [--regression]     # → experiments/results/layer-solvers.json

A synthetic layer per shape (d_in × d_out): n = 4·d_in input rows A = Z·diag(σ)·Qᵀ with Z Gaussian, a random
rotation Q and a power-law spectrum σ_i = (1 + i/64)^(-1/2) (correlated inputs), 8 input features scaled ×8
(outliers, as activations have), W̄ Gaussian / √d_in; H = AᵀA; seed 0. Each method through
``swapjax.contract.solve_layer`` (the driver's call per layer): a compiling call, then the median of
``--repeats`` warm calls. The floor is one product H·W (2·d_in²·d_out FLOPs) timed in the same run; every
time is also given as a ratio to SparseGPT's and to the floor. Error: ‖A(W̄ − W)‖²_F / ‖AW̄‖²_F in float64.
``--regression`` adds ``Regression()`` (LR on the flattened layer operator, the default before ``Swaps``;
minutes on the larger shapes); ``--methods`` runs those alone (with SparseGPT, the reference of the
ratios). Rows are written after every method, atomically, with the machine's load average (the machine may be
shared: the ratios within one run are what compare); a rerun replaces the rows it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import layer_methods  # noqa: E402
from swapjax.contract import solve_layer  # noqa: E402

METHODS = {
    "SparseGPT": layer_methods.SparseGPT(),
    "Wanda": layer_methods.Wanda(),
    "refit on SparseGPT": layer_methods.Refit(layer_methods.SparseGPT()),
    "Swaps (default)": layer_methods.Swaps(),
    "Swaps fast (rounds=1, swaps=10, iterations=5)": layer_methods.Swaps(rounds=1, swaps=10, iterations=5),
    "Regression (before)": layer_methods.Regression(),
}


def layer(d_in: int, d_out: int, seed: int = 0):
    """(W̄, H, A) of the synthetic layer (float32 W̄ and H, float64 A)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    A = (rng.normal(size=(4 * d_in, d_in)) / np.sqrt(1.0 + np.arange(d_in) / 64.0)) @ q.T
    A[:, rng.choice(d_in, 8, replace=False)] *= 8.0
    W = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
    return jnp.asarray(W, jnp.float32), jnp.asarray((A.T @ A).astype(np.float32)), A


def flops(name: str, d_in: int, d_out: int, method) -> float:
    """The dominant FLOPs (a multiply-add counts 2), as the code here runs them (d = d_in, B = 128).

    SparseGPT: the Cholesky factor of H + δI (d³/3), (H + δI)⁻¹ from it by two triangular solves on d right-hand
    sides (2d³), the upper factor of the inverse (d³/3): 8d³/3; the sweep: inside each block 2·d_out·(B − i) per
    input (d·B·d_out in all), and each block's error carried to the later inputs by one product (2·d_out·B·(d − i₂),
    d²·d_out in all). Swaps: SparseGPT, then products H_δP (2d²·d_out each): a refit of t iterations takes t + 1
    (its first residual), each round's search one (its gradient), so (rounds + 1)(iterations + 1) + rounds; a
    search step O(d·d_out) per candidate, counted as 10 passes. Wanda: the scores (d·d_out) and a sort per unit.
    The refit to convergence and Regression run until a tolerance: NaN (their iterations are not counted)."""
    product = 2.0 * d_in ** 2 * d_out
    sparsegpt = 8 / 3 * d_in ** 3 + d_in ** 2 * d_out + d_in * 128 * d_out
    if name == "Wanda":
        return float(d_in * d_out * (1 + np.log2(d_in)))
    if name == "SparseGPT":
        return sparsegpt
    if name.startswith("Swaps"):
        products = (method.rounds + 1) * (method.iterations + 1) + method.rounds
        steps = method.rounds * method.swaps * 10.0 * d_in * d_out * (method.candidates + 1)
        return sparsegpt + product * products + steps
    return float("nan")


def groups(rule: str, d_in: int, d_out: int):
    if ":" in rule:
        n, m = (int(x) for x in rule.split(":"))
        return layer_methods.nm_groups(n, m, d_in, d_out)
    return swapjax.Groups.top_k(round((1 - float(rule)) * d_in * d_out))


def timed(fn, repeats: int):
    jax.block_until_ready(fn())  # compiles
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return out, float(np.median(seconds))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x1024", "1024x4096"])
    ap.add_argument("--rules", nargs="+", default=["0.5", "0.7", "2:4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--regression", action="store_true")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="run these (and SparseGPT, the reference) only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "results/layer-solvers.json")
    args = ap.parse_args()
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for shape in args.shapes:
        d_in, d_out = (int(x) for x in shape.split("x"))
        W, H, A = layer(d_in, d_out)
        X, Y = jnp.ones((d_in, d_in)), jnp.ones((d_in, d_out))
        _, floor = timed(lambda: X @ Y, 5)
        for rule in args.rules:
            g = groups(rule, d_in, d_out)
            base = None
            for name, method in METHODS.items():
                if args.methods and name != "SparseGPT" and name not in args.methods or (
                        name.startswith("Regression") and not args.regression and not args.methods):
                    continue
                rows = [r for r in rows if (r["shape"], r["rule"], r["method"]) != (shape, rule, name)]
                reps = 1 if name.startswith(("Regression", "refit")) else args.repeats
                (w, mask), seconds = timed(lambda: solve_layer(method, shape, W, H, g), reps)
                delta = A @ (np.asarray(w, np.float64) - np.asarray(W, np.float64))
                error = float(np.sum(delta ** 2) / np.sum((A @ np.asarray(W, np.float64)) ** 2))
                base = seconds if name == "SparseGPT" else base
                rows.append(dict(shape=shape, rule=rule, method=name, seconds=round(seconds, 4), error=round(error, 6),
                                 vs_sparsegpt=round(seconds / base, 2), vs_floor=round(seconds / floor, 1),
                                 floor_seconds=round(floor, 5), gflop=round(flops(name, d_in, d_out, method) / 1e9, 1),
                                 kept=int(np.sum(mask)), load=round(os.getloadavg()[0], 2),
                                 machine=platform.processor() or platform.machine(),
                                 jax=jax.__version__, device=str(jax.devices()[0])))
                print(f"{shape} {rule} {name}: {seconds:.3f} s ({seconds / base:.2f}x SparseGPT, {seconds / floor:.0f}x the "
                      f"floor), error {error:.5f}", flush=True)
                R.write_json(args.out, {"rows": rows})
    print(table(rows))


def table(rows: list) -> str:
    lines = ["| layer | rule | method | seconds | × SparseGPT | × floor (H·W) | GFLOP | relative error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['rule']} | {r['method']} | {r['seconds']:.3f} | {r['vs_sparsegpt']:.2f} | "
                     f"{r['vs_floor']:.0f} | {r['gflop']} | {r['error']:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
