"""Cost of MasaCtrl and Plug-and-Play over plain generation of the same batch (steady state)
and recompilation on a second run with new prompts, masks and windows.

  python scripts/bench_masactrl_pnp.py [--steps 50] [--groups 4] [--repeats 3] [--model PATH]

The batch: G groups × [source, target] (2G images, CFG: 4G UNet rows), DDIM. Timed: the
compiled sampler loop (``decode=False``; the same work in every variant), median of
``--repeats`` interleaved runs after a warm-up. Rows:

* plain — ``pipe.generate`` of the 2G prompts, no policy;
* MasaCtrl (plain variant; and the mask variant, materialised probabilities at the edited
  layers) — goal ≤ 1.1×;
* PnP, generated source — the source is member 0 of the same batch (its pass included) —
  goal ≤ 1.2×;
* PnP, real images — DDIM inversion of the G sources (the source pass) + the PnP run with
  re-imposition, over the same plain batch (printed; the inversion is G rows × n steps).

Then a second run of each with new prompts, new masks and new step windows: the number of
new traces of the sampler program (goal 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax.numpy as jnp
import numpy as np

import jattn
from jattn.methods import masactrl as mc
from jattn.methods import pnp as pp
from jattn.sampling.inversion import invert
from jattn.sampling.sampler import SamplerHooks, reimposition
from jattn.world.scene import render
from jattn.world.spec import SceneSpec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    pipe = jattn.load(args.model)
    n, g = args.steps, args.groups
    cols = ["red", "blue", "green", "yellow", "purple", "orange"]
    prompts = [p for i in range(g) for p in (f"a {cols[i % 6]} heart on the left",
                                              f"a {cols[i % 6]} heart on the right")]
    seeds = [7 + i for i in range(g) for _ in range(2)]
    lh = pipe.default_size // pipe.vae_scale_factor
    left = np.zeros((lh, lh), np.float32)
    left[:, : lh // 2] = 1
    mask = np.stack([left, left[:, ::-1]])
    imgs = np.stack([render(SceneSpec.of(f"{cols[i % 6]} heart on the left"), seed=i).image
                     for i in range(g)])
    kw = dict(num_inference_steps=n, scheduler="ddim", decode=False)

    def policies(step_frac=mc.START_STEP, attn=0.5, feat=0.8, mk=mask):
        return {
            "masactrl": mc.masactrl_policy(pipe, members=2, num_inference_steps=n, groups=g,
                                           start_step=step_frac),
            "masactrl-mask": mc.masactrl_policy(pipe, members=2, num_inference_steps=n,
                                                groups=g, variant="mask", masks=mk,
                                                start_step=step_frac),
            "pnp": pp.pnp_policy(pipe, members=2, num_inference_steps=n, groups=g,
                                 attn_fraction=attn, feature_fraction=feat),
        }

    def run_real(pol, ps):
        inv = invert(pipe, imgs, [""] * g, method="ddim", num_inference_steps=n)
        x_t, rows = reimposition(np.repeat(inv.latents, 2, axis=1))
        hooks = SamplerHooks(reimpose=rows, reimpose_rows=jnp.asarray([True, False] * g))
        pr = [p for i in range(g) for p in ("", ps[2 * i + 1])]
        return pipe.generate(pr, latents=np.asarray(x_t).transpose(0, 3, 1, 2), policy=pol,
                             hooks=hooks, **kw)

    def runs(ps, pols):
        return {
            "plain": lambda: pipe.generate(ps, seed=seeds, **kw),
            "masactrl": lambda: pipe.generate(ps, seed=seeds, policy=pols["masactrl"], **kw),
            "masactrl-mask": lambda: pipe.generate(ps, seed=seeds, policy=pols["masactrl-mask"],
                                                   **kw),
            "pnp": lambda: pipe.generate(ps, seed=seeds, policy=pols["pnp"], **kw),
            "pnp-real (inversion + edit)": lambda: run_real(pols["pnp"], ps),
        }

    fns = runs(prompts, policies())
    for f in fns.values():          # compile + warm up
        np.asarray(f().latents)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            np.asarray(f().latents)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bundled model, {g} groups × [source, target], {n} DDIM steps, CFG 7.5 "
          f"(median of {args.repeats}):")
    goals = {"masactrl": 1.1, "masactrl-mask": 1.1, "pnp": 1.2, "pnp-real (inversion + edit)": 1.2}
    for k, v in med.items():
        ratio = v / med["plain"]
        goal = f" (goal ≤ {goals[k]}×)" if k in goals else ""
        print(f"  {k:28s} {v:7.2f} s  {ratio:5.2f}×{goal}")
    # second run: new prompts, masks, windows -> no new traces
    before = dict(pipe.trace_counts)
    new_prompts = [p.replace("heart", "star") for p in prompts]
    new = runs(new_prompts, policies(step_frac=0.2, attn=0.3, feat=0.6, mk=mask[::-1].copy()))
    for f in new.values():
        np.asarray(f().latents)
    traces = {k: pipe.trace_counts.get(k, 0) - before.get(k, 0) for k in pipe.trace_counts}
    print(f"second run with new prompts, masks and windows: new traces {traces} "
          f"(goal: sample 0)")
    return {"seconds": med, "ratios": {k: v / med["plain"] for k, v in med.items()},
            "new_traces": traces}


if __name__ == "__main__":
    main()
