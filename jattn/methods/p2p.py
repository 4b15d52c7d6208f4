"""Prompt-to-Prompt editing: build the policy from prompts and run it.

Source: Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control"
(ICLR 2023); reference google/prompt-to-prompt@9c472e4 (``prompt-to-prompt_stable.ipynb``,
``null_text_w_ptp.ipynb``, ``seq_aligner.py``, ``ptp_utils.py``). Defaults follow the
reference: ``cross_replace_steps`` 0.8, ``self_replace_steps`` 0.4, self replacement only
where the query grid has at most latent/4 × latent/4 tokens (16² at SD's 64² latents),
local blend on the cross-attention layers at latent/4 resolution, threshold 0.3.

One edit is one group ``[source, target_1, …]`` of the batch; every member starts from the
same initial latents (or the inverted latents of a real image).

SDXL (issue 16; the reference is SD1.4 only): the same rules by latent fraction — self
replacement at ``(latent/4)²`` tokens and coarser (``self_max_tokens=None``; 32² at 1024 px:
down_blocks.2, mid, up_blocks.0), local blend at the smallest cross resolution ``>=
max(latent/4, 8)`` (32²). Token positions are those of ``prompt`` in ``tokenizer`` (the
same CLIP BPE as ``tokenizer_2``, so both encoders' halves of the context share them as
long as ``prompt_2`` is left at its default, the prompt itself). Null-text inversion on
SDXL: :mod:`jattn.sampling.inversion` (the context is optimised; pooled embedding and time
ids fixed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.methods import p2p_text
from jattn.methods.p2p_ops import CrossEdit, LocalBlend, SelfReplace
from jattn.policy.capture import Capture
from jattn.policy.core import Layout, Policy, Select, compose, resolve

__all__ = ["p2p_policy", "edit", "MODES"]

MODES = ("replace", "refine", "reweight")


def _blend_resolution(sites, latent_hw, blend_resolution):
    cross = sorted({s.resolution for s in sites if s.kind == "cross"})
    if blend_resolution is not None:
        res = (blend_resolution, blend_resolution) if isinstance(blend_resolution, int) \
            else tuple(blend_resolution)
        if res not in cross:
            raise ValueError(f"blend_resolution={blend_resolution}: no cross-attention sites at "
                             f"that resolution; available: {cross}")
        return res
    # the reference blends at latent/4 (16² of 64²); with small latents that is too coarse,
    # so take the smallest cross resolution >= max(latent/4, 8).
    want = max(latent_hw[0] // 4, min(8, latent_hw[0]))
    above = [r for r in cross if r[0] >= want]
    return above[0] if above else cross[-1]


def _word_rows(tokenizer, groups, words, arg_name, max_len=77) -> np.ndarray:
    """``(G, M, S)``: 1 at the tokens of each listed word that occurs in each prompt of each
    group (``groups``: G lists of M prompts). Every word must occur somewhere."""
    rows = np.zeros((len(groups), len(groups[0]), max_len), np.float32)
    found = set()
    for g, prompts in enumerate(groups):
        for m, prompt in enumerate(prompts):
            present = prompt.split()
            for w in words:
                if w in present:
                    rows[g, m, p2p_text.word_token_indices(tokenizer, prompt, w)] = 1.0
                    found.add(w)
    missing = [w for w in words if w not in found]
    if missing:
        raise ValueError(f"{arg_name}: {missing} occur in none of the prompts "
                         f"{[p for ps in groups for p in ps]}; use words spelled as in the "
                         "prompts.")
    return rows


def p2p_policy(
    pipe,
    source: str | Sequence[str],
    targets: Sequence[str] | Sequence[Sequence[str]],
    *,
    num_steps: int,
    mode: str = "replace",
    cross_replace_steps: float | tuple[float, float] | Mapping = 0.8,
    self_replace_steps: float | tuple[float, float] = 0.4,
    equalize: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
    blend_words: Sequence[str] | None = None,
    subtract_words: Sequence[str] | None = None,
    start_blend: float = 0.0,
    blend_threshold: float = 0.3,
    blend_resolution: int | None = None,
    self_max_tokens: int | None = None,
    capture: bool = False,
    capture_resolutions: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    reference_quirks: bool = False,
) -> Policy:
    """Build the Prompt-to-Prompt policy for one group ``[source, *targets]`` — or for G
    independent edits at once (``source`` a list of G prompts, ``targets`` a list of G lists
    of equal length): one compiled program edits the whole batch.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (for sites and tokenizer).
      source: the source prompt (member 0), or one per group.
      targets: edited prompts (members 1…M-1), or one list per group.
      num_steps: denoising steps (step windows are in step indices).
      mode: "replace" (word swap; equal word counts), "refine" (token alignment) or
        "reweight" (the source's maps with column weights; targets are usually the source
        prompt again).
      cross_replace_steps: float b → steps ``[0, int(b·(T+1)))``; ``(start, end)``; or a
        mapping with per-word windows and ``"default_"`` (reference semantics).
      self_replace_steps: float s or ``(s0, s1)`` → steps ``[int(T·s0), int(T·s1))``.
      equalize: ``{word: weight}`` column weights for the targets' words, or one such
        mapping per target (reweighting;
        chains after replace/refine).
      blend_words: words whose attention defines the local-blend mask (each member uses
        those it contains); ``subtract_words``: words removed from the mask.
      start_blend: fraction of steps before blending starts (null-text notebook 0.2).
      self_max_tokens: self replacement only where key tokens ≤ this (default None: 16² =
        256 on SD1/SD2, the reference's constant in ``prompt-to-prompt_stable.ipynb``; its
        null-text notebook uses 32²; on SDXL ``(latent/4)²``, the reference's rule
        "latent/4 and coarser" translated: 32² at 1024 px, SDXL's down_blocks.2, mid and
        up_blocks.0 layers — a fixed 256 would select no SDXL layer, its coarsest attention
        being 32²). On SD1/SD2 it is a token count, not a fraction of the latent: on SD's 64²
        latents it selects the 16² and 8² layers, on the bundled model's 16² latents every
        self-attention layer.
      capture: also capture head/layer-averaged maps (cross at every resolution; self at
        ``capture_resolutions``) for pictures.
      reference_quirks: reproduce the reference's quirks (post-edit stored maps; word
        alignment quirks of ``get_word_inds`` and the word-swap tail mapping).
    Returns:
      a :class:`Policy` with layout ``Layout(groups=G, members=1+len(targets), cfg=True)``;
      its arrays carry a leading G axis when G > 1.
    Raises:
      ValueError: unknown mode, word swap with different word counts, unknown equalizer or
        blend word, window outside [0, 1], prompts over 77 tokens.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    sources, target_lists = _groups(source, targets)
    g, m = len(sources), 1 + len(target_lists[0])
    tok = pipe.tokenizer
    sites = pipe.sites(height, width)
    lat_h = (height or pipe.default_size) // pipe.vae_scale_factor
    lat_w = (width or pipe.default_size) // pipe.vae_scale_factor
    layout = Layout(groups=g, members=m, cfg=True)

    def stack(arrays):  # one group: shared shape; several: a leading G axis
        return jnp.asarray(arrays[0] if g == 1 else np.stack(arrays))

    alphas = stack([p2p_text.cross_replace_alphas([s] + t, num_steps, cross_replace_steps, tok,
                                                  reference_quirks=reference_quirks)
                    for s, t in zip(sources, target_lists)])
    eq = None
    if equalize:
        eqs = [equalize] * (m - 1) if isinstance(equalize, Mapping) else list(equalize)
        if len(eqs) != m - 1:
            raise ValueError(f"equalize: {len(eqs)} mappings for {m - 1} targets; give "
                             "one mapping for all or one per target")
        eq = stack([np.stack([p2p_text.equalizer(tok, t, list(e), list(e.values()),
                                                 reference_quirks=reference_quirks)
                              for t, e in zip(tl, eqs)]) for tl in target_lists])
    kwargs = dict(alphas=alphas, equalizer=eq, mode=mode)
    if mode == "replace":
        kwargs["mapper"] = stack([p2p_text.replacement_mappers(
            tok, s, t, reference_quirks=reference_quirks) for s, t in zip(sources, target_lists)])
    elif mode == "refine":
        pairs = [p2p_text.refinement_mappers(tok, s, t) for s, t in zip(sources, target_lists)]
        kwargs["mapper"] = stack([np.asarray(mp, np.int32) for mp, _ in pairs])
        kwargs["refine_alphas"] = stack([ra for _, ra in pairs])
    elif eq is None:
        raise ValueError("mode='reweight' needs equalize={word: weight}")
    cross = CrossEdit(**kwargs)
    s0, s1 = p2p_text.self_replace_window(num_steps, self_replace_steps)
    if self_max_tokens is None:  # SD1/SD2: the reference's 16²; SDXL: (latent/4)²
        self_max_tokens = ((lat_h // 4) * (lat_w // 4) if getattr(pipe, "is_sdxl", False)
                           else 16 ** 2)
    max_tokens = int(self_max_tokens)
    self_res = tuple(sorted({s.resolution for s in sites if s.kind == "self"
                             and s.query_tokens <= max_tokens}))
    rules = [(Select(kind="cross"), cross)]
    # whether self replacement is on is decided by the fractions the user gave, never by
    # the rounded step window: a window that rounds to no step (0.4 of 2 steps) stays a
    # value of the same compiled program instead of changing its structure.
    f0, f1 = p2p_text._window(self_replace_steps, "self_replace_steps")
    self_capture = (Select(kind="self", resolutions=tuple(capture_resolutions))
                    if capture and capture_resolutions else None)
    if self_res and f1 > f0:
        replaced = Select(kind="self", resolutions=self_res)
        # maps captured at the replaced sites must be the materialised, pre-edit ones;
        # elsewhere replace the targets' queries and keys (same maps, fused attention)
        captured = self_capture is not None and any(
            replaced.matches(s) and self_capture.matches(s) for s in sites)
        rules.append((replaced, SelfReplace(window=jnp.asarray([s0, s1], jnp.int32),
                                            via_qkv=not captured)))
    policies = [resolve(rules, sites, layout=layout, record_post_edit=reference_quirks)]
    if subtract_words and not blend_words:
        raise ValueError("subtract_words: it removes words from the local-blend mask, which "
                         "only exists with blend_words; give blend_words too (CLI: "
                         "--blend-words WORD).")
    if blend_words:
        res = _blend_resolution(sites, (lat_h, lat_w), blend_resolution)
        all_prompts = [[s] + t for s, t in zip(sources, target_lists)]
        words = stack(list(_word_rows(tok, all_prompts, blend_words, "blend_words")))
        sub = (stack(list(_word_rows(tok, all_prompts, subtract_words, "subtract_words")))
               if subtract_words else None)
        blend = LocalBlend.build(words, blend_threshold, int(start_blend * num_steps),
                                 subtract=sub)
        policies.append(resolve([(Select(kind="cross", resolutions=(res,)), blend)], sites,
                                layout=layout, record_post_edit=reference_quirks))
    if capture:
        rules = [(Select(kind="cross"), Capture())]
        if self_capture is not None:
            rules.append((self_capture, Capture()))
        policies.append(resolve(rules, sites, layout=layout, record_post_edit=reference_quirks))
    return compose(*policies)


def _groups(source, targets) -> tuple[list[str], list[list[str]]]:
    """Normalise ``(source, targets)`` to G sources and G equal-length target lists."""
    if isinstance(source, str):
        tl = [targets] if isinstance(targets, str) else list(targets)
        sources, target_lists = [source], [tl]
    else:
        sources = list(source)
        target_lists = [[t] if isinstance(t, str) else list(t) for t in targets]
        if len(target_lists) != len(sources):
            raise ValueError(f"targets: {len(target_lists)} lists for {len(sources)} sources; "
                             "give one list of targets per source prompt")
    if not sources or not target_lists[0]:
        raise ValueError("targets: give at least one target prompt")
    if len({len(t) for t in target_lists}) != 1:
        raise ValueError("targets: every group needs the same number of targets (the batch is "
                         "groups × members)")
    return sources, target_lists


def edit(pipe, source, targets, *, num_inference_steps: int = 50,
         guidance_scale: float = 7.5, seed: int = 0, latents: np.ndarray | None = None,
         uncond_per_step=None, height: int | None = None, width: int | None = None,
         sdxl: dict | None = None, **policy_kwargs):
    """Run Prompt-to-Prompt edits: in each group the source and every target start from
    the same latents. ``source``/``targets`` as in :func:`p2p_policy` (G groups at once).

    Args:
      latents: float32 ``(G, C, h, w)`` initial latents, one per group, unscaled as
        diffusers' ``latents=``; default: Gaussian noise from ``seed + g`` for group g.
      uncond_per_step: ``(steps, G or 1, 77, D)`` null-text embeddings (real-image editing);
        SDXL: :func:`jattn.sampling.inversion.invert`'s ``{"context", "text_embeds"}`` with
        those leading axes.
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
      policy_kwargs: see :func:`p2p_policy`.
    Returns:
      :class:`jattn.pipeline.GenerateOutput` with images ``[source_0, *targets_0, source_1,
      …]`` (group-major).
    """
    sources, target_lists = _groups(source, targets)
    g, m = len(sources), 1 + len(target_lists[0])
    prompts = [p for s, t in zip(sources, target_lists) for p in [s] + t]
    policy = p2p_policy(pipe, source, targets, num_steps=num_inference_steps, height=height,
                        width=width, **policy_kwargs)
    f = pipe.vae_scale_factor
    h = (height or pipe.default_size) // f
    w = (width or pipe.default_size) // f
    c = pipe.unet_config.in_channels
    if latents is None:
        latents = np.stack([np.random.default_rng(seed + i).standard_normal((c, h, w))
                            for i in range(g)]).astype(np.float32)
    latents = np.asarray(latents, np.float32).reshape(g, c, h, w)
    latents = np.repeat(latents, m, axis=0)          # every member of a group: same latents
    if uncond_per_step is not None:  # (steps, G or 1, S, D); SDXL: a dict of such leaves

        def per_member(u):
            u = jnp.asarray(u)
            if u.shape[1] not in (1, g):
                raise ValueError(f"uncond_per_step: {u.shape[1]} rows, expected 1 or {g} "
                                 "groups")
            u = jnp.broadcast_to(u[:, :, None], (u.shape[0], g, m) + u.shape[2:])
            return u.reshape((u.shape[0], g * m) + u.shape[3:])

        uncond_per_step = jax.tree_util.tree_map(per_member, uncond_per_step)
    return pipe.generate(prompts, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents,
                         policy=policy, uncond_per_step=uncond_per_step, height=height,
                         width=width, scheduler="ddim", **(sdxl or {}))
