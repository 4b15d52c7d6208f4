"""Attention maps of a generation: capture in-graph, then pictures.

Cross-attention per token (all cross sites) and self-attention (one resolution) are
captured by :class:`jattn.policy.capture.Capture` ops in the compiled sampler, averaged
over heads, layers of a resolution and steps (P2P ``aggregate_attention``; DAAM for the
word heatmaps, see :mod:`jattn.policy.analysis`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn.policy import analysis
from jattn.policy.capture import Capture, captured_maps
from jattn.policy.core import Layout, Policy, Select, resolve

__all__ = ["capture_policy", "generate_with_maps", "maps_pictures"]


def capture_policy(pipe, batch_size: int, *, cfg: bool = True, self_resolution: int | None = None,
                   height: int | None = None, width: int | None = None) -> Policy:
    """Capture every cross-attention site (and self-attention at ``self_resolution``, a
    query grid side in latent cells) for ``batch_size`` independent prompts."""
    rules = [(Select(kind="cross"), Capture())]
    if self_resolution is not None:
        rules.append((Select(kind="self", resolutions=(self_resolution,)), Capture()))
    return resolve(rules, pipe.sites(height, width),
                   layout=Layout(groups=batch_size, members=1, cfg=cfg),
                   context_tokens=pipe.text_config.max_position_embeddings)


def default_self_resolution(pipe, height=None, width=None) -> int:
    """The largest self-attention grid with at most 32×32 tokens (P2P stores ≤ 32²)."""
    res = sorted({s.resolution[0] for s in pipe.sites(height, width) if s.kind == "self"
                  and s.query_tokens <= 32 * 32})
    return res[-1] if res else min(s.resolution[0] for s in pipe.sites(height, width))


def generate_with_maps(pipe, prompts: Sequence[str], *, seed: int | Sequence[int] = 0,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       self_resolution: int | None = None, **generate_kwargs):
    """Generate and capture attention.

    Returns:
      ``(output, maps)``: the :class:`jattn.pipeline.GenerateOutput` and
      ``{"cross16x16": (B, T, 77), "self16x16": (B, T, T), …}`` float32 maps.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cfg = guidance_scale > 1.0
    policy = capture_policy(pipe, len(prompts), cfg=cfg, self_resolution=self_resolution,
                            height=generate_kwargs.get("height"),
                            width=generate_kwargs.get("width"))
    out = pipe.generate(prompts, seed=seed, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, policy=policy, **generate_kwargs)
    maps: dict[str, np.ndarray] = {}
    for acc in out.aux:
        maps.update(captured_maps(acc))
    return out, maps


def maps_pictures(image: np.ndarray, maps: dict, tokenizer, prompt: str, *, row: int = 0
                  ) -> dict:
    """Pictures for one image: per-token overlays, a labelled grid and the self-attention PCA.

    Returns:
      ``{"tokens": [(token, overlay uint8 (H, W, 3))], "grid": PIL.Image,
      "self_pca": uint8 (H, W, 3) or None}``.
    """
    h, w = image.shape[:2]
    heat = analysis.token_heatmaps(maps, tokenizer, prompt, row=row, size=(h, w))
    overlays = [(tok, analysis.overlay(image, m, alpha=0.5)) for tok, m in heat]
    self_keys = [k for k in maps if k.startswith("self")]
    pca = None
    if self_keys:
        pca = analysis.self_attention_pca(maps[self_keys[0]][row], size=(h, w))
    tiles = [image] + [o for _, o in overlays] + ([pca] if pca is not None else [])
    labels = ["image"] + [t for t, _ in overlays] + (["self-attn PCA"] if pca is not None else [])
    g = analysis.grid(tiles, rows=1, cols=len(tiles), labels=labels)
    return {"tokens": overlays, "grid": g, "self_pca": pca}
