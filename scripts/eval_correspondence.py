"""Evaluate localisation / correspondence methods on the bundled model's world.

Run:  python scripts/eval_correspondence.py --method segment [--model DIR] [--cases 48]
          [--seeds 0] [--steps 50] [--inversion ddim|null-text] [--ablation]
          [--config configs/segment_world.py] [--out runs/eval_segment.json]

Methods (``--method``; each is one entry of ``METHODS``, a function
``(pipe, args) -> results dict``, or of ``SCRIPTS``: ``mix`` runs scripts/eval_mix.py and
``cross-image`` scripts/eval_cross_image.py with the remaining arguments, e.g.
``--method cross-image --n 48 --steps 100 --guidance-scale 3.5``):

* ``segment`` — self-segmentation (:mod:`jattn.methods.segment`; Patashnik et al. ICCV
  2023). Two parts, ``--cases`` each (≥ 48):

  (a) ``renders``: world scenes (1 or 2 objects of distinct shapes, positions stated,
      background stated in every other case) rendered with exact masks, given as *images*:
      inverted (``--inversion``), regenerated with the maps captured, segmented. Ground
      truth: the renderer's masks.
  (b) ``generated``: the same kind of prompts generated from seeds; ground truth: the
      world detector's masks of the objects matched to the prompt
      (:func:`jattn.world.detector.score_image`; objects it does not find are left out and
      counted).

  The words are the objects' shape nouns (what the reference's noun tagger would pick,
  less "background"/"photo"/"drawing"). Per object, at 128² (masks with holes filled: a
  ring counts as its disc): IoU of the pixels labelled with its word with its mask, and
  whether its word is the majority label over its mask ("label correct"). Goals: mean IoU
  ≥ 0.7, label correct ≥ 0.9.

  Baseline beside it: the word's cross-attention alone — DAAM heat maps
  (:func:`jattn.policy.analysis.word_heatmaps`: every cross grid but the lowest, bicubic
  to 128², clamped, min–max normalised) thresholded at Otsu's threshold (and at DAAM's
  0.4); a pixel takes the word of highest heat among the words whose mask holds it, else
  background.

  ``--ablation`` adds, on the same cases: cross grid 16² instead of 8², threshold 0.3,
  clusters 3 / 8, bilinear label upsampling, self grid 8², step windows [0, 0.5) and
  [0.5, 1), and the default words (colour and shape; an object then counts its colour or
  shape word as its label).

Prints a table and writes JSON (``--out``) with the settings, figures and per-case
records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GOALS = {"iou_mean": 0.7, "label_acc": 0.9}


# ------------------------------------------------------------------------- world cases
@dataclasses.dataclass
class Case:
    """One evaluation case: a prompt, the words that label segments, the objects' specs,
    and the seed of its render (part a) or of its generation (part b)."""

    prompt: str
    words: list[str]
    spec: object
    seed: int


def world_cases(n: int, *, offset: int = 0) -> list[Case]:
    """``n`` deterministic world prompts: case i has 1 object (even i) or 2 (odd i) of
    distinct colours and shapes (training-split pairs), positions stated (the two objects
    on opposite sides), the background stated in every other pair of cases, caption
    openings rotating over the 8 prefixes. ``offset`` shifts the sequence."""
    from jattn.world import (BACKGROUNDS, COLORS, HELD_OUT_PAIRS, SHAPES, ObjectSpec,
                             SceneSpec, caption_for)

    sides = (("on the left", "on the right"), ("at the top", "at the bottom"),
             ("on the right", "on the left"), ("at the bottom", "at the top"))
    singles = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
    out = []
    for i in range(offset, offset + n):
        c1 = COLORS[i % len(COLORS)]
        s1 = SHAPES[(i // 2) % len(SHAPES)]
        if (c1, s1) in HELD_OUT_PAIRS:
            s1 = SHAPES[(SHAPES.index(s1) + 1) % len(SHAPES)]
        if i % 2 == 0:
            objs = (ObjectSpec(c1, s1, position=singles[(i // 2) % len(singles)]),)
        else:
            c2 = COLORS[(i * 3 + 2) % len(COLORS)]
            c2 = c2 if c2 != c1 else COLORS[(COLORS.index(c1) + 1) % len(COLORS)]
            s2 = next(s for k in range(1, len(SHAPES))
                      if (s := SHAPES[(SHAPES.index(s1) + k + i // 6) % len(SHAPES)]) != s1
                      and (c2, s) not in HELD_OUT_PAIRS)
            p1, p2 = sides[(i // 2) % len(sides)]
            objs = (ObjectSpec(c1, s1, position=p1), ObjectSpec(c2, s2, position=p2))
        background = BACKGROUNDS[(i // 4) % len(BACKGROUNDS)] if (i // 2) % 2 else None
        spec = SceneSpec(objs, background)
        out.append(Case(caption_for(spec, i % 8), [o.shape for o in objs], spec, 1000 + i))
    return out


# ------------------------------------------------------------------------- metrics
def object_scores(labels: np.ndarray, masks: Sequence[np.ndarray | None],
                  word_labels: Sequence[Sequence[int]]) -> list[dict | None]:
    """Per object: IoU of the pixels whose label is one of ``word_labels[o]`` with
    ``masks[o]``, and whether the majority label over the mask is one of them.

    Args:
      labels: int ``(H, W)`` label map (0 background); masks: bool ``(H, W)`` per object
        (None: not found, scored None); word_labels: the labels that count as the object's.
    """
    from jattn.world.evaluate import mask_iou

    out = []
    for mask, ok in zip(masks, word_labels):
        if mask is None:
            out.append(None)
            continue
        pred = np.isin(labels, ok)
        counts = np.bincount(labels[mask].ravel().astype(np.int64), minlength=int(labels.max()) + 1)
        out.append({"iou": mask_iou(pred, mask), "label_ok": bool(int(counts.argmax()) in ok)})
    return out


def daam_labels(maps: dict, tokenizer, prompt: str, words: Sequence[str], row: int,
                size: tuple[int, int], threshold) -> np.ndarray:
    """The baseline label map: each word's DAAM heat map thresholded (a float, or "otsu"),
    a pixel takes the word of highest heat among those whose mask holds it, else 0."""
    from jattn.policy.analysis import word_heatmaps
    from jattn.world.evaluate import threshold_heatmap

    heat = word_heatmaps(maps, tokenizer, prompt, list(words), row=row, size=size)
    stack = np.stack([heat[w] for w in words])                          # (W, H, W)
    masks = np.stack([threshold_heatmap(heat[w], threshold) for w in words])
    best = np.where(masks, stack, -1.0).argmax(0)
    return np.where(masks.any(0), best + 1, 0).astype(np.uint8)


def cell_labels(maps: dict, tokenizer, prompt: str, words: Sequence[str], row: int,
                grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Ablation baseline at the segmentation's own resolution: each word's cross map at
    ``grid`` (no interpolation) min–max normalised and cut at Otsu's threshold, a cell
    takes the word of highest value among those above it, nearest upsampling to ``size``."""
    from jattn.io.words import word_token_indices
    from jattn.world.evaluate import otsu_threshold

    m = np.asarray(maps[f"cross{grid[0]}x{grid[1]}"][row])
    heat = []
    for w in words:
        h = m[:, word_token_indices(tokenizer, prompt, w)].mean(1).reshape(grid)
        heat.append((h - h.min()) / (h.max() - h.min() + 1e-8))
    heat = np.stack(heat)
    masks = np.stack([h >= otsu_threshold(h) for h in heat])
    lab = np.where(masks.any(0), np.where(masks, heat, -1.0).argmax(0) + 1, 0)
    return _nearest(lab, size)


