"""ConsiStory's cost over plain generation of the same batch (bundled model, one run, steady
state: each program is compiled by a first call, then timed as the best of ``--repeat``).

  python scripts/bench_consistory.py --steps 25 --repeat 2

Rows: plain DDIM generation of the 4 prompts (CFG 5, no policy); ConsiStory's first pass
without query blending (SDSA + masks + FreeU); the first pass (+ query blending: the vanilla
pre-pass at steps 1 … n//10); the full method (the first pass, the DIFT correspondence and
the second pass with feature injection). Also: compilations of a second call with new
prompts (pipe.trace_counts and the correspondence program).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a heart on the left on a beige background", "a heart at the top on a gray background",
           "a heart on the right on a checkered background",
           "a heart at the bottom on a striped background"]
OTHER = ["a star on the left on a gray background", "a star at the top on a beige background",
         "a star on the right on a striped background",
         "a star at the bottom on a checkered background"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax

    import jattn
    from jattn.methods import consistory as cs
    from jattn.pipeline import bundled_model_path

    pipe = jattn.load(bundled_model_path())
    n = args.steps

    def plain():
        out = pipe.generate(PROMPTS, num_inference_steps=n, guidance_scale=5.0,
                            scheduler="ddim", seed=0)
        return out.images

    def method(**kw):
        return lambda: cs.consistory(pipe, "heart", PROMPTS, num_inference_steps=n, seed=0,
                                     **kw).images

    rows = {"plain": plain,
            "first pass, no query blending": method(feature_injection=False,
                                                    share_queries=False),
            "first pass": method(feature_injection=False),
            "full (with feature injection)": method()}
    res = {}
    for name, fn in rows.items():
        jax.block_until_ready(fn())
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t0)
        res[name] = best
        print(f"{name:32s} {best:7.2f} s  {best / res['plain']:.2f}×", flush=True)
    before = dict(pipe.trace_counts), dict(cs.TRACES)
    cs.consistory(pipe, "star", OTHER, num_inference_steps=n, seed=7)
    compiles = sum(dict(pipe.trace_counts).values()) - sum(before[0].values()) + \
        sum(cs.TRACES.values()) - sum(before[1].values())
    print(f"compilations of a second call with new prompts: {compiles}")
    out = dict(seconds=res, ratios={k: v / res["plain"] for k, v in res.items()},
               compiles_new_prompts=compiles, steps=n, batch=len(PROMPTS),
               device=str(jax.devices()[0]))
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
