"""MasaCtrl: mutual self-attention control for consistent synthesis and non-rigid editing.

Source: Cao, Wang, Qi, Shan, Qie, Zheng, "MasaCtrl: Tuning-Free Mutual Self-Attention
Control for Consistent Image Synthesis and Editing" (ICCV 2023); reference
TencentARC/MasaCtrl (``masactrl/masactrl.py``: ``MutualSelfAttentionControl``, ``…Union``,
``…Mask``, ``…MaskAuto``; ``masactrl/masactrl_utils.py``; ``masactrl/diffuser_utils.py``;
``playground.ipynb``, ``playground_real.ipynb``).

One edit is one group ``[source, target_1, …]`` (``Layout(1, M, cfg)``), every member
from the same initial noise (the reference expands one start code). In the chosen
self-attention layers, from the chosen step on, each target's queries attend to the
source's keys and values, per CFG half (``ku[:num_heads]``); the source runs plain
attention and is bit-identical to its plain generation of the same batch (every variant:
where the site runs on materialised probabilities or concatenated keys, the source's rows
take the fused plain attention, ``SharedAttention.edit_output``; ``"auto-mask"`` only up to
rounding: recording the cross maps materialises every row's cross-attention).

**Sites and steps for any UNet.** The reference counts every attention call in forward
order (``cur_att_layer``; ``// 2`` = the transformer block: SD1/SD2 down 0–5, mid 6,
up 7–15) and edits blocks ``>= 10`` of 16 — up_blocks.2 and .3, the decoder's self-attention
at its **two largest resolutions** (32² and 64² at 512 px) — from step 4 of 50. jattn's
default (``start_layer=None``) is that rule: decoder self-attention at the two largest query
resolutions the decoder has (SD1/SD2: exactly blocks 10–15; the bundled model: its 8² and
16² decoder layers, up_blocks.1–2). ``start_layer`` may instead be a fraction of the L
self-attention layers in call order (index ``>= ceil(f · L)``; 10/16 = 0.625 is the
reference on SD1/SD2, 44/70 on SDXL; on the bundled model 0.625 keeps only its 16² layers,
which keeps the source's background less well: see ``configs/masactrl_world.py``) or an
int, the reference's block index itself. ``start_step`` 4/50 = 0.08 gives steps
``>= int(0.08 · n)`` (n = 50: 4).

Variants (``variant=``):

* ``"plain"``: :class:`jattn.policy.ops.MemberSource` (K, V from member 0);
* ``"union"``: :class:`jattn.policy.shared.SharedAttention` with ``own=True`` (K, V =
  concat[own; source]; the reference concatenates [source; target], the same softmax);
* ``"mask"``: ``SharedAttention(own=False, mask=GivenMask, match_query=True)``: target
  foreground queries attend to the source's foreground (``mask_s``), background to
  background, split by the target's mask (``mask_t``); masks given at the image or the
  latent size (the reference resizes nearest, jattn bilinear then >= 0.5);
* ``"auto-mask"``: the same with masks from the token's cross-attention maps
  (:class:`jattn.policy.cross_masks.CrossMapMask`: mean over heads and the cross layers
  of one resolution, min-max, ``>= threshold`` 0.1); resolution = the smallest cross
  resolution ``>= max(latent/4, 8)`` (SD at 64² latents: 16², the reference's); the masks
  of step i come from the maps of step i − 1 (the reference: the same step's earlier
  layers).

Real images (``image=``): DDIM inversion with the source prompt (the reference: ``""``;
its CFG 7.5 inversion with ``""`` on both halves equals the conditional-only inversion
used here) and every member starts from ``z*_T``; the source member is then generated
from ``z*_T`` with its prompt, as ``playground_real.ipynb`` does by default
(``follow_inversion=True``: it follows the inverted trajectory instead, latent
re-imposition, the notebook's commented ``ref_intermediate_latents`` alternative).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jattn.io import checks
from jattn.io.words import word_token_indices
from jattn.policy.core import Layout, Policy, Select, resolve
from jattn.policy.cross_masks import CrossMapMask
from jattn.policy.ops import MemberSource, member_table
from jattn.policy.shared import AuxMask, GivenMask, SharedAttention, shared_table

__all__ = ["VARIANTS", "masactrl_sites", "masactrl_policy", "masactrl", "MasaCtrlOutput",
           "auto_mask_resolution"]

VARIANTS = ("plain", "union", "mask", "auto-mask")
START_STEP = 4 / 50      # the reference's step 4 of 50
# SDXL: the reference's MutualSelfAttentionControl(model_type="SDXL") counts 70 blocks and
# starts at 44 (start_layer=None on SDXL takes this fraction of the self-attention layers:
# SDXL base up_blocks.0.attentions.0.transformer_blocks.4 on, i.e. 26 of its 36 decoder
# layers at 32² and 64²)
SDXL_START_LAYER = 44 / 70


def _start_layer(pipe, start_layer):
    """``start_layer`` None on SDXL -> :data:`SDXL_START_LAYER` (the reference's SDXL
    setting); SD1/SD2 keep None (the two largest decoder resolutions)."""
    if start_layer is None and getattr(pipe, "is_sdxl", False):
        return SDXL_START_LAYER
    return start_layer
START_LAYER = 10 / 16    # the reference's transformer block 10 of 16 (SD1/SD2) as a fraction


def _fraction(value, name: str) -> float:
    v = checks.finite_number(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r}: a fraction of the steps/layers must be in [0, 1] "
                         f"(the reference: {name}={START_STEP if 'step' in name else START_LAYER:g})")
    return v


def masactrl_sites(sites: Sequence, start_layer: float | int | None = None) -> list:
    """The self-attention sites MasaCtrl edits (call order).

    ``None``: decoder self-attention at the two largest query resolutions of the decoder
    (SD1/SD2: the reference's blocks 10–15). A float ``f`` in [0, 1]: index in call order
    ``>= ceil(f · L)`` of the L self-attention sites. An int: index ``>= start_layer`` (the
    reference's block index).

    Raises:
      ValueError: ``start_layer`` outside [0, 1] (float) / [0, L) (int), or no site left.
    """
    selfs = [s for s in sites if s.kind == "self"]
    n = len(selfs)
    if start_layer is None:
        dec = [s for s in selfs if s.block == "up"]
        res = sorted({s.resolution for s in dec}, key=lambda r: r[0] * r[1])[-2:]
        chosen = [s for s in dec if s.resolution in res]
        if not chosen:
            raise ValueError("MasaCtrl needs self-attention in the UNet's decoder; this model "
                             "has none (give start_layer as a fraction or an index)")
        return chosen
    if isinstance(start_layer, (int, np.integer)) and not isinstance(start_layer, bool):
        first = int(start_layer)
        if not 0 <= first < n:
            raise ValueError(f"start_layer={start_layer}: a block index must be in [0, {n}) "
                             f"for this UNet's {n} self-attention layers (or give a fraction)")
    else:
        first = math.ceil(_fraction(start_layer, "start_layer") * n - 1e-9)
    chosen = selfs[first:]
    if not chosen:
        raise ValueError(f"start_layer={start_layer}: selects none of the {n} self-attention "
                         "layers; use a smaller value (the reference: 0.625 = block 10 of 16)")
    return chosen


def auto_mask_resolution(sites: Sequence) -> tuple[int, int]:
    """The cross-attention resolution of the auto masks: the smallest ``>= max(latent/4,
    8)`` (SD at 64² latents: 16², the reference's), else the largest there is."""
    latent = max(s.resolution[0] for s in sites)
    want = max(latent // 4, min(8, latent))
    cross = sorted({tuple(s.resolution) for s in sites if s.kind == "cross"})
    above = [r for r in cross if r[0] >= want]
    return above[0] if above else cross[-1]


def _exact(paths) -> str:
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def masactrl_policy(
    pipe,
    *,
    members: int,
    num_inference_steps: int,
    start_step: float | int = START_STEP,
    start_layer: float | int | None = None,
    variant: str = "plain",
    masks: np.ndarray | None = None,
    token_weights: np.ndarray | None = None,
    threshold: float = 0.1,
    cfg: bool = True,
    groups: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> Policy:
    """The MasaCtrl policy for ``groups`` groups ``[source, target_1, …]`` of ``members`` members.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (its sites).
      members: M >= 2.
      num_inference_steps: n.
      start_step: fraction of the steps (float in [0, 1]; steps ``>= int(f·n)``) or a step
        index (int).
      start_layer: None (decoder self-attention at its two largest resolutions; on SDXL
        :data:`SDXL_START_LAYER` = 44/70, the reference's SDXL setting), a fraction of the
        self-attention layers in call order, or the reference's block index (int); see the
        module docstring.
      variant: one of :data:`VARIANTS`.
      masks: ``"mask"``: float ``(M, h, w)`` or ``(G, M, h, w)`` in [0, 1], member 0 the
        source's, any grid.
      token_weights: ``"auto-mask"``: float32 ``(M, S)`` or ``(G, M, S)``: 1 at each
        member's subject tokens.
      threshold: ``"auto-mask"``: the maps' threshold after min-max (0.1).
      cfg: the layout's CFG flag (both halves are edited, each from its own half).
      groups: G independent edits in one batch (rows group-major: G × M prompts).
    Returns:
      a :class:`Policy` with ``Layout(G, M, cfg)``.
    Raises:
      ValueError: members < 2, an unknown variant, fractions outside [0, 1], missing masks
        or token weights for the mask variants.
    """
    m = checks.whole_number(members, "members")
    if m < 2:
        raise ValueError(f"members={m}: MasaCtrl needs a source and at least one target "
                         "(give one or more target prompts)")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1)
    if isinstance(start_step, (int, np.integer)) and not isinstance(start_step, bool):
        if not 0 <= int(start_step) <= n:
            raise ValueError(f"start_step={start_step}: a step index must be in [0, {n}]")
        window = (int(start_step), n)
    else:
        window = (_fraction(start_step, "start_step"), 1.0)
    sites = pipe.sites(height, width)
    chosen = masactrl_sites(sites, _start_layer(pipe, start_layer))
    sel = Select(path=_exact(s.path for s in chosen), kind="self")
    layout = Layout(groups=checks.whole_number(groups, "groups", minimum=1), members=m, cfg=cfg)
    table = member_table(n, m, {i: 0 for i in range(1, m)}, window=window)
    if variant == "plain":
        t = jnp.asarray(table)
        return resolve([(sel, MemberSource(k_from=t, v_from=t))], sites, layout=layout)
    if variant == "union":
        st = shared_table(n, m, "first", window=window)
        return resolve([(sel, SharedAttention(jnp.asarray(st), own=True, plain_members=(0,)))],
                       sites,
                       layout=layout)
    if variant == "mask":
        if masks is None:
            raise ValueError("variant='mask' needs masks (mask_s and mask_t); or use "
                             "variant='auto-mask' with a token")
        mk = np.asarray(masks, np.float32)
        if mk.ndim not in (3, 4) or mk.shape[-3] != m:
            raise ValueError(f"masks of shape {mk.shape}: expected (M, h, w) = ({m}, h, w) or "
                             "(G, M, h, w)")
        op = SharedAttention(jnp.asarray(table), mask=GivenMask(jnp.asarray(mk)), own=False,
                             match_query=True, plain_members=(0,))
        return resolve([(sel, op)], sites, layout=layout)
    if token_weights is None:
        raise ValueError("variant='auto-mask' needs the subject token (token=WORD)")
    res = auto_mask_resolution(sites)
    w = np.asarray(token_weights, np.float32)
    rec = CrossMapMask(jnp.asarray(w), jnp.float32(threshold), resolution=res)
    op = SharedAttention(jnp.asarray(table), mask=AuxMask(op_index=0, key="mask"), own=False,
                         match_query=True, plain_members=(0,))
    return resolve([(Select(kind="cross", resolutions=(res,)), rec), (sel, op)], sites,
                   layout=layout)


@dataclasses.dataclass
class MasaCtrlOutput:
    """Result of :func:`masactrl`.

    Attributes:
      images: uint8 ``(M, H, W, 3)``: the source (or its regeneration from the inverted
        noise) then the targets in order.
      latents: float32 ``(M, C, h, w)`` final latents.
      masks: float32 ``(M, h', w')`` the masks used last (mask variants), else None.
      settings: the resolved settings (sites, steps, variant).
    """

    images: np.ndarray
    latents: np.ndarray
    masks: np.ndarray | None
    settings: dict


def _mask_array(mask, name: str, pipe, height, width) -> np.ndarray:
    """A mask at the image size (H, W) or the latent size (h, w) as float32 in [0, 1]."""
    a = np.asarray(mask)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., 0]
    f = pipe.vae_scale_factor
    hh, ww = pipe.check_size(height, width)
    ok = {(hh, ww), (hh // f, ww // f)}
    if a.ndim != 2 or tuple(a.shape) not in ok:
        raise ValueError(f"{name}: mask of shape {a.shape}; give a 2-D mask of the image size "
                         f"{hh}×{ww} or the latent size {hh // f}×{ww // f}")
    a = a.astype(np.float32)
    if a.max() > 1.0:
        a = a / 255.0
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name}: mask values must be in [0, 1] (or 0..255)")
    if a.shape == (hh, ww):  # to the latent grid (f×f block means): one compiled shape
        a = a.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))
    return a


def masactrl(
    pipe,
    source_prompt: str | None,
    target_prompts: str | Sequence[str],
    *,
    image: np.ndarray | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    start_step: float | int = START_STEP,
    start_layer: float | int | None = None,
    variant: str = "plain",
    mask_s: np.ndarray | None = None,
    mask_t: np.ndarray | None = None,
    token: str | tuple[str, str] | None = None,
    threshold: float = 0.1,
    negative_prompt: str | None = None,
    follow_inversion: bool = False,
    height: int | None = None,
    width: int | None = None,
    sdxl: dict | None = None,
) -> MasaCtrlOutput:
    """Run MasaCtrl: the source and each target prompt from one noise, DDIM sampler.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      source_prompt: the source's prompt (with ``image``: the inversion prompt, default
        ``""`` as the reference).
      target_prompts: one or more target prompts.
      image: uint8 ``(H, W, 3)`` real image to edit (DDIM-inverted first), or None.
      seed: the noise of every member (generated source).
      start_step, start_layer, variant, threshold: :func:`masactrl_policy`.
      mask_s, mask_t: ``"mask"``: source / target masks ``(H, W)`` at the image or latent
        size, values in [0, 1] or 0..255.
      token: ``"auto-mask"``: the subject word, in the source and every target prompt, or
        ``(source_word, target_word)``.
      negative_prompt: the unconditional prompt (None: "", the reference).
      follow_inversion: real images: the source follows the inverted trajectory.
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
    Returns:
      :class:`MasaCtrlOutput`.
    Raises:
      ValueError: no target, fractions outside [0, 1], masks missing or of the wrong size,
        a token not in a prompt, an unreadable image array (see also ``Pipeline.generate``).
    """
    from jattn.sampling.inversion import invert
    from jattn.sampling.sampler import SamplerHooks, reimposition

    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts or [])
    if not targets:
        raise ValueError("target_prompts: give at least one target prompt (a group of one has "
                         "no image to edit)")
    checks.prompt_list(targets, "target_prompts")
    if source_prompt is None:
        if image is None:
            raise ValueError("source_prompt: give the source prompt (or an image to edit)")
        source_prompt = ""
    prompts = [source_prompt] + targets
    m = len(prompts)
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1)
    masks = token_weights = None
    if variant == "mask":
        if mask_s is None or mask_t is None:
            raise ValueError("mask_s, mask_t: variant='mask' needs both the source and the "
                             "target mask")
        a = _mask_array(mask_s, "mask_s", pipe, height, width)
        b = _mask_array(mask_t, "mask_t", pipe, height, width)
        if a.shape != b.shape:
            raise ValueError(f"mask_t: shape {b.shape} differs from mask_s's {a.shape}")
        masks = np.stack([a] + [b] * (m - 1))
    elif mask_s is not None or mask_t is not None:
        raise ValueError(f"mask_s/mask_t: masks are used by variant='mask' only (got "
                         f"variant={variant!r})")
    if variant == "auto-mask":
        if token is None:
            raise ValueError("token: variant='auto-mask' needs the subject word whose "
                             "cross-attention map gives the masks (e.g. token='heart')")
        src_w, tgt_w = (token, token) if isinstance(token, str) else tuple(token)
        token_weights = np.zeros((m, pipe.text_config.max_position_embeddings), np.float32)
        for i, (p, w) in enumerate(zip(prompts, [src_w] + [tgt_w] * (m - 1))):
            idx = word_token_indices(pipe.tokenizer, p, w)
            if len(idx) == 0:
                raise ValueError(f"token: {w!r} is not a word of the prompt {p!r}; give a word "
                                 "of the source and of every target prompt")
            token_weights[i, idx] = 1.0
    policy = masactrl_policy(pipe, members=m, num_inference_steps=n, start_step=start_step,
                             start_layer=start_layer, variant=variant, masks=masks,
                             token_weights=token_weights, threshold=threshold,
                             cfg=guidance_scale > 1.0, height=height, width=width)
    latents = hooks = None
    if image is not None:
        img = np.asarray(image)
        img = img[None] if img.ndim == 3 else img
        inv = invert(pipe, img, source_prompt, method="ddim", num_inference_steps=n)
        latents = np.repeat(inv.x_t, m, axis=0)
        if follow_inversion:
            traj = np.repeat(inv.latents, m, axis=1)
            _, re_rows = reimposition(traj)
            hooks = SamplerHooks(reimpose=re_rows,
                                 reimpose_rows=jnp.asarray([True] + [False] * (m - 1)))
    out = pipe.generate(prompts, negative_prompt=negative_prompt, num_inference_steps=n,
                        guidance_scale=guidance_scale, scheduler="ddim", seed=[seed] * m,
                        latents=latents, policy=policy, hooks=hooks, height=height,
                        width=width, **(sdxl or {}))
    used = None
    if variant == "mask":
        used = masks
    elif variant == "auto-mask":
        used = np.asarray(out.aux[0]["mask"])[0]
    chosen = masactrl_sites(pipe.sites(height, width), _start_layer(pipe, start_layer))
    first = (int(start_step) if isinstance(start_step, (int, np.integer))
             else int(float(start_step) * n))
    settings = dict(variant=variant, sites=[s.path for s in chosen], first_step=first,
                    num_inference_steps=n, guidance_scale=guidance_scale,
                    real_image=image is not None, follow_inversion=bool(follow_inversion))
    if variant == "auto-mask":
        settings["mask_resolution"] = list(auto_mask_resolution(pipe.sites(height, width)))
    return MasaCtrlOutput(out.images, out.latents, used, settings)