def oracle_labels(masks: Sequence[np.ndarray | None], grid: tuple[int, int],
                  size: tuple[int, int]) -> np.ndarray:
    """The best label map made of whole cells of ``grid``: a cell takes the object covering
    at least half of it (the ceiling of any cell-level segmentation, e.g. self-attention
    clusters upsampled by nearest neighbour)."""
    fy, fx = size[0] // grid[0], size[1] // grid[1]
    lab = np.zeros(grid, np.int64)
    for o, m in enumerate(masks):
        if m is not None:
            lab[m.reshape(grid[0], fy, grid[1], fx).mean((1, 3)) >= 0.5] = o + 1
    return _nearest(lab, size)


def _nearest(lab: np.ndarray, size) -> np.ndarray:
    rows = np.arange(size[0]) * lab.shape[0] // size[0]
    cols = np.arange(size[1]) * lab.shape[1] // size[1]
    return lab[rows][:, cols].astype(np.uint8)


def summarise(records: Sequence[dict], key: str) -> dict:
    """Mean IoU, label accuracy and counts over every object of ``records`` under
    setting ``key`` (objects not found skipped), also split by 1- and 2-object cases."""
    def agg(recs):
        objs = [o for r in recs for o in r["scores"][key] if o is not None]
        if not objs:
            return {"n_objects": 0}
        ious = np.array([o["iou"] for o in objs])
        return {"n_objects": len(objs), "iou_mean": float(ious.mean()),
                "iou_ge_0.5": float((ious >= 0.5).mean()),
                "label_acc": float(np.mean([o["label_ok"] for o in objs]))}

    out = agg(records)
    out["one_object"] = agg([r for r in records if len(r["words"]) == 1])
    out["two_objects"] = agg([r for r in records if len(r["words"]) == 2])
    return out


