"""Quality of a text-to-image model on the world, measured with the world's detector.

What is measured (``scripts/eval_world.py`` prints it; :func:`evaluate` computes it):

1. **single-object prompts** (:func:`single_object_prompts`): every held-out (colour, shape)
   pair (never drawn in training, ``spec.HELD_OUT_PAIRS``) at every position, in rotating
   caption variants. Per image: the object the detector matched to the prompt
   (``detector.score_image``) has the right colour and shape (target ≥ 90 %), the right
   position (target ≥ 85 %); also the exact rate (one object, everything stated right).
2. **two-object prompts** (:func:`two_object_prompts`): a held-out pair and a training
   pair of another colour and shape at opposite positions. Per image: both objects found
   with every stated attribute (colour, shape, position) right (target ≥ 70 %).
3. **cross-attention localisation** (single-object prompts, target mean IoU ≥ 0.5): the
   head- and layer-mean cross-attention probabilities over all denoising steps, captured
   in-graph by :class:`jattn.policy.capture.Capture` (conditional half of the CFG batch),
   of the colour token and of the shape token (mean over the word's BPE tokens):
   :func:`token_heatmap` takes the highest cross resolution (``"highest"``, 16² latents on
   the bundled model) upsampled bilinearly to the image (128²), or the mean of every cross
   resolution, each so upsampled (``"all"``), and normalises it to [0, 1] (min–max);
   :func:`threshold_heatmap` keeps pixels ≥ 0.5 (or ≥ Otsu's threshold); :func:`mask_iou`
   with the matched detection's silhouette, holes filled (a ring counts as its disc).
   Images where the object was not detected have no IoU (they are counted as misses in 1.).
   Ceiling: a map equal to a medium object's mask pooled to 16² scores IoU ≈ 0.89 at 0.5
   (≈ 0.64 for a small star); Otsu cuts lower on such maps (≈ 0.66 and 0.47).

The images are only ever judged by the detector (``detector.detect``), never by the
generator's masks. Everything here is numpy except :func:`generate_with_capture` /
:func:`evaluate`, which import the pipeline and the policy lazily (so ``jattn.world`` stays
numpy-only).

Source of the attention localisation protocol: Tang et al., "What the DAAM: Interpreting
Stable Diffusion Using Cross Attention" (ACL 2023), castorini/daam (mIoU of thresholded
per-word heat maps against object masks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from jattn.world.captions import caption_for
from jattn.world.detector import Detection, detect, fill_holes, score_image
from jattn.world.spec import (
    COLORS, HELD_OUT_PAIRS, IMAGE_SIZE, POSITIONS, SHAPES, ObjectSpec, SceneSpec,
)

__all__ = [
    "EvalPrompt", "TARGETS", "single_object_prompts", "two_object_prompts", "eval_prompts",
    "score_generated", "token_heatmap", "threshold_heatmap", "otsu_threshold", "mask_iou",
    "resize_bilinear", "attention_ious", "summarize", "format_table", "evaluate",
    "generate_with_capture", "capture_policy", "word_positions", "setting_name",
    "HEATMAP_MODES",
]

# Targets of the bundled model (the figures of summarize() they apply to).
TARGETS = {
    "single.color_shape_acc": 0.90,
    "single.position_acc": 0.85,
    "two.both_correct": 0.70,
    "attention.iou_mean": 0.50,
}
# Caption openings of caption_for variants 0..7 (prefix × articles); a spec without
# background reads the same for variant v and v + 8k, so these 8 cover every wording.
_NUM_OPENINGS = 8
_TWO_POSITIONS = (("on the left", "on the right"), ("at the top", "at the bottom"),
                  ("on the right", "on the left"), ("at the bottom", "at the top"))
HEATMAP_MODES = ("highest", "all")


# ----------------------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Attributes:
      text: the caption given to the model.
      spec: what it asks for (``parse_prompt(text) == spec``).
      category: "single" or "two".
    """

    text: str
    spec: SceneSpec
    category: str


