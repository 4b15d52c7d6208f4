"""StyleAligned: a set of images in one style by shared self-attention.

Source: Hertz, Voynov, Fruchter, Cohen-Or, "Style Aligned Image Generation via Shared
Attention" (CVPR 2024); reference google/style-aligned (``sa_handler.py``: ``StyleAlignedArgs``,
``SharedAttentionProcessor``, ``register_shared_norm``, ``_get_switch_vec``;
``inversion.py``: ``ddim_inversion``, ``make_inversion_callback``; notebooks
``style_aligned_sd1.ipynb``, ``style_aligned_transfer_sdxl.ipynb``).

A group holds M members; member 0 is the reference (its style is shared), per CFG half.
This front-end only composes generic ops:

* every self-attention site (``only_self_level`` = 0; :func:`switch_vector`):
  :class:`jattn.policy.shared.AdaIN` of Q and K (not V) toward member 0, then
  :class:`jattn.policy.shared.SharedAttention` with K, V := concat[own; member 0],
  ``k_scale`` = ``shared_score_scale`` on member 0's keys, ``shift`` =
  ``shared_score_shift`` a logit bias on its columns; ``full_attention_share``: every
  member attends to every member's tokens (``shared_table(…, "all")``, no AdaIN);
* ``share_group_norm``: :class:`jattn.policy.features.SharedGroupNorm` at every GroupNorm
  of the UNet (resnets' norm1/norm2, transformers' ``norm``, ``conv_norm_out``): statistics
  over own + member 0 (``share_layer_norm`` is numerically a no-op: LayerNorm statistics are
  per token);
* from a reference image: DDIM inversion with CFG ``inversion_guidance`` (2 as the
  notebook, the empty prompt as the unconditional) and member 0's latents re-imposed after
  every step (:func:`jattn.sampling.sampler.reimposition`, ``offset`` 5:
  ``latents[0] = zts[max(offset + 1, i + 1)]``), ``SamplerHooks.reimpose``;
* optional FreeU (:func:`jattn.policy.features.freeu_policy`) composed after.

Reference defaults: SD1 notebook: DDIM 50 steps, CFG 7.5, share_group_norm, share_attention,
adain_queries, adain_keys True, adain_values False, scale 1, shift 0. SDXL notebooks use
share_group_norm False: ``share_group_norm=None`` (default) takes the SD1 notebook's True on
SD1/SD2 and the SDXL notebooks' False on SDXL (``pipe.is_sdxl``).
Transfer notebook: shift log 2, generation CFG 10, inversion CFG 2, offset 5.

Reference differences: the reference runs member 0 through the shared path too (AdaIN toward
itself, attending to ``[own; own]`` shifted, GroupNorm over ``[own; own]``), equal to its
plain generation up to rounding; here member 0's slot is off and its rows take the plain
computation itself (fused attention, own GroupNorm statistics: see :mod:`jattn.policy.shared`,
:class:`jattn.policy.features.SharedGroupNorm`), so member 0 is bit-identical to plain
generation of the same batch (``scripts/bench_edit.py`` prints it; the tests' ``-O0``
builds round one GroupNorm differently).
``window`` (a step window of the sharing) is an extension (the reference shares at every
step). Several groups run in one batch, each with its own member 0.

Quirk (``reference_quirks=True``): ``_get_switch_vec`` is indexed with ``i // 2`` over all
attention processors in diffusers' registration order (down, up, mid), the intended
index being the self-attention layer's own. For SD UNets (attn1, attn2 alternate) the two
coincide, so the quirk changes nothing there; it is kept for other layouts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jattn.policy.core import Layout, Policy, Select, compose, resolve
from jattn.policy.features import SharedGroupNorm, freeu_policy
from jattn.policy.ops import member_table
from jattn.policy.shared import AdaIN, SharedAttention, shared_table

__all__ = ["style_aligned_policy", "style_aligned", "StyleAlignedOutput", "switch_vector",
           "shared_self_sites"]


def switch_vector(num_layers: int, level: float) -> np.ndarray:
    """bool ``(num_layers,)``: True where a self-attention layer is *not* shared (the
    reference's ``_get_switch_vec``: level 0 = share all, 1 = share none, in between every
    ``n // int(level·n)``-th layer switched off, flipped above 0.5).

    Raises:
      ValueError: level outside [0, 1].
    """
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"only_self_level={level!r}: must be in [0, 1] (0 shares every "
                         "self-attention layer, 1 none)")
    n = int(num_layers)
    if level == 0:
        return np.zeros(n, bool)
    if level == 1:
        return np.ones(n, bool)
    flip = level > 0.5
    if flip:
        level = 1 - level
    k = int(level * n)
    if k == 0:
        vec = np.zeros(n, bool)
    else:
        vec = np.arange(n) % (n // k) == 0
    return ~vec if flip else vec


def _diffusers_order(sites) -> list:
    """Attention sites in diffusers' ``unet.attn_processors`` order: down, up, mid blocks
    (``mid_block`` is registered after the ``up_blocks`` list), call order within each."""
    rank = {"down": 0, "up": 1, "mid": 2}
    return sorted(sites, key=lambda s: rank.get(s.block, 3))


def shared_self_sites(sites, only_self_level: float = 0.0, *,
                      reference_quirks: bool = False) -> list:
    """The self-attention sites StyleAligned shares at (all of them at level 0)."""
    att = _diffusers_order([s for s in sites if getattr(s, "kind", None) in ("self", "cross")])
    selfs = [s for s in att if s.kind == "self"]
    vec = switch_vector(len(selfs), only_self_level)
    if reference_quirks:  # index i // 2 over every attention processor
        return [s for i, s in enumerate(att) if s.kind == "self"
                and not (vec[i // 2] if i // 2 < len(vec) else False)]
    return [s for j, s in enumerate(selfs) if not vec[j]]


def _group_norm_default(pipe, share_group_norm: bool | None) -> bool:
    """``share_group_norm``: None -> the reference's default for the model family (SD1
    notebook True; SDXL notebooks False)."""
    if share_group_norm is None:
        return not getattr(pipe, "is_sdxl", False)
    return bool(share_group_norm)


def style_aligned_policy(pipe, members: int, num_steps: int, *, groups: int = 1,
                         cfg: bool = True, share_group_norm: bool | None = None,
                         full_attention_share: bool = False, adain_queries: bool = True,
                         adain_keys: bool = True, adain_values: bool = False,
                         shared_score_scale: float = 1.0, shared_score_shift: float = 0.0,
                         only_self_level: float = 0.0,
                         window: tuple[float, float] | tuple[int, int] = (0.0, 1.0),
                         reference_quirks: bool = False, height: int | None = None,
                         width: int | None = None) -> Policy:
    """The StyleAligned policy for ``groups × members`` images (member 0 the reference).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (sites).
      members: M ≥ 2; num_steps: denoising steps (tables are per step).
      groups: G independent groups in the batch.
      cfg: the run uses classifier-free guidance (``guidance_scale > 1``); both halves share.
      share_group_norm: GroupNorm statistics over own + member 0 at every GroupNorm; None
        (default): True on SD1/SD2 (SD1 notebook), False on SDXL (the SDXL notebooks).
      full_attention_share: every member attends to all members (no AdaIN/scale/shift).
      adain_queries, adain_keys, adain_values: AdaIN toward member 0 (per head/channel,
        statistics over tokens, unbiased variance + 1e-5).
      shared_score_scale: factor on member 0's keys seen by the others (array leaf).
      shared_score_shift: logit bias on member 0's columns (array leaf; 0 = none and the
        fused kernel, as the reference's ``if shared_score_shift != 0``; switching between 0
        and non-zero compiles once, other values never).
      only_self_level: fraction of self-attention layers not shared (:func:`switch_vector`).
      window: ``(start, end)`` step fractions in [0, 1] (or step indices) where sharing is
        on (attention, AdaIN and GroupNorm); the reference: always (0, 1).
      reference_quirks: the switch vector's ``i // 2`` indexing (module docstring).
      height, width: image size in px (default: the model's).
    Returns:
      a :class:`Policy` with ``Layout(groups, members, cfg)``; attention rules at the shared
      self sites, feature rules at the GroupNorm sites.
    Raises:
      ValueError: M < 2, a window or level outside [0, 1], non-finite scale/shift.
    """
    m, n, g = int(members), int(num_steps), int(groups)
    share_group_norm = _group_norm_default(pipe, share_group_norm)
    if m < 2:
        raise ValueError(f"members={m}: a group of one image shares nothing; StyleAligned needs "
                         "the reference (member 0) and at least one more prompt")
    for name, val in (("shared_score_scale", shared_score_scale),
                      ("shared_score_shift", shared_score_shift)):
        if not np.isfinite(float(val)):
            raise ValueError(f"{name}={val!r}: must be a finite number")
    s0, s1 = window
    if isinstance(s0, float) or isinstance(s1, float):
        if not 0.0 <= s0 <= s1 <= 1.0:
            raise ValueError(f"window={tuple(window)}: step fractions need 0 <= start <= end "
                             "<= 1")
    layout = Layout(groups=g, members=m, cfg=bool(cfg))
    sites = pipe.sites(height, width, features=share_group_norm)
    shared = shared_self_sites(sites, only_self_level, reference_quirks=reference_quirks)
    first = {i: 0 for i in range(1, m)}
    policies = []
    if shared:
        if full_attention_share:
            ops: tuple = (SharedAttention(sources=jnp.asarray(shared_table(n, m, "all",
                                                                           window=window))),)
        else:
            table = jnp.asarray(member_table(n, m, first, window=window))
            adain = AdaIN(q_from=table if adain_queries else None,
                          k_from=table if adain_keys else None,
                          v_from=table if adain_values else None)
            share = SharedAttention(
                sources=jnp.asarray(shared_table(n, m, "first", window=window)),
                k_scale=jnp.float32(shared_score_scale),
                shift=None if float(shared_score_shift) == 0.0
                else jnp.float32(shared_score_shift), plain_members=(0,))
            ops = ((adain, share) if (adain_queries or adain_keys or adain_values)
                   else (share,))
        paths = "|".join(re.escape(s.path) for s in shared)
        policies.append(resolve([(Select(path=f"^({paths})$", kind="self"), ops)], sites,
                                layout=layout))
    if share_group_norm:
        gn = SharedGroupNorm(source=jnp.asarray(member_table(n, m, first, window=window)))
        policies.append(resolve([(Select(kind="group_norm"), gn)], sites, layout=layout))
    if not policies:
        raise ValueError(f"only_self_level={only_self_level} with share_group_norm=False: "
                         "nothing is shared; lower only_self_level or share the GroupNorms")
    return compose(*policies)


# ---------------------------------------------------------------------------- front-end
@dataclasses.dataclass
class StyleAlignedOutput:
    """Result of :func:`style_aligned`.

    Attributes:
      images: uint8 ``(G·M, H, W, 3)`` group-major (None with ``decode=False``); per group
        member 0 is the reference (from a reference image: its reconstruction), then the
        other prompts in order.
      latents: float32 ``(G·M, C, h, w)`` final latents (NCHW).
      prompts: ``G`` lists of M prompts (member 0 = the reference's prompt).
      seeds: the per-image seeds.
      settings: the resolved settings (for result.json).
    """

    images: np.ndarray | None
    latents: np.ndarray
    prompts: list
    seeds: list
    settings: dict


def _groups_of(prompts, name: str) -> list[list[str]]:
    from jattn.io import checks

    if isinstance(prompts, str):
        raise ValueError(f"{name}: one prompt; give a list (the reference first, then the "
                         "prompts that share its style)")
    items = list(prompts)
    if items and all(not isinstance(p, str) for p in items):
        groups = [checks.prompt_list(p, f"{name}[{i}]") for i, p in enumerate(items)]
    else:
        groups = [checks.prompt_list(items, name)]
    if len({len(gp) for gp in groups}) != 1:
        raise ValueError(f"{name}: groups of {sorted({len(gp) for gp in groups})} prompts; every "
                         "group needs the same number of members")
    return groups


def style_aligned(pipe, prompts: Sequence[str] | Sequence[Sequence[str]], *, seed: Any = 0,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5,
                  reference_image: Any = None, reference_prompt: str | Sequence[str] | None = None,
                  inversion_guidance: float = 2.0, offset: int = 5,
                  share_group_norm: bool | None = None, full_attention_share: bool = False,
                  adain_queries: bool = True, adain_keys: bool = True,
                  adain_values: bool = False, shared_score_scale: float = 1.0,
                  shared_score_shift: float = 0.0, only_self_level: float = 0.0,
                  window: tuple[float, float] = (0.0, 1.0), freeu: str | dict | None = None,
                  share: bool = True, negative_prompt: str | None = None,
                  reference_quirks: bool = False, height: int | None = None,
                  width: int | None = None, decode: bool = True,
                  sdxl: dict | None = None) -> StyleAlignedOutput:
    """Generate images that share the style of a reference (member 0).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      prompts: one group ``[reference, p1, …]`` or G groups of equal length (one batch).
        With ``reference_image`` the prompts are the members after the reference (≥ 1).
      seed: int (image i of the batch uses seed + i, as ``pipe.generate``) or one per image.
        Member 0 with ``seed`` s is bit for bit the image plain generation of the same
        batch gives (``share=False``; ``pipe.generate(prompts[0], seed=s)`` alone: up to
        the rounding of another batch size).
      num_inference_steps, guidance_scale: DDIM steps (the notebooks: 50) and CFG (SD1: 7.5;
        transfer: 10).
      reference_image: uint8 ``(H, W, 3)`` (or PIL), or one per group: member 0 follows its
        DDIM inversion (CFG ``inversion_guidance``), re-imposed after every step
        (``offset``); its output is the reconstruction.
      reference_prompt: the reference image's prompt (one, or one per group); required with
        ``reference_image``.
      share_group_norm … window, reference_quirks: :func:`style_aligned_policy`.
      freeu: None, a preset name of :data:`jattn.policy.features.FREEU_FACTORS`, or a dict of
        :func:`jattn.policy.features.freeu_policy` keywords; composed after StyleAligned.
      share: False = plain generation of the same prompts and seeds (the baseline; FreeU,
        the reference image's re-imposition still apply).
      decode: decode images.
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
    Returns:
      :class:`StyleAlignedOutput`.
    Raises:
      ValueError: a group of one prompt, ``reference_image`` without ``reference_prompt``,
        an image that is not (H, W, 3) uint8 or of a size the model cannot take, an offset
        outside ``[0, steps)``, bad numbers (naming the argument).
    """
    from jattn.io import checks
    from jattn.io.images import as_uint8_images
    from jattn.sampling.sampler import SamplerHooks, initial_noise, per_sample_keys, reimposition

    groups = _groups_of(prompts, "prompts")
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=2,
                            maximum=pipe.scheduler_config.num_train_timesteps)
    gs = checks.finite_number(guidance_scale, "guidance_scale", minimum=0.0)
    images = None
    if reference_image is not None:
        if reference_prompt is None:
            raise ValueError("reference_prompt: give the reference image's prompt (what it "
                             "shows, e.g. \"a red circle on a beige background\"); it is "
                             "inverted with it")
        refs = reference_image if isinstance(reference_image, (list, tuple)) else [reference_image]
        refs = [np.asarray(r.convert("RGB")) if hasattr(r, "convert") else r for r in refs]
        images = np.concatenate([as_uint8_images(r, "reference_image") for r in refs])
        rp = checks.prompt_list(reference_prompt, "reference_prompt")
        if len(refs) == 1 and len(groups) > 1:
            images = np.repeat(images, len(groups), axis=0)
        if len(rp) == 1:
            rp = rp * len(groups)
        if images.shape[0] != len(groups) or len(rp) != len(groups):
            raise ValueError(f"reference_image/reference_prompt: {images.shape[0]} images and "
                             f"{len(rp)} prompts for {len(groups)} groups; give one for all or "
                             "one per group")
        groups = [[r] + gp for r, gp in zip(rp, groups)]
        offset = checks.whole_number(offset, "offset", minimum=0, maximum=n - 1)
        inversion_guidance = checks.finite_number(inversion_guidance, "inversion_guidance",
                                                  minimum=1.0)
        height, width = images.shape[1], images.shape[2]
    m, g = len(groups[0]), len(groups)
    if m < 2:
        raise ValueError("prompts: a group of one prompt shares nothing; give the reference "
                         "and at least one more prompt (CLI: two or more --prompt, or "
                         "--reference-image with one --prompt)")
    flat = [p for gp in groups for p in gp]
    pipe.tokenize(flat, name="prompts")
    seeds = checks.seed_list(seed, g * m, "seed")
    height, width = pipe.check_size(height or pipe.default_size, width or pipe.default_size,
                                    g * m)
    cfg = gs > 1.0
    share_group_norm = _group_norm_default(pipe, share_group_norm)
    policies = []
    if share:
        policies.append(style_aligned_policy(
            pipe, m, n, groups=g, cfg=cfg, share_group_norm=share_group_norm,
            full_attention_share=full_attention_share, adain_queries=adain_queries,
            adain_keys=adain_keys, adain_values=adain_values,
            shared_score_scale=checks.finite_number(shared_score_scale, "shared_score_scale"),
            shared_score_shift=checks.finite_number(shared_score_shift, "shared_score_shift"),
            only_self_level=checks.finite_number(only_self_level, "only_self_level",
                                                 minimum=0.0, maximum=1.0),
            window=tuple(window), reference_quirks=reference_quirks, height=height,
            width=width))
    if freeu is not None:
        kw = {"preset": freeu} if isinstance(freeu, str) else dict(freeu)
        policies.append(freeu_policy(pipe.sites(height, width, features=True),
                                     layout=Layout(g, m, cfg), **kw))
    policy = compose(*policies) if policies else None
    latents, hooks, inv_info = None, None, None
    if images is not None:
        from jattn.sampling.inversion import invert

        inv = invert(pipe, images, [gp[0] for gp in groups], method="ddim",
                     num_inference_steps=n, inversion_guidance=inversion_guidance)
        x_t, traj = reimposition(inv.latents, offset)        # (G, h, w, C), (n, G, h, w, C)
        h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        c = int(x_t.shape[-1])
        x = initial_noise(per_sample_keys(np.asarray(seeds, np.uint32)), (h, w, c))
        x = x.reshape((g, m, h, w, c)).at[:, 0].set(x_t)
        full = jnp.zeros((n, g, m, h, w, c), jnp.float32).at[:, :, 0].set(traj)
        rows = np.zeros((g, m), bool)
        rows[:, 0] = True
        hooks = SamplerHooks(reimpose=full.reshape((n, g * m, h, w, c)),
                             reimpose_rows=jnp.asarray(rows.reshape(-1)))
        latents = np.asarray(x.reshape((g * m, h, w, c))).transpose(0, 3, 1, 2)
        inv_info = dict(inversion="ddim", inversion_guidance=inversion_guidance, offset=offset,
                        reference_prompts=[gp[0] for gp in groups])
    out = pipe.generate(flat, negative_prompt=negative_prompt, num_inference_steps=n,
                        guidance_scale=gs, scheduler="ddim", eta=0.0, seed=seeds,
                        latents=latents, policy=policy, hooks=hooks, height=height,
                        width=width, decode=decode, **(sdxl or {}))
    settings = dict(num_inference_steps=n, guidance_scale=gs, scheduler="ddim", groups=g,
                    members=m, share=share, share_group_norm=share_group_norm,
                    full_attention_share=full_attention_share, adain_queries=adain_queries,
                    adain_keys=adain_keys, adain_values=adain_values,
                    shared_score_scale=float(shared_score_scale),
                    shared_score_shift=float(shared_score_shift),
                    only_self_level=float(only_self_level), window=list(window),
                    freeu=freeu, reference_quirks=reference_quirks,
                    reference_image=inv_info, height=height, width=width)
    return StyleAlignedOutput(images=out.images, latents=out.latents, prompts=groups,
                              seeds=seeds, settings=settings)
