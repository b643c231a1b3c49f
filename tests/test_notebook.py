"""docs/notebooks/quickstart.ipynb runs top to bottom (small settings: SWAPJAX_NOTEBOOK_QUICK=1)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPJAX_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "%pip install" in nb.cells[1].source and "except ImportError" in nb.cells[1].source  # Colab install cell
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert _text(nb.cells[1]) == ""  # swapjax was importable: nothing installed
    # one row per method at the quick setting's sparsity, accuracies in [0, 1]
    rows = re.findall(r"^(MP|LR|SWAP)\s+0\.90\s+([\d.]+)%\s+([\d.]+)%$", out, re.M)
    assert [r[0] for r in rows] == ["MP", "LR", "SWAP"]
    assert all(0 <= float(a) <= 100 and 0 <= float(b) <= 100 for _, a, b in rows)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # the sparse export kept exactly the kept weights: 10 % of 64·64 + 64·10
    assert re.search(r"'Dense_0/kernel': \d+, 'Dense_1/kernel': \d+", out)
    nse = sum(int(n) for n in re.findall(r"'Dense_\d/kernel': (\d+)", out))
    assert nse == round(0.1 * (64 * 64 + 64 * 10))


def test_install_cell_without_swapjax_asks_for_the_source_or_pip_installs_it(monkeypatch):
    """Where swapjax cannot be imported: no SWAPJAX_SOURCE -> a RuntimeError saying what to set; with it, the
    `%pip install "swapjax[demo] @ <source>"` line runs (the magic is stubbed: no network)."""
    import sys

    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = TransformerManager().transform_cell(nb.cells[1].source)
    installed = sys.modules.get("swapjax") or __import__("swapjax")
    monkeypatch.setitem(sys.modules, "swapjax", None)  # `import swapjax` raises ImportError
    monkeypatch.delenv("SWAPJAX_SOURCE", raising=False)
    with pytest.raises(RuntimeError, match="swapjax is not installed: set SWAPJAX_SOURCE"):
        exec(code, {})
    calls = []

    class _Shell:
        def run_line_magic(self, name, line, *args):
            calls.append((name, line))
            sys.modules["swapjax"] = installed  # "installed": the import after the magic finds it

    monkeypatch.setenv("SWAPJAX_SOURCE", "file:///content/swapjax-0.1.0-py3-none-any.whl")
    ns = {"get_ipython": lambda: _Shell()}
    exec(code, ns)
    assert calls == [("pip", 'install --quiet "swapjax[demo] @ {SWAPJAX_SOURCE}"')]
    assert ns["SWAPJAX_SOURCE"] == "file:///content/swapjax-0.1.0-py3-none-any.whl" and ns["swapjax"] is installed
