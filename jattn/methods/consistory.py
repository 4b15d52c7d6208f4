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
  vanilla UNet pass (no extended attention, FreeU on) and, where it extends attention,
  replaces the queries by ``s_i·q_vanilla + (1 − s_i)·q`` with ``s = linspace(0.9,
  0.81836735, n//10 + 1)`` (so steps 1 … n//10; step 0 has no extended attention). jattn
  runs that vanilla pass as the sampler's **pre-pass hook**
  (:class:`jattn.sampling.sampler.SamplerHooks` ``pre_policy``/``pre_window``: a
  :class:`jattn.policy.prepass.RecordQKV` at the decoder self-attention sites + FreeU, at
  steps ``1 … n//10`` only, under ``lax.cond``), and
  :class:`jattn.policy.prepass.PrePassBlend` blends its queries into the main pass (every
  member, both CFG halves).
* **feature injection** (``feature_injection``, the reference's default; ``run_batch_
  generation``): a second pass from the same noise with the same policy, in which the
  decoder's and encoder's self-attention outputs at the largest self-attention resolution
  (``FeatureInjector.inject_res = [64]`` on SDXL's 128² latents; 16² on SD1 at 64² and on
  the bundled model at 16² — the finest attention grid) are blended toward their nearest
  neighbours among the anchors, ``α = 0.8``, at steps ``n//10 … n//3`` (5 … 16 of 50:
  fractions 0.1 … 1/3 for any step count), conditional half only, where the member's own
  subject mask is set and its nearest-neighbour distance is below Otsu's threshold of its
  distances. The correspondence (:mod:`jattn.policy.correspondence`): **DIFT features** =
  the first up-block's output (``up_ft_indices=[0]``; jattn's feature site
  ``up_blocks.1.resnets.0.backbone``, before FreeU) at timestep 261 (``DIFTLatentStore(
  steps=[261])``: the step whose timestep is nearest 261/1000 of the training timesteps,
  step 36 of 50), conditional half, recorded in-graph in the first pass
  (:class:`jattn.policy.features.FeatureRecord`), Gaussian-smoothed (3×3, σ 1), resized
  bilinearly to the injection grid; cosine nearest neighbour of each token among each
  anchor's subject tokens (the first pass's last Otsu masks at that grid, no dropout),
  minimum over the anchors (``cyclic_nn_map``, ``swap_strategy='min'``,
  ``dist_thr='dynamic'``). Both passes run one compiled program (the first with an empty
  injection window, the second with an empty DIFT window): the arrays of the second pass
  are dynamic leaves, no recompilation.
* **FreeU** (``freeu=True``): :func:`jattn.policy.features.freeu_policy` with the
  reference's ``enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)``, on every pass (also the
  vanilla pre-pass).

Reference differences: the mask dropout is drawn per group from the group's seed (the
reference: one draw for the whole batch from ``torch.manual_seed(0)``;
``reference_quirks=True`` uses one key, 0, for every group); several subject words are
summed into one map (the reference thresholds each concept and takes the union); the
injection reads every member's outputs as before injection (the reference injects in
place, member after member, so members read anchors already injected:
``reference_quirks=True`` does that too); the reference's vanilla pass also runs at step 0,
where its queries are not used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checks
from jattn.policy.core import Layout, Policy, PolicyError, Select, compose, resolve
from jattn.policy.correspondence import (CorrespondenceInject, gaussian_smooth,
                                         injection_mask, member_correspondence,
                                         resize_bilinear)
from jattn.policy.cross_masks import CrossMapMask
from jattn.policy.features import FeatureRecord, recorded_features
from jattn.policy.otsu import OtsuMask, otsu_mask
from jattn.policy.prepass import PrePassBlend, RecordQKV
from jattn.policy.shared import SharedAttention, resize_mask, shared_table
from jattn.sampling.sampler import SamplerHooks

__all__ = ["consistory_policy", "consistory_hooks", "consistory", "ConsiStoryOutput",
           "subject_token_weights", "query_strengths", "query_window", "injection_window",
           "dift_step", "dift_site", "injection_resolution", "correspondence_arrays",
           "FREEU", "MASK_HISTORY", "ALPHA", "DIFT_TIMESTEP", "TRACES"]

