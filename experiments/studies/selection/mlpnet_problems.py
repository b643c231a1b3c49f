"""The one-shot MLPNet / Fashion-MNIST problems of the offline studies (support_search.py,
selection_ceiling.py): the dense checkpoints of `reproduce.py --preset mlpnet-fashion-mnist`, the
first N = 1,000 training examples split as `swapjax.prune` splits them by default (every fifth held
out), the held-out score and the test accuracy of a flat w.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/: reproduce.py
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, pytree  # noqa: E402
from swapjax.prune import _example_losses, _split_held_out  # noqa: E402

PRESET = "mlpnet-fashion-mnist"


@dataclass
class Problem:
    seed: int
    model: object
    variables: dict
    loss_fn: object
    batch: dict  # the N examples
    fit: dict  # the examples prune fits (X's rows)
    val: dict  # the held-out examples of its score
    test: data.Dataset

    @property
    def params(self):
        return self.variables["params"]

    @property
    def layout(self):
        return pytree.layout(self.params)

    @property
    def w_bar(self):
        return pytree.flatten(self.params, self.layout)

    def score(self, w):
        """Per-example held-out losses at w, as prune's score."""
        return _example_losses(self.loss_fn, self.layout, 256, self.params, w, self.val)

    def accuracy(self, w) -> float:
        pruned = {**self.variables, "params": pytree.unflatten(w, self.params, self.layout)}
        return round(swapjax.evaluate(self.model, pruned, self.test.x, self.test.y)[0], 5)


def arguments(doc: str, out_name: str) -> argparse.Namespace:
    """The common command line of the studies: --seeds, --runs (the dense checkpoints), --out (<out_name>
    beside the scripts)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=Path("runs/mlpnet-fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / out_name)
    return ap.parse_args()


def problems(seeds, runs: Path):
    """One Problem per seed."""
    preset = R.PRESETS[PRESET]
    train = data.load("fashion_mnist", "train", flatten=True)
    test = data.load("fashion_mnist", "test", flatten=True)
    for seed in seeds:
        model, variables = R.dense_model(preset, PRESET, seed, train, runs, False)
        batch = {"x": jnp.asarray(train.x[:1000]), "y": jnp.asarray(train.y[:1000])}
        fit, val = _split_held_out(batch, None, 0.2)
        yield Problem(seed, model, variables, R.per_example_loss(model, variables), batch, fit, val, test)


def write_csv(out: Path, fields, rows) -> None:
    """The rows into ``out``, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
