"""Peak memory and time of a one-shot SWAP prune at 0.9 against p: X formed ("in-memory"), formed in B column
blocks ("blocked-B", ``swapjax.Blocked(width=⌈p/B⌉)``) or not at all ("matrix-free").

    .venv/bin/python experiments/bench/bench_memory.py                      # MLPs 784-w-w-w-10, w = 256 … 2048
    .venv/bin/python experiments/bench/bench_memory.py --widths 2048 --modes matrix-free
    .venv/bin/python experiments/bench/bench_memory.py --widths 1024 --modes in-memory blocked-4
    .venv/bin/python experiments/bench/bench_memory.py --network mobilenetv1 --modes auto   # prune's own choice
    .venv/bin/python experiments/bench/bench_memory.py --network mobilenetv1  # MobileNetV1 (4.2M), synthetic 32×32 inputs
    python experiments/bench/bench_memory.py --network resnet50 --image-size 64 --csv gpu.csv   # on a GPU

Networks: ReLU MLPs 784-w-w-w-10 (p = 784w + 2w² + 10w kernel weights; w = 2048 gives 10.0M) at
their Flax initialisation (seed 0), on Fashion-MNIST train[:N] (N(0,1) inputs if not installed);
MobileNetV1 (width 1.0, 1000 classes, the 32×32 variant at --image-size 32) and ResNet50 (25.5M
kernel weights) with every conv and the classifier pruned, on N synthetic images of
--image-size² × 3. Each point runs in a fresh process: peak RSS is that process's ru_maxrss
(Python, JAX, the data and the model included); on a GPU also the device's peak bytes in use;
time is the whole ``prune`` call, compilation included. A mode whose estimate
(``swapjax.memory.estimate``) exceeds the available memory is recorded as not fitting, without
running. Rows go to --csv (default experiments/results/bench_memory.csv; a rerun skips the
points already there), the plot (CPU MLP rows) to docs/figures/memory.png, the table into
docs/benchmarks.md between the markers named after the CSV file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV = HERE.parent / "results" / "bench_memory.csv"
FIGURE = HERE.parents[1] / "docs" / "figures" / "memory.png"
DOC = HERE.parents[1] / "docs" / "benchmarks.md"
FIELDS = ["network", "p", "n", "mode", "method", "noise", "status", "seconds", "peak_rss_gb", "start_rss_gb", "x_gb",
          "estimate_gb", "available_gb", "kept", "k", "objective", "iht_iterations", "lam", "epsilon", "device",
          "peak_device_gb"]
METHODS = {"fixed": "SWAP(lam=0.03, epsilon=0.3, swap_rounds=0)", "default": "SWAP()",
           "fixed-cg20": "SWAP(lam=0.03, epsilon=0.3, swap_rounds=0, cg_iters=20)"}
NOISE = "GradientNoise(std_scale=2.0, prop=0.25)"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mlp_problem(width: int, n: int):
    """(params, loss_fn, batch, data source): the ReLU MLP 784-w-w-w-10 at its Flax initialisation (seed 0) and
    Fashion-MNIST train[:n] (N(0,1) inputs if not installed)."""
    import flax.linen as nn
    import jax
    import optax

    sys.path.insert(0, str(HERE))
    from bench_core import load_batch

    batch, data = load_batch(n, 0)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    model = MLP()
    params = model.init(jax.random.key(0), batch["x"][:1])["params"]

    def loss_fn(params, example):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, example["x"]),
                                                               example["y"])

    return params, loss_fn, batch, data


def worker(network: str, width: int, n: int, mode: str, method_name: str, noise: bool, chunk_size: int,
           image_size: int) -> dict:
    """One prune in this process; returns the CSV row."""
    import jax
    import jax.numpy as jnp
    import optax

    import swapjax
    from swapjax import memory, pytree

    if network == "mlp":
        params, loss_fn, batch, _ = mlp_problem(width, n)
    else:
        model = (swapjax.models.ResNet50() if network == "resnet50" else
                 swapjax.models.MobileNetV1(num_classes=1000, small_input=image_size < 224))
        kx, ky = jax.random.split(jax.random.key(1))
        batch = {"x": jax.random.normal(kx, (n, image_size, image_size, 3)),
                 "y": jax.random.randint(ky, (n,), 0, 1000)}
        variables = jax.jit(model.init)(jax.random.key(0), batch["x"][:1])
        params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(params, example):
            logits = model.apply({"params": params, **state}, example["x"][None])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    method = eval("swapjax." + METHODS[method_name])  # noqa: S307  (a fixed table above)
    lay = pytree.layout(params)
    p = lay.size
    blocks = int(mode.split("-")[1]) if mode.startswith("blocked-") else None
    est = memory.estimate(loss_fn, params, batch, lay, chunk_size, block_width=blocks and -(-p // blocks))
    device = jax.devices()[0]
    row = dict(network=f"mlp-{width}" if network == "mlp" else f"{network}-{image_size}", p=p, n=n, mode=mode, method=method_name,
               noise=NOISE if noise else "",
               x_gb=round(n * p * 4 / 2**30, 3), available_gb=round(est.available / 2**30, 2),
               estimate_gb=_estimate_gb(est, mode),
               start_rss_gb=round(_rss_gb(), 3), k=swapjax.kept_count(0.9, p), device=device.device_kind)
    t0 = time.perf_counter()
    try:
        extra = dict(noise=eval("swapjax." + NOISE), key=jax.random.key(0)) if noise else {}  # noqa: S307
        res = swapjax.prune(loss_fn, params, batch, sparsity=0.9, method=method, chunk_size=chunk_size,
                            mode=swapjax.Blocked(width=est.block_width) if blocks else mode,
                            **extra)
    except ValueError as e:
        if "does not fit" not in str(e):
            raise
        return {**row, "status": "does not fit (estimate)"}
    jax.block_until_ready(res.params)
    seconds = time.perf_counter() - t0
    if mode == "auto":  # the mode prune chose, and its estimate
        row["mode"] = f"auto: {res.mode}"
        row["estimate_gb"] = _estimate_gb(est, res.mode)
    kept = int(sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(res.masks)))
    stage = res.info[-1]
    solves = _solve_infos(stage.method_info)  # LR's and SWAP's SolveInfo: one, or one per block
    lams = {float(i.lam) for i in solves if i.lam is not None}
    epsilons = {i.epsilon for i in solves}
    return {**row, "status": "ok", "seconds": round(seconds, 2), "peak_rss_gb": round(_rss_gb(), 3), "kept": kept,
            "objective": f"{stage.objective:.6g}", "iht_iterations": sum(int(i.iht_iterations) for i in solves),
            "lam": f"{lams.pop():.4g}" if len(lams) == 1 else "nan", "epsilon": epsilons.pop() if len(epsilons) == 1 else None,
            "peak_device_gb": _device_peak_gb(device)}


def _solve_infos(info) -> list:
    """The SolveInfo of a stage's method_info: itself, or each solved block's (a blocked solve)."""
    blocks = getattr(info, "blocks", None)
    return [i for i in blocks if i is not None] if blocks is not None else [info]


def _estimate_gb(est, mode: str) -> float:
    """The estimated peak (GiB) of ``mode``: "in-memory", "matrix-free", or blocked ("blocked", "blocked-B", "auto")."""
    return round({"in-memory": est.in_memory, "matrix-free": est.matrix_free}.get(mode, est.blocked) / 2**30, 3)


def _device_peak_gb(device):
    """The accelerator's peak bytes in use (GiB); "" on CPU (see peak RSS there)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return round(stats["peak_bytes_in_use"] / 2**30, 3) if stats and "peak_bytes_in_use" in stats else ""


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict], figure: Path) -> None:
    """Peak memory and time against p, one line per (mode, method); the CPU's MLPs or a GPU's networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = any(r.get("peak_device_gb") for r in rows)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("in-memory", "o"), ("matrix-free", "s"), *((m, "^") for m in sorted({r["mode"] for r in rows}) if m.startswith("blocked"))):
        for method in METHODS:
            pts = sorted((int(r["p"]), float(r["peak_device_gb" if gpu else "peak_rss_gb"]), float(r["seconds"]))
                         for r in rows if r["mode"] == mode and r["method"] == method and r["status"] == "ok"
                         and (gpu or r["network"].startswith("mlp")) and not r.get("noise"))
            if not pts:
                continue
            p, mem, sec = zip(*pts)
            label = f"{mode}, SWAP {method}"
            ax_mem.plot(p, mem, marker=marker, label=label)
            ax_time.plot(p, sec, marker=marker, label=label)
    xs = sorted({int(r["p"]) for r in rows if gpu or r["network"].startswith("mlp")})
    n = int(rows[0]["n"]) if rows else 1000
    ax_mem.plot(xs, [n * p * 4 / 2**30 for p in xs], "k:", label=f"size of X (N = {n}, float32)")
    if gpu:
        for r in rows:
            if r["status"] == "ok":
                ax_mem.annotate(r["network"], (int(r["p"]), float(r["peak_device_gb"])), fontsize=7)
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("p (prunable weights)" + ("" if gpu else ", MLP 784-w-w-w-10"))
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_ylabel(f"peak {'device memory' if gpu else 'RSS of the process'} (GiB)")
    ax_time.set_ylabel(f"one-shot prune at 0.9 (s, {'one GPU' if gpu else '2 CPU cores'})")
    ax_mem.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)


def doc_section(rows: list[dict], name: str) -> str:
    """The table of every point, for docs/benchmarks.md, between the markers of ``name`` (the CSV's stem)."""
    gpu = any(r.get("peak_device_gb") for r in rows)
    mem = "peak device memory (GiB)" if gpu else "peak RSS (GiB)"
    lines = [f"| network | p | mode | SWAP | noise | X (GiB) | estimate (GiB) | {mem} | (peak − start) / X | s | kept = k | f |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in sorted(rows, key=lambda r: (not r["network"].startswith("mlp"), int(r["p"]), r["mode"], r["noise"])):
        ok = r["status"] == "ok"
        peak = float(r["peak_device_gb"]) if gpu and ok else float(r["peak_rss_gb"] or 0)
        ratio = f"{(peak - (0 if gpu else float(r['start_rss_gb']))) / float(r['x_gb']):.2f}" if ok else ""
        lines.append(
            f"| {r['network']} | {int(r['p']):,} | {r['mode']} | {METHODS[r['method']]} | {'yes' if r['noise'] else ''} "
            f"| {float(r['x_gb']):.2f} | {float(r['estimate_gb']):.2f} | {peak if ok else r['status']} "
            f"| {ratio} | {r['seconds'] if ok else ''} | {'yes' if ok and r['kept'] == r['k'] else ''} "
            f"| {r['objective'] if ok else ''} |")
    n = rows[0]["n"] if rows else "?"
    where = (f"on one {rows[0]['device']} (peak = the device's peak bytes in use, start 0)" if gpu else
             'on the 2 shared CPU cores (peak RSS of the whole process, "start" its RSS before `prune` '
             "(Python, JAX, data, model))")
    plot = f"\n![peak memory and time against p](figures/{'memory_gpu' if gpu else 'memory'}.png)\n"
    return f"""{_marker(name, "begin")}
## Memory: X formed or not (N = {n}, one-shot SWAP at 0.9{", GPU" if gpu else ""})

`experiments/bench/bench_memory.py` {where}: each point a fresh process; seconds for the whole `prune`
call, compilation included; noise = GradientNoise(2, 0.25). MLPs 784-w-w-w-10 at initialisation on
Fashion-MNIST train[:{n}]; MobileNetV1 and ResNet50 (every conv and the classifier) on {n} synthetic
images of the size after the network's name. "does not fit": the estimate exceeded the available
memory, so nothing ran. f: the stage's objective at the end (the backsolve is exact in memory, conjugate
gradients matrix-free).

{chr(10).join(lines)}
{plot}{_marker(name, "end")}"""


def _marker(name: str, which: str) -> str:
    if which == "begin":
        return f"<!-- {name}:begin (written by experiments/bench/bench_memory.py) -->"
    return f"<!-- {name}:end -->"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="MLP widths w")
    ap.add_argument("--network", default="mlp", choices=["mlp", "mobilenetv1", "resnet50"])
    ap.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (CNNs; default 32)")
    ap.add_argument("--modes", nargs="+", default=["in-memory", "matrix-free"])
    ap.add_argument("--methods", nargs="+", default=["fixed"], choices=sorted(METHODS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--noise", action="store_true", help=f"add {NOISE} to X (in-memory only)")
    ap.add_argument("--chunk-size", type=int, default=128, help="examples per chunk of per-sample gradients")
    ap.add_argument("--csv", type=Path, default=CSV, help="rows are read from and appended to this file")
    ap.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md and the plot alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    rows = read_rows(args.csv)
    done = {(r["network"], r["n"], r["mode"], r["method"], bool(r.get("noise"))) for r in rows}
    points = ([(f"mlp-{w}", w) for w in args.widths] if args.network == "mlp" else
              [(f"{args.network}-{args.image_size}", 0)])
    for name, width in points:
        for mode in args.modes:
            for method in args.methods:
                if (name, str(args.n), mode, method, args.noise) in done:
                    continue
                print(f"{name} {mode} {method} N={args.n} ...", flush=True)
                job = dict(network=args.network, width=width, n=args.n, mode=mode, method_name=method,
                           noise=args.noise, chunk_size=args.chunk_size, image_size=args.image_size)
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE,
                                     text=True)
                if out.returncode != 0:
                    print(f"  failed (exit {out.returncode})", flush=True)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print("  " + ", ".join(f"{k}={row.get(k)}" for k in ("p", "status", "seconds", "peak_rss_gb",
                                                                      "peak_device_gb", "kept", "k")), flush=True)
                rows.append(row)
                write_rows(args.csv, rows)
    if args.no_doc:
        return
    gpu = any(r.get("peak_device_gb") for r in rows)
    plot(rows, FIGURE.with_name("memory_gpu.png") if gpu else FIGURE)
    from bench_core import write_doc

    write_doc(DOC, doc_section(rows, args.csv.stem), _marker(args.csv.stem, "begin"), _marker(args.csv.stem, "end"))


if __name__ == "__main__":
    main()