# ------------------------------------------------------------------------- segment
def _batches(items: list, size: int):
    """Fixed-size batches (the last padded with its last item; ``n_real`` items are real),
    so one compiled program serves the whole run."""
    for s in range(0, len(items), size):
        chunk = items[s:s + size]
        yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def _render(case: Case):
    """The case's world render (uint8 image) and its objects' masks (holes filled)."""
    from jattn.world import fill_holes, render

    scene = render(case.spec, seed=case.seed, variant=0)
    return scene.image, [fill_holes(o.mask) for o in scene.objects]


def _detected(image: np.ndarray, case: Case) -> list[np.ndarray | None]:
    """Masks (holes filled) of the detections matched to the case's objects (None: not
    found)."""
    from jattn.world import fill_holes, score_image

    res = score_image(image, case.spec)
    return [fill_holes(o["detection"].mask) if o["found"] else None for o in res["objects"]]


def eval_segment(pipe, args) -> dict:
    """Parts (a) renders and (b) generations; every setting and the baseline (module
    docstring). Returns the results dict (settings, summary per part and setting,
    records)."""
    from jattn.methods.segment import segment, segment_from_maps
    from jattn.sampling.inversion import invert

    cfg = {}
    if args.config:
        from jattn.cli import load_config

        cfg = {k: v for k, v in load_config(args.config).items()
               if k not in ("method", "expected", "prompt", "words", "image", "seed")}
    base = dict(clusters=cfg.get("clusters", args.clusters),
                threshold=cfg.get("threshold", args.threshold),
                upsample=cfg.get("upsample", args.upsample),
                cross_grid=cfg.get("cross_resolution", args.cross_resolution))
    steps = cfg.get("steps", args.steps)
    gs = cfg.get("guidance_scale", args.guidance_scale)
    window = tuple(cfg.get("step_window", (args.start_step, args.end_step)))
    # post-processing variants on the maps of the main capture: name -> segment_from_maps kw
    posts = {"self-seg": base}
    # other capture passes: name -> segment() kwargs (scored with the base post-processing)
    passes = {}
    if args.ablation:
        posts.update({
            "cross 16²": dict(base, cross_grid=16),
            "threshold 0.3": dict(base, threshold=0.3),
            "clusters 3": dict(base, clusters=3),
            "clusters 8": dict(base, clusters=8),
            "bilinear": dict(base, upsample="bilinear"),
            "default words": dict(base, words=None),
        })
        passes = {"steps [0, 0.5)": dict(step_window=(0.0, 0.5)),
                  "steps [0.5, 1)": dict(step_window=(0.5, 1.0)),
                  "self 8²": dict(self_resolution=8, cross_resolution=None)}
    parts = {"renders": world_cases(args.cases),
             "generated": world_cases(args.cases, offset=args.cases)}
    results = {"settings": dict(vars(args)), "config": cfg, "parts": {}}
    for part, cases in parts.items():
        t0 = time.perf_counter()
        jobs = [(c, s) for c in cases for s in (args.seeds if part == "generated" else [c.seed])]
        records = [{"prompt": c.prompt, "words": c.words, "seed": s, "scores": {}}
                   for c, s in jobs]
        gts: list = [None] * len(jobs)
        batches = list(_batches(list(range(len(jobs))), args.batch_size))
        inversions = []
        if part == "renders":
            for chunk, _ in batches:
                scenes = [_render(jobs[j][0]) for j in chunk]
                for j, (_, masks) in zip(chunk, scenes):
                    gts[j] = masks
                inversions.append(invert(pipe, np.stack([im for im, _ in scenes]),
                                         [jobs[j][0].prompt for j in chunk],
                                         method=args.inversion, num_inference_steps=steps,
                                         guidance_scale=gs))
        for pname, pkw in [("main", {})] + list(passes.items()):
            for bi, (chunk, n) in enumerate(batches):
                cs = [jobs[j][0] for j in chunk]
                prompts, words = [c.prompt for c in cs], [c.words for c in cs]
                kw = dict(words=words, num_inference_steps=steps, guidance_scale=gs,
                          clusters=base["clusters"], threshold=base["threshold"],
                          upsample=base["upsample"], cross_resolution=base["cross_grid"],
                          step_window=window)
                kw.update(pkw)
                if part == "renders":
                    r = segment(pipe, prompts, inversion=inversions[bi],
                                capture_all_cross=pname == "main", **kw)
                else:
                    r = segment(pipe, prompts, seed=[jobs[j][1] for j in chunk],
                                capture_all_cross=pname == "main", **kw)
                if part == "generated" and pname == "main":
                    for row, j in enumerate(chunk[:n]):
                        gts[j] = _detected(r.images[row], cs[row])
                        records[j]["found"] = [m is not None for m in gts[j]]
                if pname != "main":
                    for row, j in enumerate(chunk[:n]):
                        records[j]["scores"][pname] = object_scores(
                            r.labels[row], gts[j], _own(cs[row], words[row]))
                    continue
                for post, post_kw in posts.items():
                    post_kw = dict(post_kw)
                    pw = post_kw.pop("words", words)
                    rr = segment_from_maps(pipe, r.maps, prompts, words=pw, size=r.labels.shape[1:],
                                           **post_kw)
                    for row, j in enumerate(chunk[:n]):
                        rec = records[j]
                        rec["scores"][post] = object_scores(rr.labels[row], gts[j],
                                                            _own(cs[row], rr.words[row]))
                        if post == "self-seg":
                            rec["segments"] = rr.segments(row)
                            rec["pixels_per_label"] = np.bincount(
                                rr.labels[row].ravel(), minlength=len(words[row]) + 1).tolist()
                for row, j in enumerate(chunk[:n]):
                    own = _own(cs[row], words[row])
                    if args.ablation:
                        grid = (r.self_grid, r.cross_grid)
                        records[j]["scores"][f"cross {grid[1][0]}² cells@otsu"] = object_scores(
                            cell_labels(r.maps, pipe.tokenizer, prompts[row], words[row], row,
                                        grid[1], r.labels.shape[1:]), gts[j], own)
                        records[j]["scores"][f"oracle {grid[0][0]}² cells"] = object_scores(
                            oracle_labels(gts[j], grid[0], r.labels.shape[1:]), gts[j],
                            [[k + 1] for k in range(len(words[row]))])
                    for thr in ("otsu", 0.4):
                        lab = daam_labels(r.maps, pipe.tokenizer, prompts[row], words[row], row,
                                          r.labels.shape[1:], thr)
                        records[j]["scores"][f"baseline DAAM@{thr}"] = object_scores(
                            lab, gts[j], own)
                print(f"  {part} / {pname}: batch {bi + 1}/{len(batches)} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        keys = list(records[0]["scores"])
        summary = {k: summarise(records, k) for k in keys}
        if part == "generated":
            found = [f for r in records for f in r.get("found", [])]
            summary["detector_found"] = float(np.mean(found)) if found else None
        results["parts"][part] = {"summary": summary, "records": records,
                                  "seconds": time.perf_counter() - t0}
    return results


def _own(case: Case, words: Sequence[str]) -> list[list[int]]:
    """Labels counting as each object's: its shape word's, and its colour word's when the
    words include it (the default content words)."""
    return [[words.index(w) + 1 for w in (o.shape, o.color) if w in words]
            for o in case.spec.objects]


METHODS = {"segment": eval_segment}


# ------------------------------------------------------------------------- report
def format_table(results: dict) -> str:
    lines = []
    for part, res in results["parts"].items():
        s = res["summary"]
        lines.append(f"\n{part} ({res['seconds']:.0f} s)"
                     + (f", detector found {s['detector_found']:.1%} of the objects"
                        if s.get("detector_found") is not None else ""))
        lines.append(f"{'setting':<26} {'objects':>7} {'mIoU':>6} {'IoU≥.5':>7} {'label':>6}"
                     f" {'mIoU 1obj':>9} {'mIoU 2obj':>9} {'label 2obj':>10}")
        for k, v in s.items():
            if not isinstance(v, dict) or "n_objects" not in v or not v["n_objects"]:
                continue
            one, two = v["one_object"], v["two_objects"]
            lines.append(f"{k:<26} {v['n_objects']:>7} {v['iou_mean']:>6.3f} "
                         f"{v['iou_ge_0.5']:>7.1%} {v['label_acc']:>6.1%} "
                         f"{one.get('iou_mean', float('nan')):>9.3f} "
                         f"{two.get('iou_mean', float('nan')):>9.3f} "
                         f"{two.get('label_acc', float('nan')):>10.1%}")
    lines.append(f"\ngoals: mIoU >= {GOALS['iou_mean']}, label correct >= {GOALS['label_acc']}; "
                 "self-segmentation must beat the cross-attention baseline")
    return "\n".join(lines)


# methods whose evaluation lives in its own script (run with the remaining arguments)
SCRIPTS = {"mix": "eval_mix.py", "cross-image": "eval_cross_image.py"}


def main(argv=None):
    import runpy
    import sys

    import jattn
    from jattn.io.outputs import _jsonable

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    known, rest = pre.parse_known_args(argv)
    if known.method in SCRIPTS:
        script = Path(__file__).resolve().parent / SCRIPTS[known.method]
        sys.argv = [str(script)] + rest
        runpy.run_path(str(script), run_name="__main__")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(METHODS) + sorted(SCRIPTS), required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default=None, help="a configs/segment_*.py (its settings)")
    ap.add_argument("--cases", type=int, default=48, help="cases per part")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="generation seeds of part (b) (each case once per seed)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--inversion", choices=["ddim", "null-text"], default="ddim")
    ap.add_argument("--clusters", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.35)
    ap.add_argument("--cross-resolution", type=int, default=None)
    ap.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest")
    ap.add_argument("--start-step", type=float, default=0.0,
                    help="step window start (fraction of the steps)")
    ap.add_argument("--end-step", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe = jattn.load(args.model)
    results = METHODS[args.method](pipe, args)
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_jsonable(results), indent=1))


if __name__ == "__main__":
    main()
