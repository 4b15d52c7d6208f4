"""The notebooks run top to bottom in a real Jupyter kernel (here on the tiny random
pipeline, 2 steps), and the quickstart's install cell points at the project's repository."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# What each notebook prints in its last code cell once everything before it has run.
LAST_OUTPUT = {"quickstart.ipynb": "PSNR null-text"}


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts.append(o.data.get("text/plain", ""))
    return "".join(parts)


def test_every_notebook_has_an_expected_last_output():
    assert NOTEBOOKS and {p.name for p in NOTEBOOKS} == set(LAST_OUTPUT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tiny_sd_dir, tmp_path, monkeypatch):
    # The kernel is a child of this process and inherits its environment.
    monkeypatch.setenv("JATTN_MODEL", str(tiny_sd_dir))
    monkeypatch.setenv("JATTN_STEPS", "2")
    nb = nbformat.read(path, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    # One extra cell, run last: which environment the kernel runs in.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('PREFIX', sys.prefix)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first cell that fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    # ipykernel's "python3" spec runs `python`, which jupyter_client maps to sys.executable.
    assert f"PREFIX {sys.prefix}\n" in _text(code[-1].outputs)
    last = code[n_code - 1]
    assert LAST_OUTPUT[path.name] in _text(last.outputs), _text(last.outputs)
    if path.name == "quickstart.ipynb":
        # Display calls render in the kernel: PIL grids as the last expression, treescope.
        assert any("image/png" in o.get("data", {}) for o in last.outputs)
        tree = next(c for c in code if "treescope.display" in c.source)
        assert any("text/html" in o.get("data", {}) for o in tree.outputs), tree.outputs


def _first_code_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_quickstart_installs_from_the_declared_repository():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    repo = project["project"]["urls"]["Repository"]
    src = _first_code_cell(ROOT / "notebooks" / "quickstart.ipynb")
    m = re.search(r'REPO_URL = os\.environ\.get\("JATTN_REPO", "([^"]+)"\)', src)
    assert m, src
    assert m.group(1) == repo
    assert '"jattn @ git+{REPO_URL}"' in src and "import jattn" in src