FREEU = dict(b1=1.1, b2=1.2, s1=0.6, s2=0.4)  # consistory_run.py load_pipeline
MASK_HISTORY = 20                              # AttentionStore: x[-20:]
QUERY_STRENGTH = (0.9, 0.81836735)             # query_store_kwargs
ALPHA = 0.8                                    # inject_range_alpha=[(n//10, n//3, 0.8)]
DIFT_TIMESTEP = 261                            # DIFTLatentStore(steps=[261]) of 1000
TRACES: dict = {}                              # traces of the correspondence program


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


def query_window(n: int, sdsa: bool = True) -> tuple[int, int]:
    """Steps ``[start, end)`` of the vanilla pre-pass: where the queries are blended
    (``1 … n//10``; none without SDSA: the reference blends only where it extends
    attention)."""
    return (1, min(n // 10 + 1, n)) if sdsa and n // 10 >= 1 else (0, 0)


def injection_window(n: int) -> tuple[int, int]:
    """Steps ``[start, end)`` of the feature injection: ``n//10 … n//3`` inclusive
    (``inject_range_alpha=[(n_steps//10, n_steps//3, 0.8)]``, ``min <= i <= max``; 5 … 16 of
    50)."""
    return (n // 10, min(n // 3 + 1, n))


def dift_step(timesteps: np.ndarray, num_train_timesteps: int = 1000) -> int:
    """The step index whose timestep is nearest ``261/1000`` of the training timesteps (the
    reference records DIFT features at timestep 261: step 36 of SDXL's 50 DDIM steps)."""
    t = np.asarray(timesteps, np.float64)
    return int(np.argmin(np.abs(t - DIFT_TIMESTEP * num_train_timesteps / 1000.0)))


def dift_site(sites) -> Any:
    """The feature site holding the first up-block's output (``up_ft_indices=[0]``): the
    backbone input of the second up-block's first resnet (``up_blocks.1.resnets.0.backbone``).

    Raises:
      ValueError: a UNet with fewer than two up blocks.
    """
    for s in sites:
        if getattr(s, "kind", "") == "backbone" and s.path == "up_blocks.1.resnets.0.backbone":
            return s
    raise ValueError("feature_injection: this UNet has no second up block "
                     "(up_blocks.1.resnets.0.backbone), where the first up block's output "
                     "(the DIFT features) is read; use feature_injection=False")


def injection_resolution(sites) -> tuple[int, int]:
    """The largest self-attention resolution of the encoder and decoder (the reference's
    ``inject_res = [64]`` on SDXL, its finest attention grid)."""
    res = [tuple(s.resolution) for s in sites
           if getattr(s, "kind", "") == "self" and s.block in ("down", "up")]
    if not res:
        raise ValueError("feature_injection: this UNet has no self-attention in its encoder "
                         "or decoder; use feature_injection=False")
    return max(res, key=lambda r: r[0] * r[1])


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
    return [s for s in sites if getattr(s, "kind", "") == "self" and s.block == "up"]


def _anchor_sources(m: int, n_anchors: int) -> dict:
    anchors = list(range(min(n_anchors, m)))
    sources = {i: [a for a in anchors if a != i] for i in range(m)}
    return {k: v for k, v in sources.items() if v}


def _source_slots(m: int, n_anchors: int) -> np.ndarray:
    """int32 ``(M, A)``: each member's anchors other than itself, padded with itself (off)."""
    src = _anchor_sources(m, n_anchors)
    a = max((len(v) for v in src.values()), default=1)
    out = np.tile(np.arange(m, dtype=np.int32)[:, None], (1, a))
    for k, v in src.items():
        out[k, :len(v)] = v
    return out


def consistory_policy(pipe, token_weights: np.ndarray, num_steps: int, *, groups: int = 1,
                      cfg: bool = True, n_anchors: int = 2, mask_dropout: float = 0.5,
                      mask_keys: Sequence[int] | None = None, share_queries: bool = True,
                      sdsa: bool = True, freeu: bool = True,
                      mask_resolution: tuple[int, int] | None = None,
                      feature_injection: bool = False, alpha: float = ALPHA,
                      sequential_injection: bool = False,
                      height: int | None = None, width: int | None = None) -> Policy:
    """The ConsiStory policy for G groups of M members (both passes: one program).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (sites).
      token_weights: float32 ``(G, M, S)`` or ``(M, S)``: 1 at each member's subject tokens.
      num_steps: n (tables are per step).
      groups: G; cfg: the run uses CFG.
      n_anchors: anchors = members ``0 … min(n_anchors, M)−1``.
      mask_dropout: p in [0, 1] (array leaf).
      mask_keys: one int per group (mask dropout draws; default 0 for every group).
      share_queries: blend the decoder self-attention queries toward the vanilla pre-pass
        (needs :func:`consistory_hooks` in the sampler).
      sdsa: False: no shared attention (masks still recorded).
      freeu: compose FreeU with the reference's factors.
      mask_resolution: the cross resolution of the maps (default: module docstring).
      feature_injection: add the DIFT recorder (window: the DIFT step) and the injection op
        (window empty until :func:`correspondence_arrays` fills it for the second pass).
      alpha: the injection's α (0.8); sequential_injection: the reference's in-place order.
    Returns:
      a :class:`Policy` with ``Layout(G, M, cfg)``; op 0 records the masks.
    Raises:
      ValueError: M < 2, n_anchors < 1, mask_dropout outside [0, 1], alpha outside [0, 1].
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
    a = checks.finite_number(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha={alpha!r}: the injection weight must be in [0, 1] (the "
                         "reference: 0.8)")
    layout = Layout(groups=g, members=m, cfg=bool(cfg))
    sites = pipe.sites(height, width, features=bool(freeu or feature_injection))
    att = [s for s in sites if getattr(s, "kind", "") in ("self", "cross")]
    res = tuple(mask_resolution) if mask_resolution is not None else auto_mask_resolution(att)
    rec = CrossMapMask(jnp.asarray(w), resolution=res, mode="otsu", history=MASK_HISTORY)
    window = (1, n) if sdsa else (0, 0)
    table = shared_table(n, m, _anchor_sources(m, na), window=window)
    keys = np.zeros(g, np.uint32) if mask_keys is None else np.asarray(mask_keys, np.uint32)
    share = SharedAttention(jnp.asarray(table), mask=OtsuMask(op_index=0, key="map"),
                            dropout=jnp.float32(p), keys=jnp.asarray(keys),
                            plain_members=())  # nothing to keep exact: no recomputation
    ops: tuple = (share,)
    if share_queries:
        ops = (PrePassBlend(weight=jnp.asarray(query_strengths(n)), op_index=0), share)
    if not _self_up_sites(sites):
        raise ValueError("this UNet has no decoder self-attention; ConsiStory shares there")
    rules: list = [(Select(kind="cross", resolutions=(res,)), rec),
                   (Select(kind="self", blocks=("up",)), ops)]
    if feature_injection:
        ds = dift_site(sites)
        s0 = dift_step(np.asarray(pipe.schedule(n, "ddim").timesteps),
                       pipe.scheduler_config.num_train_timesteps)
        rules.append((Select(path="^" + ds.path.replace(".", r"\.") + "$", kind="backbone"),
                      FeatureRecord(window=jnp.asarray([s0, s0 + 1], jnp.int32))))
    pol = resolve(rules, sites, layout=layout)
    if feature_injection:
        ir = injection_resolution(att)
        t = ir[0] * ir[1]
        inj = CorrespondenceInject(member=jnp.zeros((g, m, t), jnp.int32),
                                   token=jnp.zeros((g, m, t), jnp.int32),
                                   mask=jnp.zeros((g, m, t), bool), alpha=jnp.float32(a),
                                   window=jnp.asarray([0, 0], jnp.int32), halves="cond",
                                   sequential=bool(sequential_injection))
        pol = compose(pol, resolve([(Select(kind="self", blocks=("down", "up"),
                                            resolutions=(ir,)), inj)], att, layout=layout))
    if freeu:
        from jattn.policy.features import freeu_policy

        pol = compose(pol, freeu_policy(sites, layout=layout, **FREEU))
    return pol


def consistory_hooks(pipe, num_steps: int, layout: Layout, *, sdsa: bool = True,
                     freeu: bool = True, height: int | None = None,
                     width: int | None = None) -> SamplerHooks:
    """The vanilla pre-pass of query blending: :class:`RecordQKV` at every decoder
    self-attention (+ FreeU, as the reference's pipeline), at steps :func:`query_window`."""
    sites = pipe.sites(height, width, features=bool(freeu))
    pre = resolve([(Select(kind="self", blocks=("up",)), RecordQKV())], sites, layout=layout)
    if freeu:
        from jattn.policy.features import freeu_policy

        pre = compose(pre, freeu_policy(sites, layout=layout, **FREEU))
    return SamplerHooks(pre_policy=pre, pre_window=jnp.asarray(query_window(num_steps, sdsa),
                                                               jnp.int32))


def _op_of(pol: Policy, kind) -> int:
    return next(i for i, o in enumerate(pol.ops) if isinstance(o, kind))


def _correspond(feats, maps, sources, resolution):
    TRACES["correspondence"] = TRACES.get("correspondence", 0) + 1
    f = resize_bilinear(gaussian_smooth(feats), resolution)              # (G, M, h, w, C)
    mk = resize_mask(maps, resolution)
    mk = otsu_mask(mk.reshape(mk.shape[:2] + (-1,))) > 0                 # (G, M, T)
    member, token, dist = member_correspondence(f, mk, sources)
    return member, token, injection_mask(mk, dist)


_correspond_jit = jax.jit(_correspond, static_argnums=(3,))


def correspondence_arrays(features: Any, maps: Any, n_anchors: int, resolution: tuple
                          ) -> tuple:
    """The injection's ``(member, token, mask)`` ``(G, M, T)`` from the first pass.

    Args:
      features: float32 ``(G, M, h, w, C)`` DIFT features (conditional half).
      maps: float32 ``(G, M, h', w')`` the subject maps (``CrossMapMask``'s ``"map"`` after
        the last step), thresholded by Otsu at ``resolution`` (the reference's ``last_mask``).
      n_anchors: anchors (each member reads the anchors other than itself).
      resolution: the injection grid ``(h, w)``.
    """
    f = jnp.asarray(features, jnp.float32)
    src = jnp.asarray(_source_slots(f.shape[1], n_anchors))
    return _correspond_jit(f, jnp.asarray(maps, jnp.float32), src, tuple(resolution))


@dataclasses.dataclass
class ConsiStoryOutput:
    """Result of :func:`consistory`.

    Attributes:
      images: uint8 ``(G·M, H, W, 3)`` group-major, prompts in order (None with
        ``decode=False``).
      latents: float32 ``(G·M, C, h, w)`` final latents (NCHW; the second pass's with
        feature injection).
      masks: float32 ``(G·M, h', w')`` the last subject masks (at the maps' resolution).
      first_latents: float32 ``(G·M, C, h, w)`` the first pass's final latents with feature
        injection (None without).
      injected: float32 ``(G·M, h'', w'')`` where the second pass injects (None without).
      prompts: G lists of M prompts; seeds: per image.
      settings: the resolved settings (for result.json).
    """

    images: np.ndarray | None
    latents: np.ndarray
    masks: np.ndarray
    prompts: list
    seeds: list
    settings: dict
    first_latents: np.ndarray | None = None
    injected: np.ndarray | None = None


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
               sdsa: bool = True, feature_injection: bool = True, alpha: float = ALPHA,
               freeu: bool = True, mask_resolution: tuple[int, int] | None = None,
               negative_prompt: str | None = None, reference_quirks: bool = False,
               height: int | None = None, width: int | None = None,
               decode: bool = True, sdxl: dict | None = None) -> ConsiStoryOutput:
    """Generate the prompts with one consistent subject (ConsiStory).

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
        :func:`consistory_policy`; ``sdsa=False``: no shared attention (plain + FreeU, and
        the injection if on: the reference's ``perform_sdsa=False``).
      feature_injection: the reference's second pass (default, as ``perform_injection``);
        False: the first pass only. alpha: its α (0.8).
      reference_quirks: one dropout draw for every group (key 0), as the reference's
        whole-batch draw; the injection in place member after member.
      decode: decode images.
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
    Returns:
      :class:`ConsiStoryOutput`.
    Raises:
      ValueError: a single prompt, a subject word missing from a prompt, mask_dropout or
        alpha outside [0, 1], bad numbers (naming the argument).
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
                               feature_injection=feature_injection, alpha=alpha,
                               sequential_injection=reference_quirks,
                               height=height, width=width)
    hooks = (consistory_hooks(pipe, n, policy.layout, sdsa=sdsa, freeu=freeu, height=height,
                              width=width) if share_queries else None)
    kw = dict(negative_prompt=negative_prompt, num_inference_steps=n, guidance_scale=gs,
              scheduler="ddim", eta=0.0, seed=seeds, height=height, width=width, hooks=hooks,
              **(sdxl or {}))
    out = pipe.generate(flat, policy=policy, decode=decode and not feature_injection, **kw)
    first_latents = injected = None
    na = min(int(n_anchors), m)
    settings_inj = None
    if feature_injection:
        i_rec, i_inj = _op_of(policy, FeatureRecord), _op_of(policy, CorrespondenceInject)
        feats = next(iter(recorded_features(out.aux[i_rec]).values()))   # (G·M, h, w, C)
        feats = feats.reshape((g, m) + feats.shape[1:])
        inj_op = policy.ops[i_inj]
        site = policy.sites_of(i_inj)[0]
        res = tuple(site.resolution)
        member, token, mask = correspondence_arrays(feats, out.aux[0]["map"], na, res)
        win = injection_window(n)
        ops = list(policy.ops)
        ops[i_inj] = inj_op.replace(member=member, token=token, mask=mask,
                                    window=jnp.asarray(win, jnp.int32))
        ops[i_rec] = policy.ops[i_rec].replace(window=jnp.asarray([0, 0], jnp.int32))
        first_latents = out.latents
        injected = np.asarray(mask, np.float32).reshape((g * m,) + res)
        out = pipe.generate(flat, policy=policy.replace(ops=tuple(ops)), decode=decode, **kw)
        settings_inj = dict(alpha=float(alpha), steps=[win[0], win[1] - 1],
                            resolution=list(res),
                            dift_step=int(np.asarray(policy.ops[i_rec].window)[0]),
                            dift_site=policy.sites_of(i_rec)[0].path,
                            in_place=bool(reference_quirks))
    mask_maps = np.asarray(out.aux[0]["mask"])
    masks = mask_maps.reshape((g * m,) + mask_maps.shape[2:])
    images = None if out.images is None else np.asarray(out.images)
    settings = dict(num_inference_steps=n, guidance_scale=gs, scheduler="ddim", groups=g,
                    members=m, subject=subjects, n_anchors=na,
                    mask_dropout=p, share_queries=share_queries, sdsa=sdsa, freeu=freeu,
                    freeu_factors=FREEU if freeu else None,
                    mask_resolution=list(policy.ops[0].resolution),
                    sdsa_steps=[1, n - 1] if sdsa else None,
                    query_steps=([query_window(n, sdsa)[0], query_window(n, sdsa)[1] - 1]
                                 if share_queries and query_window(n, sdsa)[1] else None),
                    feature_injection=settings_inj, reference_quirks=reference_quirks,
                    height=height, width=width)
    return ConsiStoryOutput(images=images, latents=np.asarray(out.latents), masks=masks,
                            prompts=groups, seeds=seeds, settings=settings,
                            first_latents=first_latents, injected=injected)
