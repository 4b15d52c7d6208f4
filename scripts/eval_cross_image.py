"""Cross-Image Attention on the bundled model's world, read back with the world's detector.

    python scripts/eval_cross_image.py [--n 48] [--steps 100] [--groups 8]
        [--variant full|no_guidance|no_adain|no_contrast|high_only|low_only|unmasked_adain …]
        [--json out.json]

Cases: a structure render and an appearance render (one object each) that differ in
shape, colour, fill and background, both given as images. Goals (issue 11): the output
keeps the structure's shape and position (≥ 0.85) and takes the appearance's object colour
(≥ 0.8), fill (≥ 0.6; solid/outlined, striped/dotted reported apart: the VAE renders them
solid, see BUNDLED_LIMITS.md) and background (≥ 0.7). Baseline: plain regeneration from
the structure image's inversion (the STRUCT member of the same run: same inversion, same
noise maps, no policy). Prompt "a shape", object word "shape" for the AdaIN masks.

Background read-back: nearest of the five clean background renders by mean colour and
within-row / within-column spread of the pixels the detector calls background (checked on
the appearance member, which the loop regenerates from its own inversion).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jattn.world.detector import classify_pixels, detect  # noqa: E402
from jattn.world.scene import _background, render  # noqa: E402
from jattn.world.spec import ObjectSpec, SceneSpec  # noqa: E402

SHAPES = ("circle", "square", "triangle", "heart", "star", "ring")
POS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
FILLS = ("solid", "outlined", "striped", "dotted")
BGS = ("gray", "light gray", "beige", "striped", "checkered")
CCOLS = ("red", "orange", "yellow", "green", "blue", "purple")


def cases(n: int) -> list[dict]:
    out = []
    i = 0
    while len(out) < n:
        s_shape, a_shape = SHAPES[i % 6], SHAPES[(i + 1 + i // 6) % 6]
        s_col, a_col = CCOLS[i % 6], CCOLS[(i * 5 + 3) % 6]
        s_bg, a_bg = BGS[i % 5], BGS[(i * 2 + 1 + i // 5) % 5]
        a_fill = FILLS[(i // 2) % 4]
        if a_shape == "ring" and a_fill == "outlined":
            a_fill = "solid"
        if s_col == a_col or s_bg == a_bg or s_shape == a_shape:
            i += 1
            continue
        pos = POS[i % 5]
        s = SceneSpec((ObjectSpec(color=s_col, shape=s_shape, position=pos),), background=s_bg)
        a = SceneSpec((ObjectSpec(color=a_col, shape=a_shape, position=POS[(i + 2) % 5],
                                  fill=None if a_fill == "solid" else a_fill),),
                      background=a_bg)
        out.append(dict(i=len(out), structure=s, appearance=a, s_shape=s_shape, pos=pos,
                        s_col=s_col, a_col=a_col, a_fill=a_fill, s_bg=s_bg, a_bg=a_bg))
        i += 1
    return out


_BG_FEATS = None


def _bg_features(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32)
    m = mask.astype(np.float32)[..., None]
    n = max(m.sum(), 1.0)
    mean = (x * m).sum((0, 1)) / n
    g = x.mean(-1)
    row_spread = np.median(np.abs(np.diff(g, axis=1))[mask[:, 1:] & mask[:, :-1]]) \
        if (mask[:, 1:] & mask[:, :-1]).any() else 0.0
    col_spread = np.median(np.abs(np.diff(g, axis=0))[mask[1:] & mask[:-1]]) \
        if (mask[1:] & mask[:-1]).any() else 0.0
    # pattern energy: mean |diff| (stripes vary down columns only, checkers both ways)
    rv = np.abs(np.diff(g, axis=1))[mask[:, 1:] & mask[:, :-1]].mean() if mask.any() else 0
    cv = np.abs(np.diff(g, axis=0))[mask[1:] & mask[:-1]].mean() if mask.any() else 0
    return np.concatenate([mean / 8.0, [row_spread, col_spread, rv * 2, cv * 2]])


def background_of(img: np.ndarray) -> str:
    global _BG_FEATS
    if _BG_FEATS is None:
        _BG_FEATS = {b: _bg_features(_background(b), np.ones((128, 128), bool)) for b in BGS}
    mask = classify_pixels(img) < 0
    for d in detect(img):
        mask &= ~d.mask
    f = _bg_features(img, mask)
    return min(BGS, key=lambda b: float(np.abs(f - _BG_FEATS[b]).sum()))


def score(img: np.ndarray, c: dict, struct_mask: np.ndarray) -> dict:
    dets = detect(img)
    d = max(dets, key=lambda x: x.area) if dets else None
    r = dict(found=d is not None, background=background_of(img))
    if d is not None:
        inter = np.logical_and(d.mask, struct_mask).sum()
        union = np.logical_or(d.mask, struct_mask).sum()
        r.update(shape=d.shape, position=d.position, color=d.color, fill=d.fill,
                 iou=float(inter / union) if union else 0.0, n_objects=len(dets))
    return r


def summarize(records: list[dict], which: str) -> dict:
    def rate(pred, subset=None):
        rs = [r for r in records if subset is None or subset(r)]
        return (float(np.mean([pred(r) for r in rs])) if rs else None), len(rs)

    g = lambda r: r[which]  # noqa: E731
    out = {}
    out["structure_kept"] = rate(lambda r: g(r).get("shape") == r["s_shape"]
                                 and g(r).get("position") == r["pos"])
    out["shape_kept"] = rate(lambda r: g(r).get("shape") == r["s_shape"])
    out["position_kept"] = rate(lambda r: g(r).get("position") == r["pos"])
    out["mask_iou_mean"] = (float(np.mean([g(r).get("iou", 0.0) for r in records])),
                            len(records))
    out["colour_from_appearance"] = rate(lambda r: g(r).get("color") == r["a_col"])
    out["fill_solid_outlined"] = rate(lambda r: g(r).get("fill") == r["a_fill"],
                                      lambda r: r["a_fill"] in ("solid", "outlined"))
    out["fill_outlined"] = rate(lambda r: g(r).get("fill") == r["a_fill"],
                                lambda r: r["a_fill"] == "outlined")
    out["fill_solid"] = rate(lambda r: g(r).get("fill") == r["a_fill"],
                             lambda r: r["a_fill"] == "solid")
    out["fill_striped_dotted (model limit)"] = rate(
        lambda r: g(r).get("fill") == r["a_fill"], lambda r: r["a_fill"] in ("striped", "dotted"))
    out["background_from_appearance"] = rate(lambda r: g(r)["background"] == r["a_bg"])
    out["background_kept_structure"] = rate(lambda r: g(r)["background"] == r["s_bg"])
    return out


VARIANTS = {
    "full": {},
    "no_guidance": dict(swap_guidance_scale=1.0),
    "no_adain": dict(adain=False),
    "unmasked_adain": dict(masked_adain=False),
    "no_contrast": dict(contrast_strength=1.0),
    "quirks": dict(reference_quirks=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--groups", type=int, default=8, help="cases per compiled call")
    ap.add_argument("--variant", nargs="*", default=["full"],
                    help=f"any of {sorted(VARIANTS)}, or high_only / low_only / "
                         "window=A,B (swap window fractions at both resolutions)")
    ap.add_argument("--guidance-scale", type=float, default=1.0,
                    help="CFG of the loop (the reference: 1; 3.5 = the inversion's scale, so "
                         "APP/STRUCT regenerate their inputs exactly)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-grid", default=None, help="PNG of the first 8 cases")
    args = ap.parse_args(argv)

    import jattn
    from jattn.methods.cross_image import CrossImageSteps, cross_image_batch

    pipe = jattn.load()
    cs = cases(args.n)
    renders = [(render(c["structure"], seed=100 + c["i"]), render(c["appearance"],
                                                                  seed=200 + c["i"]))
               for c in cs]
    report = {}
    for variant in args.variant:
        kw = dict(VARIANTS.get(variant, {}))
        if variant == "high_only":
            kw["steps"] = CrossImageSteps(swap_low=(0.0, 0.0))
        elif variant == "low_only":
            kw["steps"] = CrossImageSteps(swap_high=(0.0, 0.0))
        elif variant.startswith("window="):
            a, b = (float(v) for v in variant.split("=")[1].split(","))
            kw["steps"] = CrossImageSteps(swap_high=(a, b), swap_low=(a, b))
        elif variant not in VARIANTS:
            raise SystemExit(f"--variant {variant!r}: unknown")
        records, t0, outs = [], time.perf_counter(), []
        for start in range(0, len(cs), args.groups):
            chunk = list(range(start, min(start + args.groups, len(cs))))
            while len(chunk) < args.groups:  # same G every call: one compiled program
                chunk.append(chunk[-1])
            res = cross_image_batch(pipe, [renders[k][0].image for k in chunk],
                                    [renders[k][1].image for k in chunk], prompt="a shape",
                                    num_inference_steps=args.steps, seed=0,
                                    guidance_scale=args.guidance_scale, **kw)
            seen = set()
            for j, k in enumerate(chunk):
                if k in seen:
                    continue
                seen.add(k)
                c = cs[k]
                smask = renders[k][0].objects[0].mask
                out_img, app_img, st_img = res.images[3 * j:3 * j + 3]
                outs.append((st_img, app_img, out_img))
                rec = {key: c[key] for key in ("i", "s_shape", "pos", "s_col", "a_col",
                                               "a_fill", "s_bg", "a_bg")}
                rec["output"] = score(out_img, c, smask)
                rec["baseline"] = score(st_img, c, smask)
                rec["appearance_regen"] = score(app_img, c, smask)
                records.append(rec)
            print(f"[{variant}] {len(records)}/{len(cs)} cases, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        seconds = time.perf_counter() - t0
        summ = {"output": summarize(records, "output"),
                "baseline (regeneration of the structure)": summarize(records, "baseline"),
                "appearance regenerated (background reader check)": {
                    "background": float(np.mean([r["appearance_regen"]["background"] == r["a_bg"]
                                                 for r in records])),
                    "colour": float(np.mean([r["appearance_regen"].get("color") == r["a_col"]
                                             for r in records]))},
                "seconds": seconds, "n": len(records)}
        report[variant] = dict(summary=summ, records=records)
        print(f"\n== {variant}: {len(records)} cases, {args.steps} steps, {seconds:.0f} s")
        for name in summ["output"]:
            o, b = summ["output"][name], summ["baseline (regeneration of the structure)"][name]
            print(f"  {name:40s} {o[0] if o[0] is None else round(o[0], 3)!s:>6} "
                  f"(baseline {b[0] if b[0] is None else round(b[0], 3)!s:>6}, n={o[1]})")
        print(f"  appearance regenerated: {summ['appearance regenerated (background reader check)']}")
        if args.save_grid and variant == args.variant[0]:
            from PIL import Image

            rows = [np.concatenate(t, axis=1) for t in outs[:8]]
            Image.fromarray(np.concatenate(rows, axis=0)).save(args.save_grid)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
