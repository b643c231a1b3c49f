"""Reproduce the paper's pruning sweeps: methods × sparsities × gradient noise × seeds.

    .venv/bin/python experiments/reproduce.py --preset mlpnet-fashion-mnist          # CPU, minutes
    .venv/bin/python experiments/reproduce.py --preset mlpnet-fashion-mnist --quick  # `make demo`
    .venv/bin/python experiments/reproduce.py --preset vit-fashion-mnist             # CPU, an hour
    .venv/bin/python experiments/reproduce.py --preset resnet20-cifar10              # GPU-sized
    .venv/bin/python experiments/reproduce.py --preset mobilenetv1-imagenet --synthetic --image-size 32 \
        --methods SWAP-fixed --sparsities 0.9                # the prune step alone, random data
    .venv/bin/python experiments/reproduce.py --preset lm-fortunes   # byte-level GPT: held-out perplexity

For each seed: train the dense model (or restore its checkpoint, orbax, under
runs/<preset>/dense-seed<s>), then for every mode (one-shot; gradual = the cubic
schedule with the preset's number of stages and no fine-tuning; gradual-ft = the
same with one epoch of masked fine-tuning between stages), gradient noise
setting (docs/methods.md), sparsity and method: prune with `swapjax.prune` on the
first N training examples (X's rows, for every method), LR and SWAP choosing λ and ε on
the next 200 (`val_batch`; --val-examples 0: on a fifth of the N), and evaluate on the
test split. One CSV row per run
(runs/<preset>/results.csv), appended as one whole line as soon as the run ends; a
rerun skips the rows already there, so an interrupted sweep resumes (with the same
--val-examples, which runs/<preset>/protocol.json records; another value is an error). Rows are validated
on load: a line cut off by a kill (or otherwise malformed, or a duplicate) is dropped,
reported on stderr and its run redone; the file is then rewritten atomically. Then the table (mean ± std
over seeds) and PNG plots of test accuracy and loss against sparsity, one line
per method with a band of ± one std over seeds.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import swapjax
from swapjax import data, text
from swapjax.models import MLPNet

FIELDS = ["preset", "seed", "mode", "noise", "sparsity", "method", "test_accuracy", "test_loss",
          "dense_test_accuracy", "seconds"]
NOISE = {  # name: (std_scale, prop) of the published noise model (docs/methods.md)
    "none": None, "1σ,10%": (1.0, 0.1), "1σ,25%": (1.0, 0.25), "2σ,10%": (2.0, 0.1),
    "2σ,25%": (2.0, 0.25), "4σ,25%": (4.0, 0.25), "1σ,100%": (1.0, 1.0),
}
METHODS = {  # name: (method, anchor of swapjax.prune: w̄ reset to each stage's start, or kept dense)
    "MP": (swapjax.Magnitude(), "current"),
    "WF": (swapjax.WoodFisher(), "current"),
    "LR": (swapjax.LR(), "current"),  # CHITA++ in gradual modes
    "SWAP": (swapjax.SWAP(), "current"),
    "LR-dense": (swapjax.LR(), "dense"),  # w̄ = the dense weights at every stage: the published SWAP setting
    "SWAP-dense": (swapjax.SWAP(), "dense"),
    # the defaults before held-out selection: absolute λ = 0.01, ε = 0.3, no swap search, dense anchor
    "SWAP-fixed": (swapjax.SWAP(lam=0.01, lam_scale="absolute", epsilon=0.3, patience=None, swap_rounds=0), "dense"),
}


@dataclass(frozen=True)
class Preset:
    dataset: str
    model: callable
    input_shape: tuple
    epochs: int  # dense training
    lr: float
    fisher_examples: int  # N
    stages: int  # gradual mode
    sparsities: tuple = (0.5, 0.7, 0.9, 0.95, 0.98)
    noises: tuple = ("none", "2σ,25%")
    modes: tuple = ("one-shot",)
    seeds: tuple = (0, 1, 2)
    methods: tuple = ("MP", "WF", "LR", "SWAP")
    batch_size: int = 128
    flatten: bool = False
    test_examples: int | None = None
    # the selection's held-out examples: the val_examples training examples after the N of X (prune's val_batch),
    # so that X has the published N rows for every method; 0: prune holds out a fifth of the N instead
    val_examples: int = 200


PRESETS = {
    "mlpnet-fashion-mnist": Preset("fashion_mnist", MLPNet, (784,), epochs=3, lr=1e-3, fisher_examples=1000,
                                   stages=8, modes=("one-shot", "gradual"), flatten=True,
                                   noises=("none", "1σ,25%", "2σ,25%"), seeds=(0, 1, 2, 3, 4)),
    "lenet5-fashion-mnist": Preset("fashion_mnist", lambda: _models().LeNet5(), (28, 28, 1), epochs=3, lr=1e-3,
                                   fisher_examples=1000, stages=8, modes=("one-shot", "gradual"),
                                   noises=("none", "2σ,25%"), seeds=(0, 1, 2, 3, 4)),
    "vit-fashion-mnist": Preset("fashion_mnist", lambda: _models().ViT(), (28, 28, 1), epochs=5, lr=1e-3,
                                fisher_examples=1000, stages=8, sparsities=(0.5, 0.7, 0.9),
                                modes=("one-shot", "gradual"), noises=("none", "2σ,25%"), seeds=(0, 1, 2, 3, 4)),
    "mlpnet-mnist": Preset("mnist", MLPNet, (784,), epochs=5, lr=1e-3, fisher_examples=1000, stages=14,
                           modes=("one-shot", "gradual"), flatten=True, noises=tuple(NOISE)),
    "resnet20-cifar10": Preset("cifar10", lambda: _models().ResNet20(), (32, 32, 3), epochs=100, lr=1e-3,
                               fisher_examples=100, stages=9, modes=("one-shot", "gradual"), noises=tuple(NOISE)),
    # GPU-sized. ImageNet: data.load holds a whole split in memory, so the training split needs a
    # streaming loader (or a pretrained checkpoint restored into dense-seed<s>/) before this runs.
    "mobilenetv1-imagenet": Preset("imagenet2012", lambda: _models().MobileNetV1(), (224, 224, 3), epochs=90,
                                   lr=1e-3, fisher_examples=1000, stages=9, batch_size=256,
                                   noises=("none", "2σ,25%"), test_examples=10000),
}
QUICK = dict(sparsities=(0.5, 0.9, 0.95), noises=("none", "2σ,25%"), modes=("one-shot",), seeds=(0, 1))


def _models():
    import swapjax.models as models

    return models


def log(msg):
    print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


def dense_model(preset: Preset, name: str, seed: int, train_set, out: Path, progress: bool):
    """Train (or restore) the dense model of one seed; returns (model, variables)."""
    model = preset.model()
    variables = model.init(jax.random.key(seed), jnp.zeros((1,) + preset.input_shape))
    variables = swapjax.train(
        model, variables, train_set.x, train_set.y, epochs=preset.epochs, batch_size=preset.batch_size,
        optimizer=optax.adam(preset.lr), key=jax.random.key(seed), checkpoint_dir=str(out / f"dense-seed{seed}"),
        progress=progress,
    )
    return model, variables


def calibration(preset: Preset, train_set) -> tuple[dict, dict | None]:
    """(X's examples, the selection's): the first N training examples, then the next ``val_examples``."""
    n, v = preset.fisher_examples, preset.val_examples
    take = lambda a, b: {"x": jnp.asarray(train_set.x[a:b]), "y": jnp.asarray(train_set.y[a:b])}  # noqa: E731
    return take(0, n), (take(n, n + v) if v else None)


def per_example_loss(model, variables):
    """loss_fn(params, example) for swapjax.prune: BatchNorm (if any) in inference mode."""
    extra = {k: v for k, v in variables.items() if k != "params"}
    flag = {"train": False} if extra else {}

    def loss(params, example):
        logits = model.apply({"params": params, **extra}, example["x"][None], **flag)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])

    return loss


def timed_prune(prune, model, variables, test, warmup: bool = True) -> dict:
    """Run ``prune()`` (a PruneResult) once to compile where ``warmup``, then timed: its test accuracy,
    the sparsity reached and the seconds of the timed call."""
    if warmup:
        jax.block_until_ready(prune().params)
    t0 = time.perf_counter()
    result = prune()
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    accuracy = swapjax.evaluate(model, {**variables, "params": result.params}, test.x, test.y)[0]
    return dict(accuracy=accuracy, sparsity=result.summary()["total"]["sparsity"], seconds=seconds)


def write_json(out: Path, payload) -> None:
    """``payload`` as JSON, atomically (a temporary file, then a rename): a killed run leaves the last whole file."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)


