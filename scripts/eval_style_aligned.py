"""StyleAligned on the bundled model: do the members of a group take the reference's
unstated background and fill, while keeping their own colour and shape?

  python scripts/eval_style_aligned.py --groups 16 --seeds 0 1 2 --steps 50 --out FILE.json
  python scripts/eval_style_aligned.py --mode image --groups 16 --seeds 0 1 2 --steps 50

``--mode generated`` (default): groups of 4 prompts "a <colour> <shape>" (distinct colours
and shapes in a group, training pairs, background and fill unstated); member 0 is the
reference. Per member 1..3: background equal to member 0's (goal ≥ 0.9), fill equal to
member 0's (goal ≥ 0.8; outlined vs solid reported apart; striped/dotted are rendered solid
by the bundled VAE, ../shared/BUNDLED_LIMITS.md), own colour+shape right (goal ≥ 0.85).
Baseline: plain generation of the same prompts and seeds (no sharing).

``--mode image``: member 0 is a world render with a stated background and fill given as the
reference image (DDIM-inverted with its caption, CFG 2, re-imposed with offset 5; shift
log 2, generation CFG 10 as the transfer notebook); members 1..3 as above. Agreement with
the render's background and fill.

Everything is judged by the world's detector (jattn.world.evaluate.score_generated).
``--ablate`` adds a few settings (shift, GroupNorm sharing, window) on the same groups.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star", "heart")


def make_groups(n: int, members: int = 4, seed: int = 0) -> list[list[tuple[str, str]]]:
    """n groups of ``members`` (colour, shape) pairs, distinct colours and shapes in a group,
    training pairs only (never spec.HELD_OUT_PAIRS)."""
    from jattn.world.spec import HELD_OUT_PAIRS

    held = {tuple(p) for p in HELD_OUT_PAIRS}
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        cols = rng.choice(COLOURS, members, replace=False)
        shp = rng.choice(SHAPES, members, replace=False)
        pairs = [(str(c), str(s)) for c, s in zip(cols, shp)]
        if any(p in held for p in pairs):
            continue
        out.append(pairs)
    return out


def prompt_of(colour: str, shape: str) -> str:
    from jattn.world.captions import caption_for
    from jattn.world.spec import ObjectSpec, SceneSpec

    return caption_for(SceneSpec(objects=(ObjectSpec(color=colour, shape=shape),)), 0)


def judge(image, colour, shape) -> dict:
    from jattn.world.evaluate import score_generated
    from jattn.world.spec import ObjectSpec, SceneSpec

    r = score_generated(image, SceneSpec(objects=(ObjectSpec(color=colour, shape=shape),)))
    o = r["objects"][0]
    det = o["detection"]
    return {"background": r["background"], "fill": det["fill"] if det else None,
            "found": o["found"], "color_shape_ok": o["color_shape_ok"]}


def agreement(records: list[dict], ref_key: str = "member0") -> dict:
    """Figures over members 1..M-1 against the reference's background/fill."""
    bg, fill, own, own0 = [], [], [], []
    by_fill: dict = {}
    for rec in records:
        ref = rec[ref_key]
        own0.append(rec["members"][0]["color_shape_ok"])
        for m in rec["members"][1:]:
            own.append(m["color_shape_ok"])
            bg.append(ref["background"] is not None and m["background"] == ref["background"])
            ok = ref["fill"] is not None and m["fill"] == ref["fill"]
            fill.append(ok)
            by_fill.setdefault(str(ref["fill"]), []).append(ok)
    mean = lambda x: round(float(np.mean(x)), 3) if x else None  # noqa: E731
    return {"background_agree": mean(bg), "fill_agree": mean(fill),
            "fill_agree_by_reference_fill": {k: [mean(v), len(v)] for k, v in by_fill.items()},
            "own_color_shape": mean(own), "reference_color_shape": mean(own0), "n": len(bg)}


def run_generated(pipe, groups, seeds, args, **sa_kw) -> dict:
    from jattn.methods.style_aligned import style_aligned

    out = {"records": []}
    t_total = 0.0
    bs = max(1, args.batch_groups)
    for seed in seeds:
        for start in range(0, len(groups), bs):
            chunk = groups[start:start + bs]
            prompts = [[prompt_of(c, s) for c, s in g] for g in chunk]
            flat_seeds = [seed * 100000 + (start + gi) * 10 + m for gi in range(len(chunk))
                          for m in range(len(chunk[0]))]
            t0 = time.perf_counter()
            res = style_aligned(pipe, prompts, seed=flat_seeds,
                                num_inference_steps=args.steps,
                                guidance_scale=args.guidance_scale, **sa_kw)
            t_total += time.perf_counter() - t0
            m = len(chunk[0])
            for gi, g in enumerate(chunk):
                mem = [judge(res.images[gi * m + j], c, s) for j, (c, s) in enumerate(g)]
                out["records"].append({"group": start + gi, "seed": seed,
                                       "prompts": prompts[gi], "members": mem,
                                       "member0": mem[0]})
    out["summary"] = agreement(out["records"])
    out["seconds"] = round(t_total, 1)
    return out


