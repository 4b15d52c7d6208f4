"""ConsiStory: training-free consistent subject generation.

Source: Tewel, Kaduri, Gal, Kasten, Wolf, Chechik, Atzmon, "Training-Free Consistent
Text-to-Image Generation" (SIGGRAPH 2024); reference NVlabs/consistory
(``consistory_run.py``: ``run_batch_generation``; ``consistory_pipeline.py``;
``attention_processor.py``: ``ConsistoryExtendedAttnXFormersAttnProcessor``;
``consistory_utils.py``: ``QueryStore``, ``FeatureInjector``; ``utils/ptp_utils.py``:
``AttentionStore``; ``utils/general_utils.py``: ``attn_map_to_binary``).

A group is the M prompts of one subject; members ``0 … n_anchors−1`` are the anchors
(``create_anchor_mapping``). This front-end composes generic ops only:

* **subject masks** (:class:`jattn.policy.cross_masks.CrossMapMask` with ``mode="otsu"``,
  ``history=20``): the subject token's cross map (its first sub-token, as
  ``create_token_indices``), conditional half, mean over heads, the cross layers of one
  resolution and the last 20 steps; :class:`jattn.policy.otsu.OtsuMask` upsamples it
  bilinearly to each shared site's resolution and thresholds it there by Otsu (the
  reference: ``attn_res`` 32² = latent/4 on SDXL's 128² latents, masks at 32² and 64²).
  **Resolution for any UNet**: the smallest cross-attention resolution ``>= max(latent/4,
  8)`` (:func:`jattn.methods.masactrl.auto_mask_resolution`: SDXL 128² → 32², the
  reference's; SD1/SD2 64² → 16²; the bundled model 16² → 8², latent/4 = 4² being too
  coarse for a subject). The masks of step i come from the maps up to step i − 1 (the
  reference aggregates after each step, too).
* **subject-driven shared self-attention** (SDSA):
  :class:`jattn.policy.shared.SharedAttention` at every decoder self-attention
  (``extend_kv_unet_parts=['up']``), both CFG halves: member ``m`` attends to its own
  tokens and to every other anchor's tokens inside that anchor's mask (non-anchors do not
  see each other), with mask dropout 0.5 per group, step and resolution
  (:func:`jattn.policy.shared.drop_mask`; batch-invariant), at steps ``1 … n−1``
  (``t_range=[(1, n_steps)]``).
* **query blending** (``share_queries``): the reference runs, at steps ``i <= n//10``, a
  vanilla UNet pass (no extended attention) and, where it extends attention, replaces the
  queries by ``s_i·q_vanilla + (1 − s_i)·q`` with ``s = linspace(0.9, 0.81836735,
  n//10 + 1)`` (so steps 1 … n//10; step 0 has no extended attention). jattn gives every
  member a **shadow member** (same noise; :class:`jattn.policy.blend.TieLatents` copies
  the member's latents to it after every step; no SDSA at its rows), whose queries at the
  same site and step are the vanilla pass's, and :class:`jattn.policy.blend.MemberBlend`
  blends them in. Exact, but the batch is twice as large for the whole run.
* **FreeU** (``freeu=True``): :func:`jattn.policy.features.freeu_policy` with the
  reference's ``enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)``, on every row.

Not implemented (yet): the second pass with **feature injection** (DIFT features at
timestep 261 of up-block 0's output, Gaussian-smoothed, cyclic nearest-neighbour maps inside
the masks, α 0.8 at steps n//10 … n//3 in the decoder self-attention outputs at the
largest resolution): ``feature_injection=True`` raises ``NotImplementedError``.

Reference differences: the mask dropout is drawn per group from the group's seed (the
reference: one draw for the whole batch from ``torch.manual_seed(0)``;
``reference_quirks=True`` uses one key, 0, for every group); several subject words are
summed into one map (the reference thresholds each concept and takes the union).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jattn.io import checks
from jattn.policy.blend import MemberBlend, TieLatents
from jattn.policy.core import Layout, Policy, Select, compose, resolve
from jattn.policy.cross_masks import CrossMapMask
from jattn.policy.otsu import OtsuMask
from jattn.policy.ops import member_table
from jattn.policy.shared import SharedAttention, shared_table

__all__ = ["consistory_policy", "consistory", "ConsiStoryOutput", "subject_token_weights",
           "query_strengths", "FREEU", "MASK_HISTORY"]

FREEU = dict(b1=1.1, b2=1.2, s1=0.6, s2=0.4)  # consistory_run.py load_pipeline
MASK_HISTORY = 20                              # AttentionStore: x[-20:]
QUERY_STRENGTH = (0.9, 0.81836735)             # query_store_kwargs


def query_strengths(n: int, start: float = QUERY_STRENGTH[0], end: float = QUERY_STRENGTH[1]
                    ) -> np.ndarray:
    """float32 ``(n,)``: the vanilla queries' weight per step: ``linspace(start, end, n//10 +
    1)`` at steps ``1 … n//10`` (``QueryStore.inject_query`` where extended attention runs,
    i.e. from step 1), 0 elsewhere."""
    k = n // 10
    w = np.zeros(n, np.float32)
    s = np.linspace(start, end, k + 1).astype(np.float32)
    for i in range(1, min(k, n - 1) + 1):
        w[i] = s[i]
    return w


def subject_token_weights(pipe, prompts: Sequence[str], subject: str | Sequence[str]
                          ) -> np.ndarray:
    """float32 ``(M, S)``: 1 at the first sub-token of each subject word in each prompt
    (``create_token_indices``: ``tokenizer.encode(word)[0]``).

    Raises:
      ValueError: a subject word missing from a prompt (names both).
    """
    from jattn.io.words import word_token_indices

    words = [subject] if isinstance(subject, str) else list(subject)
    words = [w for s in words for w in str(s).split()]
    if not words:
        raise ValueError("subject: give the subject word(s) that every prompt shares, e.g. "
                         "subject='heart'")
    s = pipe.text_config.max_position_embeddings
    out = np.zeros((len(prompts), s), np.float32)
    for i, p in enumerate(prompts):
        for w in words:
            idx = word_token_indices(pipe.tokenizer, p, w)
            if len(idx) == 0:
                raise ValueError(f"subject: {w!r} is not a word of the prompt {p!r}; every "
                                 "prompt must name the subject (e.g. 'a heart on the left')")
            out[i, int(idx[0])] = 1.0
    return out


def _self_up_sites(sites) -> list:
    return [s for s in sites if s.kind == "self" and s.block == "up"]


def consistory_policy(pipe, token_weights: np.ndarray, num_steps: int, *, groups: int = 1,
                      cfg: bool = True, n_anchors: int = 2, mask_dropout: float = 0.5,
                      mask_keys: Sequence[int] | None = None, share_queries: bool = True,
                      sdsa: bool = True, freeu: bool = True,
                      mask_resolution: tuple[int, int] | None = None,
                      height: int | None = None, width: int | None = None) -> Policy:
    """The ConsiStory policy (first pass) for G groups of M members.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (sites).
      token_weights: float32 ``(G, M, S)`` or ``(M, S)``: 1 at each member's subject tokens.
      num_steps: n (tables are per step).
      groups: G; cfg: the run uses CFG.
      n_anchors: anchors = members ``0 … min(n_anchors, M)−1``.
      mask_dropout: p in [0, 1] (array leaf).
      mask_keys: one int per group (mask dropout draws; default 0 for every group).
      share_queries: add a shadow per member and blend its queries (module docstring); the
        layout then has 2M members, ``M + m`` being member m's shadow.
      sdsa: False: no shared attention (masks still recorded).
      freeu: compose FreeU with the reference's factors.
      mask_resolution: the cross resolution of the maps (default: module docstring).
    Returns:
      a :class:`Policy` with ``Layout(G, M or 2M, cfg)``; op 0 records the masks.
    Raises:
      ValueError: M < 2, n_anchors < 1, mask_dropout outside [0, 1].
    """
    from jattn.methods.masactrl import auto_mask_resolution

    w = np.asarray(token_weights, np.float32)
    if w.ndim == 2:
        w = np.broadcast_to(w[None], (int(groups),) + w.shape)
    g, m = int(w.shape[0]), int(w.shape[1])
    n = checks.whole_number(num_steps, "num_inference_steps", minimum=1)
    if m < 2:
        raise ValueError(f"prompts: a group of {m} prompt shares nothing; ConsiStory needs at "
                         "least two prompts of the same subject")
    na = checks.whole_number(n_anchors, "n_anchors", minimum=1)
    na = min(na, m)
    p = checks.finite_number(mask_dropout, "mask_dropout")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_dropout={mask_dropout!r}: a probability must be in [0, 1] "
                         "(the reference: 0.5)")
    mm = 2 * m if share_queries else m
    layout = Layout(groups=g, members=mm, cfg=bool(cfg))
    sites = pipe.sites(height, width, features=bool(freeu))
    res = tuple(mask_resolution) if mask_resolution is not None else auto_mask_resolution(
        [s for s in sites if hasattr(s, "kind") and s.kind in ("self", "cross")])
    wf = np.concatenate([w, w], axis=1) if share_queries else w
    rec = CrossMapMask(jnp.asarray(wf), resolution=res, mode="otsu", history=MASK_HISTORY)
    anchors = list(range(na))
    sources = {i: [a for a in anchors if a != i] for i in range(m)}
    sources = {k: v for k, v in sources.items() if v}
    window = (1, n) if sdsa else (0, 0)
    table = shared_table(n, mm, sources, window=window)
    keys = np.zeros(g, np.uint32) if mask_keys is None else np.asarray(mask_keys, np.uint32)
    share = SharedAttention(jnp.asarray(table), mask=OtsuMask(op_index=0, key="map"),
                            dropout=jnp.float32(p), keys=jnp.asarray(keys))
    ops: list = [share]
    if share_queries:
        qwin = (1, min(n // 10 + 1, n)) if sdsa else (0, 0)   # where SDSA and i <= n//10
        qt = member_table(n, mm, {i: m + i for i in range(m)}, window=qwin)
        ops = [MemberBlend(q_from=jnp.asarray(qt), weight=jnp.asarray(query_strengths(n))),
               share, TieLatents(jnp.asarray(list(range(m)) + list(range(m)), jnp.int32))]
    ups = _self_up_sites(sites)
    if not ups:
        raise ValueError("this UNet has no decoder self-attention; ConsiStory shares there")
    pol = resolve([(Select(kind="cross", resolutions=(res,)), rec),
                   (Select(kind="self", blocks=("up",)), tuple(ops))], sites, layout=layout)
    if freeu:
        from jattn.policy.features import freeu_policy

        pol = compose(pol, freeu_policy(sites, layout=layout, **FREEU))
    return pol


@dataclasses.dataclass
class ConsiStoryOutput:
    """Result of :func:`consistory`.

    Attributes:
      images: uint8 ``(G·M, H, W, 3)`` group-major, prompts in order (None with
        ``decode=False``).
      latents: float32 ``(G·M, C, h, w)`` final latents (NCHW).
      masks: float32 ``(G·M, h', w')`` the last subject masks (at the maps' resolution).
      prompts: G lists of M prompts; seeds: per image.
      settings: the resolved settings (for result.json).
    """

    images: np.ndarray | None
    latents: np.ndarray
    masks: np.ndarray
    prompts: list
    seeds: list
    settings: dict


def _groups_of(prompts) -> list[list[str]]:
    if isinstance(prompts, str):
        raise ValueError("prompts: one prompt; give a list of at least two prompts of the "
                         "same subject")
    items = list(prompts)
    if items and all(not isinstance(p, str) for p in items):
        groups = [checks.prompt_list(p, f"prompts[{i}]") for i, p in enumerate(items)]
    else:
        groups = [checks.prompt_list(items, "prompts")]
    if len({len(gp) for gp in groups}) != 1:
        raise ValueError(f"prompts: groups of {sorted({len(gp) for gp in groups})} prompts; every "
                         "group needs the same number of prompts")
    if len(groups[0]) < 2:
        raise ValueError("prompts: a single prompt shares nothing; give at least two prompts "
                         "of the same subject (CLI: two or more --prompt)")
    return groups


def consistory(pipe, subject: str | Sequence[str], prompts: Sequence[str] | Sequence[Sequence[str]],
               *, seed: Any = 0, num_inference_steps: int = 50, guidance_scale: float = 5.0,
               n_anchors: int = 2, mask_dropout: float = 0.5, share_queries: bool = True,
               sdsa: bool = True, feature_injection: bool = False, freeu: bool = True,
               mask_resolution: tuple[int, int] | None = None,
               negative_prompt: str | None = None, reference_quirks: bool = False,
               height: int | None = None, width: int | None = None,
               decode: bool = True) -> ConsiStoryOutput:
    """Generate the prompts with one consistent subject (ConsiStory, first pass).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      subject: the subject word(s) every prompt contains (``concept_token``), or one per
        group.
      prompts: M >= 2 prompts, or G groups of M (one batch).
      seed: int (image i of the batch: seed + i) or one per image; the mask dropout of a
        group is drawn from its first image's seed.
      num_inference_steps, guidance_scale: DDIM steps (50) and CFG (the pipeline's default
        5.0, SDXL's).
      n_anchors, mask_dropout, share_queries, freeu, mask_resolution:
        :func:`consistory_policy`; ``sdsa=False``: no shared attention (plain + FreeU +
        query blending toward the same model, i.e. the reference's ``perform_sdsa=False``).
      feature_injection: the reference's second pass (not implemented: raises).
      reference_quirks: one dropout draw for every group (key 0), as the reference's
        whole-batch draw.
      decode: decode images.
    Returns:
      :class:`ConsiStoryOutput`.
    Raises:
      ValueError: a single prompt, a subject word missing from a prompt, mask_dropout
        outside [0, 1], bad numbers (naming the argument).
      NotImplementedError: ``feature_injection=True``.
    """
    groups = _groups_of(prompts)
    g, m = len(groups), len(groups[0])
    subjects = ([subject] * g if isinstance(subject, str) or subject is None
                else list(subject))
    if len(subjects) != g:
        raise ValueError(f"subject: {len(subjects)} subjects for {g} groups; give one for all "
                         "or one per group")
    p = checks.finite_number(mask_dropout, "mask_dropout")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_dropout={mask_dropout!r}: a probability must be in [0, 1] "
                         "(the reference: 0.5)")
    if feature_injection:
        raise NotImplementedError("feature_injection: ConsiStory's second pass (DIFT feature "
                                  "injection) is not implemented yet; use "
                                  "feature_injection=False")
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=2,
                            maximum=pipe.scheduler_config.num_train_timesteps)
    gs = checks.finite_number(guidance_scale, "guidance_scale", minimum=0.0)
    flat = [q for gp in groups for q in gp]
    pipe.tokenize(flat, name="prompts")
    weights = np.stack([subject_token_weights(pipe, gp, s) for gp, s in zip(groups, subjects)])
    seeds = checks.seed_list(seed, g * m, "seed")
    height, width = pipe.check_size(height or pipe.default_size, width or pipe.default_size,
                                    g * m)
    keys = [0] * g if reference_quirks else [seeds[i * m] for i in range(g)]
    policy = consistory_policy(pipe, weights, n, groups=g, cfg=gs > 1.0, n_anchors=n_anchors,
                               mask_dropout=p, mask_keys=keys, share_queries=share_queries,
                               sdsa=sdsa, freeu=freeu, mask_resolution=mask_resolution,
                               height=height, width=width)
    mm = policy.layout.members
    run_prompts, run_seeds = flat, seeds
    if share_queries:  # shadows: same prompts and noise as their members
        run_prompts = [q for gp in groups for q in gp + gp]
        run_seeds = [s for i in range(g) for s in seeds[i * m:(i + 1) * m] * 2]
    out = pipe.generate(run_prompts, negative_prompt=negative_prompt, num_inference_steps=n,
                        guidance_scale=gs, scheduler="ddim", eta=0.0, seed=run_seeds,
                        policy=policy, height=height, width=width, decode=decode)
    keep = np.asarray([i * mm + j for i in range(g) for j in range(m)])
    masks = np.asarray(out.aux[0]["mask"]).reshape((g, mm) + out.aux[0]["mask"].shape[2:])
    masks = masks[:, :m].reshape((g * m,) + masks.shape[2:])
    images = None if out.images is None else np.asarray(out.images)[keep]
    settings = dict(num_inference_steps=n, guidance_scale=gs, scheduler="ddim", groups=g,
                    members=m, subject=subjects, n_anchors=min(int(n_anchors), m),
                    mask_dropout=p, share_queries=share_queries, sdsa=sdsa, freeu=freeu,
                    freeu_factors=FREEU if freeu else None,
                    mask_resolution=list(policy.ops[0].resolution),
                    sdsa_steps=[1, n - 1] if sdsa else None,
                    query_steps=[1, n // 10] if share_queries else None,
                    feature_injection=False, reference_quirks=reference_quirks,
                    height=height, width=width)
    return ConsiStoryOutput(images=images, latents=np.asarray(out.latents)[keep], masks=masks,
                            prompts=groups, seeds=seeds, settings=settings)