def _valid_row(row: dict) -> str | None:
    """None if a results row is well-formed, else what is wrong with it."""
    if None in row or any(row.get(k) in (None, "") for k in FIELDS):
        return "wrong number of fields"
    try:
        int(row["seed"])
        numbers = {k: float(row[k]) for k in ("sparsity", "test_accuracy", "test_loss", "dense_test_accuracy", "seconds")}
    except ValueError as e:
        return f"not a number ({e})"
    if not all(np.isfinite(v) for v in numbers.values()):
        return "a value is not finite"
    if not (0 <= numbers["sparsity"] < 1 and 0 <= numbers["test_accuracy"] <= 1 and 0 <= numbers["dense_test_accuracy"] <= 1):
        return "a value is out of range"
    return None


def _row_key(row: dict) -> tuple:
    return (str(row["seed"]), row["mode"], row["noise"], str(row["sparsity"]), row["method"])


def _write_atomic(csv_path: Path, rows: list) -> None:
    """Header and rows into a temporary file next to csv_path, then os.replace: all or nothing."""
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, csv_path)


def load_results(csv_path: Path) -> list:
    """The valid rows of results.csv, creating it (header only) if absent or empty.

    Rows are appended one whole line at a time, so a run killed mid-write leaves at most a last
    line without its newline: that line is dropped (its run is redone), as is any malformed or
    duplicate row and a cut-off header; each drop is reported on stderr and the file is rewritten
    atomically with what remains. A file with only valid rows is left byte for byte as it is."""
    if not csv_path.exists():
        _write_atomic(csv_path, [])
        return []
    text = csv_path.read_bytes().decode("utf-8", errors="replace")
    lines = [line for line in re.split(r"(?<=\n)", text) if line]
    header = ",".join(FIELDS)
    if not lines or lines[0].rstrip("\r\n") != header or not lines[0].endswith("\n"):
        if text:
            log(f"{csv_path}: the header is missing or cut off; dropping the file's {len(lines)} line(s): "
                f"{text[:80]!r}")
        _write_atomic(csv_path, [])
        return []
    rows, seen, dropped = [], set(), []
    for number, line in enumerate(lines[1:], start=2):
        if not line.endswith("\n"):
            dropped.append((number, "cut off (no newline at the end)", line))
            continue
        parsed = list(csv.DictReader(io.StringIO(header + "\n" + line)))
        problem = "not one CSV record" if len(parsed) != 1 else _valid_row(parsed[0])
        if problem is None and _row_key(parsed[0]) in seen:
            problem = "a duplicate of an earlier row"
        if problem is not None:
            dropped.append((number, problem, line))
            continue
        seen.add(_row_key(parsed[0]))
        rows.append(parsed[0])
    for number, problem, line in dropped:
        log(f"{csv_path}: dropping line {number} ({problem}): {line.rstrip()!r}; its run will be redone")
    if dropped:
        _write_atomic(csv_path, rows)
    return rows


