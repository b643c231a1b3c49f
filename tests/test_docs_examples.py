"""The documentation's code runs as written: README and docs pages, the API page's coverage, the notebook."""
from __future__ import annotations

import doctest
import inspect
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import swapjax

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), re.S | re.M)


def _run(page: str, tmp_path, monkeypatch, ns=None) -> dict:
    """Run the page's ```python blocks in order in one namespace (in tmp_path: examples may write files);
    ``ns``: continue the namespace of an earlier page."""
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(page)
    assert blocks, f"{page}: no python block"
    ns = {"__name__": "__docs__"} if ns is None else ns
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[block {i}]", "exec"), ns)
    return ns


def _zero_off_mask(params, masks) -> bool:
    import jax

    pairs = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda m, p: None if m is None else bool(np.all(np.asarray(p)[~np.asarray(m)] == 0)),
                               masks, params, is_leaf=lambda m: m is None))
    return bool(pairs) and all(pairs)


def test_readme_examples(tmp_path, monkeypatch):
    ns = _run("README.md", tmp_path, monkeypatch)
    # linen: exactly k of p kernel weights kept, the rest exactly 0, biases untouched; better than chance
    result, p = ns["result"], 64 * 32 + 32 * 10
    assert result.summary()["total"] == {"kept": swapjax.kept_count(0.9, p), "total": p,
                                         "sparsity": pytest.approx(0.9, abs=1e-3), "constraint": "global top-k"}
    assert _zero_off_mask(result.params, result.masks) and result.masks["Dense_0"]["bias"] is None
    np.testing.assert_array_equal(result.params["Dense_0"]["bias"], ns["variables"]["params"]["Dense_0"]["bias"])
    assert ns["accuracy"] > 0.3
    # NNX: the module holds the pruned weights
    net, masks = ns["net"], ns["nnx_result"].masks
    assert np.array_equal(np.asarray(net.l1.kernel[...]) != 0, np.asarray(masks["l1"]["kernel"].value))
    assert ns["nnx_result"].summary()["total"]["kept"] == swapjax.kept_count(0.9, p)
    # a transformer: every kernel pruned, exactly k kept; tokens, positions and biases untouched
    vit = ns["vit_result"]
    assert vit.summary()["total"]["kept"] == swapjax.kept_count(0.7, 9024)
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): m for path, m in
            jax.tree_util.tree_flatten_with_path(vit.masks, is_leaf=lambda m: m is None)[0]}
    assert all((m is not None) == name.endswith("kernel") for name, m in flat.items())
    assert {"cls", "pos_embedding", "attn/query/bias"} <= set(flat) and _zero_off_mask(vit.params, vit.masks)
    # fine-tuning: the tuned weights moved, the pruned ones are still exactly 0
    gradual, tuned = ns["gradual"], ns["tuned"]
    assert len(gradual.info) >= 1 and _zero_off_mask(tuned["params"], gradual.masks)
    assert not np.allclose(tuned["params"]["Dense_0"]["kernel"], gradual.params["Dense_0"]["kernel"])
    # bare problem: a k-sparse w over the p kernel weights
    w, k = np.asarray(ns["w"]), ns["k"]
    assert ns["X"].shape == (500, p) and w.shape == (p,) and 0 < np.count_nonzero(w) <= k
    _check_transformers_page(_run("docs/models/transformers.md", tmp_path, monkeypatch, ns))


def _check_transformers_page(ns):
    """The select recipes of docs/models/transformers.md, on the README's TinyViT and the page's GPT."""
    # the careless select is one error naming every leaf outside the default rule, and the way out
    assert all(name in ns["message"] for name in ("wte/embedding", "wpe", "head/bias", "block_0/fc1/bias",
                                                   "swapjax.exclude"))
    gpt_kernels = {f"block_{i}/{name}/kernel" for i in range(2) for name in ("attn/query", "attn/key",
                                                                             "attn/value", "attn/out", "fc1", "fc2")}
    for result in (ns["no_head"], ns["same"]):
        summary = result.summary()
        assert set(summary) - {"total"} == gpt_kernels and _zero_off_mask(result.params, result.masks)
        p = sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(ns["gpt_params"])[0]
                if jax.tree_util.keystr(path, simple=True, separator="/") in gpt_kernels)
        assert summary["total"]["kept"] == swapjax.kept_count(0.5, p)
        np.testing.assert_array_equal(result.params["head"]["kernel"], ns["gpt_params"]["head"]["kernel"])
    np.testing.assert_array_equal(np.asarray(ns["no_head"].masks["block_1"]["fc1"]["kernel"]),
                                  np.asarray(ns["same"].masks["block_1"]["fc1"]["kernel"]))
    vit = ns["first_last_dense"].summary()
    assert set(vit) == {"total", "attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel",
                        "fc1/kernel", "fc2/kernel"}
    assert vit["total"]["kept"] == swapjax.kept_count(0.7, 3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)
    with pytest.raises(ValueError, match=r"exclude\('hed'\) matches none of the prunable leaves"):
        swapjax.prune(ns["gpt_loss"], ns["gpt_params"], {"t": ns["tokens"]}, select=swapjax.exclude("hed"))


