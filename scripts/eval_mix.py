"""Evaluate prompt mixing (shape variations) on the bundled model's world, with the detector.

Run:  python scripts/eval_mix.py [--model DIR] [--prompts 16] [--steps 50]
          [--windows 0.14,0.34 0.6,1] [--out runs/eval_mix.json]

Cases: ``--prompts`` single-object prompts "a {colour} {shape} {position} on a {background}
background" (colours, shapes, positions and backgrounds cycled), each with 3 proxies (the
other shapes of circle/square/triangle/star/heart): 16 prompts → 48 cases. Each prompt is
one group ``[original, 3 proxies]`` of :func:`jattn.methods.mix.mix`; ``--groups-per-call``
groups run in one compiled call (seed of prompt i: i).

Per case, the world's detector reads the original and the variant:

* shape: the variant's object has the proxy's shape (goal ≥ 0.7);
* kept: the variant's colour and position equal the original's detected ones and the
  background stays (mean abs difference < 6 uint8 levels outside the masks; goal ≥ 0.85);
* outside: mean abs difference (uint8, all channels) over the pixels outside the union of
  both detected object masks dilated by one latent cell (8 px); goal ≤ 2 levels.

``--phrasing two``: "a {c1} {s1} {p1} and a {c2} {s2} {p2}", the first shape varied; kept
= the first object's position and the second object's shape and position as in the
original; ``--preserve-other`` adds a run with the second shape word preserved (the
self-attention localisation). ``--phrasing bare`` uses "a {colour} {shape}" prompts
instead: nothing but the object is stated, so where the object sits and which background it
gets come from the noise.

Baseline beside it: plain generation of the prompt with the proxy word substituted, same
seed (same initial noise as the original). Ablation: every window of ``--windows``, and the
best window without the background blend.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
BACKGROUNDS = ("beige", "gray", "light gray", "striped", "checkered")
TWO_POSITIONS = (("on the left", "on the right"), ("at the top", "at the bottom"),
                 ("on the right", "on the left"), ("at the bottom", "at the top"))


def cases(n_prompts: int, phrasing: str = "full"):
    """(prompt, word, proxies, seed) per prompt; ``phrasing`` "full" states position and
    background, "bare" only colour and shape ("a red circle": the model chooses the place
    and background from the noise, so the baseline may move the object)."""
    out = []
    for i in range(n_prompts):
        shape = SHAPES[i % len(SHAPES)]
        colour = COLOURS[i % len(COLOURS)]
        pos = POSITIONS[(i // 2) % len(POSITIONS)]
        bg = BACKGROUNDS[(i // 3) % len(BACKGROUNDS)]
        others = [s for s in SHAPES if s != shape]
        proxies = [others[(i + k) % len(others)] for k in range(3)]
        if phrasing == "two":
            c2 = COLOURS[(i + 3) % len(COLOURS)]
            s2 = SHAPES[(i + 2) % len(SHAPES)]
            p1, p2 = TWO_POSITIONS[i % len(TWO_POSITIONS)]
            others = [x for x in SHAPES if x not in (shape, s2)]
            proxies = [others[(i + k) % len(others)] for k in range(3)]
            text = f"a {colour} {shape} {p1} and a {c2} {s2} {p2}"
            out.append((text, shape, proxies, i, dict(c1=colour, c2=c2, other=s2)))
            continue
        text = (f"a {colour} {shape} {pos} on a {bg} background" if phrasing == "full"
                else f"a {colour} {shape}")
        out.append((text, shape, proxies, i, {}))
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    pad = np.pad(mask, r)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[dy:dy + h, dx:dx + w]
    return out


def score(original: np.ndarray, variant: np.ndarray, proxy: str) -> dict:
    from jattn.world.evaluate_edits import main_object

    a, b = main_object(original), main_object(variant)
    masks = [d.mask for d in (a, b) if d is not None]
    union = np.zeros(original.shape[:2], bool)
    for m in masks:
        union |= m
    outside = ~_dilate(union, 8)
    diff = np.abs(original.astype(np.int16) - variant.astype(np.int16)).mean(axis=-1)
    out_mad = float(diff[outside].mean()) if outside.any() else 0.0
    rec = {"original": None if a is None else (a.color, a.shape, a.position),
           "variant": None if b is None else (b.color, b.shape, b.position),
           "outside_mad": out_mad}
    rec["shape_ok"] = b is not None and b.shape == proxy
    rec["kept"] = (a is not None and b is not None and a.color == b.color
                   and a.position == b.position and out_mad < 6.0)
    rec["outside_ok"] = out_mad <= 2.0
    return rec


def score_two(original: np.ndarray, variant: np.ndarray, proxy: str, meta: dict) -> dict:
    """Two objects: the first (colour c1) takes the proxy's shape; the other (colour c2)
    keeps its colour, shape and position; outside: both images' masks dilated 8 px."""
    from jattn.world.detector import detect

    def by_colour(img, c):
        ds = [d for d in detect(img) if d.color == c]
        return max(ds, key=lambda d: d.area) if ds else None

    a1, b1 = by_colour(original, meta["c1"]), by_colour(variant, meta["c1"])
    a2, b2 = by_colour(original, meta["c2"]), by_colour(variant, meta["c2"])
    union = np.zeros(original.shape[:2], bool)
    for d in (a1, b1):
        if d is not None:
            union |= d.mask
    outside = ~_dilate(union, 8)
    diff = np.abs(original.astype(np.int16) - variant.astype(np.int16)).mean(axis=-1)
    out_mad = float(diff[outside].mean()) if outside.any() else 0.0
    rec = {"original": [None if d is None else (d.color, d.shape, d.position) for d in (a1, a2)],
           "variant": [None if d is None else (d.color, d.shape, d.position) for d in (b1, b2)],
           "outside_mad": out_mad}
    rec["shape_ok"] = b1 is not None and b1.shape == proxy
    rec["kept"] = (a1 is not None and b1 is not None and a1.position == b1.position
                   and a2 is not None and b2 is not None and a2.shape == b2.shape
                   and a2.position == b2.position)
    rec["outside_ok"] = out_mad <= 2.0
    return rec


