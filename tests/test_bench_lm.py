"""experiments/bench/bench_lm.py on a tiny GPT and a synthetic fortune corpus: one row per cell, resume,
the LM head dense, the pruned layers' sparsity measured from the weights."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments" / "bench"))
sys.path.insert(0, str(ROOT / "experiments"))
import bench_lm  # noqa: E402
import reproduce  # noqa: E402

from swapjax import text  # noqa: E402
from swapjax.models import next_token_loss  # noqa: E402


def _corpus(directory: Path, n=300) -> Path:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to the red house".split()
    docs = [" ".join(rng.choice(words, rng.integers(4, 16))) + ".\n" for _ in range(n)]
    directory.mkdir()
    (directory / "one").write_text("%\n".join(docs) + "%\n")
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-block GPT of d = 16 at its random initialisation (lm_dense replaced: no training)."""
    preset = replace(reproduce.LM_PRESETS["lm-fortunes"], d_model=16, n_layers=2, n_heads=2, context=16,
                     seeds=(0,), eval_batch=8, data_dir=str(_corpus(tmp_path_factory.mktemp("c") / "corpus")))
    model = preset.model()

    def lm_dense(preset_, seed, train_tokens, out, progress):
        params = model.init(jax.random.key(seed), jnp.zeros((1, preset.context), jnp.int32))["params"]
        return model, params, {}

    return preset, model, lm_dense


def _leaves(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def test_rows_per_cell_resume_and_the_head_dense(tiny, tmp_path, monkeypatch):
    preset, _, lm_dense = tiny
    monkeypatch.setattr(reproduce, "lm_dense", lm_dense)
    out = tmp_path / "r.json"
    kw = dict(seeds=(0,), parts=("main", "owl"), methods=("magnitude", "SparseGPT"), n=8, eval_windows=4,
              warmup=False, preset=preset, runs=tmp_path / "runs", out=out)
    payload = bench_lm.main("tiny", **kw)
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"]
    keys = [(r["cell"], r["method"], r["budget"]) for r in rows]
    expected = {(c, m, "uniform") for c in bench_lm.CELLS for m in ("magnitude", "SparseGPT")} | {
        (c, m, "owl") for c in ("0.7", "0.8") for m in ("magnitude", "SparseGPT")}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    for r in rows:
        s = 0.5 if ":" in r["cell"] else float(r["cell"])
        assert r["head_dense"] and r["sparsity"] == pytest.approx(s, abs=1e-3), r
        assert r["calibration"] == 8 and np.isfinite(r["bits_per_byte"]) and r["seconds"] > 0
        assert r["bits_per_byte"] == pytest.approx(np.log2(r["perplexity"]), rel=1e-4)
        assert ("layer_sparsity" in r) == (r["budget"] == "owl")
    owl = next(r for r in rows if r["budget"] == "owl")
    assert not any(k.startswith("head") for k in owl["layer_sparsity"])
    assert set(payload["outliers"]["0"]) >= {"block_0/fc1/kernel", "block_1/fc2/kernel", "head/kernel"}
    assert all(v >= 1 for v in payload["outliers"]["0"].values())
    assert "| magnitude |" in out.with_suffix(".md").read_text()

    # a rerun prunes nothing and keeps the rows; another test-window count is refused
    monkeypatch.setattr(bench_lm, "prune_cell", lambda *a, **k: pytest.fail("a done row was pruned again"))
    assert bench_lm.main("tiny", **kw)["rows"] == rows
    with pytest.raises(ValueError, match="test_windows"):
        bench_lm.main("tiny", **{**kw, "eval_windows": 3})


@pytest.mark.parametrize("cell,method", [("0.7", "SparseGPT"), ("2:4", "default (Swaps)"), ("0.6", "magnitude")])
def test_prune_cell_keeps_the_head_and_prunes_every_other_layer_to_the_cell(tiny, cell, method):
    preset, model, lm_dense = tiny
    _, params, _ = lm_dense(preset, 0, None, None, False)
    before = jax.tree_util.tree_map(np.array, params)
    train = text.load("fortunes", "train", data_dir=preset.data_dir)
    batch = {"tokens": text.sample_windows(train.tokens, preset.context, 8, seed=1)}
    result = bench_lm.prune_cell(method, cell, "uniform", next_token_loss(model), params, batch)
    masks, new, old = _leaves(result.masks), _leaves(result.params), _leaves(before)
    assert masks["head/kernel"] is None
    np.testing.assert_array_equal(new["head/kernel"], old["head/kernel"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # the input is not mutated
    kernels = [k for k in new if k.endswith("kernel") and not k.startswith("head")]
    assert len(kernels) == 12  # q, k, v, out, fc1, fc2 of 2 blocks
    for k in kernels:
        w = np.asarray(new[k])
        if ":" in cell:  # n of every m along the inputs: the leading axes (the out projection's two)
            n, m = map(int, cell.split(":"))
            d_in = int(np.prod(w.shape[:2])) if k.endswith("out/kernel") else w.shape[0]
            groups = (w.reshape(d_in, -1) != 0).reshape(d_in // m, m, -1).sum(axis=1)
            assert groups.max() <= n and np.count_nonzero(w) >= 0.95 * w.size * n / m, k
        else:
            mask = np.asarray(masks[k])
            assert np.all(w[~mask] == 0) and np.count_nonzero(w) == mask.sum(), k
            assert abs(1 - np.count_nonzero(w) / w.size - float(cell)) <= 1 / w.size, k  # s_l = s, to a count


def test_jobs_cover_the_issue_grid_once():
    all_jobs = bench_lm.jobs(bench_lm.PARTS, 128, bench_lm.CALIBRATION_SIZES)
    keys = [j[1:] for j in all_jobs]
    assert len(keys) == len(set(keys))
    count = lambda part: sum(j[0] == part for j in all_jobs)  # noqa: E731
    # 5 methods x 6 cells; 5 x 2 OWL; 2 methods x 2 cells x 4 sizes (N = 128 is main's); 4 network-wide
    assert (count("main"), count("owl"), count("calibration"), count("network")) == (30, 10, 16, 4)
    assert {j[2] for j in bench_lm.jobs(["main"], 128, (), methods=["Wanda"], cells=["2:4", "0.8"])} == {"2:4", "0.8"}
    with pytest.raises(ValueError, match="N:M"):
        bench_lm.constraint_of("2:4", "owl")


def test_network_wide_prune_keeps_the_head_dense(tiny):
    preset, model, lm_dense = tiny
    _, params, _ = lm_dense(preset, 0, None, None, False)
    train = text.load("fortunes", "train", data_dir=preset.data_dir)
    batch, val = ({"tokens": text.sample_windows(train.tokens, preset.context, 8, seed=s)} for s in (1, 2))
    result = bench_lm.prune_cell("LR network", "0.5", "uniform", next_token_loss(model), params, batch, val)
    masks, new = _leaves(result.masks), _leaves(result.params)
    assert masks["head/kernel"] is None and np.array_equal(new["head/kernel"], params["head"]["kernel"])
    for k in (k for k in new if k.endswith("kernel") and not k.startswith("head")):
        assert abs(1 - np.count_nonzero(new[k]) / new[k].size - 0.5) <= 1 / new[k].size, k


def test_the_command_line_names_every_method():
    assert sorted(bench_lm.SHORT.values()) == sorted([*bench_lm.LAYERWISE, *bench_lm.NETWORK])
