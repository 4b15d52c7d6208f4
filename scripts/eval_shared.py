"""Evaluate the shared-attention / feature-injection methods of issue 10 on the bundled
model's world: one entry point that runs each method's evaluation script with the
remaining arguments (plain generation beside each method, same prompts and seeds).

Run:  python scripts/eval_shared.py --method style-aligned [script options…]
      python scripts/eval_shared.py --method masactrl-pnp [script options…]
      python scripts/eval_shared.py --method consistory [script options…]
      python scripts/eval_shared.py --list

Each script prints its figures beside the baseline and writes a JSON (``--out``); the
measured figures are in configs/style_aligned_world.py, configs/masactrl_world.py,
configs/pnp_world.py and configs/consistory_world.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SCRIPTS = {
    "style-aligned": "eval_style_aligned.py",
    "masactrl-pnp": "eval_masactrl_pnp.py",
    "masactrl": "eval_masactrl_pnp.py",
    "pnp": "eval_masactrl_pnp.py",
    "consistory": "eval_consistory.py",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list" in argv or not argv:
        here = Path(__file__).resolve().parent
        for name, script in SCRIPTS.items():
            state = "" if (here / script).exists() else "  (script not present)"
            print(f"{name:14s} scripts/{script}{state}")
        return 0
    method = None
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--method":
            method = next(it, None)
        elif a.startswith("--method="):
            method = a.split("=", 1)[1]
        else:
            rest.append(a)
    if method not in SCRIPTS:
        print(f"eval_shared: error: --method {method!r}: choose one of {sorted(SCRIPTS)}",
              file=sys.stderr)
        return 2
    script = Path(__file__).resolve().parent / SCRIPTS[method]
    if not script.exists():
        print(f"eval_shared: error: {script.name} is not in scripts/ yet", file=sys.stderr)
        return 2
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
