"""The notebooks run top to bottom (here on the tiny random pipeline, 2 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nb", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_runs(nb, tiny_sd_dir):
    env = dict(os.environ, JATTN_MODEL=str(tiny_sd_dir), JATTN_STEPS="2")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"),
                        str(ROOT / "notebooks" / nb)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "notebook ok" in r.stdout
