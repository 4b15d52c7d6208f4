"""Plug-and-Play diffusion features: text-driven image-to-image translation.

Source: Tumanyan, Geyer, Bagon, Dekel, "Plug-and-Play Diffusion Features for Text-Driven
Image-to-Image Translation" (CVPR 2023); reference MichalGeyer/pnp-diffusers (``pnp.py``,
``pnp_utils.py``: ``register_attention_control_efficient``,
``register_conv_control_efficient``; ``preprocess.py``; ``config_pnp.yaml``).

The reference's UNet batch is ``[source at t; target uncond; target cond]``: the source
row holds the inverted latents of the current timestep with the empty prompt's embedding;
the target rows take the source's **queries and keys** (not values) in decoder
self-attention (``up_blocks.1.attentions.1–2`` and every layer of ``up_blocks.2–3``) at
the timesteps ``scheduler.timesteps[:int(n · pnp_attn_t)]`` (0.5: the first, high-noise
steps), and the **residual branch** of ``up_blocks.1.resnets.1`` (conv2's output before
the shortcut is added) at ``timesteps[:int(n · pnp_f_t)]`` (0.8). (Its ``t == 1000``
clause never fires on a 50-step DDIM schedule, whose first timestep is 981.) DDIM 50,
CFG 7.5, negative prompt ``"ugly, blurry, black, low res, unrealistic"``.

In jattn one edit is one group ``[source, target_1, …]`` (``Layout(1, M, cfg)``): the
source is member 0, in both CFG halves; each half of a target takes member 0's Q, K
(:class:`jattn.policy.ops.MemberSource`) and residual feature
(:class:`jattn.policy.features.FeatureInject`, site kind ``resnet_residual``) from the
same half. For a **real image** the source member has the empty prompt in both halves,
so both its rows are the reference's single source row, and its latents are re-imposed
from the DDIM-inversion trajectory after every step (``SamplerHooks.reimpose``: it is at
``z*_t`` at each step, as the reference loads ``noisy_latents_{t}``); every target starts
from ``z*_T``. The inversion: DDIM at the edit's n steps with the source prompt (default
``""``, the reference's ``inversion_prompt``), conditional prediction only (the reference
inverts at 999 steps and keeps the latents of the 50-step timesteps). For a **generated
source** member 0 is denoised with its own prompt (and the negative prompt) from the seed's
noise, which every target also starts from; it is bit-identical to its plain generation.
The cost is one extra row pair over the reference (4 rows for one target instead of 3).

**Sites for any UNet.** Attention: every decoder self-attention layer but the first in
call order (SD1/SD2: up_blocks.1.attentions.1–2, up_blocks.2–3, the reference's
``res_dict``; the bundled model: up_blocks.1.attentions.1 at 8² and up_blocks.2 at 16²).
Feature: ``up_blocks.1.resnets.1`` (the second resnet of the decoder's second block, present
in every SD-family UNet and in the bundled model).

**SDXL** (issue 16; the reference has no SDXL version): rule "the second resnet of the first
decoder block at latent/4", the resolution of the reference's feature (SD: ``up_blocks.1``
at 16² of 64² latents). SDXL's first up block already runs at latent/4 (32² of 128²: SDXL
has three levels and no attention-free 8² block), so its feature site is
``up_blocks.0.resnets.1`` (:data:`FEATURE_SITE_SDXL`, the default ``feature_site=None`` on
SDXL); the attention rule is unchanged (every decoder self-attention layer but the first:
35 of SDXL's 36 decoder layers, ``up_blocks.0`` at 32² and ``up_blocks.1`` at 64²).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jattn.io import checks
from jattn.policy.core import Layout, Policy, Select, resolve
from jattn.policy.features import FeatureInject
from jattn.policy.ops import MemberSource, member_table

__all__ = ["REFERENCE_NEGATIVE", "pnp_sites", "pnp_policy", "pnp", "PnPOutput",
           "default_feature_site", "FEATURE_SITE", "FEATURE_SITE_SDXL"]

REFERENCE_NEGATIVE = "ugly, blurry, black, low res, unrealistic"  # config_pnp.yaml
FEATURE_SITE = "up_blocks.1.resnets.1"
FEATURE_SITE_SDXL = "up_blocks.0.resnets.1"  # SDXL: first up block = latent/4 (docstring)


def default_feature_site(pipe) -> str:
    """The default ``feature_site`` of the model family: :data:`FEATURE_SITE` on SD1/SD2,
    :data:`FEATURE_SITE_SDXL` on SDXL."""
    return FEATURE_SITE_SDXL if getattr(pipe, "is_sdxl", False) else FEATURE_SITE


def _fraction(value, name: str, ref: float) -> float:
    v = checks.finite_number(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r}: a fraction of the steps must be in [0, 1] (the "
                         f"reference: {ref:g})")
    return v


def pnp_sites(sites: Sequence, feature_site: str = FEATURE_SITE) -> tuple[list, str]:
    """``(attention sites, residual feature path)``: every decoder self-attention site but
    the first in call order, and ``{feature_site}.conv2``.

    Raises:
      ValueError: a UNet without two decoder self-attention layers or without the resnet.
    """
    dec = [s for s in sites if s.kind == "self" and s.block == "up"]
    if len(dec) < 2:
        raise ValueError("Plug-and-Play needs at least two self-attention layers in the UNet's "
                         f"decoder; this model has {len(dec)}")
    return dec[1:], f"{feature_site}.conv2"


def pnp_policy(
    pipe,
    *,
    members: int,
    num_inference_steps: int,
    attn_fraction: float = 0.5,
    feature_fraction: float = 0.8,
    feature_site: str | None = None,
    cfg: bool = True,
    groups: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> Policy:
    """The Plug-and-Play policy for ``groups`` groups ``[source, target_1, …]``.

    Args:
      members: M >= 2.
      num_inference_steps: n; Q, K are injected at steps ``[0, int(n·attn_fraction))``,
        the residual feature at ``[0, int(n·feature_fraction))``.
      feature_site: the resnet whose residual branch is injected (None: the family's
        default, :func:`default_feature_site`).
      cfg: the layout's CFG flag.
      groups: G independent edits in one batch (rows group-major: G × M prompts).
    Returns:
      a :class:`Policy` (attention and feature seams) with ``Layout(G, M, cfg)``.
    Raises:
      ValueError: members < 2, fractions outside [0, 1], a missing site.
    """
    m = checks.whole_number(members, "members")
    if m < 2:
        raise ValueError(f"members={m}: Plug-and-Play needs a source and at least one target "
                         "(give one or more target prompts)")
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1)
    fa = _fraction(attn_fraction, "attn_fraction", 0.5)
    ff = _fraction(feature_fraction, "feature_fraction", 0.8)
    feature_site = default_feature_site(pipe) if feature_site is None else feature_site
    sites = pipe.sites(height, width, features=True)
    att, feat = pnp_sites(sites, feature_site)
    if not any(s.path == feat for s in sites):
        ups = sorted({".".join(s.path.split(".")[:2]) for s in sites
                      if getattr(s, "block", "") == "up"})
        raise ValueError(f"feature_site={feature_site!r}: this UNet has no resnet residual site "
                         f"{feat!r} (its up blocks: {', '.join(ups)}); leave feature_site at "
                         f"its default ({default_feature_site(pipe)!r} for this model) or "
                         "list the sites with `jattn sites --features`")
    src = {i: 0 for i in range(1, m)}
    qk = jnp.asarray(member_table(n, m, src, window=(0.0, fa)))
    ft = jnp.asarray(member_table(n, m, src, window=(0.0, ff)))
    rules = [(Select(path="^(" + "|".join(re.escape(s.path) for s in att) + ")$", kind="self"),
              MemberSource(q_from=qk, k_from=qk)),
             (Select(path="^" + re.escape(feat) + "$", kind="resnet_residual"),
              FeatureInject(ft))]
    g = checks.whole_number(groups, "groups", minimum=1)
    return resolve(rules, sites, layout=Layout(groups=g, members=m, cfg=cfg))


@dataclasses.dataclass
class PnPOutput:
    """Result of :func:`pnp`.

    Attributes:
      images: uint8 ``(M, H, W, 3)``: the source (generated, or the real image's
        reconstruction ``decode(z*_0)``), then one per target.
      latents: float32 ``(M, C, h, w)``.
      settings: resolved sites and steps.
    """

    images: np.ndarray
    latents: np.ndarray
    settings: dict


def pnp(
    pipe,
    *,
    image: np.ndarray | None = None,
    source_prompt: str | None = None,
    target_prompts: str | Sequence[str],
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    attn_fraction: float = 0.5,
    feature_fraction: float = 0.8,
    negative_prompt: str = REFERENCE_NEGATIVE,
    feature_site: str | None = None,
    height: int | None = None,
    width: int | None = None,
    sdxl: dict | None = None,
) -> PnPOutput:
    """Translate a generated or a real image to each target prompt.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      image: uint8 ``(H, W, 3)`` (DDIM-inverted with ``source_prompt`` or ``""``), or None.
      source_prompt: the generated source's prompt (required without ``image``).
      target_prompts: one or more prompts.
      seed: the noise of the generated source (every member starts from it).
      attn_fraction, feature_fraction: see :func:`pnp_policy` (0.5, 0.8).
      negative_prompt: of the targets (and of a generated source).
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
    Returns:
      :class:`PnPOutput`.
    Raises:
      ValueError: no target, neither an image nor a source prompt, fractions outside [0, 1]
        (see also ``Pipeline.generate``, ``invert``).
    """
    from jattn.sampling.inversion import invert
    from jattn.sampling.sampler import SamplerHooks, reimposition

    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts or [])
    if not targets:
        raise ValueError("target_prompts: give at least one target prompt (a group of one has "
                         "nothing to translate)")
    checks.prompt_list(targets, "target_prompts")
    if image is None and source_prompt is None:
        raise ValueError("source_prompt: give the source prompt (a generated source) or an "
                         "image to translate")
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1)
    src = source_prompt if source_prompt is not None else ""
    prompts = [src] + targets
    m = len(prompts)
    policy = pnp_policy(pipe, members=m, num_inference_steps=n, attn_fraction=attn_fraction,
                        feature_fraction=feature_fraction, feature_site=feature_site,
                        cfg=guidance_scale > 1.0, height=height, width=width)
    latents = hooks = None
    negs = [negative_prompt] * m
    if image is not None:
        img = np.asarray(image)
        img = img[None] if img.ndim == 3 else img
        inv = invert(pipe, img, src, method="ddim", num_inference_steps=n)
        x_t, rows = reimposition(np.repeat(inv.latents, m, axis=1))
        latents = np.asarray(x_t).transpose(0, 3, 1, 2)
        hooks = SamplerHooks(reimpose=rows, reimpose_rows=jnp.asarray([True] + [False] * (m - 1)))
        negs[0] = src  # the source row: the same prompt in both halves (one reference row)
    out = pipe.generate(prompts, negative_prompt=negs, num_inference_steps=n,
                        guidance_scale=guidance_scale, scheduler="ddim", seed=[seed] * m,
                        latents=latents, policy=policy, hooks=hooks, height=height,
                        width=width, **(sdxl or {}))
    att, feat = pnp_sites(pipe.sites(height, width),
                          default_feature_site(pipe) if feature_site is None else feature_site)
    settings = dict(attention_sites=[s.path for s in att], feature_site=feat,
                    qk_steps=[0, int(float(attn_fraction) * n)],
                    feature_steps=[0, int(float(feature_fraction) * n)],
                    num_inference_steps=n, guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt, real_image=image is not None)
    return PnPOutput(out.images, out.latents, settings)
