"""The cost of held-out selection: the 14-stage MLPNet SWAP prune of `make bench`, default vs fixed values.

    .venv/bin/python experiments/bench/bench_selection.py   # → experiments/results/bench_selection.json
    python experiments/bench/bench_selection.py out.json     # elsewhere (a GPU machine)

Same problem as experiments/bench/bench_core.py (MLPNet at random init, Fashion-MNIST train[:1000],
cubic schedule of 14 stages to 0.95). "default" is ``SWAP()`` (λ, ε chosen per stage on a
held-out fifth of the batch, swap search, one-shot comparison at the end, w̄ reset every stage);
"fixed" is the solver before selection, ``SWAP(lam=0.01, lam_scale="absolute", epsilon=0.3,
patience=None, swap_rounds=0)`` with w̄ kept dense (``anchor="dense"``, the default of that
time). Medians of 3 after a compiling call, with the other processes' CPU share.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_core as B  # noqa: E402

import swapjax  # noqa: E402

METHODS = {  # name: (method, anchor)
    "default": (swapjax.SWAP(), "current"),
    "fixed": (swapjax.SWAP(lam=0.01, lam_scale="absolute", epsilon=0.3, patience=None, swap_rounds=0), "dense"),
}


def main(out: Path = Path(__file__).parent.parent / "results/bench_selection.json"):
    batch, data_desc = B.load_batch(1000, 0)
    params, params_desc = B.make_params(0, batch, 0)
    res = {"data": data_desc, "params": params_desc, "machine": B.machine_info()}
    for name, (method, anchor) in METHODS.items():
        r = B.metered(B.bench_prune, method, params, batch, 0.95, 14, 3, anchor=anchor)
        res[name] = {k: r[k] for k in ("median_s", "min_s", "max_s", "compile_s", "gradient_s_total",
                                       "solve_s_total", "iht_iterations_total", "other_cpu_share", "batch_loss")}
        print(f"{name}: median {r['median_s']:.2f} s (other processes' CPU share {r['other_cpu_share']:.0%})",
              flush=True)
    res["ratio"] = res["default"]["median_s"] / res["fixed"]["median_s"]
    print(f"default / fixed: {res['ratio']:.2f}×")
    B.write_json_atomic(out, res)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:2]))
