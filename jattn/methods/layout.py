"""Layout guidance (Chen, Laina, Vedaldi, "Training-Free Layout Control with Cross-Attention
Guidance", WACV 2024; reference silent-chen/layout-guidance, backward guidance).

Boxes per subject phrase. At each of the first ``max_index_step`` (10) steps the UNet runs
on the conditional batch recording the per-head cross-attention of the mid block and of
the first up block with cross-attention; per site, subject and subject token the in-box
fraction ``a_h = Σ_box A_h / Σ A_h`` gives ``mean_h (1 − a_h)²``; tokens are averaged per
subject, the sum over sites and subjects is divided by ``subjects × sites`` and scaled by
``loss_scale`` (30). While ``loss / 30 > 0.2`` (at most 5 times) the latents take
``z ← z − σ_t² ∇_z loss`` (σ_t the noise level of LMS/Euler latents; jattn's DDIM latents are
``√ᾱ_t`` times those, so the equivalent step there is ``(1 − ᾱ_t)``).

Box masks follow the reference: ``mask[int(y0·H):int(y1·H), int(x0·W):int(x1·W)] = 1`` at
each map resolution.

Reference quirks (``reference_quirks=True``): (1) the loss variable persists across steps
(initialised once to 10000): once it drops below the threshold no later step is guided
(``Guidance.refine_from="carried"``); without the quirk each step starts afresh (at least one
update per guided step). (2) ``attn_map.chunk(2)[1]`` on ``(batch·heads)`` rows with batch 1
keeps the second half of the heads only; without the quirk all heads count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.methods.subjects import check_boxes, mid_and_first_up, subject_tokens, token_table
from jattn.policy.core import Layout, Op, SiteContext, resolve
from jattn.sampling.guidance import Guidance

Array = jax.Array

__all__ = ["RecordHeads", "layout_loss", "layout_guidance", "layout_generate", "box_mask_ref"]

K_MAX = 8


@struct.dataclass
class RecordHeads(Op):
    """Record per-head attention probabilities of the conditional rows, per site."""

    needs_probs = True

    def record(self, ctx: SiteContext, p_pre, p_post):
        p = p_pre.astype(jnp.float32)
        if ctx.layout.cfg:
            p = p[p.shape[0] // 2:]
        return {"probs": p}

    def aux_init(self, sites, layout, context_tokens):
        return {}

    def aux_update(self, acc, per_site, step, sites):
        return {path: rec["probs"] for path, rec in per_site.items()}


def box_mask_ref(box_frac, h: int, w: int) -> np.ndarray:
    """The reference's mask: rows ``int(y0·H):int(y1·H)``, cols ``int(x0·W):int(x1·W)``."""
    m = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = box_frac
    m[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = 1.0
    return m


def layout_loss(maps: Sequence[Array], masks: Sequence[Array], tokens: Array, valid: Array,
                subj: Array, head_slice: tuple[int, int] | None = None) -> Array:
    """Per-sample layout loss (before ``loss_scale``).

    Args:
      maps: per site ``(B, H, T, S)`` per-head probabilities.
      masks: per site ``(B, N, T)`` box masks at that site's resolution.
      tokens/valid: ``(B, N, K)`` subject token positions; subj: ``(B, N)`` real subjects.
      head_slice: the heads that count (None: all).
    Returns: ``(B,)``.
    """
    total = 0.0
    for a, m in zip(maps, masks):
        if head_slice is not None:
            a = a[:, head_slice[0]:head_slice[1]]
        b, h, t, s = a.shape
        n, k = tokens.shape[1:]
        sel = jnp.take_along_axis(a, tokens.reshape(b, 1, 1, n * k), axis=-1)
        sel = sel.reshape(b, h, t, n, k)                                # (B, H, T, N, K)
        inside = jnp.einsum("bhtnk,bnt->bhnk", sel, m)
        frac = inside / sel.sum(2)
        per_tok = jnp.mean((1.0 - frac) ** 2, axis=1)                   # (B, N, K)
        per_tok = jnp.where(valid, per_tok, 0.0)
        per_obj = per_tok.sum(-1) / jnp.maximum(valid.sum(-1), 1)
        total = total + jnp.where(subj, per_obj, 0.0).sum(-1)
    n_obj = jnp.maximum(subj.sum(-1), 1)
    return total / (n_obj * len(maps))


def _loss_fn(acc, step, args):
    rec = acc[0]
    paths = args["paths"]
    maps = [rec[p] for p in paths]
    masks = [args["masks"][p] for p in paths]
    hs = args.get("head_slice")
    loss = layout_loss(maps, masks, args["tokens"], args["valid"], args["subj"],
                       None if hs is None else (int(hs[0]), int(hs[1])))
    return loss * args["scale"]


def _guided_sites(sites):
    mid, first_up = mid_and_first_up([s for s in sites if s.kind == "cross"])
    return mid + first_up


def layout_guidance(pipe, prompts: Sequence[str], phrases: Sequence[Sequence[str]],
                    boxes: Sequence[Sequence[Sequence[float]]], *,
                    num_inference_steps: int = 50, scheduler: str | None = None,
                    eta: float | None = None, loss_scale: float = 30.0,
                    loss_threshold: float = 0.2, max_iter: int = 5, max_index_step: int = 10,
                    height: int | None = None, width: int | None = None,
                    reference_quirks: bool = False) -> Guidance:
    """The :class:`Guidance` of layout guidance (module docstring); ``boxes[i][j]`` is the
    box of ``phrases[i][j]`` (pixels, or fractions when all four are ≤ 1)."""
    b = len(prompts)
    if len(phrases) != b or len(boxes) != b:
        raise ValueError(f"boxes: {len(boxes)} box lists and {len(phrases)} phrase lists for "
                         f"{b} prompts; give one per prompt")
    height, width = pipe.check_size(height, width, b)
    sites = pipe.sites(height, width)
    gsites = _guided_sites(sites)
    paths = tuple(s.path for s in gsites)
    toks, fracs = [], []
    for i, pr in enumerate(prompts):
        if len(phrases[i]) != len(boxes[i]):
            raise ValueError(f"boxes: prompt {i} has {len(boxes[i])} boxes for "
                             f"{len(phrases[i])} phrases")
        toks.append(subject_tokens(pipe.tokenizer, pr, phrases[i], "boxes"))
        fracs.append(check_boxes(boxes[i], height, width, "boxes"))
    tokens, valid, subj = token_table(toks, K_MAX)
    n = tokens.shape[1]
    masks = {}
    for s in gsites:
        r0, r1 = s.resolution
        m = np.zeros((b, n, r0 * r1), np.float32)
        for i in range(b):
            for j, bx in enumerate(fracs[i]):
                m[i, j] = box_mask_ref(bx, r0, r1).reshape(-1)
        masks[s.path] = jnp.asarray(m)
    pol = resolve([(f"^({'|'.join(p.replace('.', '[.]') for p in paths)})$", RecordHeads())],
                  sites, layout=Layout(groups=b, members=1, cfg=False))
    schedule = pipe.schedule(int(num_inference_steps), scheduler, eta)
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    ts = np.asarray(schedule.timesteps).astype(np.float64)
    if float(np.asarray(schedule.init_noise_sigma)) > 1.0:  # sigma-scaled latents (Euler)
        step = np.asarray(schedule.sigmas, np.float64)[:len(ts)] ** 2
    else:                                                  # DDIM/DDPM latents
        step = 1.0 - ac[np.clip(np.round(ts).astype(int), 0, len(ac) - 1)]
    step = step.astype(np.float32)
    step[int(max_index_step):] = 0.0
    thr = np.full((len(ts),), loss_threshold * loss_scale, np.float32)
    heads = gsites[0].num_heads if gsites else 1
    args = {"paths": paths, "masks": masks, "tokens": jnp.asarray(tokens),
            "valid": jnp.asarray(valid), "subj": jnp.asarray(subj),
            "scale": jnp.float32(loss_scale)}
    if reference_quirks:
        args["head_slice"] = (heads - heads // 2, heads)
    return Guidance(policy=pol, step_size=jnp.asarray(step), loss_fn=_loss_fn, iterations=0,
                    threshold=jnp.asarray(thr), max_refine=int(max_iter),
                    refine_from="carried" if reference_quirks else "reset",
                    loss_args=_static_split(args))


def _static_split(args):
    """``paths``/``head_slice`` are static: keep them out of the traced pytree."""
    return _Args(dyn={k: v for k, v in args.items() if k not in ("paths", "head_slice")},
                 paths=args["paths"], head_slice=args.get("head_slice"))


@struct.dataclass
class _Args:
    dyn: dict
    paths: tuple = struct.field(pytree_node=False, default=())
    head_slice: tuple | None = struct.field(pytree_node=False, default=None)

    def __getitem__(self, k):
        if k == "paths":
            return self.paths
        return self.dyn[k]

    def get(self, k, default=None):
        if k == "head_slice":
            return self.head_slice
        return self.dyn.get(k, default)


def layout_generate(pipe, prompts, phrases, boxes, *, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5, seed=0, latents=None,
                    scheduler: str | None = None, height=None, width=None,
                    reference_quirks: bool = False, decode: bool = True, **kw):
    """Generate with layout guidance (one image per prompt)."""
    if isinstance(prompts, str):
        prompts, phrases, boxes = [prompts], [phrases], [boxes]
    g = layout_guidance(pipe, list(prompts), phrases, boxes,
                        num_inference_steps=num_inference_steps, scheduler=scheduler,
                        height=height, width=width, reference_quirks=reference_quirks, **kw)
    return pipe.generate(list(prompts), num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents,
                         scheduler=scheduler, height=height, width=width, guidance=g,
                         decode=decode)
