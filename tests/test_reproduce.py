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
    """Both modes, both noises, both methods at one sparsity (8 runs); the slow test adds a second sparsity."""
    _tiny_sweep(tmp_path, capsys, sparsities=(0.5,))


@pytest.mark.slow
def test_tiny_sweep_two_sparsities(synthetic_fashion, tmp_path, capsys):
    _tiny_sweep(tmp_path, capsys, sparsities=(0.5, 0.9))


def test_val_examples_are_the_training_examples_after_the_n_of_x(synthetic_fashion, tmp_path, monkeypatch):
    """--val-examples V: prune gets X's N examples as the batch and the next V as val_batch (0: no val_batch);
    more examples than the split holds, or another protocol in a results directory, is an error before any run."""
    seen, prune = [], swapjax.prune

    def spy(loss_fn, params, batch, **kw):
        seen.append((np.asarray(batch["x"]), None if kw["val_batch"] is None else np.asarray(kw["val_batch"]["x"])))
        return prune(loss_fn, params, batch, **kw)

    monkeypatch.setattr(reproduce.swapjax, "prune", spy)
    preset = replace(reproduce.PRESETS["mlpnet-fashion-mnist"], epochs=1, fisher_examples=32, sparsities=(0.5,),
                     noises=("none",), modes=("one-shot",), seeds=(0,), methods=("LR",), batch_size=64)
    train = reproduce.data.load("fashion_mnist", "train", flatten=True)
    reproduce.run("tiny", replace(preset, val_examples=16), tmp_path / "val", progress=False)
    reproduce.run("tiny", replace(preset, val_examples=0), tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="need 544 training examples, the split has 512"):  # before any training
        reproduce.run("tiny", replace(preset, val_examples=512), tmp_path / "big", progress=False)
    assert len(seen) == 2 and not (tmp_path / "big" / "dense-seed0").exists()
    # a results directory keeps one protocol: resuming it with another is an error, before any run
    with pytest.raises(ValueError, match="run with --val-examples 16, this run asks for 0"):
        reproduce.run("tiny", replace(preset, val_examples=0), tmp_path / "val", progress=False)
    (tmp_path / "val" / "protocol.json").unlink()  # a results.csv from before protocol.json: --val-examples 0
    with pytest.raises(ValueError, match="run with --val-examples 0, this run asks for 16"):
        reproduce.run("tiny", replace(preset, val_examples=16), tmp_path / "val", progress=False)
    assert len(seen) == 2
    (x_val_run, val), (x_plain, no_val) = seen
    np.testing.assert_array_equal(x_val_run, train.x[:32])
    np.testing.assert_array_equal(x_plain, train.x[:32])
    np.testing.assert_array_equal(val, train.x[32:48])
    assert no_val is None


def _tiny_sweep(tmp_path, capsys, sparsities):
    preset = replace(reproduce.PRESETS["mlpnet-fashion-mnist"], epochs=1, fisher_examples=32, stages=2,
                     sparsities=sparsities, noises=("none", "2σ,25%"), modes=("one-shot", "gradual"),
                     seeds=(0,), methods=("MP", "LR"), batch_size=64)
    reproduce.run("tiny", preset, tmp_path, progress=False)
    rows = _rows(tmp_path / "results.csv")
    keys = {(r["mode"], r["noise"], r["sparsity"], r["method"]) for r in rows}
    assert len(rows) == len(keys) == len(sparsities) * 2 * 2 * 2
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


# ---------------------------------------------------------------------------
# results.csv survives a kill at any byte


def _sample_rows(n=4):
    rows = []
    for i in range(n):
        rows.append(dict(preset="tiny", seed=i % 2, mode="one-shot", noise=("none", "1σ,25%")[i % 2],
                         sparsity=(0.5, 0.9, 0.95, 0.98)[i], method=("MP", "SWAP")[i % 2],
                         test_accuracy=0.5 + i / 100, test_loss=1.25 + i, dense_test_accuracy=0.875, seconds=3.45))
    return rows


def _as_strings(row):
    return {k: str(v) for k, v in row.items()}


def test_results_csv_cut_at_every_byte_loses_and_corrupts_nothing(tmp_path, capsys):
    path = tmp_path / "results.csv"
    rows = _sample_rows()
    assert reproduce.load_results(path) == [] and path.read_bytes() == (",".join(reproduce.FIELDS) + "\r\n").encode()
    for row in rows:
        reproduce.append_result(path, row)
    full = path.read_bytes()
    assert reproduce.load_results(path) == [_as_strings(r) for r in rows]
    assert path.read_bytes() == full  # a clean file is left byte for byte
    line_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]  # header, then one per row
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        complete = sum(end <= cut for end in line_ends[1:])
        loaded = reproduce.load_results(path)
        assert loaded == [_as_strings(r) for r in rows[:complete]], cut
        err = capsys.readouterr().err
        clean = cut in line_ends or cut == 0
        assert ("dropping" in err) == (not clean), (cut, err)
        # the repaired file ends with a whole line; the resumed sweep appends the missing rows
        for row in rows[complete:]:
            reproduce.append_result(path, row)
        assert reproduce.load_results(path) == [_as_strings(r) for r in rows], cut
        assert path.read_bytes() == full, cut


