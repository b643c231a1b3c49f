"""experiments/reproduce.py at a tiny size: the grid of runs, resume, and one row checked independently."""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import reproduce  # noqa: E402

import swapjax  # noqa: E402
from swapjax import data, pytree  # noqa: E402


@pytest.fixture
def synthetic_fashion(monkeypatch):
    """A learnable 10-class problem shaped like flat Fashion-MNIST, in place of data.load."""
    centres = np.random.default_rng(0).normal(size=(10, 784)).astype(np.float32)

    def fake_load(name, split, flatten=False, examples=None):  # the same arrays on every call
        rng = np.random.default_rng(1 if split == "train" else 2)
        n = 512 if split == "train" else 200
        y = rng.integers(0, 10, n).astype(np.int32)
        x = np.clip(0.5 + 0.2 * centres[y] + 0.1 * rng.normal(size=(n, 784)), 0, 1).astype(np.float32)
        return data.Dataset(x, y, 10, name, split, "synthetic")

    monkeypatch.setattr(reproduce.data, "load", fake_load)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_grid_resume_and_an_independent_row(synthetic_fashion, tmp_path, capsys):
    preset = replace(reproduce.PRESETS["mlpnet-fashion-mnist"], epochs=1, fisher_examples=32, stages=2,
                     sparsities=(0.5, 0.9), noises=("none", "2σ,25%"), modes=("one-shot", "gradual"),
                     seeds=(0,), methods=("MP", "LR"), batch_size=64)
    reproduce.run("tiny", preset, tmp_path, progress=False)
    rows = _rows(tmp_path / "results.csv")
    keys = {(r["mode"], r["noise"], r["sparsity"], r["method"]) for r in rows}
    assert len(rows) == len(keys) == 2 * 2 * 2 * 2
    assert all(0 <= float(r["test_accuracy"]) <= 1 and float(r["test_loss"]) > 0 for r in rows)
    assert (tmp_path / "test_accuracy.png").stat().st_size > 0 and (tmp_path / "test_loss.png").stat().st_size > 0
    assert "| MP |" in capsys.readouterr().out

    # One-shot magnitude pruning at 0.5, recomputed from the restored dense checkpoint with NumPy.
    train = reproduce.data.load("fashion_mnist", "train", flatten=True)
    test = reproduce.data.load("fashion_mnist", "test", flatten=True)
    model, variables = reproduce.dense_model(preset, "tiny", 0, train, tmp_path, progress=False)
    lay = pytree.layout(variables["params"])
    w = np.asarray(pytree.flatten(variables["params"], lay))
    keep = np.argsort(-np.abs(w), kind="stable")[: swapjax.kept_count(0.5, w.size)]
    pruned = pytree.unflatten(np.where(np.isin(np.arange(w.size), keep), w, 0), variables["params"], lay)
    h = test.x
    for name in ("fc1", "fc2"):
        h = np.maximum(h @ np.asarray(pruned[name]["kernel"]), 0)
    acc = np.mean(np.argmax(h @ np.asarray(pruned["fc3"]["kernel"]), 1) == test.y)
    row = next(r for r in rows if (r["mode"], r["noise"], r["sparsity"], r["method"]) == ("one-shot", "none", "0.5", "MP"))
    assert float(row["test_accuracy"]) == pytest.approx(acc, abs=1e-6)

    # A rerun finds every row done: no new rows.
    reproduce.run("tiny", preset, tmp_path, progress=False)
    assert len(_rows(tmp_path / "results.csv")) == len(rows)
