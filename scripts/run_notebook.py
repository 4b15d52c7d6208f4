"""Execute a notebook's code cells top to bottom as a script (no Jupyter needed).

Run:  JATTN_MODEL=DIR JATTN_STEPS=2 python scripts/run_notebook.py notebooks/quickstart.ipynb
Expected: "notebook ok" (used by tests/test_notebooks.py on the tiny pipeline).
"""

import json
import sys


def run(path: str) -> None:
    nb = json.load(open(path))
    env: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
            exec(compile(src, f"{path}[cell {i}]", "exec"), env)


if __name__ == "__main__":
    run(sys.argv[1])
    print("notebook ok")