def test_results_csv_malformed_and_duplicate_rows_are_dropped_and_reported(tmp_path, capsys):
    path = tmp_path / "results.csv"
    reproduce.load_results(path)
    good = _sample_rows(2)
    for row in good:
        reproduce.append_result(path, row)
    with open(path, "a", newline="") as f:
        f.write("tiny,0,one-shot,none,0.5,MP,0.55\r\n")  # too few fields
        f.write("tiny,0,one-shot,none,0.7,MP,nan,1.0,0.9,1.0\r\n")  # not finite
        f.write("tiny,0,one-shot,none,0.7,MP,abc,1.0,0.9,1.0\r\n")  # not a number
        f.write("tiny,0,one-shot,none,0.5,MP,0.1,1.0,0.9,1.0\r\n")  # a duplicate of the first row's key
    assert reproduce.load_results(path) == [_as_strings(r) for r in good]
    err = capsys.readouterr().err
    assert err.count("dropping line") == 4 and "wrong number of fields" in err and "duplicate" in err
    assert reproduce.load_results(path) == [_as_strings(r) for r in good]
    assert capsys.readouterr().err == ""  # repaired once, atomically


def test_a_sweep_killed_mid_row_resumes_with_every_row_valid(synthetic_fashion, tmp_path, capsys, monkeypatch):
    # the plots of a whole CSV are checked by the tiny sweep (the rows here are the same after each resume);
    # matplotlib would take about a second per rerun
    monkeypatch.setattr(reproduce, "plot", lambda rows, preset, out: None)
    preset = replace(reproduce.PRESETS["mlpnet-fashion-mnist"], epochs=1, fisher_examples=32, stages=2,
                     sparsities=(0.5, 0.9), noises=("none",), modes=("one-shot",), seeds=(0,), methods=("MP",),
                     batch_size=64)
    reproduce.run("tiny", preset, tmp_path, progress=False)
    path = tmp_path / "results.csv"
    full = path.read_bytes()
    reference = _rows(path)
    assert len(reference) == 2
    last_row_start = full.rstrip(b"\r\n").rfind(b"\n") + 1
    accuracy_cut = full.index(b",", full.index(b",MP,", last_row_start) + 4) - 2  # inside the test accuracy
    rng = np.random.default_rng(0)
    for cut in (0, 10, accuracy_cut, len(full) - 1, int(rng.integers(len(full.split(b"\n")[0]) + 1, len(full)))):
        path.write_bytes(full[:cut])
        capsys.readouterr()
        reproduce.run("tiny", preset, tmp_path, progress=False)
        rows = _rows(path)
        assert [{k: r[k] for k in ("seed", "mode", "noise", "sparsity", "method")} for r in rows] == \
            [{k: r[k] for k in ("seed", "mode", "noise", "sparsity", "method")} for r in reference], cut
        assert all(reproduce._valid_row(r) is None for r in rows)
        for r, ref in zip(rows, reference):  # the redone run gives the same accuracy (deterministic on CPU)
            assert r["test_accuracy"] == ref["test_accuracy"], cut
        if cut == accuracy_cut:
            assert "dropping line 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the language-model preset (lm-fortunes) at a tiny size


def _fortune_dir(directory: Path, n=400):
    """Fortune files of simple sentences (a learnable corpus shaped like Debian's fortunes)."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to the red house".split()
    docs = [" ".join(rng.choice(words, rng.integers(4, 16))) + ".\n" for _ in range(n)]
    directory.mkdir()
    (directory / "one").write_text("%\n".join(docs[: n // 2]) + "%\n")
    (directory / "two").write_text("%\n".join(docs[n // 2:]) + "%\n")
    return directory


def test_lm_preset_trains_reports_held_out_perplexity_and_restores(tmp_path, capsys, monkeypatch):
    """Training loss falls; held-out perplexity finite and below a uniform guess's 256; bits per byte its
    log2; the rerun restores the cached model (no training), another training config is an error."""
    import json

    from swapjax import text

    corpus = _fortune_dir(tmp_path / "corpus")
    preset = replace(reproduce.LM_PRESETS["lm-fortunes"], d_model=16, n_layers=1, n_heads=2, context=16, steps=40,
                     batch_size=8, warmup=4, seeds=(0,), eval_batch=32, data_dir=str(corpus))
    (row,) = reproduce.lm_run("tiny", preset, tmp_path / "out", progress=False)
    meta = json.loads((tmp_path / "out" / "dense-seed0" / "meta.json").read_text())
    curve = [loss for _, loss in meta["loss_curve"]]
    assert len(curve) == 10 and meta["loss_curve"][-1][0] == 40
    assert curve[-1] < curve[0] - 1.0  # nats
    assert np.isfinite(row["test_perplexity"]) and 1 < row["test_perplexity"] < 256
    assert row["test_bits_per_byte"] == pytest.approx(np.log2(row["test_perplexity"]), rel=1e-3)
    assert row["test_bytes"] == (text.load("fortunes", "test", data_dir=corpus).tokens.size - 1) // 16 * 16
    assert row["weights"] == meta["weights"] and "| 0 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "dense.json").read_text())["rows"] == [row]

    monkeypatch.setattr(reproduce, "lm_optimizer", lambda preset: pytest.fail("a cached seed was trained again"))
    (again,) = reproduce.lm_run("tiny", preset, tmp_path / "out", progress=False)
    assert {**again, "eval_seconds": 0} == {**row, "eval_seconds": 0}
    with pytest.raises(ValueError, match=r"trained with another config.*'lr': \(0.003, 0.001\)"):
        reproduce.lm_run("tiny", replace(preset, lr=1e-3), tmp_path / "out", progress=False)


def test_lm_preset_refuses_the_pruning_options(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "lm-fortunes", "--sparsities", "0.5"])
    with pytest.raises(SystemExit):
        reproduce.main()
    assert "--sparsities" in capsys.readouterr().err
