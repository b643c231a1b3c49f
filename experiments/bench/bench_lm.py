"""The language-model pruning table on an ``lm-<corpus>`` preset: perplexity and bits per byte on held-out text.

    .venv/bin/python experiments/bench/bench_lm.py [preset] [seeds...] [--parts main owl calibration network]
        [--methods magnitude wanda sparsegpt refit default lr swap lr-global swap-global] [--cells 0.5 ... 4:8]
        [--n 128] [--calibration-sizes 16 32 64 128 256] [--eval-windows K: a smoke run]
    # → experiments/results/<preset>.json (a row per seed, cell, method, calibration size and budget rule)
    #   and experiments/results/<preset>.md (the tables)

For each seed s: the preset's dense GPT (``reproduce.lm_dense``: restored from runs/<preset>/dense-seed<s>,
trained there first when not cached); the calibration batch is N windows of T + 1 bytes of the TRAIN split
(``text.sample_windows(train, T, N, seed=10_000 + s)``: the windows of a smaller N are the first of a larger
one's); every pruned network is evaluated on the whole TEST split (``swapjax.perplexity`` on
``text.windows(test, T)``: every test byte after the first predicted once), in bits per byte and perplexity.

Parts (``--parts``; all by default):

- ``main``: layer by layer (``swapjax.prune_layerwise``, sequential, ``dense_ends="last"``: the LM head dense,
  as the published SparseGPT and Wanda code): magnitude per output unit (``LayerMagnitude``), Wanda, SparseGPT,
  the exact refit on SparseGPT's mask (``Refit(SparseGPT())``) and the default (``Swaps``), at uniform 0.5, 0.6,
  0.7, 0.8 (``LayerBudgets()``), 2:4 and 4:8 (``NM``), N = ``--n`` windows;
- ``owl``: the same methods at 0.7 and 0.8 under ``LayerBudgets("owl")`` (M = 5, Λ = 0.08; one sparsity per
  decoder block, ``owl_group``); the uniform rows they are compared with are main's;
- ``calibration``: SparseGPT and the default at 0.5 and 2:4 with N = 16, 32, 64, 128, 256 windows;
- ``network``: ``swapjax.prune`` (one-shot, ``stages=1``, ``dense_ends="last"``) with LR and SWAP at 0.5, under
  uniform per-layer budgets and under the global top-k (the library's default constraint); X from the N
  calibration windows, λ and ε chosen on ``--val-windows`` other training windows (seed 20_000 + s).

Timing: before the first prune of each (method, cell, N, budget) in a process, one compiling call of the
same prune (its seconds: ``first_seconds``, in the first seed's row); the row's ``seconds`` is the call after
(later seeds reuse the compiled functions), with the 1-minute load average before and after it (``load``).
Once per seed: the dense network's perplexity and whether the model has outlier features, the spread of
its input-feature norms ‖A_:,i‖₂ = √H_ii per layer (max/median, from ``swapjax.layer_grams`` on the N
calibration windows). A rerun skips the rows already in the file (written atomically after every row).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import layer_methods, text  # noqa: E402
from swapjax.models import next_token_loss  # noqa: E402

#: cell → (sparsity, (n, m) or None)
CELLS = {"0.5": (0.5, None), "0.6": (0.6, None), "0.7": (0.7, None), "0.8": (0.8, None),
         "2:4": (None, (2, 4)), "4:8": (None, (4, 8))}
LAYERWISE = {"magnitude": layer_methods.LayerMagnitude(), "Wanda": layer_methods.Wanda(),
             "SparseGPT": layer_methods.SparseGPT(),
             "refit on SparseGPT": layer_methods.Refit(layer_methods.SparseGPT()),
             "default (Swaps)": layer_methods.Swaps()}
#: network-wide: method name → (method, budget)
NETWORK = {"LR network": (swapjax.LR(), "uniform"), "SWAP network": (swapjax.SWAP(), "uniform"),
           "LR network, global top-k": (swapjax.LR(), "global top-k"),
           "SWAP network, global top-k": (swapjax.SWAP(), "global top-k")}
#: the command line's names of the methods
SHORT = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "refit": "refit on SparseGPT",
         "default": "default (Swaps)", "lr": "LR network", "swap": "SWAP network",
         "lr-global": "LR network, global top-k", "swap-global": "SWAP network, global top-k"}
PARTS = ("main", "owl", "calibration", "network")
CALIBRATION_SIZES = (16, 32, 64, 128, 256)
CALIBRATION_SEED, VAL_SEED = 10_000, 20_000  # + the model's seed


def block_of(name: str) -> str:
    """OWL's group of a layer: its decoder block (``block_2/fc1/kernel`` → ``block_2``)."""
    return name.split("/")[0]


