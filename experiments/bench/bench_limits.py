"""The default ``swapjax.prune`` call on the 10M-weight MLP inside an address-space limit: wall time, the mode
``mode="auto"`` chose, peak memory, and a floor (one full-batch gradient) timed in the same process.

    bash -c 'ulimit -v 12000000; .venv/bin/python experiments/bench/bench_limits.py'             # the figure
    bash -c 'ulimit -v 3000000; .venv/bin/python experiments/bench/bench_limits.py --width 256 --n 200 --stages 1 \\
        --out experiments/results/bench_limits-small.json'                                    # a quick trial

The network is the one of ``experiments/bench/bench_memory.py`` at w = 2048: a ReLU MLP 784-w-w-w-10 at its Flax
initialisation (seed 0; p = 784w + 2w² + 10w = 10,014,720 kernel weights), on Fashion-MNIST train[:N] (N(0,1)
inputs if not installed), N = 1,000, the default call ``prune(loss_fn, params, batch)`` (``--stages 1``: the
same with ``stages=1``). The limits are the process's own (``ulimit -v`` before starting; the script only
records them). Peak RSS is the process's ru_maxrss, VmPeak its largest address space (both include
Python, JAX, the data and the floor's pass). The floor: ``jax.grad`` of the mean loss over the N examples
(one forward and backward pass, compiled before it is timed, median of 3), the least any prune computes.
Also recorded: the prune's CPU seconds (user + system, every thread) and the 1-minute load average every
10 s during it (other processes on the same cores stretch the wall time, not the CPU time). The result
(one JSON object) is written atomically to --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench_limits.json"


class Tee(io.TextIOBase):
    """stderr as it was, and a copy of every line (prune's progress and its choice of mode)."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.stream.write(text)
        self.lines.append(text)
        return len(text)

    def flush(self):
        self.stream.flush()


def _status() -> dict:
    """VmPeak, VmSize, VmHWM, VmRSS of this process (GiB)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) / 2**20, 3)
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _gib(b):
    return None if b is None else round(b / 2**30, 3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=2048, help="MLP width w (2048: 10.0M kernel weights)")
    ap.add_argument("--n", type=int, default=1000, help="examples N")
    ap.add_argument("--stages", type=int, default=None, help="pass stages= (default: the default call)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp

    import swapjax
    from swapjax import memory

    sys.path.insert(0, str(HERE))
    from bench_memory import mlp_problem

    width = args.width
    params, loss_fn, batch, data = mlp_problem(width, args.n)

    p = swapjax.pytree.layout(params).size
    limits = memory.process_limits()
    bound = limits.bound()

    # the floor: one full-batch gradient (compiled first, median of 3)
    grad = jax.jit(jax.grad(lambda params: jnp.mean(jax.vmap(lambda e: loss_fn(params, e))(batch))))
    jax.block_until_ready(grad(params))
    floor = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params))
        floor.append(time.perf_counter() - t0)
    floor_s = statistics.median(floor)
    before = _status()

    kwargs = {} if args.stages is None else {"stages": args.stages}
    tee = Tee(sys.stderr)
    sys.stderr = tee
    loads, done = [], threading.Event()

    def sample_load():  # the 1-minute load average every 10 s: what else ran on the cores meanwhile
        while not done.wait(10.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    error = None
    try:
        res = swapjax.prune(loss_fn, params, batch, **kwargs)
        jax.block_until_ready(res.params)
    except Exception as e:  # noqa: BLE001  (recorded: the run's outcome is the figure)
        res, error = None, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    done.set()
    sys.stderr = tee.stream
    after = _status()
    text = "".join(tee.lines)
    soft_as = resource.getrlimit(resource.RLIMIT_AS)[0]
    kept = None if res is None else int(sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(res.masks)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    row = {
        "network": f"MLP 784-{width}-{width}-{width}-10, Flax init seed 0", "p": p, "n": args.n, "data": data,
        "call": "prune(loss_fn, params, batch" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")",
        "commit": commit, "device": jax.devices()[0].device_kind, "cores": os.cpu_count(),
        "rlimit_as_gib": None if soft_as == resource.RLIM_INFINITY else _gib(soft_as),
        "limits_gib": {k: _gib(v) for k, v in limits._asdict().items()}, "available_gib": _gib(bound),
        "bound": bound.limit,
        "status": "ok" if error is None else "error", "error": error,
        "mode": None if res is None else res.mode,
        "stages": None if res is None else len(res.info),
        "seconds": round(seconds, 1), "floor_seconds": round(floor_s, 3), "floor": "jax.grad of the mean loss over N",
        "ratio_to_floor": round(seconds / floor_s, 1), "cpu_seconds": round(cpu, 1),
        "load_during": {"mean": round(statistics.mean(loads), 2), "max": round(max(loads), 2)} if loads else None,
        "kept": kept, "k": swapjax.kept_count(0.9, p),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "vm_before_prune": before, "vm_after": after,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "stderr_swapjax": [line for line in text.splitlines() if any(s in line for s in ("does not fit", "stage(s)", "stages=", "stage 1/"))],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: row[k] for k in ("status", "mode", "stages", "seconds", "cpu_seconds", "load_during",
                                          "floor_seconds", "ratio_to_floor",
                                          "peak_rss_gib", "available_gib", "bound", "error")}))


if __name__ == "__main__":
    main()
