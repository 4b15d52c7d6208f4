"""Attend-and-Excite on the bundled model: two-object prompts stating no positions, plain
generation beside (same seeds). Detector read-back (jattn.world.evaluate.score_generated):
"present" = both objects found; "both right" = both with the right colour and shape;
leakage = an object found with the other's colour or shape.

  python scripts/eval_layout.py [--n 48] [--steps 50] [--batch 8] [--attn-res 4]
      [--out runs/eval_layout.json]

Layout guidance and Bounded Attention rows: not written yet (see the closing note).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jattn
from jattn.methods.excite import attend_and_excite
from jattn.world.evaluate import score_generated, two_object_prompts
from jattn.world.spec import ObjectSpec, SceneSpec


def cases(n: int):
    out = []
    for ep in two_object_prompts(n):
        a, b = ep.spec.objects
        spec = SceneSpec((ObjectSpec(a.color, a.shape), ObjectSpec(b.color, b.shape)))
        prompt = f"a {a.color} {a.shape} and a {b.color} {b.shape}"
        out.append((prompt, spec, [f"{a.color} {a.shape}", f"{b.color} {b.shape}"]))
    return out


def score(img, spec):
    r = score_generated(img, spec)
    objs = r["objects"]
    present = all(o["found"] for o in objs)
    right = all(o["color_shape_ok"] for o in objs)
    leak = False
    for o, other in ((objs[0], spec.objects[1]), (objs[1], spec.objects[0])):
        d = o["detection"]
        if d is not None and not o["color_shape_ok"] and (
                d["color"] == other.color or d["shape"] == other.shape):
            leak = True
    return present, right, leak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--attn-res", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pipe = jattn.load()
    cs = cases(a.n)
    rows = {"baseline": [], "attend-excite": []}
    t0 = time.time()
    for s in range(0, len(cs), a.batch):
        chunk = cs[s:s + a.batch]
        prompts = [c[0] for c in chunk]
        seeds = list(range(s, s + len(chunk)))
        base = pipe.generate(prompts, num_inference_steps=a.steps, seed=seeds).images
        ae = attend_and_excite(pipe, prompts, [c[2] for c in chunk],
                               num_inference_steps=a.steps, seed=seeds,
                               attn_res=a.attn_res).images
        for (p, spec, _), ib, ia in zip(chunk, base, ae):
            rows["baseline"].append((p,) + score(ib, spec))
            rows["attend-excite"].append((p,) + score(ia, spec))
        print(f"{s + len(chunk)}/{len(cs)} cases, {time.time() - t0:.0f} s", flush=True)
    summary = {}
    for k, r in rows.items():
        arr = np.asarray([x[1:] for x in r], float)
        summary[k] = dict(present=arr[:, 0].mean(), both_right=arr[:, 1].mean(),
                          leakage=arr[:, 2].mean(), n=len(r))
        print(f"{k:15s} present {arr[:, 0].mean():.2f}  both right {arr[:, 1].mean():.2f}  "
              f"leakage {arr[:, 2].mean():.2f}  (n={len(r)})")
    for k, r in rows.items():
        leaks = [x[0] for x in r if x[3]]
        print(f"leakage cases, {k}: {leaks}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(summary=summary, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