def jobs(parts, n: int, sizes, methods=None, cells=None) -> list[tuple]:
    """(part, method, cell, N, budget) in run order; ``methods``/``cells`` filter every part."""
    out = []
    for part in parts:
        if part == "main":
            grid = [(m, c, n, "uniform") for m in LAYERWISE for c in CELLS]
        elif part == "owl":
            grid = [(m, c, n, "owl") for m in LAYERWISE for c in ("0.7", "0.8")]
        elif part == "calibration":
            grid = [(m, c, k, "uniform") for m in ("SparseGPT", "default (Swaps)") for c in ("0.5", "2:4")
                    for k in sizes]
        elif part == "network":
            grid = [(m, "0.5", n, NETWORK[m][1]) for m in NETWORK]
        else:
            raise ValueError(f"part {part!r}: expected one of {PARTS}")
        out += [(part, *g) for g in grid if (not methods or g[0] in methods) and (not cells or g[1] in cells)]
    seen, unique = set(), []
    for job in out:  # calibration's N = n rows are main's
        if job[1:] not in seen:
            seen.add(job[1:])
            unique.append(job)
    return unique


def constraint_of(cell: str, budget: str):
    sparsity, nm = CELLS[cell]
    if nm is not None:
        if budget != "uniform":
            raise ValueError(f"cell {cell}: N:M takes no {budget!r} budget")
        return swapjax.NM(*nm)
    if budget == "owl":
        return swapjax.LayerBudgets("owl", owl_group=block_of)
    return swapjax.LayerBudgets() if budget == "uniform" else None  # None: prune's global top-k


def prune_cell(method: str, cell: str, budget: str, loss_fn, params, batch, val_batch=None):
    """One prune of the table: a PruneResult (the LM head dense, ``dense_ends="last"``)."""
    sparsity = CELLS[cell][0]
    constraint = constraint_of(cell, budget)
    if method in LAYERWISE:
        return swapjax.prune_layerwise(loss_fn, params, batch, sparsity=sparsity, method=LAYERWISE[method],
                                       constraint=constraint, sequential=True, dense_ends="last", progress=False)
    return swapjax.prune(loss_fn, params, batch, sparsity=sparsity, method=NETWORK[method][0], constraint=constraint,
                         stages=1, val_batch=val_batch, dense_ends="last", progress=False)


def outlier_spread(loss_fn, params, batch) -> dict:
    """{layer: max_i ‖A_:,i‖₂ / median_i ‖A_:,i‖₂} over the layer's input features, ‖A_:,i‖₂² = H_ii."""
    out = {}
    for name, (H, _) in swapjax.layer_grams(loss_fn, params, batch).items():
        norms = np.sqrt(np.maximum(np.diag(np.asarray(H, np.float64)), 0.0))
        out[name] = round(float(norms.max() / np.median(norms)), 3)
    return out


