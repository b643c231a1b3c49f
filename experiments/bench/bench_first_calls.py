"""First calls against warm calls: what the compiler costs a user's first call.

    .venv/bin/python experiments/bench/bench_first_calls.py                  # every configuration, 3 processes each
    .venv/bin/python experiments/bench/bench_first_calls.py readme vit --repeats 1
    → experiments/results/first-calls.json (written after every configuration, atomically); a table on stdout

Each run is a fresh Python process (nothing compiled, no persistent compilation cache unless the
configuration names one): the setup (data, model, loss function; not timed), the floor, the timed
first call, then the same call again (warm: nothing left to compile). The floor is the first call
of one jitted forward pass of the model on the batch, the compile-and-run that any JAX program on
this model pays once; first/floor says how many such programs the first call is worth. Every XLA
compilation is counted, per call, with its seconds (JAX's backend-compile events). The load average
is recorded with each run: on a shared machine, compare runs made at similar load; the table gives
the median of the repeats.

Configurations:

- ``readme``: the README's first example (an MLP on scikit-learn's digits, ``swapjax.prune`` with
  its defaults: SWAP() with held-out λ and ε, ``stages="auto"``: 8 stages and a one-shot);
- ``mlpnet``, ``vit``: the presets' networks (experiments/reproduce.py: N = 1000 Fisher examples,
  200 held out for the selection), one-shot SWAP() at 0.9 (0.7 for the ViT);
- ``vit-layerwise-<method>``: ``swapjax.prune_layerwise`` on the ViT at 0.7 with Regression (the
  default), SparseGPT and Wanda;
- ``mlpnet-blocked``: the MLPNet one-shot with X in 4 column blocks (``mode=swapjax.Blocked(width=p/4)``);
- ``tiny-blocked``: LR on a 160-weight MLP in blocks of 7 columns (23 blocks), the case that
  compiled once per block;
- ``readme-cache-cold``, ``readme-cache-warm``: ``readme`` with JAX's persistent compilation cache
  in a fresh directory (the first process fills it, the second reads it).

The presets' Fashion-MNIST is read where it is installed (swapjax.data); elsewhere the images are
uniform noise of its shape, with random labels, and the networks keep their initial weights: the
programs compiled and the work per call depend on the shapes, which are the presets'. The JSON
says which.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent.parent / "results" / "first-calls.json"
CONFIGS = ("readme", "mlpnet", "vit", "vit-layerwise-regression", "vit-layerwise-sparsegpt", "vit-layerwise-wanda",
           "mlpnet-blocked", "tiny-blocked", "readme-cache-cold", "readme-cache-warm")


# ---------------------------------------------------------------------------
# One configuration, in its own process


def _readme():
    """The README's first example (README.md, "### Flax linen"): (the call, the floor)."""
    import flax.linen as nn
    import jax
    import optax
    from sklearn.datasets import load_digits

    import swapjax

    digits = load_digits()
    x = (digits.data / 16).astype("float32")
    y = digits.target.astype("int32")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(10)(x)

    model = MLP()
    variables = model.init(jax.random.key(0), x[:1])
    variables = swapjax.train(model, variables, x[:1500], y[:1500], epochs=10, batch_size=64,
                              optimizer=optax.adam(1e-2), key=jax.random.key(1), progress=False)

    def loss_fn(params, example):
        logits = model.apply({"params": params}, example["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    batch = {"x": x[:500], "y": y[:500]}
    call = lambda: swapjax.prune(loss_fn, variables["params"], batch, sparsity=0.9,  # noqa: E731
                                 method=swapjax.SWAP(), progress=False).params
    return call, lambda: jax.jit(model.apply)(variables, batch["x"]), dict(p=2368, n=500)


def _preset(name: str):
    """(model, variables, loss_fn, batch, val, data source) of a preset, at its initial weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
    import reproduce as R

    from swapjax import data

    preset = R.PRESETS[name]
    total = preset.fisher_examples + preset.val_examples
    try:
        train = data.load(preset.dataset, "train", flatten=preset.flatten, examples=total)
        x, y, source = train.x, train.y, preset.dataset
    except Exception:  # noqa: BLE001  (not installed: noise of its shape)
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(total,) + ((784,) if preset.flatten else preset.input_shape)).astype(np.float32)
        y, source = rng.integers(0, 10, total).astype(np.int32), "synthetic (uniform noise, random labels)"
    model = preset.model()
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + preset.input_shape))
    n = preset.fisher_examples
    batch = {"x": jnp.asarray(x[:n]), "y": jnp.asarray(y[:n])}
    val = {"x": jnp.asarray(x[n:]), "y": jnp.asarray(y[n:])}
    return model, variables, R.per_example_loss(model, variables), batch, val, source


def _network(name: str, sparsity: float, blocks: int = 0, layerwise=None):
    import jax

    import swapjax
    from swapjax import layer_methods as L

    model, variables, loss_fn, batch, val, source = _preset(name)
    params = variables["params"]
    p = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path).endswith("'kernel']"))
    if layerwise is not None:
        method = {"regression": L.Regression(), "sparsegpt": L.SparseGPT(), "wanda": L.Wanda()}[layerwise]
        call = lambda: swapjax.prune_layerwise(loss_fn, params, batch, sparsity=sparsity,  # noqa: E731
                                               method=method, progress=False).params
    else:
        mode = swapjax.Blocked(width=-(-p // blocks)) if blocks else "auto"
        call = lambda: swapjax.prune(loss_fn, params, batch, sparsity=sparsity, method=swapjax.SWAP(),  # noqa: E731
                                     stages=1, val_batch=val, mode=mode, progress=False).params
    return call, lambda: jax.jit(model.apply)(variables, batch["x"]), dict(p=p, n=len(batch["y"]), data=source)


def _tiny_blocked():
    """LR on a 160-weight MLP (8-16-2, kernels only) in blocks of 7 columns."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import swapjax

    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": rng.normal(size=(8, 16)).astype("float32") / 3, "bias": np.zeros(16, "float32")},
              "l2": {"kernel": rng.normal(size=(16, 2)).astype("float32") / 4, "bias": np.zeros(2, "float32")}}
    batch = {"x": rng.normal(size=(200, 8)).astype("float32"), "y": rng.integers(0, 2, 200).astype("int32")}

    def forward(p, x):
        return jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"]

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(forward(p, ex["x"]))[ex["y"]]

    call = lambda: swapjax.prune(loss_fn, params, batch, sparsity=0.8, method=swapjax.LR(),  # noqa: E731
                                 mode=swapjax.Blocked(width=7), progress=False).params
    return call, lambda: jax.jit(forward)(params, batch["x"]), dict(p=160, n=200)


def setup(name: str):
    if name.startswith("readme"):
        return _readme()
    if name == "tiny-blocked":
        return _tiny_blocked()
    if name.startswith("vit-layerwise-"):
        return _network("vit-fashion-mnist", 0.7, layerwise=name.removeprefix("vit-layerwise-"))
    if name == "vit":
        return _network("vit-fashion-mnist", 0.7)
    return _network("mlpnet-fashion-mnist", 0.9, blocks=4 if name == "mlpnet-blocked" else 0)


def worker(name: str, cache: str | None) -> dict:
    import jax

    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(seconds) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    call, floor, shape = setup(name)
    row = dict(config=name, **shape, load_before=os.getloadavg()[0])

    def timed(fn, label):
        del compiles[:]
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        row[label] = time.perf_counter() - t0
        row[f"{label}_compiles"], row[f"{label}_compile_seconds"] = len(compiles), sum(compiles)

    timed(floor, "floor")
    timed(call, "first")
    timed(call, "warm")
    row["load_after"] = os.getloadavg()[0]
    return row


# ---------------------------------------------------------------------------
# The driver


def run(name: str, cache: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + (["--cache", cache] if cache else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the worker failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(out: Path, payload) -> None:
    """``payload`` as JSON, atomically (a temporary file, then a rename): a killed run leaves the last whole file."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)


def table(rows: list) -> str:
    """Median seconds over the repeats per configuration: first call, warm call, the first call's compilations
    (count and seconds), the floor and first/floor."""
    lines = ["| configuration | p | first call (s) | warm call (s) | compilations in the first call (s) | "
             "floor (s) | first / floor | load |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = lambda name: CONFIGS.index(name) if name in CONFIGS else len(CONFIGS)  # noqa: E731
    for name in sorted(dict.fromkeys(r["config"] for r in rows), key=order):
        runs = [r for r in rows if r["config"] == name]
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        lines.append(f"| {name} | {runs[0]['p']:,} | {med('first'):.1f} | {med('warm'):.2f} | "
                     f"{med('first_compiles'):.0f} ({med('first_compile_seconds'):.1f}) | {med('floor'):.2f} | "
                     f"{med('first') / med('floor'):.0f} | {med('load_before'):.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", help=f"some of {', '.join(CONFIGS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON file (default %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.cache)))
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration {unknown}; choose among {', '.join(CONFIGS)}")
    configs = args.configs or list(CONFIGS)
    payload = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    payload["rows"] = [r for r in payload["rows"] if r["config"] not in configs]
    with tempfile.TemporaryDirectory() as scratch:
        for name in configs:
            for repeat in range(args.repeats):
                cache = None
                if name.startswith("readme-cache"):  # cold: an empty directory per repeat; warm: the one cold filled
                    cache = os.path.join(scratch, f"cache-{repeat}")
                    if name == "readme-cache-warm" and not os.path.isdir(cache):
                        run("readme-cache-cold", cache)
                row = run(name, cache)
                payload["rows"].append(dict(row, repeat=repeat))
                print(f"{name} #{repeat}: first {row['first']:.1f} s ({row['first_compiles']} compilations, "
                      f"{row['first_compile_seconds']:.1f} s), warm {row['warm']:.2f} s, floor {row['floor']:.2f} s, "
                      f"load {row['load_before']:.1f}", flush=True)
                write_json(args.out, payload)
    print(table(payload["rows"]))


if __name__ == "__main__":
    main()
