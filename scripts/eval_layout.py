"""Layout methods on the bundled model, plain generation beside (same prompts, same seeds),
read back by the world's detector (jattn.world.evaluate.score_generated).

Figures (each ``--n`` cases, default 48; case i uses seed i in every method):

  excite2  Attend-and-Excite vs plain, two-object prompts stating no positions
           ("a C1 S1 and a C2 S2", jattn.world.evaluate.two_object_prompts' pairs):
           present = every object found; right = every object with its colour and shape.
  excite3  the same on three-object prompts ("a C1 S1, a C2 S2 and a C3 S3", three
           distinct colours and shapes, :func:`three_object_cases`).
  boxes    layout guidance / Bounded Attention vs plain on two-object prompts stating no
           positions, with a box per object (:data:`BOX_LAYOUTS`, fractions of the image,
           rotating over cases); plain = the same prompts and seeds without boxes, scored
           against the same boxes. in_box = every object's detected centroid inside its box;
           iou = every object's box IoU >= 0.3 (IoU of the matched detection's bounding box
           with the given box, both in pixels, exclusive ends); placed = in_box and iou and
           right. Boxes are 0.34 of the image a side (a medium object, 25–29 px, fully inside
           one has IoU ≈ 0.3–0.4); also reported per layout and on the four layouts at the
           world's anchors ("anchors": left/right, top/bottom and swapped; the diagonals
           ask for positions the world never draws).
  binding  similar subjects (half same shape, "a red circle and a blue circle"; half same
           colour, "a green square and a green star"), boxes as above: right = both
           objects with their colour and shape; leakage = an object read with the other's
           colour (same-shape cases) or shape (same-colour cases): the failure Bounded
           Attention exists to remove. Leakage cases are printed per method.

Objects are matched to detections by score_generated (colour first, then shape); an object
not found fails every figure.

  python scripts/eval_layout.py [--methods baseline,layout,bounded,excite]
      [--figures excite2,excite3,boxes,binding] [--n 48] [--steps 50] [--batch 8]
      [--attn-res N] [--layout-kw JSON] [--bounded-kw JSON] [--out runs/eval_layout.json]

Methods: baseline (plain generation), excite (Attend-and-Excite, jattn.methods.excite),
layout (layout guidance, jattn.methods.layout), bounded (Bounded Attention,
jattn.methods.bounded; skipped with a note when that module is not there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import jattn
from jattn.world.captions import _article
from jattn.world.evaluate import score_generated, two_object_prompts
from jattn.world.spec import COLORS, HELD_OUT_PAIRS, IMAGE_SIZE, SHAPES, ObjectSpec, SceneSpec

METHODS = ("baseline", "excite", "layout", "bounded")
FIGURES = ("excite2", "excite3", "boxes", "binding")
# Which methods each figure runs (baseline everywhere).
FIGURE_METHODS = {"excite2": ("baseline", "excite"), "excite3": ("baseline", "excite"),
                  "boxes": ("baseline", "layout", "bounded"),
                  "binding": ("baseline", "layout", "bounded")}
IOU_MIN = 0.3
_H = 0.17  # half side of a box (fraction): 0.34 × 128 ≈ 44 px, a medium object is 25–29 px


def _box(cx: float, cy: float) -> tuple[float, float, float, float]:
    return (round(max(cx - _H, 0.0), 3), round(max(cy - _H, 0.0), 3),
            round(min(cx + _H, 1.0), 3), round(min(cy + _H, 1.0), 3))


# Box pairs (first object, second object), fractions of the image: the world's left/right and
# top/bottom anchors, swapped, and the two diagonals (positions no caption names and no
# training image shows: the world draws objects only near its five anchors).
BOX_LAYOUTS = (
    ("left/right", _box(0.2, 0.5), _box(0.8, 0.5)),
    ("top/bottom", _box(0.5, 0.2), _box(0.5, 0.8)),
    ("right/left", _box(0.8, 0.5), _box(0.2, 0.5)),
    ("bottom/top", _box(0.5, 0.8), _box(0.5, 0.2)),
    ("top-left/bottom-right", _box(0.27, 0.27), _box(0.73, 0.73)),
    ("top-right/bottom-left", _box(0.73, 0.27), _box(0.27, 0.73)),
)

ANCHOR_LAYOUTS = ("left/right", "top/bottom", "right/left", "bottom/top")


def _case(objs, boxes=None, layout=None):
    spec = SceneSpec(tuple(ObjectSpec(c, s) for c, s in objs))
    phrases = [f"{c} {s}" for c, s in objs]
    words = [f"{_article(p)} {p}" for p in phrases]
    prompt = ", ".join(words[:-1]) + f" and {words[-1]}"
    return dict(prompt=prompt, spec=spec, phrases=phrases, boxes=boxes, layout=layout)


def two_object_cases(n: int, with_boxes: bool = False):
    """Two-object prompts stating no positions (two_object_prompts' colour/shape pairs)."""
    out = []
    for i, ep in enumerate(two_object_prompts(n)):
        a, b = ep.spec.objects
        name, b1, b2 = BOX_LAYOUTS[i % len(BOX_LAYOUTS)]
        out.append(_case([(a.color, a.shape), (b.color, b.shape)],
                         [b1, b2] if with_boxes else None, name if with_boxes else None))
    return out


def three_object_cases(n: int):
    """Three objects, distinct colours and distinct shapes, no held-out pair.

    Case i: colours ``COLORS[i % 8]``, then +3 and +5 steps (mod 8); shapes ``SHAPES[i % 6]``
    and the next unused shapes (forward, or backward when ``(i // 6)`` is odd) that keep the pair out of the
    held-out split. Deterministic."""
    out = []
    for i in range(n):
        cols = [COLORS[(i + k) % len(COLORS)] for k in (0, 3, 5)]
        shapes, used = [], set()
        j = i % len(SHAPES)
        step = 1 if (i // len(SHAPES)) % 2 == 0 else len(SHAPES) - 1
        for c in cols:
            for _ in range(2 * len(SHAPES)):
                s = SHAPES[j % len(SHAPES)]
                j += step
                if s not in used and (c, s) not in HELD_OUT_PAIRS:
                    break
            used.add(s)
            shapes.append(s)
        out.append(_case(list(zip(cols, shapes))))
    return out


def binding_cases(n: int):
    """Similar subjects: even cases the same shape in two colours, odd cases one colour on
    two shapes; no held-out pair; boxes rotate over BOX_LAYOUTS. Deterministic."""
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    out = []
    for i in range(n):
        k = i // 2
        if i % 2 == 0:  # same shape
            s = SHAPES[k % len(SHAPES)]
            cs = [c for c in COLORS if (c, s) in allowed]
            c1 = cs[k % len(cs)]
            c2 = cs[(k % len(cs) + 1 + k // len(SHAPES)) % len(cs)]
            if c2 == c1:
                c2 = cs[(cs.index(c1) + 1) % len(cs)]
            objs = [(c1, s), (c2, s)]
        else:  # same colour
            c = COLORS[k % len(COLORS)]
            ss = [s for s in SHAPES if (c, s) in allowed]
            s1 = ss[k % len(ss)]
            s2 = ss[(k % len(ss) + 1 + k // len(COLORS)) % len(ss)]
            if s2 == s1:
                s2 = ss[(ss.index(s1) + 1) % len(ss)]
            objs = [(c, s1), (c, s2)]
        name, b1, b2 = BOX_LAYOUTS[k % len(BOX_LAYOUTS)]
        out.append(_case(objs, [b1, b2], name) | {"kind": "same shape" if i % 2 == 0
                                                  else "same colour"})
    return out


def box_iou(a, b) -> float:
    """IoU of two boxes (x0, y0, x1, y1) in the same units (exclusive ends)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_case(img, case) -> dict:
    """Per-image figures (see the module docstring)."""
    spec = case["spec"]
    r = score_generated(img, spec)
    objs = r["objects"]
    present = all(o["found"] for o in objs)
    right = all(o["color_shape_ok"] for o in objs)
    leak = False
    for i, o in enumerate(objs):
        d = o["detection"]
        if d is None or o["color_shape_ok"]:
            continue
        for j, other in enumerate(spec.objects):
            if j == i:
                continue
            me = spec.objects[i]
            if ((d["color"] == other.color and other.color != me.color)
                    or (d["shape"] == other.shape and other.shape != me.shape)):
                leak = True
    out = dict(present=present, right=right, leak=leak,
               detected=[None if o["detection"] is None else
                         f"{o['detection']['color']} {o['detection']['shape']}" for o in objs])
    if case["boxes"] is not None:
        in_box, ious = [], []
        for o, b in zip(objs, case["boxes"]):
            bp = [v * IMAGE_SIZE for v in b]
            d = o["detection"]
            if d is None:
                in_box.append(False)
                ious.append(0.0)
                continue
            x0, y0, x1, y1 = d["box"]
            cx, cy = d["centroid"]
            in_box.append(bp[0] <= cx <= bp[2] and bp[1] <= cy <= bp[3])
            ious.append(box_iou((x0, y0, x1, y1), bp))
        out.update(in_box=all(in_box), iou=all(v >= IOU_MIN for v in ious),
                   ious=[round(v, 3) for v in ious])
        out["placed"] = out["in_box"] and out["iou"] and right
    return out


def _bounded():
    try:
        from jattn.methods.bounded import bounded_generate
    except ImportError:
        return None
    return bounded_generate


def run_method(pipe, method, cases, steps, batch, attn_res=None, progress=True,
               method_kw=None):
    """Images of ``cases`` (seed of case i = i) by ``method``, in fixed-size batches."""
    images = []
    for s in range(0, len(cases), batch):
        chunk = cases[s:s + batch]
        pad = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled program for all
        prompts = [c["prompt"] for c in pad]
        seeds = list(range(s, s + len(chunk))) + [s + len(chunk) - 1] * (batch - len(chunk))
        if method == "baseline":
            out = pipe.generate(prompts, num_inference_steps=steps, seed=seeds)
        elif method == "excite":
            from jattn.methods.excite import attend_and_excite

            out = attend_and_excite(pipe, prompts, [c["phrases"] for c in pad],
                                    num_inference_steps=steps, seed=seeds, attn_res=attn_res)
        elif method == "layout":
            from jattn.methods.layout import layout_generate

            out = layout_generate(pipe, prompts, [c["phrases"] for c in pad],
                                  [c["boxes"] for c in pad], num_inference_steps=steps,
                                  seed=seeds, **(method_kw or {}).get("layout", {}))
        elif method == "bounded":
            out = _bounded()(pipe, prompts, [c["phrases"] for c in pad],
                             [c["boxes"] for c in pad], num_inference_steps=steps, seed=seeds,
                             **(method_kw or {}).get("bounded", {}))
        else:
            raise ValueError(f"unknown method {method!r}")
        images.extend(np.asarray(out.images)[:len(chunk)])
        if progress:
            print(f"  {method}: {len(images)}/{len(cases)}", flush=True)
    return images


def summarize(rows, cases=None):
    """Fractions of cases; with boxes also ``anchors`` (the four layouts on the world's
    position anchors) and ``by_layout``; binding cases also ``by_kind`` (same shape /
    same colour)."""
    keys = [k for k in ("present", "right", "leak", "in_box", "iou", "placed") if k in rows[0]]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"n": len(rows)}
    if cases is not None and "in_box" in rows[0]:
        groups: dict = {}
        for c, r in zip(cases, rows):
            groups.setdefault(c["layout"], []).append(r)
        out["by_layout"] = {k: summarize(v) for k, v in groups.items()}
        anchors = [r for c, r in zip(cases, rows) if c["layout"] in ANCHOR_LAYOUTS]
        out["anchors"] = summarize(anchors)
    if cases is not None and "kind" in cases[0]:
        kinds: dict = {}
        for c, r in zip(cases, rows):
            kinds.setdefault(c["kind"], []).append(r)
        out["by_kind"] = {k: summarize(v) for k, v in kinds.items()}
    return out


def _line(s: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)) + f"  (n={s['n']})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="baseline,layout,bounded,excite",
                    help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--figures", default=",".join(FIGURES),
                    help="comma-separated subset of " + ",".join(FIGURES))
    ap.add_argument("--n", type=int, default=48, help="cases per figure")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--attn-res", type=int, default=None, help="Attend-and-Excite attn_res")
    ap.add_argument("--layout-kw", default="{}",
                    help='JSON keyword arguments of layout_generate, e.g. \'{"max_index_step": 20}\'')
    ap.add_argument("--bounded-kw", default="{}",
                    help='JSON keyword arguments of bounded_generate (ablations), e.g. '
                         '\'{"num_guidance_steps": 0}\'')
    ap.add_argument("--out", default=None, help="JSON file with every figure and row")
    ap.add_argument("--save-images", default=None, help="folder for the images (npz per run)")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    figures = [f for f in a.figures.split(",") if f]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
    for f in figures:
        if f not in FIGURES:
            ap.error(f"--figures: unknown figure {f!r}; choose from {','.join(FIGURES)}")
    if "bounded" in methods and _bounded() is None:
        print("note: jattn.methods.bounded not importable: Bounded Attention rows skipped")
        methods.remove("bounded")
    try:
        method_kw = {"layout": json.loads(a.layout_kw), "bounded": json.loads(a.bounded_kw)}
    except json.JSONDecodeError as e:
        ap.error(f"--layout-kw/--bounded-kw: not JSON ({e}); give e.g. '{{\"num_guidance_steps\": 0}}'")
    pipe = jattn.load()
    case_sets = {"excite2": two_object_cases(a.n), "excite3": three_object_cases(a.n),
                 "boxes": two_object_cases(a.n, with_boxes=True), "binding": binding_cases(a.n)}
    results = {"settings": dict(steps=a.steps, n=a.n, batch=a.batch, guidance_scale=7.5,
                                scheduler=pipe.default_scheduler if hasattr(
                                    pipe, "default_scheduler") else "default",
                                attn_res=a.attn_res, iou_min=IOU_MIN, method_kw=method_kw, seeds="case i: seed i",
                                model=getattr(pipe, "source", "")),
               "figures": {}, "rows": {}, "timing_s_per_image": {}}
    t_all = time.time()
    done: dict = {}
    for fig in figures:
        cs = case_sets[fig]
        results["figures"][fig] = {}
        results["rows"][fig] = {"cases": [dict(prompt=c["prompt"], boxes=c["boxes"],
                                               layout=c["layout"]) for c in cs]}
        for m in FIGURE_METHODS[fig]:
            if m not in methods:
                continue
            t0 = time.time()
            key = (m, tuple(c["prompt"] for c in cs))
            if m in ("baseline", "excite") and key in done:  # no boxes: same images
                imgs = done[key]
            else:
                imgs = run_method(pipe, m, cs, a.steps, a.batch, a.attn_res,
                                  method_kw=method_kw)
                done[key] = imgs
            dt = time.time() - t0
            results["timing_s_per_image"][f"{fig}/{m}"] = dt / len(cs)
            if a.save_images:
                Path(a.save_images).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(a.save_images) / f"{fig}_{m}.npz", images=np.stack(imgs))
            rows = [score_case(im, c) for im, c in zip(imgs, cs)]
            results["rows"][fig][m] = rows
            results["figures"][fig][m] = summarize(rows, cs)
            print(f"[{fig}] {m}: {_line(results['figures'][fig][m])}  ({dt:.0f} s, "
                  f"{time.time() - t_all:.0f} s total)", flush=True)
    print(f"\nfigures ({a.n} cases each, {a.steps} steps, seed of case i = i):")
    for fig, per in results["figures"].items():
        for m, s in per.items():
            print(f"  {fig:8s} {m:9s} {_line(s)}")
            if "anchors" in s:
                print(f"  {'':8s} {'':9s} anchor layouts: {_line(s['anchors'])}")
                for k, v in s["by_layout"].items():
                    print(f"  {'':8s} {'':9s}   {k:22s} {_line(v)}")
            for k, v in s.get("by_kind", {}).items():
                print(f"  {'':8s} {'':9s} {k}: {_line(v)}")
    for fig in ("binding", "boxes", "excite2", "excite3"):
        for m, rows in results["rows"].get(fig, {}).items():
            if m == "cases":
                continue
            cs = case_sets[fig]
            leaks = [f"{c['prompt']} -> {r['detected']}" for c, r in zip(cs, rows) if r["leak"]]
            print(f"leakage cases, {fig}, {m} ({len(leaks)}):")
            for line in leaks:
                print("   ", line)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
