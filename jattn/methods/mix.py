"""Prompt mixing: localized object-level shape variations.

Source: Patashnik, Garibi, Azuri, Averbuch-Elor, Cohen-Or, "Localizing Object-level Shape
Variations with Text-to-Image Diffusion Models" (ICCV 2023); reference
orpatashnik/local-prompt-mixing@4bc225d (``main.py`` ``LPMConfig``, ``src/prompt_mixing.py``
``PromptMixing``, ``src/diffusion_model_wrapper.py`` ``DiffusionModelWrapper.forward``,
``src/attention_based_segmentation.py`` ``Segmentor``).

One variation group is the batch ``[original, proxy_1, …, proxy_P]`` (``Layout(groups=G,
members=1+P)``): every member starts from the original's initial noise; member ``p`` is
conditioned on the prompt with the object word replaced by proxy word ``p``. Three moves:

1. **Prompt mixing** (every cross-attention site, conditional half of the CFG batch): the
   proxies' keys always come from the original prompt (member 0); their values come from
   their own (proxy) prompt during the step window ``window`` and from the original
   outside it. Reference: steps ``[7, 17)`` of 50 (``start_prompt_range``,
   ``end_prompt_range``), here fractions ``(7/50, 17/50)`` → ``[int(f0·n), int(f1·n))``
   so the window scales to any step count. Built from the generic
   :class:`jattn.policy.ops.MemberSource` (k_from / v_from tables).
2. **Self-attention localisation** (optional, ``preserve`` words; the reference's
   ``objects_to_preserve``, empty by default): at self-attention sites with at most 32²
   query tokens, steps ``[0, 40)`` of 50 (``localise_window`` = ``(0, 40/50)``), a proxy's
   self-attention map takes the original's map in the rows and columns of the preserved
   objects' pixels, minus the object's own pixels (``remove_obj_from_self_mask``). The
   pixels come from the original's cross-attention maps averaged over all steps, min–max
   normalised, threshold 0.05 (``obj_pixels_injection_threshold``). Like the reference,
   this needs the original's maps before the mixed run: :func:`mix` then generates the
   original once first (with an in-graph capture), then the group.
3. **Background blend** (once, at step ``blend_step`` = 35/50, reference
   ``background_blend_timestep`` 35): the object mask (the object word's cross-attention
   of the original OR of the proxy, accumulated over the steps so far), upsampled to the
   latents (nearest) and dilated 3×3, keeps the proxy's latents inside; outside, the
   latents become the original's at that step.

Deviations from the reference (documented, not quirks): the reference's object mask is
self-attention KMeans segmentation labelled by cross maps (``Segmentor``); here the mask is
the object word's cross map (P2P LocalBlend's mask, :func:`jattn.methods.p2p_ops.
local_blend_mask`, threshold 0.3 of the max) at the smallest cross-attention resolution
≥ latent/2 (32² of SD's 64², as the reference's segmentation; 8² of the bundled model's
16²). The localisation uses the head- and layer-averaged cross map of each resolution
(the reference: every head of the same layer, a pixel counts when any head passes).

Reference quirks (``reference_quirks=True``): the background mask of a batch of proxies is
the *last* proxy's mask for every proxy (``Segmentor(..., select=len(prompts) - 1)``); a
proxy that tokenizes to a different number of tokens is accepted and its values are paired
with the original's keys by position (the reference formats the template and never checks,
so every token after the word gets the value of another token). By default such a proxy is
an error naming it.

Unused by the reference's defaults and not reproduced: the median-filtered cross-attention
of ``PromptMixing.get_cross_attn`` (its window ``[num_steps, num_steps)`` is empty), P2P
injection alongside mixing (``cross_attn_inject_steps`` 0; compose with
:func:`jattn.methods.p2p.p2p_policy` instead), automatic proxy words from CLIP similarity
(``get_proxy_words``; give proxies explicitly).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.io.words import prompt_ids, word_token_indices
from jattn.methods.p2p_ops import LocalBlend, apply_local_blend, local_blend_mask
from jattn.policy.core import Layout, Op, Policy, Select, SiteContext, compose, in_window, resolve
from jattn.policy.ops import MemberSource, member_table

Array = jax.Array

__all__ = ["mix", "mix_policy", "mix_prompts", "MixBlend", "SelfLocalise", "preserve_masks",
           "window_steps", "REFERENCE_WINDOW", "REFERENCE_BLEND_STEP",
           "REFERENCE_LOCALISE_WINDOW"]

REFERENCE_WINDOW = (7 / 50, 17 / 50)
REFERENCE_BLEND_STEP = 35 / 50
REFERENCE_LOCALISE_WINDOW = (0.0, 40 / 50)


# ---------------------------------------------------------------------- ops
@struct.dataclass
class MixBlend(LocalBlend):
    """Background blend of prompt mixing, once at step ``start_step``.

    Records the head-averaged cross maps like :class:`LocalBlend` (same fields, same
    in-graph sum over its sites and the steps so far); at ``step == start_step`` after the
    scheduler step, with ``mask = dilate(M_0 OR M_p)`` (``M`` the thresholded word map of
    :func:`local_blend_mask` without pooling, upsampled to the latents), each proxy's
    latents become ``x_0 + mask·(x_p − x_0)`` (x_0 the original's latents at that step).

    Attributes (besides LocalBlend's ``words``, ``threshold``, ``start_step``):
      dilation: static; radius of the square dilation at latent resolution (1 = 3×3,
        the reference's ``cv2.dilate(np.ones((3, 3)))``).
      last_member_mask: static; the reference quirk: every proxy uses the last proxy's
        mask (OR the original's).
    """

    dilation: int = struct.field(pytree_node=False, default=1)
    last_member_mask: bool = struct.field(pytree_node=False, default=False)

    def masks(self, acc: Array, latent_hw: tuple[int, int]) -> Array:
        """bool ``(G, M, h, w, 1)``: the blend mask of each member (member 0: its own)."""
        mask = local_blend_mask(acc, self.words, latent_hw, self.threshold[0], pool=False)
        if self.last_member_mask:
            mask = jnp.broadcast_to(mask[:, -1:], mask.shape)
        mask = mask | mask[:, :1]
        r = int(self.dilation)
        if r > 0:
            k = 2 * r + 1
            mask = jax.lax.reduce_window(mask.astype(jnp.float32), -jnp.inf, jax.lax.max,
                                         (1, 1, k, k, 1), (1, 1, 1, 1, 1),
                                         ((0, 0), (0, 0), (r, r), (r, r), (0, 0))) > 0.5
        return mask

    def on_step(self, latents, acc, step, layout):
        mask = self.masks(acc, latents.shape[1:3])
        blended = apply_local_blend(latents, mask, layout.groups, layout.members)
        return jnp.where(step == self.start_step, blended, latents)


@struct.dataclass
class SelfLocalise(Op):
    """Self-attention localisation: members 1…M-1 take member 0's self-attention maps in
    the rows and columns of preserved pixels (conditional half, step window).

    ``p_m ← p_m·(1 − K) + p_0·K`` with ``K[i, j] = max(keep[i], keep[j])`` (reference
    ``PromptMixing.mask_self_attn_patches``).

    Attributes:
      keep: float32 ``(G, T)`` or ``(T,)``: 1 at the preserved query pixels of this site's
        resolution (T = h·w tokens), 0 elsewhere.
      window: int32 ``(2,)`` steps ``[start, end)``.
    Sites must share one resolution (resolve one rule per resolution).
    """

    keep: Array
    window: Array

    needs_probs = True

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        x = ctx.layout.split(p)                       # (halves, G, M, N, T, T)
        cond = x[-1]
        g = cond.shape[0]
        keep = jnp.broadcast_to(jnp.asarray(self.keep), (g, cond.shape[-1])) \
            if jnp.ndim(self.keep) == 1 else jnp.asarray(self.keep)
        k2 = jnp.maximum(keep[:, :, None], keep[:, None, :]).astype(cond.dtype)  # (G, T, T)
        k2 = k2[:, None, None]                                                   # (G,1,1,T,T)
        src = cond[:, :1]
        mixed = cond * (1 - k2) + src * k2
        on = in_window(ctx.step, self.window)
        mixed = jnp.where(on, mixed, cond)
        mixed = mixed.at[:, 0].set(cond[:, 0])
        return ctx.layout.merge(x.at[-1].set(mixed))


# ---------------------------------------------------------------------- prompts
def _as_groups(prompt, word, proxies):
    if isinstance(prompt, str):
        prompts, words = [prompt], [word]
        proxy_lists = [[proxies] if isinstance(proxies, str) else list(proxies or [])]
        if not isinstance(word, str):
            raise TypeError(f"word={word!r}: give the object word of the prompt as a string")
    else:
        prompts = list(prompt)
        words = [word] * len(prompts) if isinstance(word, str) else list(word)
        proxy_lists = [[p] if isinstance(p, str) else list(p) for p in proxies]
        if len(words) != len(prompts) or len(proxy_lists) != len(prompts):
            raise ValueError(f"proxies/word: {len(proxy_lists)} proxy lists and {len(words)} "
                             f"words for {len(prompts)} prompts; give one of each per prompt")
    if not prompts:
        raise ValueError("prompt: give at least one prompt")
    for pl in proxy_lists:
        if not pl:
            raise ValueError("proxies: give at least one proxy word (CLI: --proxy WORD), e.g. "
                             "proxies=['square'] for a circle")
    if len({len(pl) for pl in proxy_lists}) != 1:
        raise ValueError("proxies: every prompt needs the same number of proxies (the batch is "
                         "groups × members)")
    return prompts, words, proxy_lists


def mix_prompts(tokenizer, prompt: str, word: str, proxies: Sequence[str], *,
                reference_quirks: bool = False) -> tuple[list[str], np.ndarray]:
    """The group's prompts ``[prompt, prompt with word → proxy_1, …]`` and the word's token
    positions (int32 ``(K,)``, BOS = 0).

    The word matches whole words of ``prompt.split()`` exactly (every occurrence is
    replaced), as :func:`jattn.io.words.word_token_indices`.

    Raises:
      ValueError (naming ``word``/``proxies``): the word is not a word of the prompt; an
        empty or multi-word proxy; a proxy prompt with a different number of tokens than
        the original (unless ``reference_quirks``, see the module docstring); prompts over
        77 tokens.
    """
    if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
        raise ValueError(f"word={word!r}: give one word of the prompt (CLI: --word)")
    words = prompt.split()
    if word not in words:
        raise ValueError(f"word={word!r} (CLI: --word) is not a word of the prompt {prompt!r} "
                         f"(its words: {words}); spell it as in the prompt, e.g. "
                         f"--word {words[-1]!r}")
    idx = word_token_indices(tokenizer, prompt, word)
    n_orig = len(prompt_ids(tokenizer, prompt))
    out = [prompt]
    for p in proxies:
        if not isinstance(p, str) or not p.strip() or len(p.split()) != 1:
            raise ValueError(f"proxies: {p!r} is not one word (CLI: --proxy WORD)")
        text = " ".join(p if w == word else w for w in words)
        n = len(prompt_ids(tokenizer, text))
        if n != n_orig and not reference_quirks:
            n_w = len(prompt_ids(tokenizer, word)) - 2
            n_p = len(prompt_ids(tokenizer, p)) - 2
            raise ValueError(
                f"proxies: {p!r} is {n_p} token(s) against {n_w} for {word!r}, so the proxy "
                f"prompt has {n} tokens and the original {n_orig}. Prompt mixing pairs the "
                "original's keys with the proxy's values token by token; the reference "
                "(orpatashnik/local-prompt-mixing) does not check and silently pairs every "
                "later token with another token's value. Choose a proxy of the same token "
                "count (CLI: --proxy), or reference_quirks=True to pair by position as the "
                "reference does.")
        out.append(text)
    return out, idx


def window_steps(num_steps: int, window: tuple[float, float], name: str = "window"
                 ) -> tuple[int, int]:
    """``(start, end)`` fractions → step indices ``[int(f0·n), int(f1·n))`` (the products are
    rounded to 1e-9 first so 17/50·50 gives 17). Raises ValueError outside ``[0, 1]``."""
    try:
        f0, f1 = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={window!r}: give (start, end) fractions of the steps") from None
    if not (np.isfinite(f0) and np.isfinite(f1) and 0.0 <= f0 <= f1 <= 1.0):
        raise ValueError(f"{name}={window!r}: fractions need 0 <= start <= end <= 1")
    n = int(num_steps)
    return int(np.floor(round(f0 * n, 9))), int(np.floor(round(f1 * n, 9)))


def _mask_resolution(sites, latent_hw, resolution):
    cross = sorted({s.resolution for s in sites if s.kind == "cross"})
    if not cross:
        raise ValueError("prompt mixing needs cross-attention sites; the model has none")
    if resolution is not None:
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if res not in cross:
            raise ValueError(f"blend_resolution={resolution}: no cross-attention sites at that "
                             f"resolution; available: {cross}")
        return res
    want = max(latent_hw[0] // 2, 1)   # the reference segments at latent/2 (32² of 64²)
    above = [r for r in cross if r[0] >= want]
    return above[0] if above else cross[-1]


def preserve_masks(maps: dict[str, np.ndarray], preserve_tokens: Sequence[np.ndarray],
                   object_tokens: Sequence[np.ndarray], *, threshold: float = 0.05,
                   remove_object: bool = True) -> dict[tuple[int, int], np.ndarray]:
    """Preserved pixels per resolution from the original's cross maps.

    Args:
      maps: captured maps ``{"cross{h}x{w}": (G, T, S)}`` (head/layer mean over the steps,
        :func:`jattn.policy.capture.captured_maps`), one row per group's original.
      preserve_tokens: per group, int positions of the preserved words' tokens.
      object_tokens: per group, the object word's positions.
      threshold: on the map min–max normalised over pixels and tokens (reference 0.05).
      remove_object: drop the object's own pixels (reference ``remove_obj_from_self_mask``).
    Returns:
      ``{(h, w): float32 (G, T)}``, 1 at preserved pixels.
    """
    out = {}
    for key, m in maps.items():
        if not key.startswith("cross"):
            continue
        h, w = (int(v) for v in key[len("cross"):].split("x"))
        m = np.asarray(m, np.float32)
        keep = np.zeros(m.shape[:2], np.float32)
        for g in range(m.shape[0]):
            n = m[g] - m[g].min()
            n = n / max(float(n.max()), 1e-12)
            for t in preserve_tokens[g]:
                keep[g] = np.maximum(keep[g], (n[:, int(t)] > threshold).astype(np.float32))
            if remove_object:
                for t in object_tokens[g]:
                    keep[g][n[:, int(t)] > threshold] = 0.0
        out[(h, w)] = keep
    return out


# ---------------------------------------------------------------------- policy
def mix_policy(
    pipe,
    prompt: str | Sequence[str],
    word: str | Sequence[str],
    proxies: Sequence[str] | Sequence[Sequence[str]],
    *,
    num_steps: int,
    window: tuple[float, float] = REFERENCE_WINDOW,
    blend_step: float | None = REFERENCE_BLEND_STEP,
    blend_threshold: float = 0.3,
    blend_resolution: int | None = None,
    dilation: int = 1,
    keep: dict | None = None,
    localise_window: tuple[float, float] = REFERENCE_LOCALISE_WINDOW,
    localise_max_tokens: int = 32 ** 2,
    height: int | None = None,
    width: int | None = None,
    reference_quirks: bool = False,
) -> Policy:
    """Build the prompt-mixing policy for one group ``[original, *proxies]``, or G groups
    (``prompt`` a list of G prompts, ``word`` one word or one per prompt, ``proxies`` G
    lists of equal length).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (sites, tokenizer).
      prompt, word, proxies: see :func:`mix`.
      num_steps: denoising steps n.
      window: ``(start, end)`` fractions of the steps whose cross-attention values come
        from the proxy: steps ``[int(start·n), int(end·n))`` (reference (7/50, 17/50)).
      blend_step: fraction f of the steps; the background blend runs once after step
        ``int(f·n)`` (reference 35/50); None: no blend.
      blend_threshold: mask threshold after dividing the word map by its max (0.3).
      blend_resolution: cross-attention resolution of the mask (default: smallest ≥
        latent/2).
      dilation: dilation radius of the mask at latent resolution (1 = 3×3, reference).
      keep: ``{(h, w): float32 (G, T) or (T,)}`` preserved pixels per self-attention
        resolution (:func:`preserve_masks`); None: no self-attention localisation.
      localise_window: fractions of the steps with localisation (reference (0, 40/50)).
      localise_max_tokens: localisation only at self sites with at most this many query
        tokens (reference 32²; on the bundled model's 16² latents: every self site).
      reference_quirks: see the module docstring.
    Returns:
      a :class:`Policy` with layout ``Layout(groups=G, members=1+P, cfg=True)``; compose
      it with other policies of the same layout (:func:`jattn.policy.core.compose`).
    Raises:
      ValueError: see :func:`mix_prompts`; a window outside [0, 1]; a blend resolution
        without cross-attention sites.
    """
    prompts, words, proxy_lists = _as_groups(prompt, word, proxies)
    g, m = len(prompts), 1 + len(proxy_lists[0])
    tok = pipe.tokenizer
    sites = pipe.sites(height, width)
    lat_h = (height or pipe.default_size) // pipe.vae_scale_factor
    lat_w = (width or pipe.default_size) // pipe.vae_scale_factor
    layout = Layout(groups=g, members=m, cfg=True)
    idx = [mix_prompts(tok, p, w, pl, reference_quirks=reference_quirks)[1]
           for p, w, pl in zip(prompts, words, proxy_lists)]
    n = int(num_steps)
    s0, s1 = window_steps(n, window, "window")
    proxies_of = {k: 0 for k in range(1, m)}
    outside = np.ones(n, bool)
    outside[s0:s1] = False
    k_from = member_table(n, m, proxies_of, window=(0, n))
    v_from = member_table(n, m, proxies_of, window=(0, n), steps=outside)
    mixing = MemberSource(k_from=jnp.asarray(k_from), v_from=jnp.asarray(v_from), halves="cond")
    policies = [resolve([(Select(kind="cross"), mixing)], sites, layout=layout)]
    if blend_step is not None:
        b = window_steps(n, (0.0, blend_step), "blend_step")[1]
        res = _mask_resolution(sites, (lat_h, lat_w), blend_resolution)
        words_arr = np.zeros((g, m, pipe_context_tokens(pipe)), np.float32)
        for gi, ix in enumerate(idx):
            words_arr[gi, :, ix] = 1.0
        blend = MixBlend.build(words_arr[0] if g == 1 else words_arr, blend_threshold, b,
                               dilation=int(dilation), last_member_mask=bool(reference_quirks))
        policies.append(resolve([(Select(kind="cross", resolutions=(res,)), blend)], sites,
                                layout=layout))
    if keep is not None:
        l0, l1 = window_steps(n, localise_window, "localise_window")
        rules = []
        for res in sorted({s.resolution for s in sites
                           if s.kind == "self" and s.query_tokens <= localise_max_tokens}):
            if tuple(res) not in keep:
                raise ValueError(f"keep: no preserved-pixel mask for self-attention resolution "
                                 f"{res}; masks given for {sorted(keep)}")
            rules.append((Select(kind="self", resolutions=(res,)),
                          SelfLocalise(keep=jnp.asarray(keep[tuple(res)], jnp.float32),
                                       window=jnp.asarray([l0, l1], jnp.int32))))
        if rules:
            policies.append(resolve(rules, sites, layout=layout))
    return compose(*policies)


def pipe_context_tokens(pipe) -> int:
    return int(pipe.text_config.max_position_embeddings)


# ---------------------------------------------------------------------- front-end
def mix(pipe, prompt, word, proxies, *, seed: int | Sequence[int] = 0,
        num_inference_steps: int = 50, guidance_scale: float = 7.5,
        window: tuple[float, float] = REFERENCE_WINDOW,
        blend_step: float | None = REFERENCE_BLEND_STEP, blend_threshold: float = 0.3,
        blend_resolution: int | None = None, dilation: int = 1,
        preserve: Sequence[str] | Sequence[Sequence[str]] | None = None, remove_object: bool = True,
        localise_threshold: float = 0.05,
        localise_window: tuple[float, float] = REFERENCE_LOCALISE_WINDOW,
        scheduler: str | None = None, height: int | None = None, width: int | None = None,
        policy=None, reference_quirks: bool = False, sdxl: dict | None = None):
    """Shape variations of one object: ``[original, one image per proxy]`` in one compiled
    call (Patashnik et al. ICCV 2023; module docstring).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      prompt: the original prompt, e.g. ``"a red circle on the left on a beige
        background"`` (or G prompts: G groups in one call).
      word: the object word of the prompt (``"circle"``), matched as a whole word.
      proxies: proxy words replacing ``word`` (``["square", "star"]``; or G lists).
      seed: initial noise of ``pipe.generate(prompt, seed=seed)`` for every member (one
        seed per group for G groups; default ``seed + g``).
      num_inference_steps, guidance_scale, scheduler, height, width: as ``generate``
        (reference: DDIM 50 steps, CFG 7.5; scheduler None = the checkpoint's).
      window, blend_step, blend_threshold, blend_resolution, dilation, localise_window,
        reference_quirks: see :func:`mix_policy`.
      preserve: words of the prompt whose pixels keep the original's self-attention
        (reference ``objects_to_preserve``, default none); for G prompts one list for all
        or one list per prompt. With preserve words the
        original is generated once first to capture its cross maps (as the reference).
      remove_object, localise_threshold: reference ``remove_obj_from_self_mask`` (True),
        ``obj_pixels_injection_threshold`` (0.05).
      policy: another policy of the same layout composed after the mixing policy (e.g.
        :func:`jattn.methods.p2p.p2p_policy` with the proxy prompts as targets).
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it (``prompt_2``: one
        for all rows or one per row; the preserve pass takes the originals' rows).
    Returns:
      :class:`jattn.pipeline.GenerateOutput`: ``images`` uint8 ``(G·(1+P), H, W, 3)``
      group-major ``[original_0, proxy_0_1, …, original_1, …]``, ``latents`` float32
      ``(G·(1+P), C, h, w)``. The original is the plain generation of the prompt with
      that seed.
    Raises:
      ValueError / TypeError: see :func:`mix_prompts` (``word`` not in the prompt, no
        proxy, a proxy of another token count) and :func:`mix_policy`; a preserve word
        not in the prompt; ``generate``'s own checks.
    """
    prompts, words, proxy_lists = _as_groups(prompt, word, proxies)
    g, m = len(prompts), 1 + len(proxy_lists[0])
    tok = pipe.tokenizer
    groups = [mix_prompts(tok, p, w, pl, reference_quirks=reference_quirks)
              for p, w, pl in zip(prompts, words, proxy_lists)]
    seeds = [int(seed) + i for i in range(g)] if isinstance(seed, (int, np.integer)) \
        else [int(s) for s in seed]
    if len(seeds) != g:
        raise ValueError(f"seed: {len(seeds)} seeds for {g} prompts; give one per prompt")
    gen_kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  scheduler=scheduler, height=height, width=width)
    xl = dict(sdxl or {})
    keep_xl = dict(xl)
    if not isinstance(xl.get("prompt_2"), (str, type(None))) and len(xl["prompt_2"]) == g * m:
        keep_xl["prompt_2"] = list(xl["prompt_2"])[::m]        # the originals' rows
    keep = None
    if preserve:
        keep = _preserve_keep(pipe, prompts, words, groups, preserve, seeds,
                              {**gen_kw, **keep_xl},
                              localise_threshold, remove_object, height, width)
    pol = mix_policy(pipe, prompts if g > 1 else prompts[0], words if g > 1 else words[0],
                     proxy_lists if g > 1 else proxy_lists[0], num_steps=num_inference_steps,
                     window=window, blend_step=blend_step, blend_threshold=blend_threshold,
                     blend_resolution=blend_resolution, dilation=dilation, keep=keep,
                     localise_window=localise_window, height=height, width=width,
                     reference_quirks=reference_quirks)
    if policy is not None:
        pol = compose(pol, policy)
    all_prompts = [p for ps, _ in groups for p in ps]
    return pipe.generate(all_prompts, seed=[s for s in seeds for _ in range(m)], policy=pol,
                         **gen_kw, **xl)


def _preserve_keep(pipe, prompts, words, groups, preserve, seeds, gen_kw, threshold,
                   remove_object, height, width):
    """Generate the originals with an in-graph capture of their cross maps → keep masks."""
    from jattn.policy.capture import Capture, captured_maps

    tok = pipe.tokenizer
    per_group = [list(x) for x in preserve] if not isinstance(preserve[0], str) \
        else [list(preserve)] * len(prompts)
    if len(per_group) != len(prompts):
        raise ValueError(f"preserve: {len(per_group)} word lists for {len(prompts)} prompts; "
                         "give one list of words for all or one list per prompt")
    pres_tokens = []
    for p, words_g in zip(prompts, per_group):
        pw = p.split()
        missing = [w for w in words_g if w not in pw]
        if missing:
            raise ValueError(f"preserve: {missing} are not words of the prompt {p!r} (CLI: "
                             "--preserve)")
        pres_tokens.append(np.concatenate([word_token_indices(tok, p, w) for w in words_g]))
    sites = pipe.sites(height, width)
    cap = resolve([(Select(kind="cross"), Capture())], sites,
                  layout=Layout(groups=len(prompts), members=1, cfg=True))
    out = pipe.generate(list(prompts), seed=list(seeds), policy=cap, decode=False, **gen_kw)
    maps = captured_maps(out.aux[0])
    return preserve_masks(maps, pres_tokens, [i for _, i in groups], threshold=threshold,
                          remove_object=remove_object)