def append_result(csv_path: Path, row: dict) -> None:
    """Append one row as one whole line with a single write (O_APPEND); if the file does not end
    with a newline (a write cut off earlier), it is repaired first (:func:`load_results`)."""
    buf = io.StringIO()
    csv.DictWriter(buf, FIELDS).writerow(row)
    line = buf.getvalue()
    with open(csv_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        ends_cleanly = f.tell() == 0 or (f.seek(-1, os.SEEK_END) >= 0 and f.read(1) == b"\n")
    if not ends_cleanly or csv_path.stat().st_size == 0:
        load_results(csv_path)
    fd = os.open(csv_path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_protocol(out: Path, preset: Preset) -> None:
    """Rows of one results.csv share the selection's held-out examples: out/protocol.json records them
    (a results.csv without it is from before it existed: --val-examples 0); another value is an error."""
    path, want = out / "protocol.json", {"val_examples": preset.val_examples}
    if path.exists():
        have = json.loads(path.read_text())
    elif (out / "results.csv").exists():
        have = {"val_examples": 0}
    else:
        have = want
    if have != want:
        raise ValueError(f"{out}: its rows were run with --val-examples {have['val_examples']}, this run asks for "
                         f"{want['val_examples']}; pass that value, or --out another directory")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want) + "\n")
    os.replace(tmp, path)