def single_object_prompts(n: int = 40) -> list[EvalPrompt]:
    """``n`` one-object prompts on held-out (colour, shape) pairs, position stated.

    Prompt i asks for held-out pair ``i % 8`` (sorted) at position ``(4·(i // 8) + i) % 5``
    (so the first 40 are the 40 specs of ``spec.heldout_specs()``, every 8 consecutive ones
    covering every pair) in caption opening ``(i + i // 8) % 8`` ("a …", "a photo of a …",
    …, bare "red star on the left"; every pair gets every opening over 64 prompts).
    Deterministic.

    Raises:
      ValueError: n < 0.
    """
    if n < 0:
        raise ValueError(f"n={n}: need n >= 0")
    pairs = sorted(HELD_OUT_PAIRS)
    out = []
    for i in range(n):
        a = i // len(pairs)
        color, shape = pairs[i % len(pairs)]
        position = POSITIONS[(4 * a + i) % len(POSITIONS)]
        spec = SceneSpec((ObjectSpec(color, shape, position=position),))
        variant = (i + a) % _NUM_OPENINGS
        out.append(EvalPrompt(caption_for(spec, variant), spec, "single"))
    return out


def two_object_prompts(n: int = 40) -> list[EvalPrompt]:
    """``n`` two-object prompts: a held-out pair and a training pair, opposite positions.

    Prompt i: first object held-out pair ``i % 8``; second object the colour
    ``(c + 1 + i // 8) mod 8`` steps after it in ``COLORS`` (skipping its own) with the
    first shape from ``(s + 1 + i) mod 6`` on that is not its shape and not held out with
    that colour; positions rotate over left/right, top/bottom, right/left, bottom/top;
    caption opening ``(i + i // 8) % 8``. Never seen in training (the first pair is held out).
    Deterministic.

    Raises:
      ValueError: n < 0.
    """
    if n < 0:
        raise ValueError(f"n={n}: need n >= 0")
    pairs = sorted(HELD_OUT_PAIRS)
    out = []
    for i in range(n):
        c1, s1 = pairs[i % len(pairs)]
        ci = COLORS.index(c1)
        c2 = COLORS[(ci + 1 + (i // len(pairs)) % (len(COLORS) - 1)) % len(COLORS)]
        si = SHAPES.index(s1)
        s2 = next(s for s in (SHAPES[(si + 1 + i + k) % len(SHAPES)] for k in range(len(SHAPES)))
                  if s != s1 and (c2, s) not in HELD_OUT_PAIRS)
        p1, p2 = _TWO_POSITIONS[i % len(_TWO_POSITIONS)]
        spec = SceneSpec((ObjectSpec(c1, s1, position=p1), ObjectSpec(c2, s2, position=p2)))
        variant = (i + i // len(pairs)) % _NUM_OPENINGS
        out.append(EvalPrompt(caption_for(spec, variant), spec, "two"))
    return out


def eval_prompts(n_single: int = 40, n_two: int = 40) -> list[EvalPrompt]:
    """``single_object_prompts(n_single) + two_object_prompts(n_two)``."""
    return single_object_prompts(n_single) + two_object_prompts(n_two)


# ----------------------------------------------------------------------------- scoring

def _detection_summary(d: Detection) -> dict:
    return {"color": d.color, "shape": d.shape, "position": d.position, "size": d.size,
            "fill": d.fill, "box": list(d.box), "area": d.area,
            "centroid": [round(float(v), 2) for v in d.centroid]}


def score_generated(image: np.ndarray, spec: SceneSpec) -> dict:
    """Judge one generated image against what its prompt asked for (detector only).

    Args:
      image: uint8 ``(128, 128, 3)`` RGB.
      spec: the prompt's spec.

    Returns:
      dict with
        objects: per spec object ``{"color", "shape", "position": asked (None when
          unstated), "found": bool, "color_ok", "shape_ok": bool, "position_ok": bool or
          None when unstated, "color_shape_ok": colour and shape right, "all_ok": every
          stated attribute right, "fill": asked (None when unstated), "fill_ok": bool or
          None when unstated, "detection": summary dict of the matched detection (colour,
          shape, position, size, fill, box, area, centroid) or None}``;
        background: the detected background (one of ``spec.BACKGROUNDS``, always reported);
        background_ok: it equals the spec's background, None when the spec leaves it
          unstated (``exact`` stays about the objects);
        count_ok: as many detections as objects asked for;
        exact: count_ok and every object all_ok;
        num_detections: int;
        masks: per spec object the matched detection's silhouette with holes filled, bool
          ``(128, 128)``, or None (not JSON: drop before saving).

    Raises:
      ValueError: image not uint8 (H, W, 3).
    """
    dets = detect(image)
    res = score_image(image, spec, detections=dets)
    objects, masks = [], []
    for o, r in zip(spec.objects, res["objects"]):
        d = r["detection"]
        objects.append({
            "color": o.color, "shape": o.shape, "position": o.position,
            "found": bool(r["found"]),
            "color_ok": bool(r["color"]), "shape_ok": bool(r["shape"]),
            "position_ok": None if r["position"] is None else bool(r["position"]),
            "color_shape_ok": bool(r["color"]) and bool(r["shape"]),
            "all_ok": bool(r["all"]),
            "fill": o.fill, "fill_ok": None if r["fill"] is None else bool(r["fill"]),
            "detection": None if d is None else _detection_summary(d),
        })
        masks.append(None if d is None else fill_holes(d.mask))
    return {"objects": objects, "count_ok": bool(res["count_ok"]),
            "exact": bool(res["all_correct"]), "num_detections": len(dets),
            "background": res["background"], "background_ok": res["background_ok"],
            "masks": masks}


# ----------------------------------------------------------------------------- attention

def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights, half-pixel centres, edges clamped."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = x - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - w
    m[np.arange(n_out), hi] += w
    return m


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes (``jax.image.resize(..., "linear")`` for
    upsampling: half-pixel centres, edge values held).

    Args:
      x: float ``(..., h, w)``.
      size: (H, W) output.

    Returns:
      float32 ``(..., H, W)``.
    """
    x = np.asarray(x, np.float64)
    mh = _interp_matrix(x.shape[-2], size[0])
    mw = _interp_matrix(x.shape[-1], size[1])
    return np.einsum("Hh,...hw,Ww->...HW", mh, x, mw).astype(np.float32)


def _resolution(key: str) -> tuple[int, int]:
    h, w = key[len("cross"):].split("x")
    return int(h), int(w)


def token_heatmap(maps: dict[str, np.ndarray], positions: Sequence[int], *,
                  mode: str = "highest", size: int = IMAGE_SIZE) -> np.ndarray:
    """A word's cross-attention heat map over the image, normalised to [0, 1].

    Args:
      maps: ``{"cross{h}x{w}": (T, S)}`` for one image (T = h·w query tokens, row-major,
        S key tokens): head/layer/step-mean probabilities, e.g. one row of
        ``capture.captured_maps``. Keys not starting with "cross" are ignored.
      positions: token positions of the word (BOS = 0); their maps are averaged.
      mode: "highest" — the highest cross resolution only; "all" — the mean of every
        cross resolution, each upsampled bilinearly to the image first.
      size: output side in pixels.

    Returns:
      float32 ``(size, size)``: upsampled (bilinear), then ``(m - min) / (max - min)``
      (all zeros when the map is constant).

    Raises:
      ValueError: no cross-attention map, unknown mode, empty positions.
    """
    if mode not in HEATMAP_MODES:
        raise ValueError(f"mode={mode!r}: use one of {HEATMAP_MODES}")
    positions = np.asarray(positions, int)
    if positions.size == 0:
        raise ValueError("positions is empty: the word has no tokens in the prompt")
    keys = [k for k in maps if k.startswith("cross")]
    if not keys:
        raise ValueError(f"no cross-attention map among keys {sorted(maps)}")
    keys.sort(key=lambda k: _resolution(k)[0] * _resolution(k)[1], reverse=True)
    if mode == "highest":
        keys = keys[:1]
    heat = np.zeros((size, size), np.float32)
    for k in keys:
        h, w = _resolution(k)
        m = np.asarray(maps[k], np.float32)[:, positions].mean(-1).reshape(h, w)
        heat += resize_bilinear(m, (size, size))
    heat /= len(keys)
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(heat)
    return (heat - lo) / (hi - lo)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance of a
    ``bins``-bin histogram; returns the upper edge of the lower class)."""
    hist, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def threshold_heatmap(heat: np.ndarray, threshold: float | str = 0.5) -> np.ndarray:
    """bool mask ``heat >= threshold`` (a float in [0, 1]) or ``heat > otsu`` ("otsu").

    Raises:
      ValueError: a threshold string other than "otsu".
    """
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold={threshold!r}: give a float in [0, 1] or 'otsu'")
        return heat >= otsu_threshold(heat)
    return heat >= float(threshold)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape (0 when both empty).

    Raises:
      ValueError: shapes differ.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def attention_ious(maps: dict[str, np.ndarray], positions: dict[str, Sequence[int]],
                   mask: np.ndarray, *, modes: Iterable[str] = HEATMAP_MODES,
                   thresholds: Iterable[float | str] = (0.5, "otsu")) -> dict[str, dict[str, float]]:
    """IoU of each word's thresholded heat map with an object mask, for several settings.

    Args:
      maps: ``{"cross{h}x{w}": (T, S)}`` of one image (see :func:`token_heatmap`).
      positions: ``{word_role: token positions}``, e.g. ``{"color": [5], "shape": [6]}``.
      mask: bool ``(H, W)`` object mask, H = W = heat map size.
      modes, thresholds: the settings; each gives key ``f"{mode}@{threshold}"``.

    Returns:
      ``{setting: {word_role: IoU}}``.
    """
    out: dict[str, dict[str, float]] = {}
    heats = {(m, r): token_heatmap(maps, pos, mode=m, size=mask.shape[0])
             for m in modes for r, pos in positions.items()}
    for m in modes:
        for t in thresholds:
            out[setting_name(m, t)] = {r: mask_iou(threshold_heatmap(heats[m, r], t), mask)
                                       for r in positions}
    return out


def setting_name(mode: str, threshold: float | str) -> str:
    """``"highest@0.5"``, ``"all@otsu"`` … (keys of :func:`attention_ious`)."""
    return f"{mode}@{threshold if isinstance(threshold, str) else format(float(threshold), 'g')}"


def word_positions(tokenizer, prompt: str, obj: ObjectSpec) -> dict[str, list[int]]:
    """Token positions (BOS = 0) of the object's colour and shape words in ``prompt``
    (every occurrence; the evaluation prompts never repeat them).

    Raises:
      ValueError: a word missing from the prompt.
    """
    from jattn.io.tokenizer import token_indices

    return {role: [int(k) for k in token_indices(tokenizer, prompt, getattr(obj, role))]
            for role in ("color", "shape")}


# ----------------------------------------------------------------------------- summary

def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(records: Sequence[dict], *, setting: str = "highest@0.5") -> dict:
    """Figures over per-image records (:func:`evaluate`'s ``records``).

    Args:
      records: dicts with "category" ("single"/"two"), "objects" (from
        :func:`score_generated`), "exact", and optionally "iou" per object
        (``{setting: {"color": x, "shape": y}}`` or None when not detected).
      setting: the attention setting of the headline IoU figures.

    Returns:
      ``{"single": {...}, "two": {...}, "attention": {...}, "attention_two": {...},
      "targets": {...}}``: every fraction is over images (None without any image);
      single: color_acc, shape_acc, color_shape_acc, position_acc (images stating a
      position), exact_acc, found_acc, count_acc (exactly one object detected; None
      when records carry no "count_ok"), n_images, by_pair (color_shape_acc per held-out
      pair); two: both_correct (both objects found, every stated attribute right),
      exact_acc (and no extra detection), count_acc, color_acc/shape_acc/position_acc (per object),
      n_images; both also have by_position ``{asked phrase: {"acc", "n", "detected":
      {detected phrase or "none": count}}}`` over the objects that state a position (a
      confusion table: e.g. "on the left" read as "on the right"); attention
      (single-object images): for ``setting`` iou_color, iou_shape, iou_mean (mean of the two), n (images with the object
      detected), and ``settings``: the same for every setting recorded; attention_two: the
      same over both objects of two-object images; targets: ``{figure: {"target",
      "value", "met"}}`` for :data:`TARGETS`.
    """
    single = [r for r in records if r["category"] == "single"]
    two = [r for r in records if r["category"] == "two"]

    def frac(rs, fn):
        vals = [fn(r) for r in rs]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    s = {
        "n_images": len(single),
        "found_acc": frac(single, lambda r: r["objects"][0]["found"]),
        "color_acc": frac(single, lambda r: r["objects"][0]["color_ok"]),
        "shape_acc": frac(single, lambda r: r["objects"][0]["shape_ok"]),
        "color_shape_acc": frac(single, lambda r: r["objects"][0]["color_shape_ok"]),
        "position_acc": frac(single, lambda r: r["objects"][0]["position_ok"]),
        "exact_acc": frac(single, lambda r: r["exact"]),
        "count_acc": frac(single, lambda r: r.get("count_ok")),
        "by_pair": {},
    }
    for r in single:
        o = r["objects"][0]
        s["by_pair"].setdefault(f"{o['color']} {o['shape']}", []).append(o["color_shape_ok"])
    s["by_pair"] = {k: float(np.mean(v)) for k, v in sorted(s["by_pair"].items())}
    t = {
        "n_images": len(two),
        "both_correct": frac(two, lambda r: all(o["all_ok"] for o in r["objects"])),
        "exact_acc": frac(two, lambda r: r["exact"]),
        "count_acc": frac(two, lambda r: r.get("count_ok")),
        "color_acc": _mean(o["color_ok"] for r in two for o in r["objects"]),
        "shape_acc": _mean(o["shape_ok"] for r in two for o in r["objects"]),
        "position_acc": _mean(o["position_ok"] for r in two for o in r["objects"]),
    }

    def by_position(rs):
        out: dict = {}
        for r in rs:
            for o in r["objects"]:
                if o.get("position") is None or o.get("position_ok") is None:
                    continue
                e = out.setdefault(o["position"], {"ok": [], "detected": {}})
                e["ok"].append(bool(o["position_ok"]))
                got = (o.get("detection") or {}).get("position") or "none"
                e["detected"][got] = e["detected"].get(got, 0) + 1
        return {p: {"acc": float(np.mean(e["ok"])), "n": len(e["ok"]),
                    "detected": dict(sorted(e["detected"].items()))}
                for p, e in sorted(out.items(), key=lambda kv: POSITIONS.index(kv[0]))}

    s["by_position"] = by_position(single)
    t["by_position"] = by_position(two)

    def attention(rs):
        ious = [o["iou"] for r in rs for o in r["objects"] if o.get("iou")]
        settings = sorted({k for i in ious for k in i})
        per = {}
        for k in settings:
            c = _mean(i[k]["color"] for i in ious if k in i)
            sh = _mean(i[k]["shape"] for i in ious if k in i)
            per[k] = {"iou_color": c, "iou_shape": sh,
                      "iou_mean": None if c is None else (c + sh) / 2}
        head = per.get(setting, {"iou_color": None, "iou_shape": None, "iou_mean": None})
        return {"setting": setting, **head, "n": len(ious), "settings": per}

    out = {"single": s, "two": t, "attention": attention(single),
           "attention_two": attention(two)}
    targets = {}
    for name, target in TARGETS.items():
        group, fig = name.split(".")
        v = out[group][fig]
        targets[name] = {"target": target, "value": v, "met": v is not None and v >= target}
    out["targets"] = targets
    return out


def _fmt(v) -> str:
    return "  n/a" if v is None else f"{v:5.3f}"


def format_table(summary: dict) -> str:
    """The printed table of :func:`summarize`'s figures (targets marked)."""
    tg = {k.split(".", 1)[1] + "@" + k.split(".")[0]: v for k, v in summary["targets"].items()}

    def row(group, fig, label):
        v = summary[group][fig]
        t = tg.get(f"{fig}@{group}")
        mark = "" if t is None else f"   target ≥ {t['target']:.2f}  {'ok' if t['met'] else 'MISSED'}"
        return f"  {label:<44}{_fmt(v)}{mark}"

    s, t, a = summary["single"], summary["two"], summary["attention"]
    lines = [
        f"single-object prompts ({s['n_images']} images)",
        row("single", "color_shape_acc", "colour and shape correct"),
        row("single", "color_acc", "colour correct"),
        row("single", "shape_acc", "shape correct"),
        row("single", "position_acc", "position correct (stated)"),
        row("single", "exact_acc", "exact (one object, all stated right)"),
        row("single", "count_acc", "one object detected (no extra)"),
        f"two-object prompts ({t['n_images']} images)",
        row("two", "both_correct", "both objects, all stated attributes"),
        row("two", "exact_acc", "exact (no extra object)"),
        row("two", "count_acc", "two objects detected"),
        row("two", "color_acc", "per object: colour"),
        row("two", "shape_acc", "per object: shape"),
        row("two", "position_acc", "per object: position"),
        "position by phrase (single / per object in two-object prompts)",
        *(f"  {p:<44}{_fmt(s['by_position'].get(p, {}).get('acc'))} / "
          f"{_fmt(t['by_position'].get(p, {}).get('acc'))}"
          for p in POSITIONS if p in s["by_position"] or p in t["by_position"]),
        f"cross-attention IoU, single-object ({a['n']} detected objects, {a['setting']})",
        row("attention", "iou_color", "colour token"),
        row("attention", "iou_shape", "shape token"),
        row("attention", "iou_mean", "mean of colour and shape"),
    ]
    if a["settings"]:
        lines.append("  all settings (colour / shape):  " + "   ".join(
            f"{k} {_fmt(v['iou_color']).strip()}/{_fmt(v['iou_shape']).strip()}"
            for k, v in a["settings"].items()))
    a2 = summary["attention_two"]
    if a2["n"]:
        lines.append(f"  two-object prompts ({a2['n']} objects): colour {_fmt(a2['iou_color'])}"
                     f"  shape {_fmt(a2['iou_shape'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generation

def capture_policy(pipe, batch_size: int, *, cfg: bool = True, size: int = IMAGE_SIZE):
    """A policy capturing every cross-attention site (head/layer/step means) for a batch of
    ``batch_size`` independent prompts (``Layout(groups=batch_size, members=1)``)."""
    from jattn.methods.maps import capture_policy as _capture_policy

    return _capture_policy(pipe, batch_size, cfg=cfg, height=size, width=size)


def generate_with_capture(pipe, prompts: Sequence[str], seeds: Sequence[int], *,
                          batch_size: int = 8, num_inference_steps: int = 50,
                          guidance_scale: float = 5.0, scheduler: str = "ddim",
                          size: int = IMAGE_SIZE, progress: bool = True,
                          guidance_rescale: float = 0.0):
    """Generate one image per (prompt, seed) job in fixed-size batches, capturing
    cross-attention.

    Every call of the pipeline has ``batch_size`` prompts (the last batch is padded with
    repeats of its last job, whose outputs are dropped), so one compiled program serves
    the whole run. Image j uses seed ``seeds[j]`` and is the same whatever the batching.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      prompts, seeds: one per job.
      size: image side in pixels.

    Yields:
      ``(j, image uint8 (size, size, 3), maps {"cross{h}x{w}": (T, S) float32})`` per job.

    Raises:
      ValueError: prompts and seeds of different lengths, batch_size < 1.
    """
    from jattn.policy.capture import captured_maps

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per job")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need >= 1")
    cfg = guidance_scale > 1.0
    policy = capture_policy(pipe, batch_size, cfg=cfg, size=size)
    n = len(prompts)
    starts = range(0, n, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="generate", unit="img")
    for s in starts:
        idx = list(range(s, min(s + batch_size, n)))
        idx_padded = idx + [idx[-1]] * (batch_size - len(idx))
        out = pipe.generate([prompts[j] for j in idx_padded],
                            num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, scheduler=scheduler,
                            seed=[int(seeds[j]) for j in idx_padded], height=size, width=size,
                            policy=policy, guidance_rescale=guidance_rescale)
        maps = captured_maps(out.aux[0])
        for r, j in enumerate(idx):
            yield j, out.images[r], {k: v[r] for k, v in maps.items()}
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()


def evaluate(pipe, *, n_single: int = 40, n_two: int = 40, seeds: Sequence[int] = (0, 1, 2),
             num_inference_steps: int = 50, guidance_scale: float = 5.0,
             scheduler: str = "ddim", batch_size: int = 8, threshold: float | str = 0.5,
             heatmap_mode: str = "highest", progress: bool = True,
             guidance_rescale: float = 0.0) -> dict:
    """Generate every evaluation prompt with every seed and measure it (module docstring).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (images generated at 128², the world's size).
      n_single, n_two: numbers of single- and two-object prompts.
      seeds: seeds; every prompt is generated once per seed (seed s for every prompt).
      num_inference_steps, guidance_scale, scheduler, guidance_rescale: sampling settings.
      batch_size: prompts per pipeline call (fixed: one compiled program).
      threshold, heatmap_mode: the headline attention setting (every mode × {0.5, otsu, and
        ``threshold``} is recorded too).
      progress: tqdm bar.

    Returns:
      dict with keys ``summary`` (:func:`summarize`), ``table`` (:func:`format_table`),
      ``settings`` (model source, steps, guidance, scheduler, seeds, batch size, threshold,
      heat map mode, image size, resolutions captured), ``prompts`` (``[{"text",
      "category", "objects": [{"color", "shape", "position"}]}]``), ``records`` (per image:
      prompt index, prompt, category, seed, objects with their scores, IoUs and matched
      detections, count_ok, exact, num_detections).

    Raises:
      ValueError: no seeds, or unknown heatmap_mode / threshold.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    if heatmap_mode not in HEATMAP_MODES:
        raise ValueError(f"heatmap_mode={heatmap_mode!r}: use one of {HEATMAP_MODES}")
    if isinstance(threshold, str) and threshold != "otsu":
        raise ValueError(f"threshold={threshold!r}: give a float in [0, 1] or 'otsu'")
    prompts = eval_prompts(n_single, n_two)
    jobs = [(i, s) for s in seeds for i in range(len(prompts))]
    thresholds = [0.5, "otsu"] + ([threshold] if threshold not in (0.5, "otsu") else [])
    positions = [[word_positions(pipe.tokenizer, p.text, o) for o in p.spec.objects]
                 for p in prompts]
    records: list[dict | None] = [None] * len(jobs)
    resolutions: set[str] = set()
    gen = generate_with_capture(
        pipe, [prompts[i].text for i, _ in jobs], [s for _, s in jobs], batch_size=batch_size,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        scheduler=scheduler, size=IMAGE_SIZE, progress=progress,
        guidance_rescale=guidance_rescale)
    for j, image, maps in gen:
        i, seed = jobs[j]
        p = prompts[i]
        resolutions.update(k for k in maps if k.startswith("cross"))
        sc = score_generated(image, p.spec)
        for o, mask, pos in zip(sc["objects"], sc["masks"], positions[i]):
            o["iou"] = None if mask is None else attention_ious(
                maps, pos, mask, thresholds=thresholds)
            o["token_positions"] = pos
        records[j] = {"prompt_index": i, "prompt": p.text, "category": p.category,
                      "seed": seed, **{k: v for k, v in sc.items() if k != "masks"}}
    setting = setting_name(heatmap_mode, threshold)
    summary = summarize(records, setting=setting)
    return {
        "summary": summary,
        "table": format_table(summary),
        "settings": {
            "model": getattr(pipe, "source", ""), "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
            "scheduler": scheduler, "seeds": seeds,
            "batch_size": batch_size, "threshold": threshold, "heatmap_mode": heatmap_mode,
            "attention_setting": setting, "image_size": IMAGE_SIZE,
            "cross_resolutions": sorted(resolutions, key=lambda k: -math.prod(_resolution(k))),
            "n_single": n_single, "n_two": n_two, "dtype": np.dtype(getattr(pipe, "dtype", np.float32)).name,
        },
        "prompts": [{"text": p.text, "category": p.category,
                     "objects": [{"color": o.color, "shape": o.shape, "position": o.position}
                                 for o in p.spec.objects]} for p in prompts],
        "records": records,
    }
