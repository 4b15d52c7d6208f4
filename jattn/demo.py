"""``jattn demo``: the main job on the bundled model — generations across the world's
vocabulary, per-token cross-attention maps, and Prompt-to-Prompt edits, as PNGs plus an
``index.html`` that shows them with their prompts.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from jattn.io.outputs import OutputDir
from jattn.policy import analysis

__all__ = ["run_demo"]

BATCH = 8


def _batched_generate(pipe, prompts, seed, steps, guidance):
    """Generate in fixed batches of 8 (one compiled program), image i with seed + i."""
    images = []
    for s in range(0, len(prompts), BATCH):
        chunk = list(prompts[s:s + BATCH])
        pad = chunk + [chunk[-1]] * (BATCH - len(chunk))
        out = pipe.generate(pad, num_inference_steps=steps, guidance_scale=guidance,
                            seed=[seed + s + i for i in range(BATCH)], scheduler="ddim")
        images.extend(out.images[:len(chunk)])
    return images


def _vocabulary_prompts():
    from jattn import world

    sections = {
        "colours × shapes": [f"a {c} {s}" for s in world.SHAPES[:3] for c in world.COLORS],
        "more shapes": [f"a {c} {s}" for s in world.SHAPES[3:] for c in world.COLORS[:4]],
        "positions": [f"a red circle {p}" for p in world.POSITIONS]
        + [f"a blue square {p}" for p in world.POSITIONS[:3]],
        "sizes and fills": ["a small green triangle", "a large green triangle",
                            "a striped yellow square", "a dotted purple circle",
                            "an outlined blue star", "a large orange heart",
                            "a white ring", "a black circle"],
        "two and three objects": [
            "a red circle on the left and a blue square on the right",
            "a yellow star at the top and a green triangle at the bottom",
            "a purple heart on the left and an orange circle on the right",
            "a white square at the top and a black circle at the bottom",
            "a blue circle on the left, a red square in the center and a green star on "
            "the right",
            "a small red triangle and a large blue circle",
            "a yellow circle on a striped background",
            "a green square on a checkered background"],
    }
    return sections


EDITS = [
    ("colour swap (replace)", "a red circle on the left",
     ["a blue circle on the left", "a green circle on the left"], dict(mode="replace")),
    ("shape swap (replace)", "a yellow square in the center",
     ["a yellow star in the center", "a yellow heart in the center"], dict(mode="replace")),
    ("refinement", "a circle", ["a striped circle", "a dotted circle"], dict(mode="refine")),
    ("reweighting 'large' ×0.5, ×2, ×4", "a large blue square", ["a large blue square"] * 3,
     dict(mode="reweight", equalize=[{"large": 0.5}, {"large": 2.0}, {"large": 4.0}])),
]


def run_demo(pipe, out_dir: str | Path | OutputDir, *, steps: int = 50,
             guidance_scale: float = 7.5, seed: int = 0) -> Path:
    """Write the demo into ``out_dir`` (a folder path, which must be empty or new, or an
    :class:`jattn.io.outputs.OutputDir`) and return the path of its ``index.html``."""
    from jattn.methods.maps import default_self_resolution, generate_with_maps, maps_pictures
    from jattn.methods.p2p import edit

    out = out_dir if isinstance(out_dir, OutputDir) else OutputDir(out_dir)
    parts = ["<!doctype html><meta charset='utf-8'><title>jattn demo</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "figure{display:inline-block;margin:4px;text-align:center;font-size:12px;"
             "width:136px}img{image-rendering:pixelated}</style>",
             f"<h1>jattn demo</h1><p>model: {html.escape(str(pipe.source))}; {steps} DDIM "
             f"steps, CFG {guidance_scale}, seed {seed}.</p>"]

    # 1. generations across the vocabulary
    for title, prompts in _vocabulary_prompts().items():
        images = _batched_generate(pipe, prompts, seed, steps, guidance_scale)
        slug = "gen_" + "".join(ch if ch.isalnum() else "_" for ch in title)
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for i, (p, img) in enumerate(zip(prompts, images)):
            name = f"{slug}_{i:02d}.png"
            out.image(name, img)
            parts.append(f"<figure><img src='{name}' width=128><figcaption>"
                         f"{html.escape(p)}</figcaption></figure>")
        cols = min(8, len(images))
        out.image(f"{slug}.png", analysis.grid(images, rows=-(-len(images) // cols), cols=cols))

    # 2. attention maps
    parts.append("<h2>cross-attention per token, self-attention PCA</h2>")
    map_prompts = ["a red circle on the left and a blue square on the right",
                   "a yellow star at the top", "a large green triangle"]
    res = default_self_resolution(pipe)
    gen, maps = generate_with_maps(pipe, map_prompts, seed=seed, num_inference_steps=steps,
                                   guidance_scale=guidance_scale, self_resolution=res,
                                   scheduler="ddim")
    for i, p in enumerate(map_prompts):
        pics = maps_pictures(gen.images[i], maps, pipe.tokenizer, p, row=i)
        name = f"maps_{i:02d}.png"
        out.image(name, pics["grid"])
        parts.append(f"<p>{html.escape(p)}<br><img src='{name}'></p>")

    # 3. Prompt-to-Prompt edits
    parts.append("<h2>Prompt-to-Prompt edits (source first)</h2>")
    for i, (title, src, tgts, kw) in enumerate(EDITS):
        res_e = edit(pipe, src, tgts, num_inference_steps=steps, guidance_scale=guidance_scale,
                     seed=seed + 100 + i, **kw)
        labels = [src] + list(tgts)
        if kw.get("mode") == "reweight":
            labels = [src] + [", ".join(f"{k}×{v:g}" for k, v in e.items())
                              for e in kw["equalize"]]
        name = f"edit_{i:02d}.png"
        out.image(name, analysis.grid(list(res_e.images), rows=1, cols=len(res_e.images),
                                      labels=labels))
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{name}'>")
    page = "\n".join(parts).encode()
    return out.write("index.html", lambda fh: fh.write(page))