def run(preset_name: str, preset: Preset, out: Path, progress: bool):
    out.mkdir(parents=True, exist_ok=True)
    _same_protocol(out, preset)
    csv_path = out / "results.csv"
    done = {_row_key(r) for r in load_results(csv_path)}

    train_set = data.load(preset.dataset, "train", flatten=preset.flatten)
    test_set = data.load(preset.dataset, "test", flatten=preset.flatten, examples=preset.test_examples)
    log(f"{preset_name}: {train_set!r}, {test_set!r}")
    if preset.fisher_examples + preset.val_examples > len(train_set.y):
        raise ValueError(f"{preset_name}: N = {preset.fisher_examples} examples for X and {preset.val_examples} for "
                         f"the selection need {preset.fisher_examples + preset.val_examples} training examples, the "
                         f"split has {len(train_set.y)}; lower --val-examples")
    grid = [(m, z, s, name) for m in preset.modes for z in preset.noises for s in preset.sparsities
            for name in preset.methods]
    for seed in preset.seeds:
        todo = [g for g in grid if (str(seed), g[0], g[1], str(g[2]), g[3]) not in done]
        if not todo:
            continue
        model, variables = dense_model(preset, preset_name, seed, train_set, out, progress)
        dense_acc, dense_loss = swapjax.evaluate(model, variables, test_set.x, test_set.y)
        log(f"seed {seed}: dense test accuracy {dense_acc:.4f}, loss {dense_loss:.4f}; {len(todo)} runs to do")
        loss_fn = per_example_loss(model, variables)
        fisher, val_batch = calibration(preset, train_set)
        for i, (mode, noise, s, name) in enumerate(todo, 1):
            t0 = time.perf_counter()
            gradual = mode != "one-shot"
            hook = swapjax.make_finetune_hook(
                swapjax.batched_loss(loss_fn), {"x": train_set.x, "y": train_set.y},
                key=jax.random.key(seed), epochs=1, batch_size=preset.batch_size, progress=False,
            ) if mode == "gradual-ft" else None
            method, anchor = METHODS[name]
            result = swapjax.prune(
                loss_fn, variables["params"], fisher, sparsity=s, method=method, anchor=anchor,
                stages=preset.stages if gradual else 1, key=jax.random.key(seed),
                noise=None if NOISE[noise] is None else swapjax.GradientNoise(*NOISE[noise]),
                finetune=hook, val_batch=val_batch, progress=False,
            )
            acc, loss = swapjax.evaluate(model, {**variables, "params": result.params}, test_set.x, test_set.y)
            row = dict(preset=preset_name, seed=seed, mode=mode, noise=noise, sparsity=s, method=name,
                       test_accuracy=round(acc, 5), test_loss=round(loss, 5), dense_test_accuracy=round(dense_acc, 5),
                       seconds=round(time.perf_counter() - t0, 2))
            append_result(csv_path, row)  # one whole line per finished run
            if progress:
                log(f"seed {seed} [{i}/{len(todo)}] {mode}, noise {noise}, sparsity {s}, {name}: "
                    f"test accuracy {acc:.4f} ({row['seconds']}s)")
    rows = load_results(csv_path)
    print(table(rows, preset))
    plot(rows, preset, out)