def main(name: str = "lm-fortunes", seeds=None, parts=PARTS, methods=None, cells=None, n: int = 128,
         sizes=CALIBRATION_SIZES, val_windows: int = 32, eval_windows=None, warmup: bool = True,
         preset=None, runs: Path | None = None, out: Path | None = None) -> dict:
    """Run the missing rows, write them (``out``, atomically after each) and the tables; returns the payload."""
    preset = preset or R.LM_PRESETS[name]
    seeds = tuple(preset.seeds if seeds is None else seeds)
    runs = runs or Path("runs") / name
    smoke = "" if eval_windows is None else "-smoke"  # a smoke run never mixes with the table's file
    out = out or Path(__file__).resolve().parents[1] / f"results/{name}{smoke}.json"
    todo = jobs(parts, n, sizes, methods, cells)
    T = preset.context
    train = text.load(preset.corpus, "train", data_dir=preset.data_dir)
    test_windows = text.windows(text.load(preset.corpus, "test", data_dir=preset.data_dir).tokens, T)
    if eval_windows is not None:
        test_windows = test_windows[:eval_windows]
    header = {"preset": name, "config": json.loads(json.dumps(preset.training_config())), "context": T,
              "test_windows": len(test_windows), "val_windows": val_windows,
              "calibration_seed": f"{CALIBRATION_SEED} + seed", "sequential": True, "dense_ends": "last"}
    payload = json.loads(out.read_text()) if out.exists() else {}
    if payload:
        changed = {k: (payload.get(k), v) for k, v in header.items() if payload.get(k) != v}
        if changed:
            raise ValueError(f"{out}: written with another setting (file, asked: {changed}); pass another --out")
    payload = {**header, "commit": _commit(), "dense": payload.get("dense", {}),
               "outliers": payload.get("outliers", {}), "rows": payload.get("rows", [])}
    done = {_key(r) for r in payload["rows"]}

    model = preset.model()
    loss_fn = next_token_loss(model)  # one object: the walk's compiled segments are reused across calls
    apply = lambda p, tokens: model.apply({"params": p}, tokens)  # noqa: E731  (one object: one compilation)
    dense, calib = {}, {}
    for seed in seeds:
        if (missing := not (runs / f"dense-seed{seed}" / "meta.json").exists()):
            R.log(f"{name}: seed {seed} is not cached in {runs}: training it ({preset.steps} steps)")
        dense[seed] = R.lm_dense(preset, seed, train.tokens, runs, progress=missing)[1]
        calib[seed] = text.sample_windows(train.tokens, T, max([n, *sizes]), seed=CALIBRATION_SEED + seed)
        if str(seed) not in payload["dense"]:
            result = swapjax.perplexity(apply, dense[seed], test_windows, batch_size=preset.eval_batch)
            payload["dense"][str(seed)] = dict(bits_per_byte=round(result.bits_per_byte, 5),
                                               perplexity=round(result.perplexity, 5))
            _write(out, payload)
        if str(seed) not in payload["outliers"]:
            payload["outliers"][str(seed)] = outlier_spread(loss_fn, dense[seed], {"tokens": calib[seed][:n]})
            _write(out, payload)
        R.log(f"seed {seed}: dense {payload['dense'][str(seed)]['bits_per_byte']:.4f} bits/byte; input-feature "
              f"norm spread (max/median) {_spread_range(payload['outliers'][str(seed)])}")

    warmed = set()
    for part, method, cell, size, budget in todo:
        for seed in seeds:
            key = (seed, cell, method, size, budget)
            if key in done:
                continue
            batch = {"tokens": calib[seed][:size]}
            val = ({"tokens": text.sample_windows(train.tokens, T, val_windows, seed=VAL_SEED + seed)}
                   if method in NETWORK else None)
            prune = lambda: prune_cell(method, cell, budget, loss_fn, dense[seed], batch, val)  # noqa: E731
            first = None
            if warmup and key[1:] not in warmed:
                t0 = time.perf_counter()
                jax.block_until_ready(prune().params)
                first = round(time.perf_counter() - t0, 3)
            warmed.add(key[1:])
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = prune()
            jax.block_until_ready(result.params)
            seconds = time.perf_counter() - t0
            load_after = os.getloadavg()[0]
            t1 = time.perf_counter()
            ppl = swapjax.perplexity(apply, result.params, test_windows, batch_size=preset.eval_batch)
            summary = result.summary()
            row = dict(seed=seed, part=part, cell=cell, method=method, calibration=size, budget=budget,
                       bits_per_byte=round(ppl.bits_per_byte, 5), perplexity=round(ppl.perplexity, 5),
                       sparsity=round(summary["total"]["sparsity"], 5), seconds=round(seconds, 3),
                       first_seconds=first, load=[round(load_before, 2), round(load_after, 2)],
                       head_dense=_head_dense(result, dense[seed]), eval_seconds=round(time.perf_counter() - t1, 2))
            if budget == "owl":
                row["layer_sparsity"] = {k: round(v["sparsity"], 4) for k, v in summary.items() if k != "total"}
            payload["rows"].append(row)
            done.add(key)
            _write(out, payload)
            print(f"seed {seed} {cell} {budget} N={size} {method}: {row['bits_per_byte']:.4f} bits/byte, "
                  f"perplexity {row['perplexity']:.3f} (sparsity {row['sparsity']:.4f}, {seconds:.2f} s"
                  f"{'' if first is None else f', first {first:.2f} s'}, load {load_before:.1f})", flush=True)
    tables_md = tables(payload)
    out.with_suffix(".md").write_text(tables_md + "\n")
    print(tables_md)
    return payload