def run_image(pipe, groups, seeds, args, **sa_kw) -> dict:
    from jattn.methods.style_aligned import style_aligned
    from jattn.world.captions import caption_for
    from jattn.world.scene import render
    from jattn.world.spec import BACKGROUNDS, ObjectSpec, SceneSpec

    out = {"records": []}
    t_total = 0.0
    bs = max(1, args.batch_groups)
    rng = np.random.default_rng(123)
    for seed in seeds:
        for start in range(0, len(groups), bs):
            chunk = groups[start:start + bs]
            refs, ref_prompts, truth = [], [], []
            for gi, g in enumerate(chunk):
                c, s = g[0]
                bg = BACKGROUNDS[(start + gi + seed) % len(BACKGROUNDS)]
                if args.fill == "alternate":
                    fill = "outlined" if (start + gi + seed) % 2 and s != "ring" else None
                else:
                    fill = None if args.fill == "solid" else args.fill
                spec = SceneSpec(objects=(ObjectSpec(color=c, shape=s, fill=fill),),
                                 background=bg)
                sc = render(spec, seed=int(rng.integers(1 << 30)), variant=0)
                refs.append(sc.image)
                ref_prompts.append(caption_for(spec, 0))
                truth.append({"background": bg, "fill": fill or "solid",
                              "found": True, "color_shape_ok": True})
            prompts = [[prompt_of(c, s) for c, s in g[1:]] for g in chunk]
            flat_seeds = [seed * 100000 + (start + gi) * 10 + m for gi in range(len(chunk))
                          for m in range(len(chunk[0]))]
            t0 = time.perf_counter()
            res = style_aligned(pipe, prompts, seed=flat_seeds, reference_image=refs,
                                reference_prompt=ref_prompts,
                                num_inference_steps=args.steps,
                                guidance_scale=args.guidance_scale, **sa_kw)
            t_total += time.perf_counter() - t0
            m = len(chunk[0])
            for gi, g in enumerate(chunk):
                mem = [judge(res.images[gi * m + j], c, s) for j, (c, s) in enumerate(g)]
                rec_ref = judge(refs[gi], *g[0])
                out["records"].append({"group": start + gi, "seed": seed,
                                       "reference_prompt": ref_prompts[gi],
                                       "prompts": prompts[gi], "members": mem,
                                       "render": truth[gi], "render_detected": rec_ref})
    out["summary"] = agreement(out["records"], ref_key="render")
    out["summary_vs_reconstruction"] = agreement(
        [dict(r, member0=r["members"][0]) for r in out["records"]])
    out["seconds"] = round(t_total, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--mode", choices=["generated", "image"], default="generated")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="default 7.5 (SD1 notebook); 10 in --mode image (transfer notebook)")
    ap.add_argument("--batch-groups", type=int, default=4, help="groups per batch")
    ap.add_argument("--shift", type=float, default=None,
                    help="shared_score_shift (default 0; log 2 in --mode image)")
    ap.add_argument("--fill", choices=["alternate", "solid", "outlined", "striped", "dotted"],
                    default="alternate", help="--mode image: the reference render's fill "
                    "(default: solid and outlined alternately)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jattn

    pipe = jattn.load(args.model)
    if args.guidance_scale is None:
        args.guidance_scale = 10.0 if args.mode == "image" else 7.5
    shift = args.shift if args.shift is not None else (math.log(2) if args.mode == "image"
                                                       else 0.0)
    groups = make_groups(args.groups)
    run = run_image if args.mode == "image" else run_generated
    result = {"mode": args.mode, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "groups": args.groups, "seeds": args.seeds, "shared_score_shift": shift}
    settings = {"style_aligned": dict(shared_score_shift=shift)}
    if not args.no_baseline:
        settings["baseline (plain)"] = dict(share=False)
    if args.ablate and args.mode == "image":
        settings.update({
            "shift 2.0": dict(shared_score_shift=2.0),
            "shift 4.0": dict(shared_score_shift=4.0),
            "no GroupNorm sharing": dict(shared_score_shift=shift, share_group_norm=False),
            "AdaIN of values too": dict(shared_score_shift=shift, adain_values=True),
            "full attention share": dict(full_attention_share=True),
        })
    elif args.ablate:
        settings.update({
            "shift log 2": dict(shared_score_shift=math.log(2)),
            "shift log 4": dict(shared_score_shift=math.log(4)),
            "no GroupNorm sharing": dict(shared_score_shift=shift, share_group_norm=False),
            "GroupNorm sharing only": dict(shared_score_shift=shift, only_self_level=1.0),
            "window [0, 0.5)": dict(shared_score_shift=shift, window=(0.0, 0.5)),
            "full attention share": dict(full_attention_share=True),
        })
    for name, kw in settings.items():
        r = run(pipe, groups, args.seeds, args, **kw)
        result[name] = r
        s = r["summary"]
        n_img = len(r["records"]) * 4
        print(f"{name:28s} background {s['background_agree']}  fill {s['fill_agree']} "
              f"{s['fill_agree_by_reference_fill']}  own colour+shape {s['own_color_shape']}  "
              f"reference colour+shape {s['reference_color_shape']}  "
              f"({r['seconds']:.0f} s, {r['seconds'] / n_img:.2f} s/image)", flush=True)
        if "summary_vs_reconstruction" in r:
            v = r["summary_vs_reconstruction"]
            print(f"{'':28s} vs reconstruction: background {v['background_agree']}  fill "
                  f"{v['fill_agree']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
