"""The layer rule of jattn (../shared/DESIGN.md): arrows only point down,

    methods → sampling → policy → models → io

A module may import jattn modules of its own layer or of the layers below it, never one
above it, nor the application level (``jattn`` itself, ``jattn.pipeline``, ``jattn.cli``,
``jattn.world``, ``jattn.train``, …). Checked on the source (an AST scan of every import
statement, function-local imports included), so a lazy import that hides a cycle at import
time still fails here. If this fails, move the shared helper down (e.g. word → token
positions live in ``jattn.io.words``), don't import up.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jattn"
LAYERS = ("io", "models", "policy", "sampling", "methods")  # bottom to top
RANK = {name: r for r, name in enumerate(LAYERS)}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import statement in ``path``."""
    package = "jattn." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from jattn import sampling` imports the subpackage: count the names too
            if mod == "jattn":
                out += [(node.lineno, f"jattn.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, mod in _imported_modules(path):
            parts = mod.split(".")
            if parts[0] != "jattn":
                continue
            target = parts[1] if len(parts) > 1 else "jattn"
            if RANK.get(target, len(LAYERS)) > RANK[layer]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_point_down(layer):
    """Breaks when a module imports from a layer above its own (e.g. policy/analysis.py
    importing jattn.methods), which couples the generic layers to one method."""
    bad = _violations(layer)
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_the_scan_sees_imports(tmp_path, monkeypatch):
    """The checker itself: an upward lazy import, a relative one and ``from jattn import``
    are all caught (so the test above cannot pass by seeing nothing)."""
    fake = tmp_path / "jattn"
    (fake / "policy").mkdir(parents=True)
    (fake / "policy" / "bad.py").write_text(
        "def f():\n    from jattn.methods.p2p_text import word_token_indices\n"
        "from ..sampling import sampler\nfrom jattn import pipeline\nimport jattn.models.unet\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = sorted(b.split(" imports ")[1] for b in _violations("policy"))
    assert found == ["jattn.methods.p2p_text", "jattn.pipeline", "jattn.sampling"]