def summary(records) -> dict:
    return {"n": len(records),
            "shape": float(np.mean([r["shape_ok"] for r in records])),
            "kept": float(np.mean([r["kept"] for r in records])),
            "shape_and_kept": float(np.mean([r["shape_ok"] and r["kept"] for r in records])),
            "outside_mad_mean": float(np.mean([r["outside_mad"] for r in records])),
            "outside_mad_median": float(np.median([r["outside_mad"] for r in records])),
            "outside_le_2": float(np.mean([r["outside_ok"] for r in records]))}


def _score(orig, var, proxy, meta):
    return score_two(orig, var, proxy, meta) if meta else score(orig, var, proxy)


def run_mix(pipe, cs, steps, gs, per_call, preserve_other=False, **kw):
    from jattn.methods.mix import mix

    records, originals = [], {}
    for start in range(0, len(cs), per_call):
        chunk = cs[start:start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))    # one compiled shape
        if preserve_other:
            kw["preserve"] = [[c[4]["other"]] for c in padded]
        out = mix(pipe, [c[0] for c in padded], [c[1] for c in padded],
                  [c[2] for c in padded], seed=[c[3] for c in padded],
                  num_inference_steps=steps, guidance_scale=gs, **kw)
        m = 1 + len(chunk[0][2])
        for g, (prompt, word, proxies, seed, meta) in enumerate(chunk):
            orig = out.images[g * m]
            originals[prompt] = orig
            for k, p in enumerate(proxies):
                rec = _score(orig, out.images[g * m + 1 + k], p, meta)
                rec.update(prompt=prompt, proxy=p, seed=seed)
                records.append(rec)
    return records, originals


