"""Quality of Prompt-to-Prompt edits on the bundled model's world, with the world's detector.

* Word swap (colour): ``"a red circle on the left" → "a blue circle on the left"``. An edit
  succeeds when the target image's object has the target colour and keeps the source's
  object mask (IoU of the detected masks; the P2P claim: the layout is preserved).
* Word swap (shape): the target's object has the new shape, same colour and position.
* Reweighting: the measured amount of the reweighted attribute (object area for a size
  word, pixels of the colour for a colour word) as the equalizer weight grows.

Every (prompt pair, seed) is one group of a batched edit (:func:`jattn.methods.p2p.edit`
with G groups), so one compiled program serves the whole evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn.world.detector import classify_pixels, detect
from jattn.world.spec import COLORS

__all__ = ["colour_swap_pairs", "shape_swap_pairs", "evaluate_word_swap", "evaluate_reweight",
           "main_object"]

_SHAPES = ("circle", "square", "triangle", "star")
_POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


def colour_swap_pairs(n: int = 16) -> list[tuple[str, str, dict]]:
    """``n`` (source, target, expected) colour swaps over shapes and positions."""
    out = []
    i = 0
    while len(out) < n:
        shape = _SHAPES[i % len(_SHAPES)]
        pos = _POSITIONS[i % len(_POSITIONS)]
        c1 = COLORS[i % 6]
        c2 = COLORS[(i * 3 + 2) % 6]
        if c1 != c2:
            out.append((f"a {c1} {shape} {pos}", f"a {c2} {shape} {pos}",
                        {"color": c2, "shape": shape, "source_color": c1}))
        i += 1
    return out


def shape_swap_pairs(n: int = 16) -> list[tuple[str, str, dict]]:
    """``n`` (source, target, expected) shape swaps."""
    out = []
    i = 0
    while len(out) < n:
        s1, s2 = _SHAPES[i % 4], _SHAPES[(i + 1 + i // 4) % 4]
        c = COLORS[i % 6]
        pos = _POSITIONS[(i + 2) % len(_POSITIONS)]
        if s1 != s2:
            out.append((f"a {c} {s1} {pos}", f"a {c} {s2} {pos}",
                        {"color": c, "shape": s2, "source_shape": s1}))
        i += 1
    return out


def main_object(image: np.ndarray):
    """The largest detected object, or None."""
    dets = detect(image)
    return max(dets, key=lambda d: d.area) if dets else None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def evaluate_word_swap(pipe, pairs: Sequence[tuple[str, str, dict]], seeds: Sequence[int], *,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       groups_per_call: int = 8, progress: bool = True, **p2p_kwargs) -> dict:
    """Run every (pair, seed) as one edit group and score it with the detector.

    Returns:
      ``{"records": [...], "mask_iou_mean", "iou_ge_0.8", "target_attr_ok", "success"
      (attribute ok and IoU ≥ 0.8), "source_ok", "n"}``; per record: source, target, seed,
      iou, attribute correctness, detections.
    """
    from jattn.methods.p2p import edit

    jobs = [(s, t, exp, seed) for s, t, exp in pairs for seed in seeds]
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="p2p word swap", unit="edit")
    c = pipe.unet_config.in_channels
    hw = pipe.default_size // pipe.vae_scale_factor
    for start in range(0, len(jobs), groups_per_call):
        chunk = jobs[start:start + groups_per_call]
        padded = chunk + [chunk[-1]] * (groups_per_call - len(chunk))  # one compiled shape
        lat = np.stack([np.random.default_rng(seed).standard_normal((c, hw, hw))
                        for *_, seed in padded]).astype(np.float32)
        out = edit(pipe, [j[0] for j in padded], [[j[1]] for j in padded],
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   latents=lat, **p2p_kwargs)
        for g, (src, tgt, exp, seed) in enumerate(chunk):
            a, b = main_object(out.images[2 * g]), main_object(out.images[2 * g + 1])
            rec = {"source": src, "target": tgt, "seed": int(seed),
                   "source_detected": None if a is None else (a.color, a.shape),
                   "target_detected": None if b is None else (b.color, b.shape)}
            rec["iou"] = _iou(a.mask, b.mask) if (a is not None and b is not None) else 0.0
            rec["target_ok"] = b is not None and b.color == exp["color"] and \
                b.shape == exp["shape"]
            want_src = (exp.get("source_color", exp["color"]), exp.get("source_shape", exp["shape"]))
            rec["source_ok"] = a is not None and (a.color, a.shape) == want_src
            rec["success"] = rec["target_ok"] and rec["iou"] >= 0.8
            records.append(rec)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    n = len(records)
    return {"n": n, "records": records,
            "mask_iou_mean": float(np.mean([r["iou"] for r in records])),
            "iou_ge_0.8": float(np.mean([r["iou"] >= 0.8 for r in records])),
            "target_attr_ok": float(np.mean([r["target_ok"] for r in records])),
            "source_ok": float(np.mean([r["source_ok"] for r in records])),
            "success": float(np.mean([r["success"] for r in records]))}


def _amount(image: np.ndarray, word: str) -> float:
    if word in COLORS:
        return float((classify_pixels(image) == COLORS.index(word)).sum())
    obj = main_object(image)
    return float(obj.area) if obj is not None else 0.0


def evaluate_reweight(pipe, prompt: str, word: str, values: Sequence[float],
                      seeds: Sequence[int], *, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, **p2p_kwargs) -> dict:
    """Amount of ``word``'s attribute (colour pixels, or object area for other words) for
    each equalizer weight, averaged over seeds; ``monotonic`` tells whether it never
    decreases as the weight grows.

    Returns:
      ``{"values", "amount_mean" (per value), "amount_per_seed", "monotonic",
      "spearman"}``.
    """
    from jattn.methods.p2p import edit

    values = list(values)
    per_seed = []
    for seed in seeds:
        out = edit(pipe, prompt, [prompt] * len(values), mode="reweight",
                   equalize=[{word: v} for v in values], seed=seed,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   **p2p_kwargs)
        per_seed.append([_amount(img, word) for img in out.images[1:]])
    amounts = np.asarray(per_seed)
    mean = amounts.mean(axis=0)
    order = np.argsort(values)
    ranks = np.argsort(np.argsort(mean[order]))
    n = len(values)
    spearman = 1 - 6 * np.sum((ranks - np.arange(n)) ** 2) / (n * (n * n - 1)) if n > 1 else 1.0
    return {"values": values, "amount_mean": mean.tolist(), "amount_per_seed": amounts.tolist(),
            "monotonic": bool(np.all(np.diff(mean[order]) >= 0)), "spearman": float(spearman)}