def test_layers_page(tmp_path, monkeypatch):
    """The einsum weights and every slice of the scanned stack are layers (the table, biases and scales are
    not), and each slice's 2:4 groups run along its own inputs; to_nm packs every pruned leaf."""
    ns = _run("docs/models/layers.md", tmp_path, monkeypatch)
    found, result = ns["found"], ns["result"]
    names = [layer.name for layer in found.layers]
    for leaf in ("q_w", "kv_w", "o_w", "Dense_0/kernel", "Dense_1/kernel"):
        assert [f"ScanBlock_0/{leaf}[{i}]" in names for i in range(3)] == [True] * 3
    assert names[-1] == "head" and "Embed_0/embedding" in found.left_dense
    masks = dict(zip([swapjax.pytree.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        result.masks, is_leaf=lambda m: m is None)[0]], jax.tree_util.tree_leaves(result.masks, is_leaf=lambda m: m is None)))
    assert masks["Embed_0/embedding"] is None and masks["ScanBlock_0/RMSNorm_0/scale"] is None
    for layer in found.layers:
        kept = np.asarray(masks[layer.path]).ravel()[layer.index]
        assert np.all(kept.reshape(layer.d_in // 4, 4, layer.d_out).sum(axis=1) == 2), layer.name
    assert set(ns["packed"]) == set(found.paths)


def test_pytrees_page(tmp_path, monkeypatch):
    ns = _run("docs/models/pytrees.md", tmp_path, monkeypatch)
    assert ns["result"].masks["b1"] is None and _zero_off_mask(ns["result"].params, ns["result"].masks)
    assert set(ns["first"].summary()) == {"w1", "total"}
    assert ns["message"].startswith("select: chose b1 (32,), with ndim < 2")
    assert set(ns["with_bias"].summary()) == {"b1", "w1", "total"}


def test_batch_axis_page(tmp_path, monkeypatch):
    ns = _run("docs/models/batch-axis.md", tmp_path, monkeypatch)
    result = ns["result"]
    assert set(result.summary()) == {"Conv_0/kernel", "Dense_0/kernel", "total"}
    assert result.summary()["total"]["kept"] == swapjax.kept_count(0.8, 3 * 3 * 8 + 512 * 10)
    assert ns["accuracy"] > 0.3


def test_saving_page(tmp_path, monkeypatch):
    ns = _run("docs/saving.md", tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "mlp-90").is_dir()
    assert ns["swapjax"].bcoo_bytes(ns["sparse"])["total"] == {"dense_bytes": 9472, "sparse_bytes": 2844}  # as the page says
    np.testing.assert_array_equal(ns["dense"]["Dense_0"]["kernel"], ns["result"].params["Dense_0"]["kernel"])


_DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _doctest(test: doctest.DocTest) -> doctest.TestResults:
    """Run one doctest; assert nothing failed, with the report as the message."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=_DOCTEST_FLAGS)
    result = runner.run(test, out=report.append, clear_globs=False)
    assert result.failed == 0, "".join(report)
    return result


def _with_docstring_example() -> list[str]:
    return [n for n in swapjax.__all__ if ">>>" in (inspect.getdoc(getattr(swapjax, n)) or "")]


def _api_page_sections() -> dict[str, str]:
    """{name: the text from its `::: swapjax.NAME` directive to the next directive or heading}."""
    text = (ROOT / "docs/api.md").read_text()
    parts = re.split(r"^(::: swapjax\.(?:prune\.)?\w+|## .*)$", text, flags=re.M)
    return {m.rsplit(".", 1)[1]: body for m, body in zip(parts[1::2], parts[2::2]) if m.startswith(":::")}


def test_every_public_name_has_an_example():
    """In its docstring (rendered by mkdocstrings) or, for the few whose module this suite does not own
    the docstring of, as a ```pycon block under its entry on the API page."""
    on_page = {name for name, body in _api_page_sections().items() if "```pycon\n>>> " in body}
    missing = set(swapjax.__all__) - set(_with_docstring_example()) - on_page
    assert missing == set()


@pytest.mark.parametrize("name", _with_docstring_example())
def test_docstring_examples_run_as_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write checkpoints
    obj = getattr(swapjax, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"swapjax.{name}", globs={})
    assert tests and sum(len(t.examples) for t in tests) >= 2
    for test in tests:
        _doctest(test)


def test_api_page_examples_run_as_written(tmp_path, monkeypatch):
    """The ```pycon blocks of docs/api.md, in order, in one namespace (later examples reuse earlier names)."""
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs/api.md").read_text()
    blocks = re.findall(r"^```pycon\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 9
    globs: dict = {}
    for i, block in enumerate(blocks):
        test = doctest.DocTestParser().get_doctest(block, globs, f"docs/api.md[pycon {i}]", "docs/api.md", 0)
        _doctest(test)
        globs.update(test.globs)


def test_api_page_lists_every_public_name():
    text = (ROOT / "docs/api.md").read_text()
    documented = set(re.findall(r"^::: swapjax\.(?:prune\.)?(\w+)$", text, re.M))
    assert set(swapjax.__all__) - documented == set()


def test_docs_cite_no_missing_file():
    """Relative links and `--8<--` snippets in the docs point at files that exist."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page}: link to missing {target}"
        for snippet in re.findall(r'^--8<-- "([^":]+)', text, re.M):
            assert (ROOT / snippet).exists(), f"{page}: snippet from missing {snippet}"