def _stats(rows, key, **where):
    vals = [float(r[key]) for r in rows if all(str(r[k]) == str(v) for k, v in where.items())]
    return (np.mean(vals), np.std(vals), len(vals)) if vals else (np.nan, np.nan, 0)


def table(rows, preset: Preset) -> str:
    """Test accuracy (%) mean ± std over seeds, one block per (mode, noise)."""
    lines = []
    dense = _stats(rows, "dense_test_accuracy", method=preset.methods[0])
    lines.append(f"dense test accuracy {100 * dense[0]:.2f} ± {100 * dense[1]:.2f} %")
    for mode in preset.modes:
        for noise in preset.noises:
            lines.append(f"\n{mode}, gradient noise {noise}: test accuracy % (mean ± std over seeds)")
            lines.append("| method | " + " | ".join(str(s) for s in preset.sparsities) + " |")
            lines.append("|---|" + "---|" * len(preset.sparsities))
            for name in preset.methods:
                cells = []
                for s in preset.sparsities:
                    m, sd, n = _stats(rows, "test_accuracy", mode=mode, noise=noise, sparsity=s, method=name)
                    cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}" if n else "-")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, preset: Preset, out: Path):
    """test_accuracy.png and test_loss.png: one panel per (mode, noise) that has rows (gradual and noisy
    panels are where SWAP and LR differ: in one-shot pruning without noise z = y and they tie), mean ± std
    over seeds against sparsity, the dense model's test accuracy as a dashed line, and the model, dataset,
    N and seeds in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "imagenet2012": "ImageNet"}
    model_name = type(preset.model()).__name__  # a Flax module: building it creates no parameters
    dataset_name = datasets.get(preset.dataset, preset.dataset)
    seeds = sorted({str(r["seed"]) for r in rows})
    panels = [(m, z) for m in preset.modes for z in preset.noises
              if any(r["mode"] == m and r["noise"] == z for r in rows)] or [(preset.modes[0], preset.noises[0])]
    dense_mean, dense_std, dense_n = _stats(rows, "dense_test_accuracy", method=preset.methods[0])
    for metric in ("test_accuracy", "test_loss"):
        percent = 100.0 if metric == "test_accuracy" else 1.0
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.9), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, (mode, noise) in zip(axes[0], panels):
            for i, name in enumerate(preset.methods):
                st = [_stats(rows, metric, mode=mode, noise=noise, sparsity=s, method=name) for s in preset.sparsities]
                mean = percent * np.array([a for a, _, _ in st])
                std = percent * np.array([b for _, b, _ in st])
                # a marker and size per method, largest first, so that methods that tie (LR and SWAP in
                # one-shot pruning without noise) stay visible on top of each other
                ax.plot(preset.sparsities, mean, marker="osD^v<>"[i % 7], markersize=max(9 - 1.5 * i, 3),
                        label=name)
                ax.fill_between(preset.sparsities, mean - std, mean + std, alpha=0.15)
            if metric == "test_accuracy" and dense_n:
                ax.axhline(percent * dense_mean, color="black", linestyle="--", linewidth=1,
                           label=f"dense ({percent * dense_mean:.1f} %)")
            ax.set_title(f"{model_name} / {dataset_name}\n{mode}, gradient noise {noise}", fontsize=10)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("test accuracy (%)" if metric == "test_accuracy" else "test loss")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{model_name} on {dataset_name}: {metric.replace('_', ' ')} after pruning "
                     f"(N = {preset.fisher_examples} examples, mean ± std over {len(seeds)} seed(s))", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=110)
        plt.close(fig)
    log(f"wrote {out / 'results.csv'}, {out / 'test_accuracy.png'}, {out / 'test_loss.png'}")


# ------------------------------------------------------------------------------------ language models


@dataclass(frozen=True)
class LMPreset:
    """A byte-level GPT (swapjax.models.GPT, vocabulary 256) trained on a swapjax.text corpus.

    Training (seed s): the model initialised with key s; ``steps`` batches of ``batch_size`` windows of
    ``context`` + 1 bytes at uniform random offsets of the training split (np.random.default_rng(s)); the mean
    next-token cross-entropy; AdamW (β₂ = 0.99, weight decay on the kernels and embeddings only), gradients
    clipped to global norm 1, the learning rate warmed up linearly from 0 over ``warmup`` steps, then
    cosine-decayed to lr / 10 at the last step. Evaluation: swapjax.perplexity on the validation and test
    splits, windows of stride ``context`` (every byte after a split's first is a target exactly once)."""

    corpus: str = "fortunes"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128  # T
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seeds: tuple = (0, 1, 2, 3, 4)
    eval_batch: int = 64
    data_dir: str | None = None  # the corpus directory; None: the Debian package's

    def model(self):
        return _models().GPT(vocab=text.VOCAB, d_model=self.d_model, n_layers=self.n_layers,
                             n_heads=self.n_heads, max_len=self.context)

    def training_config(self) -> dict:
        """What decides a seed's trained weights (a cached model trained with another is an error)."""
        return {k: getattr(self, k) for k in ("corpus", "d_model", "n_layers", "n_heads", "context", "steps",
                                              "batch_size", "lr", "warmup", "weight_decay", "data_dir")}


LM_PRESETS = {"lm-fortunes": LMPreset()}
LM_QUICK = dict(steps=200, seeds=(0,))


def lm_loss(model):
    """loss(params, windows (B, T+1)): the mean next-token cross-entropy of the windows (nats)."""

    def loss(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    return loss


def lm_optimizer(preset: LMPreset):
    if not 0 <= preset.warmup < preset.steps:
        raise ValueError(f"warmup={preset.warmup}: must be ≥ 0 and below steps={preset.steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, preset.lr, preset.warmup, preset.steps, preset.lr / 10)
    decay = lambda params: jax.tree_util.tree_map(lambda w: w.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.99, weight_decay=preset.weight_decay, mask=decay))


def lm_dense(preset: LMPreset, seed: int, train_tokens: np.ndarray, out: Path, progress: bool):
    """Train (or restore) the dense GPT of one seed; returns (model, params, meta). Cached in
    out/dense-seed<s>/: params.msgpack (flax.serialization) and meta.json (the training config, the
    training seconds, the mean training loss per tenth of the steps), each written atomically, meta last."""
    from flax import serialization

    model, directory = preset.model(), out / f"dense-seed{seed}"
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, preset.context), jnp.int32))["params"]
    meta_path, params_path = directory / "meta.json", directory / "params.msgpack"
    config = json.loads(json.dumps(preset.training_config()))  # as it reads back from JSON
    if meta_path.exists() and params_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["config"] != config:
            changed = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
            raise ValueError(f"{directory}: trained with another config (cached, asked: {changed}); "
                             f"pass --out another directory or remove it")
        restored = serialization.msgpack_restore(params_path.read_bytes())
        if jax.tree_util.tree_structure(restored) != jax.tree_util.tree_structure(params) or any(
                np.shape(a) != np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(restored),
                                                          jax.tree_util.tree_leaves(params))):
            raise ValueError(f"{params_path}: not the parameters of {type(model).__name__} {config}")
        return model, jax.tree_util.tree_map(jnp.asarray, restored), meta

    loss, opt, T, B = lm_loss(model), lm_optimizer(preset), preset.context, preset.batch_size
    if train_tokens.size < T + 1:
        raise ValueError(f"the training split has {train_tokens.size} bytes, fewer than a window of {T + 1}")

    @jax.jit
    def step(params, state, windows):
        value, grads = jax.value_and_grad(loss)(params, windows)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state, rng, values = opt.init(params), np.random.default_rng(seed), []
    every = max(1, preset.steps // 10)
    t0 = time.perf_counter()
    for i in range(preset.steps):
        starts = rng.integers(0, train_tokens.size - T, B)
        windows = train_tokens[starts[:, None] + np.arange(T + 1)].astype(np.int32)
        params, state, value = step(params, state, windows)
        values.append(value)
        if progress and (i + 1) % every == 0:
            recent = float(np.mean(np.asarray(jnp.stack(values[-every:]))))
            log(f"seed {seed} step {i + 1}/{preset.steps}: training loss {recent:.4f} nats "
                f"({recent / np.log(2):.3f} bits/byte), {time.perf_counter() - t0:.0f}s")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    losses = np.asarray(jnp.stack(values), np.float64)
    curve = [[min(a + every, preset.steps), round(float(losses[a:a + every].mean()), 5)]
             for a in range(0, preset.steps, every)]
    meta = {"config": config, "seed": seed, "train_seconds": round(seconds, 2), "loss_curve": curve,
            "weights": int(sum(np.size(w) for w in jax.tree_util.tree_leaves(params)))}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = params_path.with_suffix(".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    os.replace(tmp, params_path)
    write_json(meta_path, meta)
    return model, params, meta


def lm_run(preset_name: str, preset: LMPreset, out: Path, progress: bool) -> list[dict]:
    """Train (or restore) each seed's GPT and report held-out perplexity and bits per byte: out/dense.json
    (one row per seed) and a table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: text.load(preset.corpus, s, data_dir=preset.data_dir) for s in ("train", "validation", "test")}
    for split in splits.values():
        log(f"{preset_name}: {split!r}")
    held_out = {s: text.windows(splits[s].tokens, preset.context) for s in ("validation", "test")}
    model = preset.model()
    apply = lambda params, tokens: model.apply({"params": params}, tokens)  # noqa: E731  (one object: one compile)
    rows = []
    for seed in preset.seeds:
        _, params, meta = lm_dense(preset, seed, splits["train"].tokens, out, progress)
        t0 = time.perf_counter()
        val, test = (swapjax.perplexity(apply, params, held_out[s], batch_size=preset.eval_batch)
                     for s in ("validation", "test"))
        rows.append(dict(seed=seed, weights=meta["weights"], steps=preset.steps, train_seconds=meta["train_seconds"],
                         final_train_loss=meta["loss_curve"][-1][1],
                         validation_perplexity=round(val.perplexity, 4),
                         validation_bits_per_byte=round(val.bits_per_byte, 4),
                         test_perplexity=round(test.perplexity, 4), test_bits_per_byte=round(test.bits_per_byte, 4),
                         test_bytes=test.tokens, eval_seconds=round(time.perf_counter() - t0, 2)))
        if progress:
            log(f"seed {seed}: test perplexity {test.perplexity:.3f}, {test.bits_per_byte:.4f} bits/byte "
                f"({test.tokens:,} bytes); validation {val.bits_per_byte:.4f} bits/byte")
    write_json(out / "dense.json", {"preset": preset_name, "config": preset.training_config(), "rows": rows})
    print(lm_table(rows, preset_name))
    return rows


def lm_table(rows: list[dict], preset_name: str) -> str:
    """One line per seed and the mean ± std over seeds: held-out perplexity and bits per byte."""
    cols = [("train s", "train_seconds"), ("validation bits/byte", "validation_bits_per_byte"),
            ("test perplexity", "test_perplexity"), ("test bits/byte", "test_bits_per_byte")]
    lines = [f"{preset_name}: dense GPT ({rows[0]['weights']:,} weights, {rows[0]['steps']} steps) on held-out text",
             "| seed | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r[k]:.4g}" for _, k in cols) + " |" for r in rows]
    if len(rows) > 1:
        lines.append("| mean ± std | " + " | ".join(
            f"{np.mean([r[k] for r in rows]):.4g} ± {np.std([r[k] for r in rows]):.2g}" for _, k in cols) + " |")
    return "\n".join(lines)


def synthetic_prune(preset_name: str, preset: Preset, image_size, out: Path, progress: bool) -> dict:
    """The preset's prune step alone, where its data or training is out of reach: the model at its
    random initialisation (seed 0), N = ``fisher_examples`` N(0, 1) inputs (``image_size``² instead
    of the preset's size; MobileNetV1 takes its small-input stem at ≤ 64), one-shot, the first
    method and sparsity. Records seconds, the peak RSS and the mode (``prune(mode="auto")``)."""
    import resource

    model = preset.model()
    shape = preset.input_shape if image_size is None else (image_size, image_size) + preset.input_shape[2:]
    if image_size is not None and image_size <= 64 and hasattr(model, "small_input"):
        model = model.clone(small_input=True)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    n = preset.fisher_examples
    batch = {"x": jax.random.normal(kx, (n,) + shape),
             "y": jax.random.randint(ky, (n,), 0, getattr(model, "num_classes", 10))}
    variables = model.init(kp, batch["x"][:1])
    method, anchor = METHODS[preset.methods[0]]
    t0 = time.perf_counter()
    result = swapjax.prune(per_example_loss(model, variables), variables["params"], batch,
                           sparsity=preset.sparsities[0], method=method, anchor=anchor, progress=progress)
    jax.block_until_ready(result.params)
    kept = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(result.masks))
    row = {"preset": preset_name, "input": "x".join(map(str, shape)), "n": n, "method": preset.methods[0],
           "sparsity": preset.sparsities[0], "mode": result.mode, "kept": kept,
           "seconds": round(time.perf_counter() - t0, 2),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic-prune.json").write_text(json.dumps(row, indent=2) + "\n")
    log(", ".join(f"{k}={v}" for k, v in row.items()))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS) + list(LM_PRESETS), default="mlpnet-fashion-mnist")
    ap.add_argument("--quick", action="store_true", help="the CPU-sized demo: 3 sparsities, 2 noises, 2 seeds")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--modes", nargs="+", choices=["one-shot", "gradual", "gradual-ft"])
    ap.add_argument("--sparsities", type=float, nargs="+")
    ap.add_argument("--noises", nargs="+", choices=list(NOISE))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--synthetic", action="store_true",
                    help="only the prune step, on random inputs and the untrained model (no data, no training)")
    ap.add_argument("--image-size", type=int, help="with --synthetic: inputs of this height and width")
    ap.add_argument("--val-examples", type=int,
                    help="held-out examples of the selection, taken from the training set after the N of X "
                         "(prune's val_batch; the presets: 200); 0: prune holds out a fifth of the N instead")
    args = ap.parse_args()
    if args.preset in LM_PRESETS:  # train and evaluate the dense language model
        unused = [f"--{k.replace('_', '-')}" for k in ("modes", "sparsities", "noises", "methods", "image_size",
                                                     "val_examples") if getattr(args, k) is not None]
        if unused or args.synthetic:
            unused += ["--synthetic"] * args.synthetic
            ap.error(f"{args.preset} takes --quick, --seeds, --out and --quiet; not {' '.join(unused)}")
        preset = replace(LM_PRESETS[args.preset], **(LM_QUICK if args.quick else {}))
        preset = replace(preset, **({"seeds": tuple(args.seeds)} if args.seeds else {}))
        lm_run(args.preset, preset, args.out or Path("runs") / (args.preset + ("-quick" if args.quick else "")),
               progress=not args.quiet)
        return
    preset = PRESETS[args.preset]
    if args.quick:
        preset = replace(preset, **QUICK)
    overrides = {k: tuple(v) for k, v in vars(args).items()
                 if k in ("seeds", "modes", "sparsities", "noises", "methods") and v}
    if args.val_examples is not None:
        overrides["val_examples"] = args.val_examples
    preset = replace(preset, **overrides)
    out = args.out or Path("runs") / (args.preset + ("-quick" if args.quick else ""))
    if args.synthetic:
        synthetic_prune(args.preset, preset, args.image_size, out, progress=not args.quiet)
    else:
        run(args.preset, preset, out, progress=not args.quiet)


if __name__ == "__main__":
    main()