def run_baseline(pipe, cs, originals, steps, gs, per_call):
    records = []
    jobs = [(prompt, word, p, seed, meta) for prompt, word, proxies, seed, meta in cs
            for p in proxies]
    for start in range(0, len(jobs), per_call):
        chunk = jobs[start:start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))
        prompts = [" ".join(p if w == word else w for w in prompt.split())
                   for prompt, word, p, _, _ in padded]
        out = pipe.generate(prompts, seed=[j[3] for j in padded], num_inference_steps=steps,
                            guidance_scale=gs)
        for i, (prompt, word, p, seed, meta) in enumerate(chunk):
            rec = _score(originals[prompt], out.images[i], p, meta)
            rec.update(prompt=prompt, proxy=p, seed=seed)
            records.append(rec)
    return records


def main():
    import jattn

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--groups-per-call", type=int, default=4)
    ap.add_argument("--windows", nargs="+", default=["0.14,0.34", "0.5,1", "0.6,1", "0.7,1",
                                                     "0.8,1"])
    ap.add_argument("--phrasing", choices=["full", "bare", "two"], default="full",
                    help="full: position and background stated; bare: 'a red circle'; two: "
                         "two objects, the first varied")
    ap.add_argument("--preserve-other", action="store_true",
                    help="two: also run the best window with the other object's word "
                         "preserved (self-attention localisation)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pipe = jattn.load(args.model)
    cs = cases(args.prompts, args.phrasing)
    res = {"settings": vars(args), "runs": {}}
    rows = []
    originals = None
    best = None
    for wtxt in args.windows:
        win = tuple(float(v) for v in wtxt.split(","))
        t0 = time.perf_counter()
        recs, origs = run_mix(pipe, cs, args.steps, args.guidance_scale, args.groups_per_call,
                              window=win)
        originals = originals or origs
        s = summary(recs)
        s["seconds"] = time.perf_counter() - t0
        name = f"mix window {win[0]:g}-{win[1]:g}"
        res["runs"][name] = {"summary": s, "records": recs}
        rows.append((name, s))
        print(_row(name, s), flush=True)
        if best is None or s["shape_and_kept"] > best[1]["shape_and_kept"]:
            best = (win, s)
    win = best[0]
    recs, _ = run_mix(pipe, cs, args.steps, args.guidance_scale, args.groups_per_call,
                      window=win, blend_step=None)
    if args.preserve_other:
        recs, _ = run_mix(pipe, cs, args.steps, args.guidance_scale, args.groups_per_call,
                          window=win, preserve_other=True)
        name = f"mix window {win[0]:g}-{win[1]:g}, other object preserved"
        s = summary(recs)
        res["runs"][name] = {"summary": s, "records": recs}
        rows.append((name, s))
        print(_row(name, s), flush=True)
    name = f"mix window {win[0]:g}-{win[1]:g}, no blend"
    s = summary(recs)
    res["runs"][name] = {"summary": s, "records": recs}
    rows.append((name, s))
    print(_row(name, s), flush=True)
    base = run_baseline(pipe, cs, originals, args.steps, args.guidance_scale,
                        args.groups_per_call * 4)
    s = summary(base)
    res["runs"]["baseline: proxy prompt, same seed"] = {"summary": s, "records": base}
    rows.append(("baseline: proxy prompt, same seed", s))
    print()
    print(f"{len(base)} cases ({args.prompts} {args.phrasing} prompts x 3 proxies), "
          f"{args.steps} steps, "
          f"CFG {args.guidance_scale}")
    print("| run | shape = proxy | colour+position+background kept | both | "
          "outside mask: mean abs (uint8) | outside <= 2 |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['shape']:.2f} | {s['kept']:.2f} | {s['shape_and_kept']:.2f} | "
              f"{s['outside_mad_mean']:.2f} (median {s['outside_mad_median']:.2f}) | "
              f"{s['outside_le_2']:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))


def _row(name, s):
    return (f"{name}: shape {s['shape']:.2f}, kept {s['kept']:.2f}, both "
            f"{s['shape_and_kept']:.2f}, outside MAD {s['outside_mad_mean']:.2f} "
            f"(<=2: {s['outside_le_2']:.2f})")


if __name__ == "__main__":
    main()