def _key(row: dict) -> tuple:
    return (row["seed"], row["cell"], row["method"], row["calibration"], row["budget"])


def _head_dense(result, params) -> bool:
    """The head's kernel has no mask and is the dense one."""
    head = result.masks.get("head", {}).get("kernel", "absent") if isinstance(result.masks, dict) else "absent"
    return head is None and bool(np.array_equal(np.asarray(result.params["head"]["kernel"]),
                                                np.asarray(params["head"]["kernel"])))


def _spread_range(spread: dict) -> str:
    values = list(spread.values())
    return f"{min(values):.1f}–{max(values):.1f} over {len(values)} layers"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _write(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload["seeds"] = sorted({r["seed"] for r in payload["rows"]} | {int(s) for s in payload["dense"]})
    R.write_json(out, payload)


def _stat(values, digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def tables(payload: dict) -> str:
    """Markdown: bits/byte and perplexity (mean ± std over the seeds), median warm seconds, for each part
    present; the dense network; the input-feature norm spread; the load averages seen."""
    rows = payload["rows"]

    def pick(method, cell, size, budget, field):
        return [r[field] for r in rows if (r["method"], r["cell"], r["calibration"], r["budget"]) ==
                (method, cell, size, budget)]

    dense = payload["dense"]
    seeds = sorted({r["seed"] for r in rows})
    bits_d = [dense[str(s)]["bits_per_byte"] for s in seeds if str(s) in dense]
    ppl_d = [dense[str(s)]["perplexity"] for s in seeds if str(s) in dense]
    lines = [f"{payload['preset']}: test split, {payload['test_windows']} windows of {payload['context']} bytes; "
             f"seeds {', '.join(map(str, seeds)) or '–'} (mean ± std); layer by layer sequential, LM head dense; "
             f"dense {_stat(bits_d, 3)} bits/byte, perplexity {_stat(ppl_d, 2)}", ""]
    main_n = [r["calibration"] for r in rows if r["part"] == "main"]
    n = main_n[0] if main_n else max([r["calibration"] for r in rows], default=128)

    def grid(title, methods, columns, field, digits):
        """columns: [(header, cell, size, budget)]"""
        body = []
        for m in methods:
            cells = [_stat(pick(m, c, k, b, field), digits) for _, c, k, b in columns]
            if any(x != "–" for x in cells):
                body.append(f"| {m} | " + " | ".join(cells) + " |")
        if not body:
            return []
        return [f"**{title}**", "", "| method | " + " | ".join(h for h, *_ in columns) + " |",
                "|---" * (1 + len(columns)) + "|", *body, ""]

    main_cols = [(c, c, n, "uniform") for c in CELLS]
    owl_cols = [(f"{c} {b}", c, n, b) for c in ("0.7", "0.8") for b in ("uniform", "owl")]
    sizes = sorted({r["calibration"] for r in rows if r["method"] in ("SparseGPT", "default (Swaps)")})
    cal_cols = [(f"{c}, N={k}", c, k, "uniform") for c in ("0.5", "2:4") for k in sizes]
    net_cols = [("0.5", "0.5", n, "uniform"), ("0.5 global top-k", "0.5", n, "global top-k")]
    for label, methods, cols in (("uniform budgets, N = %d" % n, LAYERWISE, main_cols),
                                 ("OWL against uniform, N = %d" % n, LAYERWISE, owl_cols),
                                 ("calibration size N", ("SparseGPT", "default (Swaps)"),
                                  cal_cols if len(sizes) > 1 else [])):
        for unit, field, digits in (("bits/byte", "bits_per_byte", 3), ("perplexity", "perplexity", 2),
                                    ("seconds (warm)", "seconds", 2)):
            lines += grid(f"{label}: {unit}", methods, cols, field, digits)
    net_methods = {"LR network": ("LR", "uniform"), "SWAP network": ("SWAP", "uniform"),
                   "LR network, global top-k": ("LR", "global top-k"),
                   "SWAP network, global top-k": ("SWAP", "global top-k")}
    net_rows = []
    for m, (short, budget) in net_methods.items():
        b, p, s = (pick(m, "0.5", n, budget, f) for f in ("bits_per_byte", "perplexity", "seconds"))
        if b:
            net_rows.append(f"| {short} | {budget} | {_stat(b, 3)} | {_stat(p, 2)} | {_stat(s, 2)} |")
    if net_rows:
        lines += [f"**network-wide (swapjax.prune, stages=1) at 0.5, N = {n}**", "",
                  "| method | budget | bits/byte | perplexity | seconds |", "|---|---|---|---|---|", *net_rows, ""]
    outliers = payload["outliers"]
    if outliers:
        kinds = {}  # the layers' role in a block (q, k and v read one input): the range over the blocks
        for name in next(iter(outliers.values())):
            parts = name.split("/")
            role = "/".join(parts[1:-1]) if parts[0].startswith("block_") and len(parts) > 2 else parts[0]
            kinds.setdefault({"key": "query", "value": "query"}.get(role, role), []).append(name)
        label = {"query": "q, k, v"}
        lines += ["**input-feature norm spread max_i ‖A_:,i‖₂ / median_i ‖A_:,i‖₂ of the dense network "
                  "(min–max over the blocks)**", "",
                  "| seed | " + " | ".join(label.get(k, k) for k in kinds) + " |", "|---" * (1 + len(kinds)) + "|"]
        for seed, spread in outliers.items():
            cells = []
            for names in kinds.values():
                v = [spread[x] for x in names if x in spread]
                cells.append("–" if not v else f"{min(v):.1f}" if min(v) == max(v) else f"{min(v):.1f}–{max(v):.1f}")
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    loads = [x for r in rows for x in r["load"]]
    if loads:
        lines.append(f"1-minute load average around the timed prunes: {min(loads):.1f}–{max(loads):.1f} "
                     f"(median {np.median(loads):.1f}); commit {payload.get('commit')}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="lm-fortunes", choices=list(R.LM_PRESETS))
    ap.add_argument("seeds", nargs="*", type=int, help="default: the preset's (0 1 2 3 4)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--methods", nargs="+", choices=list(SHORT),
                    help="; ".join(f"{k}: {v}" for k, v in SHORT.items()))
    ap.add_argument("--cells", nargs="+", choices=list(CELLS))
    ap.add_argument("--n", type=int, default=128, help="calibration windows of main, owl and network")
    ap.add_argument("--calibration-sizes", type=int, nargs="+", default=list(CALIBRATION_SIZES))
    ap.add_argument("--val-windows", type=int, default=32, help="network: held-out windows choosing λ and ε")
    ap.add_argument("--eval-windows", type=int,
                    help="only the first K test windows (a smoke run: results/<preset>-smoke.json)")
    ap.add_argument("--no-warmup", action="store_true", help="no compiling call before the timed one")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if min([args.n, *args.calibration_sizes, args.val_windows, args.eval_windows or 1]) < 1:
        ap.error("--n, --calibration-sizes, --val-windows and --eval-windows must be ≥ 1")
    methods = [SHORT[m] for m in args.methods] if args.methods else None
    main(args.preset, args.seeds or None, parts=args.parts, methods=methods, cells=args.cells, n=args.n,
         sizes=args.calibration_sizes, val_windows=args.val_windows, eval_windows=args.eval_windows,
         warmup=not args.no_warmup, out=args.out)
