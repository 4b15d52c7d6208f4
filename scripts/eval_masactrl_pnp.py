"""MasaCtrl and Plug-and-Play on the bundled model, judged by the world's detector.

  python scripts/eval_masactrl_pnp.py [--steps 50] [--pairs 48] [--renders 24]
      [--part all|masactrl|pnp] [--groups 8] [--out runs/masactrl_pnp.json]

MasaCtrl (issue 10 §3): source "a red heart on the left" → target "a red heart on the
right" (position change) or "a large red heart on the left" (size change); fill, size and
background unstated. Per pair: the target realised (the stated position / size read back,
goal ≥ 0.85) and the source's unstated attributes kept (the target's detected fill, size —
for position pairs — and background equal to the source's, goal ≥ 0.8). Baseline: the
target generated alone from the same noise (plain generation; the source is plain
generation too: MasaCtrl leaves it unchanged bit for bit).

Plug-and-Play: colour or background translation of (a) generated sources ("a red heart on
the left" → "a blue heart on the left" / "… on a checkered background") and (b) world
renders given as images (DDIM inversion with ""). Per pair: object-mask IoU of the target
with the source (detector masks, holes filled; goal ≥ 0.8) and the target attribute read
back (goal ≥ 0.9). Baselines: the target generated alone from the same noise (a); plain
regeneration from the inverted noise with the target prompt (b).

Every (pair, seed) is one group of a batched run (``--groups`` groups per call), one
compiled program per part. DDIM, CFG 7.5, the references' defaults (MasaCtrl step 4/50,
decoder self-attention at its two largest resolutions = up_blocks.1–2 at 8², 16² here; PnP Q,K 0.5, residual 0.8, negative prompt
"ugly, blurry, black, low res, unrealistic").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jattn
from jattn.methods import masactrl as mc
from jattn.methods import pnp as pp
from jattn.sampling.inversion import invert
from jattn.sampling.sampler import SamplerHooks, reimposition
from jattn.world.detector import detect, fill_holes
from jattn.world.evaluate import mask_iou
from jattn.world.scene import render
from jattn.world.spec import SceneSpec

COLS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("heart", "circle", "square", "triangle", "star")
MOVES = (("on the left", "on the right"), ("on the right", "on the left"),
         ("at the top", "at the bottom"), ("at the bottom", "at the top"))
BGS = ("gray", "light gray", "beige", "striped", "checkered")


def main_det(image):
    dets = detect(image)
    return max(dets, key=lambda d: d.area) if dets else None


# ------------------------------------------------------------------------------ MasaCtrl
def masactrl_pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        c, s = COLS[i % 6], SHAPES[(i // 2) % 5]
        p0, p1 = MOVES[i % 4]
        if i % 3 == 2:   # size change, position kept
            size = ("large", "small")[(i // 3) % 2]
            out.append(dict(kind="size", source=f"a {c} {s} {p0}", target=f"a {size} {c} {s} {p0}",
                            want=size, color=c, shape=s, seed=1000 + i))
        else:
            out.append(dict(kind="position", source=f"a {c} {s} {p0}", target=f"a {c} {s} {p1}",
                            want=p1, color=c, shape=s, seed=1000 + i))
    return out


def judge_masactrl(pair, src_img, tgt_img) -> dict:
    ds, dt = main_det(src_img), main_det(tgt_img)
    r = {"found": ds is not None and dt is not None}
    if dt is None:
        return dict(r, realised=False, realised_all=False, kept=False, fill_kept=False,
                    size_kept=False, background_kept=False)
    got = dt.position if pair["kind"] == "position" else dt.size
    r["realised"] = got == pair["want"]
    r["realised_all"] = r["realised"] and dt.color == pair["color"] and dt.shape == pair["shape"]
    from jattn.world.detector import classify_background

    bs, bt = classify_background(src_img), classify_background(tgt_img)
    r["background_kept"] = bs == bt
    r["fill_kept"] = ds is not None and ds.fill == dt.fill
    r["size_kept"] = None if pair["kind"] == "size" else (ds is not None and ds.size == dt.size)
    r["kept"] = r["background_kept"] and r["fill_kept"] and r["size_kept"] is not False
    r["detected"] = {"source": None if ds is None else [ds.color, ds.shape, ds.size, ds.fill,
                                                         ds.position, bs],
                     "target": [dt.color, dt.shape, dt.size, dt.fill, dt.position, bt]}
    return r


def summarise(rows, keys) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(float(np.mean(vals)), 3) if vals else None
    out["n"] = len(rows)
    return out


def run_masactrl(pipe, args) -> dict:
    pairs = masactrl_pairs(args.pairs)
    n, g = args.steps, args.groups
    res = {"method": [], "baseline": []}
    t0 = time.perf_counter()
    for c0 in range(0, len(pairs), g):
        chunk = pairs[c0:c0 + g]
        if len(chunk) < g:  # pad to one compiled batch size
            chunk = chunk + chunk[:g - len(chunk)]
        prompts = [p for pr in chunk for p in (pr["source"], pr["target"])]
        seeds = [pr["seed"] for pr in chunk for _ in range(2)]
        sl = args.start_layer
        sl = int(sl) if sl is not None and float(sl).is_integer() and sl >= 1 else sl
        pol = mc.masactrl_policy(pipe, members=2, num_inference_steps=n, groups=g,
                                 variant=args.variant,
                                 start_step=mc.START_STEP if args.start_step is None
                                 else args.start_step,
                                 start_layer=sl)
        edit = pipe.generate(prompts, num_inference_steps=n, scheduler="ddim", seed=seeds,
                             policy=pol).images
        plain = pipe.generate(prompts, num_inference_steps=n, scheduler="ddim",
                              seed=seeds).images
        for j, pr in enumerate(chunk[:len(pairs) - c0]):
            assert np.array_equal(edit[2 * j], plain[2 * j])  # the source is plain generation
            res["method"].append(dict(pair=pr, **judge_masactrl(pr, plain[2 * j], edit[2 * j + 1])))
            res["baseline"].append(dict(pair=pr, **judge_masactrl(pr, plain[2 * j],
                                                                   plain[2 * j + 1])))
        print(f"  masactrl {min(c0 + g, len(pairs))}/{len(pairs)} pairs "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    keys = ["realised", "realised_all", "kept", "fill_kept", "size_kept", "background_kept"]
    out = {"method": summarise(res["method"], keys), "baseline": summarise(res["baseline"], keys)}
    for kind in ("position", "size"):
        out[f"method_{kind}"] = summarise([r for r in res["method"] if r["pair"]["kind"] == kind], keys)
        out[f"baseline_{kind}"] = summarise([r for r in res["baseline"]
                                             if r["pair"]["kind"] == kind], keys)
    out["records"] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------ PnP
def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def pnp_pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        c1, s, pos = COLS[i % 6], SHAPES[(i // 2) % 5], MOVES[(i // 3) % 4][0]
        if i % 2 == 0:
            c2 = COLS[(i + 1 + i // 6) % 6]
            c2 = c2 if c2 != c1 else COLS[(i + 2) % 6]
            out.append(dict(kind="colour", source=f"{_a(c1)} {c1} {s} {pos}",
                            target=f"{_a(c2)} {c2} {s} {pos}",
                            want=c2, seed=2000 + i, color=c1, shape=s, position=pos))
        else:
            b = BGS[(i // 2) % 5]
            out.append(dict(kind="background", source=f"{_a(c1)} {c1} {s} {pos}",
                            target=f"{_a(c1)} {c1} {s} {pos} on a {b} background", want=b,
                            seed=2000 + i, color=c1, shape=s, position=pos))
    return out


def judge_pnp(pair, src_img, tgt_img) -> dict:
    from jattn.world.detector import classify_background

    ds, dt = main_det(src_img), main_det(tgt_img)
    iou = (mask_iou(fill_holes(ds.mask), fill_holes(dt.mask))
           if ds is not None and dt is not None else 0.0)
    if pair["kind"] == "colour":
        attr = dt is not None and dt.color == pair["want"]
    else:
        attr = classify_background(tgt_img) == pair["want"]
    return {"iou": round(float(iou), 3), "iou_ge_0.8": iou >= 0.8, "target_attr": bool(attr),
            "success": bool(attr) and iou >= 0.8, "source_found": ds is not None}


def _pnp_summary(rows) -> dict:
    s = summarise(rows, ["iou", "iou_ge_0.8", "target_attr", "success"])
    for kind in ("colour", "background"):
        s[kind] = summarise([r for r in rows if r["pair"]["kind"] == kind],
                            ["iou", "iou_ge_0.8", "target_attr", "success"])
    return s


def run_pnp_generated(pipe, args) -> dict:
    pairs = pnp_pairs(args.pairs)
    n, g = args.steps, args.groups
    neg = args.negative
    res = {"method": [], "baseline": []}
    t0 = time.perf_counter()
    for c0 in range(0, len(pairs), g):
        chunk = pairs[c0:c0 + g]
        if len(chunk) < g:
            chunk = chunk + chunk[:g - len(chunk)]
        prompts = [p for pr in chunk for p in (pr["source"], pr["target"])]
        seeds = [pr["seed"] for pr in chunk for _ in range(2)]
        pol = pp.pnp_policy(pipe, members=2, num_inference_steps=n, groups=g,
                            attn_fraction=args.attn_fraction,
                            feature_fraction=args.feature_fraction)
        edit = pipe.generate(prompts, negative_prompt=neg, num_inference_steps=n,
                             scheduler="ddim", seed=seeds, policy=pol).images
        plain = pipe.generate(prompts, negative_prompt=neg, num_inference_steps=n,
                              scheduler="ddim", seed=seeds).images
        for j, pr in enumerate(chunk[:len(pairs) - c0]):
            assert np.array_equal(edit[2 * j], plain[2 * j])
            res["method"].append(dict(pair=pr, **judge_pnp(pr, plain[2 * j], edit[2 * j + 1])))
            res["baseline"].append(dict(pair=pr, **judge_pnp(pr, plain[2 * j], plain[2 * j + 1])))
        print(f"  pnp generated {min(c0 + g, len(pairs))}/{len(pairs)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"method": _pnp_summary(res["method"]), "baseline": _pnp_summary(res["baseline"]),
            "records": res, "seconds": round(time.perf_counter() - t0, 1)}


def run_pnp_real(pipe, args) -> dict:
    pairs = pnp_pairs(args.renders)
    n, g = args.steps, args.groups
    neg = args.negative
    res = {"method": [], "baseline": [], "reconstruction_iou": []}
    t0 = time.perf_counter()
    for c0 in range(0, len(pairs), g):
        chunk = pairs[c0:c0 + g]
        if len(chunk) < g:
            chunk = chunk + chunk[:g - len(chunk)]
        imgs = np.stack([render(SceneSpec.of(f"{pr['color']} {pr['shape']} {pr['position']}"),
                                seed=pr["seed"]).image for pr in chunk])
        inv = invert(pipe, imgs, [""] * g, method="ddim", num_inference_steps=n)
        lat = inv.latents                                          # (n+1, G, h, w, C)
        traj = np.repeat(lat, 2, axis=1)                           # rows g*2 + m
        x_t, rows = reimposition(traj)
        hooks = SamplerHooks(reimpose=rows, reimpose_rows=jnp.asarray([True, False] * g))
        prompts = [p for pr in chunk for p in ("", pr["target"])]
        negs = [x for _ in chunk for x in ("", neg)]
        pol = pp.pnp_policy(pipe, members=2, num_inference_steps=n, groups=g,
                            attn_fraction=args.attn_fraction,
                            feature_fraction=args.feature_fraction)
        edit = pipe.generate(prompts, negative_prompt=negs, num_inference_steps=n,
                             scheduler="ddim", latents=np.asarray(x_t).transpose(0, 3, 1, 2),
                             policy=pol, hooks=hooks).images
        base = pipe.generate([pr["target"] for pr in chunk], negative_prompt=neg,
                             num_inference_steps=n, scheduler="ddim",
                             latents=inv.x_t).images
        for j, pr in enumerate(chunk[:len(pairs) - c0]):
            res["method"].append(dict(pair=pr, **judge_pnp(pr, imgs[j], edit[2 * j + 1])))
            res["baseline"].append(dict(pair=pr, **judge_pnp(pr, imgs[j], base[j])))
            res["reconstruction_iou"].append(judge_pnp(pr, imgs[j], edit[2 * j])["iou"])
        print(f"  pnp real {min(c0 + g, len(pairs))}/{len(pairs)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"method": _pnp_summary(res["method"]), "baseline": _pnp_summary(res["baseline"]),
            "reconstruction_iou_mean": round(float(np.mean(res["reconstruction_iou"])), 3),
            "records": res, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--renders", type=int, default=24)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--part", choices=["all", "masactrl", "pnp"], default="all")
    ap.add_argument("--start-step", type=float, default=None,
                    help="MasaCtrl ablation: first step fraction (default 4/50)")
    ap.add_argument("--start-layer", type=float, default=None,
                    help="MasaCtrl ablation: layer fraction < 1, or a block index >= 1 "
                         "(default: decoder self-attention at its two largest resolutions)")
    ap.add_argument("--negative", default=pp.REFERENCE_NEGATIVE,
                    help="PnP negative prompt (default the reference's)")
    ap.add_argument("--attn-fraction", type=float, default=0.5)
    ap.add_argument("--feature-fraction", type=float, default=0.8)
    ap.add_argument("--variant", default="plain", choices=["plain", "union"],
                    help="MasaCtrl ablation: the variant")
    ap.add_argument("--out", default="runs/masactrl_pnp.json")
    args = ap.parse_args(argv)
    pipe = jattn.load(None)
    report: dict = {"steps": args.steps, "pairs": args.pairs, "renders": args.renders,
                    "masactrl_settings": {"start_step": args.start_step,
                                          "start_layer": args.start_layer,
                                          "variant": args.variant},
                    "pnp_settings": {"negative": args.negative,
                                     "attn_fraction": args.attn_fraction,
                                     "feature_fraction": args.feature_fraction}}
    if args.part in ("all", "masactrl"):
        report["masactrl"] = run_masactrl(pipe, args)
        m, b = report["masactrl"]["method"], report["masactrl"]["baseline"]
        print(f"MasaCtrl ({m['n']} pairs, {args.steps} steps): realised {m['realised']} "
              f"(baseline {b['realised']}; goal ≥ 0.85), kept {m['kept']} (baseline "
              f"{b['kept']}; goal ≥ 0.8) [fill {m['fill_kept']}/{b['fill_kept']}, size "
              f"{m['size_kept']}/{b['size_kept']}, background {m['background_kept']}/"
              f"{b['background_kept']}]", flush=True)
    if args.part in ("all", "pnp"):
        report["pnp_generated"] = run_pnp_generated(pipe, args)
        report["pnp_real"] = run_pnp_real(pipe, args)
        for k in ("pnp_generated", "pnp_real"):
            m, b = report[k]["method"], report[k]["baseline"]
            print(f"PnP {k[4:]} ({m['n']} pairs): IoU mean {m['iou']} (baseline {b['iou']}), "
                  f"IoU ≥ 0.8 {m['iou_ge_0.8']} (baseline {b['iou_ge_0.8']}; goal ≥ 0.8), "
                  f"target attribute {m['target_attr']} (baseline {b['target_attr']}; goal "
                  f"≥ 0.9) [colour {m['colour']['target_attr']}, background "
                  f"{m['background']['target_attr']}]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
