"""Cross-Image Attention: zero-shot appearance transfer between two images.

Source: Alaluf, Garibi, Patashnik, Averbuch-Elor, Cohen-Or, "Cross-Image Attention for
Zero-Shot Appearance Transfer" (SIGGRAPH 2024); reference garibida/cross-image-attention
(``appearance_transfer_model.py``, ``models/stable_diffusion.py``, ``utils/attention_utils.py``,
``utils/adain.py``, ``utils/segmentation.py``, ``config.py``, ``run.py``).

One group of the batch holds three members ``[OUT, APP, STRUCT]`` (output, appearance,
structure). Both inputs are inverted with edit-friendly DDPM inversion
(:mod:`jattn.sampling.ddpm_inversion`: 100 steps, source CFG 3.5); the loop starts after
``skip`` = 32 steps, OUT from the structure's latents with the structure's noise maps, DDIM
eta 1, no CFG. Per step index ``r`` counted from the first step run (the reference's
``t_to_idx``):

* **cross-image attention** (:class:`jattn.policy.ops.MemberSource`): in decoder
  self-attention OUT's queries meet APP's keys and values; at ``r % 5 == 0 and r < 40``
  STRUCT's. Windows: the highest decoder self-attention resolution ``[10, 90)``, the second
  highest ``[10, 70)`` (the reference's 64² and 32² layers of SD1.5 at 512 px);
* **contrast** of OUT's swapped map (:class:`jattn.policy.ops.Contrast`, strength 1.67);
* **swap guidance**: a second UNet pass without the policy, ``ε = ε_noswap + s_r·(ε_swap −
  ε_noswap)`` with ``s = linspace(3.5, max(3.5/2, 1), steps run)`` for ``r`` in the swap
  span (``SamplerHooks.second_scale``);
* **masked AdaIN** of OUT's latents toward APP's after the steps ``[20, 100)``
  (:func:`jattn.policy.ops.masked_adain`), inside object masks from self-segmentation at
  ``r = 19``: k-means (5 clusters, :mod:`jattn.policy.kmeans`) of the head-averaged
  self-attention of the last decoder layer at the highest resolution, clusters labelled by
  the nouns' cross-attention (the last layer at the next lower resolution, upsampled) with
  the reference's rule (:func:`cluster_labels`).

Translation to any UNet and step count: the reference's integer steps are fractions of its
100 steps (``int(f·n)`` of ``n`` steps: 10 → 0.1, 90 → 0.9, 70 → 0.7, 40 → 0.4, 20 → 0.2,
skip 32 → 0.32), so ``num_inference_steps=100`` gives exactly the reference's steps; its
64² / 32² layers are the highest / second-highest query resolutions of the decoder's
self-attention (the bundled model: 16² / 8²; SDXL at 1024 px: 64² / 32², up_blocks.1 and
up_blocks.0, its finest attention being latent/2, so the segmentation masks of the masked
AdaIN are repeated ×2 to the latent grid). With 100 steps and skip 32 only 68 steps
run, so both swap windows in fact cover ``[10, 68)``.

Reference quirks (``reference_quirks=True``, default off): the attention sees the previous
step's index (the reference sets it in the step callback), so every attention window, the
structure steps and the segmentation step are one step late; the swap-guidance span's end is
inclusive; the contrast's mean broadcasts row means along columns
(:func:`jattn.policy.ops.contrast_probs`; equal to the clean mean on exact softmax rows).

Not implemented: the reference's FreeU variant (``models/unet_2d_condition.py``) needs a
feature seam (backbone/skip feature scaling) that jattn does not have yet.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.io.words import word_token_indices
from jattn.models.attention import AttentionSite
from jattn.policy.core import Layout, Op, Policy, Select, SiteContext, compose, resolve
from jattn.policy.kmeans import kmeans
from jattn.policy.ops import Contrast, MemberSource, masked_adain

Array = jax.Array

__all__ = ["OUT", "APP", "STRUCT", "CrossImageSteps", "cross_image_policy",
           "swap_guidance_scales", "cross_image", "cross_image_batch", "CrossImageOutput",
           "SegmentAdaIN", "cluster_labels", "swap_sites"]

OUT, APP, STRUCT = 0, 1, 2  # members of a group (the reference's OUT/STYLE/STRUCT_INDEX)


@dataclasses.dataclass(frozen=True)
class CrossImageSteps:
    """The reference's step settings as fractions of ``num_inference_steps`` (``int(f·n)``;
    the reference's integers at n = 100). Windows ``[start, end)`` in steps counted from the
    first step run (after ``skip``).

    Attributes:
      skip: steps of the inversion not run (0.32: 32 of 100).
      swap_high / swap_low: swap windows at the highest / second-highest decoder
        self-attention resolution ((0.1, 0.9), (0.1, 0.7)).
      structure_period / structure_before: STRUCT's keys and values instead of APP's at
        steps ``r % period == 0 and r < int(before·n)`` (5, 0.4).
      adain: masked-AdaIN window (0.2, 1.0); the masks come from step ``start − 1``.
    """

    skip: float = 0.32
    swap_high: tuple[float, float] = (0.1, 0.9)
    swap_low: tuple[float, float] = (0.1, 0.7)
    structure_period: int = 5
    structure_before: float = 0.4
    adain: tuple[float, float] = (0.2, 1.0)

    def steps(self, n: int) -> dict:
        i = lambda f: int(f * n)  # noqa: E731 - the reference's rounding
        return dict(skip=i(self.skip), high=(i(self.swap_high[0]), i(self.swap_high[1])),
                    low=(i(self.swap_low[0]), i(self.swap_low[1])),
                    period=int(self.structure_period), before=i(self.structure_before),
                    adain=(i(self.adain[0]), i(self.adain[1])))


def swap_sites(sites: Sequence[AttentionSite]) -> tuple[tuple, tuple | None]:
    """The highest and second-highest query resolutions of decoder self-attention
    (``None`` for the second when the decoder has one resolution).

    Raises:
      ValueError: a UNet without decoder self-attention.
    """
    res = sorted({s.resolution for s in sites if s.kind == "self" and s.block == "up"},
                 key=lambda r: r[0] * r[1], reverse=True)
    if not res:
        raise ValueError("cross-image attention needs self-attention in the UNet's decoder "
                         "(up blocks); this model has none")
    return res[0], (res[1] if len(res) > 1 else None)


def _seen_step(n: int, skip: int, quirks: bool) -> np.ndarray:
    """``(n,)`` the relative step index the attention sees at each absolute step
    (-1 before ``skip``); with the quirk, the previous step's (0 at the first)."""
    r = np.arange(n) - skip
    if quirks:
        r = np.where(r >= 0, np.maximum(r - 1, 0), r)
    return r


def swap_guidance_scales(num_inference_steps: int, skip: int, scale: float = 3.5,
                         span: tuple[int, int] = (10, 90), *, reference_quirks: bool = False
                         ) -> np.ndarray:
    """Per-step swap-guidance scales ``(n,)`` float32 for ``SamplerHooks.second_scale``:
    ``linspace(scale, max(scale/2, 1), n − skip)[r]`` at relative steps ``r`` in ``span``
    (end inclusive with ``reference_quirks``), 1 elsewhere (1 = no second pass); all 1 when
    ``scale <= 1`` (the reference's ``swap_guidance_scale > 1.0`` test)."""
    n, skip = int(num_inference_steps), int(skip)
    out = np.ones(n, np.float32)
    if scale <= 1.0:
        return out
    run = n - skip
    ramp = np.linspace(scale, max(scale / 2.0, 1.0), run).astype(np.float32)
    r = np.arange(run)
    on = (r >= span[0]) & ((r <= span[1]) if reference_quirks else (r < span[1]))
    out[skip:] = np.where(on, ramp, 1.0)
    return out


# ---------------------------------------------------------------------------- segmentation
def cluster_labels(clusters: Array, noun_maps: Array, object_nouns: Array, k: int, *,
                   ratio: float = 1.4) -> Array:
    """Which clusters are the object: the reference's ``Segmentor.cluster2noun``.

    Args:
      clusters: int32 ``(h·w,)`` k-means labels of the self-attention rows.
      noun_maps: ``(h·w, K)`` cross-attention of the K nouns at the clusters' grid (already
        upsampled); each is normalised ``(m − |min m|) / max m``.
      object_nouns: bool ``(K,)``: the nouns that count as the object.
      k: number of clusters (static).
      ratio: a cluster takes its best noun when that score is > ratio × the mean of the
        other clusters' best scores (the cluster of the highest score left out; 1.4).
    Returns:
      bool ``(k,)``: clusters labelled with an object noun.
    """
    m = noun_maps.astype(jnp.float32)
    m = (m - jnp.abs(m.min(axis=0))) / m.max(axis=0)
    one_hot = jax.nn.one_hot(clusters, k, dtype=jnp.float32)          # (T, k)
    size = jnp.maximum(one_hot.sum(axis=0), 1.0)
    scores = (one_hot.T @ m) / size[:, None]                           # (k, K) cluster means
    best = scores.max(axis=1)                                          # (k,)
    top = jnp.max(best)
    mean_rest = (jnp.sum(best) - top) / (k - 1)  # list.remove(max): one occurrence left out
    noun = jnp.argmax(scores, axis=1)
    return (best > ratio * mean_rest) & object_nouns[noun]


@struct.dataclass
class SegmentAdaIN(Op):
    """Masked AdaIN of OUT's latents toward APP's, with masks from self-segmentation.

    Resolved to two sites: the self-attention site whose head-averaged map is clustered and
    the cross-attention site whose noun maps label the clusters (with ``masked=False``
    none is read). At step ``capture_step`` (the sampler's absolute index) it records APP's
    and STRUCT's maps there and computes, in-graph, the masks ``(G, 2, h, w)`` [APP,
    STRUCT]; its ``on_step`` replaces OUT's latents after the steps in ``window`` with
    :func:`jattn.policy.ops.masked_adain` (content mask: STRUCT's, style mask: APP's).

    Attributes:
      window: int32 ``(2,)`` absolute steps ``[start, end)`` of AdaIN.
      capture_step: int32 ``()`` absolute step whose maps give the masks.
      noun_weights: float32 ``(K, S)``: token weights of each noun (mean over its tokens).
      object_nouns: bool ``(K,)``.
      key: PRNG key of the k-means (the reference seeds NumPy with 1).
      masked: static; False = plain AdaIN over the whole latents (the reference's
        ``use_masked_adain=False``).
      clusters: static k (5); n_init: static k-means restarts (10).
      self_res, cross_res: static ``(h, w)`` of the two sites.
    """

    window: Array
    capture_step: Array
    noun_weights: Array | None = None
    object_nouns: Array | None = None
    key: Array | None = None
    masked: bool = struct.field(pytree_node=False, default=True)
    clusters: int = struct.field(pytree_node=False, default=5)
    n_init: int = struct.field(pytree_node=False, default=10)
    self_res: tuple = struct.field(pytree_node=False, default=(0, 0))
    cross_res: tuple = struct.field(pytree_node=False, default=(0, 0))

    @property
    def needs_probs(self) -> bool:  # type: ignore[override]
        return self.masked

    def record(self, ctx: SiteContext, p_pre, p_post):
        if not self.masked or p_pre is None:
            return {}
        p = p_pre.astype(jnp.float32).mean(axis=1)                     # (B, T, S) head mean
        p = ctx.layout.split(p)[-1][:, APP:STRUCT + 1]                  # (G, 2, T, S) cond half
        if ctx.site.kind == "cross":
            p = jnp.einsum("GMTS,KS->GMTK", p, self.noun_weights.astype(jnp.float32))
        return {"probs": p}

    def aux_init(self, sites, layout: Layout, context_tokens: int):
        h, w = self.self_res
        return {"masks": jnp.ones((layout.groups, 2, h, w), jnp.float32),
                "clusters": jnp.zeros((layout.groups, 2, h * w), jnp.int32)}

    def aux_update(self, acc, per_site, step, sites):
        if not self.masked:
            return acc
        by_kind = {s.kind: per_site[s.path]["probs"] for s in sites if s.path in per_site}
        if "self" not in by_kind or "cross" not in by_kind:
            return acc

        def segment(_):
            x = by_kind["self"]                                         # (G, 2, T, T)
            nm = by_kind["cross"]                                       # (G, 2, Tc, K)
            g = x.shape[0]
            (h, w), (hc, wc) = self.self_res, self.cross_res
            fh, fw = h // hc, w // wc
            nm = nm.reshape(g, 2, hc, wc, -1)
            nm = jnp.repeat(jnp.repeat(nm, fh, axis=2), fw, axis=3).reshape(g, 2, h * w, -1)
            keys = jax.random.split(self.key, g * 2)
            res = jax.vmap(lambda a, kk: kmeans(a, self.clusters, kk, n_init=self.n_init))(
                x.reshape(g * 2, h * w, h * w), keys)
            labels = res.labels.reshape(g, 2, h * w)
            obj = jax.vmap(jax.vmap(lambda c, m: cluster_labels(c, m, self.object_nouns,
                                                                self.clusters)))(labels, nm)
            masks = jnp.take_along_axis(obj, labels, axis=-1).astype(jnp.float32)
            return {"masks": masks.reshape(g, 2, h, w), "clusters": labels}

        return jax.lax.cond(step == self.capture_step, segment, lambda _: acc, None)

    def on_step(self, latents, acc, step, layout: Layout):
        x = latents.reshape((layout.groups, layout.members) + latents.shape[1:])
        on = (step >= self.window[0]) & (step < self.window[1])
        if self.masked:
            hw = latents.shape[1:3]
            new = masked_adain(x[:, OUT], x[:, APP], _to_latent_grid(acc["masks"][:, 1], hw),
                               _to_latent_grid(acc["masks"][:, 0], hw))
        else:
            new = masked_adain(x[:, OUT], x[:, APP])
        x = x.at[:, OUT].set(jnp.where(on, new, x[:, OUT]))
        return x.reshape(latents.shape)


def _to_latent_grid(mask: Array, hw: tuple) -> Array:
    """Object masks ``(G, h, w)`` at the segmentation grid -> the latent grid ``(G, H, W)``
    by nearest repetition. SD1/SD2: the same grid (the finest decoder self-attention runs
    at the latent size; unchanged); SDXL: ×2, its finest attention being latent/2 (64² of
    128²)."""
    fh, fw = hw[0] // mask.shape[-2], hw[1] // mask.shape[-1]
    if (fh, fw) == (1, 1):
        return mask
    return jnp.repeat(jnp.repeat(mask, fh, axis=-2), fw, axis=-1)


def _last_site(sites, kind, res) -> AttentionSite:
    """The last site in call order of ``kind`` at resolution ``res`` (the reference keeps
    the map of the last layer it sees)."""
    return [s for s in sites if s.kind == kind and s.resolution == res][-1]


def _label_cross_res(sites, self_res) -> tuple:
    cross = sorted({s.resolution for s in sites if s.kind == "cross"},
                   key=lambda r: r[0] * r[1], reverse=True)
    lower = [r for r in cross if r[0] < self_res[0] and self_res[0] % r[0] == 0
             and self_res[1] % r[1] == 0]
    if lower:
        return lower[0]
    if self_res in cross:
        return self_res
    raise ValueError(f"masked AdaIN: no cross-attention resolution divides the self-attention "
                     f"grid {self_res}; pass masked_adain=False")


def cross_image_policy(
    pipe,
    *,
    num_inference_steps: int = 100,
    steps: CrossImageSteps = CrossImageSteps(),
    groups: int = 1,
    contrast_strength: float = 1.67,
    prompt: str = "",
    object_word: str | None = None,
    nouns: Sequence[str] | None = None,
    masked_adain: bool = True,
    adain: bool = True,
    cfg: bool = False,
    height: int | None = None,
    width: int | None = None,
    seed: int = 1,
    reference_quirks: bool = False,
) -> Policy:
    """The Cross-Image Attention policy for ``groups`` groups ``[OUT, APP, STRUCT]``.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (sites, tokenizer).
      num_inference_steps: n, the schedule's steps; ``steps`` gives the windows as
        fractions of n (module docstring).
      contrast_strength: 1.67 (1 = no contrast; the probabilities are still materialised).
      prompt: the prompt of the three members (for the nouns' token positions).
      object_word: the noun whose clusters form the AdaIN masks (the reference's
        ``object_noun``); None: plain AdaIN over the whole latents.
      nouns: every noun whose map competes for the clusters (the reference: the prompt's
        NLTK nouns but "photo", "image", "picture"); default ``[object_word]``.
      masked_adain: False = plain AdaIN even with an object word.
      adain: False = no AdaIN at all (ablation).
      cfg: the layout's CFG flag (True to compose with a CFG policy such as P2P's; the
        method itself runs without CFG). Both halves are edited.
      seed: the k-means key.
      reference_quirks: module docstring.
    Returns:
      a :class:`Policy` with ``Layout(groups, 3, cfg)``.
    Raises:
      ValueError: object word or nouns not in the prompt; a UNet without decoder
        self-attention.
    """
    n = int(num_inference_steps)
    st = steps.steps(n)
    skip = st["skip"]
    sites = pipe.sites(height, width)
    layout = Layout(groups=int(groups), members=3, cfg=cfg)
    high, low = swap_sites(sites)
    seen = _seen_step(n, skip, reference_quirks)
    rules = []
    for res, (a, b) in ((high, st["high"]), (low, st["low"])):
        if res is None:
            continue
        on = (seen >= a) & (seen < b)
        struct_steps = (seen >= 0) & (seen % st["period"] == 0) & (seen < st["before"])
        kv = np.tile(np.arange(3, dtype=np.int32), (n, 1))
        kv[on, OUT] = np.where(struct_steps[on], STRUCT, APP)
        members = np.zeros((n, 3), bool)
        members[on, OUT] = True
        table = jnp.asarray(kv)
        rules.append((Select(kind="self", blocks=("up",), resolutions=(res,)),
                      (MemberSource(k_from=table, v_from=table),
                       Contrast(strength=jnp.float32(contrast_strength),
                                members=jnp.asarray(members),
                                reference_quirks=reference_quirks))))
    policies = [resolve(rules, sites, layout=layout)]
    if adain:
        a0, a1 = st["adain"]
        cap_rel = a0 - 1
        cap_abs = int(np.flatnonzero(seen == cap_rel)[-1]) if (seen == cap_rel).any() else -1
        window = jnp.asarray([skip + a0, skip + a1], jnp.int32)
        use_masks = masked_adain and object_word is not None
        if use_masks:
            nouns = [object_word] if nouns is None else list(nouns)
            if object_word not in nouns:
                nouns.append(object_word)
            weights = np.zeros((len(nouns), 77), np.float32)  # Policy.context_tokens
            for j, word in enumerate(nouns):
                idx = word_token_indices(pipe.tokenizer, prompt, word)
                if len(idx) == 0:
                    raise ValueError(f"object_word/nouns: {word!r} is not a word of the prompt "
                                     f"{prompt!r}; the masks need the noun's attention (pass "
                                     "masked_adain=False for AdaIN over the whole latents)")
                weights[j, idx] = 1.0 / len(idx)
            cross_res = _label_cross_res(sites, high)
            s_site, c_site = _last_site(sites, "self", high), _last_site(sites, "cross", cross_res)
            sel = Select(path="^(" + re.escape(s_site.path) + "|" + re.escape(c_site.path) + ")$")
            op = SegmentAdaIN(window=window, capture_step=jnp.int32(cap_abs),
                              noun_weights=jnp.asarray(weights),
                              object_nouns=jnp.asarray([w == object_word for w in nouns]),
                              key=jax.random.key(seed), masked=True,
                              self_res=tuple(high), cross_res=tuple(cross_res))
        else:
            sel = Select(kind="self", blocks=("up",), resolutions=(high,))
            op = SegmentAdaIN(window=window, capture_step=jnp.int32(-1), masked=False,
                              self_res=tuple(high), cross_res=tuple(high))
        policies.append(resolve([(sel, op)], sites, layout=layout))
    return compose(*policies)


# ---------------------------------------------------------------------------- front-end
@dataclasses.dataclass
class CrossImageOutput:
    """Result of :func:`cross_image` / :func:`cross_image_batch`.

    Attributes:
      images: uint8 ``(3G, H, W, 3)``: per group [OUT, APP, STRUCT] (APP and STRUCT as the
        loop regenerates them from their inversions).
      latents: float32 ``(3G, C, h, w)`` final latents (NCHW).
      inputs: uint8 ``(G, 2, H, W, 3)``: the [appearance, structure] images used (given, or
        generated from the prompts).
      masks: float32 ``(G, 2, h, w)`` [APP, STRUCT] AdaIN masks (ones when unmasked).
      settings: the resolved steps, sites and scales (for result.json).
    """

    images: np.ndarray | None
    latents: np.ndarray
    inputs: np.ndarray
    masks: np.ndarray
    settings: dict


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _as_input(pipe, x, name: str, height, width):
    """An image (uint8 (H, W, 3); a PIL image) or a prompt (str)."""
    if isinstance(x, str):
        if not x.strip():
            raise ValueError(f"{name}: an empty prompt; give an image or a text prompt")
        return "prompt", x
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL
        x = np.asarray(x.convert("RGB"))
    from jattn.io.images import as_uint8_images

    a = as_uint8_images(x, name)
    if a.shape[0] != 1:
        raise ValueError(f"{name}: one image (H, W, 3), got a batch of {a.shape[0]}")
    return "image", a[0]


def cross_image_batch(pipe, structures: Sequence[Any], appearances: Sequence[Any],
                      prompt: str | None = None, **kwargs) -> CrossImageOutput:
    """:func:`cross_image` for G pairs at once (G groups of one compiled program)."""
    return _run(pipe, list(structures), list(appearances), prompt, **kwargs)


def cross_image(pipe, structure: Any, appearance: Any, prompt: str | None = None, *,
                num_inference_steps: int = 100, seed: int = 0, **kwargs) -> CrossImageOutput:
    """Transfer the appearance of one image onto the structure of another.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      structure, appearance: uint8 ``(H, W, 3)`` images (or PIL images) of the same size,
        or text prompts (the image is generated first, ``generate_steps`` DDIM steps at CFG
        ``generate_guidance_scale``, then inverted like a given image).
      prompt: the prompt of the inversions and of the three members (the reference: "A
        photo of a {domain}"); default "".
      num_inference_steps: n (the reference: 100); step settings scale with n.
      seed: the inversion noise (structure: seed, appearance: seed + 1) and generated inputs.
      kwargs: ``steps`` (:class:`CrossImageSteps`), ``swap_guidance_scale`` (3.5),
        ``contrast_strength`` (1.67), ``inversion_guidance_scale`` (3.5), ``object_word``
        (default: the prompt's last word when a prompt is given; None = plain AdaIN),
        ``nouns``, ``masked_adain``, ``adain``, ``swap`` (False = plain regeneration, the
        baseline), ``generate_steps`` (50), ``generate_guidance_scale`` (7.5),
        ``guidance_scale`` (CFG of the loop; the reference: 1 = none. At the inversion's
        scale the APP and STRUCT members regenerate their inputs exactly; both CFG halves
        are swapped, each pass does CFG, then swap guidance), ``reference_quirks``,
        ``decode``, ``sdxl`` (SDXL: ``Pipeline.generate``'s ``prompt_2`` and
        micro-conditioning keywords for the generated inputs only; the inversions and the
        loop use ``prompt``).
    Returns:
      :class:`CrossImageOutput`; ``images`` = [OUT, APP, STRUCT].
    Raises:
      ValueError: images of different sizes (naming ``appearance``), a size the model does
        not take, an empty prompt, an object word not in the prompt, bad step counts.
    """
    return _run(pipe, [structure], [appearance], prompt,
                num_inference_steps=num_inference_steps, seed=seed, **kwargs)


def _run(pipe, structures, appearances, prompt, *, num_inference_steps: int = 100, seed: int = 0,
         steps: CrossImageSteps = CrossImageSteps(), swap_guidance_scale: float = 3.5,
         contrast_strength: float = 1.67, inversion_guidance_scale: float = 3.5,
         object_word: str | None = "", nouns=None, masked_adain: bool = True,
         adain: bool = True, swap: bool = True, generate_steps: int = 50,
         generate_guidance_scale: float = 7.5, guidance_scale: float = 1.0,
         reference_quirks: bool = False, decode: bool = True,
         sdxl: dict | None = None) -> CrossImageOutput:
    from jattn.io import checks
    from jattn.sampling.ddpm_inversion import ddpm_invert
    from jattn.sampling.sampler import SamplerHooks

    if len(structures) != len(appearances) or not structures:
        raise ValueError(f"structures/appearances: {len(structures)} and {len(appearances)}; "
                         "give one appearance per structure")
    g = len(structures)
    n = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=2,
                            maximum=pipe.scheduler_config.num_train_timesteps)
    seed = checks.whole_number(seed, "seed", minimum=0, maximum=2**32 - 2 * g - 1)
    prompt = "" if prompt is None else checks.prompt_list(prompt, "prompt")[0]
    pipe.tokenize([prompt], name="prompt")  # 77-token check before any compute
    if object_word == "":  # default: the prompt's last word (the reference's domain noun)
        words = prompt.split()
        object_word = words[-1] if words else None
    if swap and adain and masked_adain and object_word is not None:
        for word in [object_word] + list(nouns or []):
            if len(word_token_indices(pipe.tokenizer, prompt, word)) == 0:
                raise ValueError(f"object_word/nouns: {word!r} is not a word of the prompt "
                                 f"{prompt!r}; the AdaIN masks need the noun's attention "
                                 "(give a prompt that contains it, or masked_adain=False)")
    swap_guidance_scale = checks.finite_number(swap_guidance_scale, "swap_guidance_scale",
                                               minimum=0.0)
    contrast_strength = checks.finite_number(contrast_strength, "contrast_strength",
                                             minimum=0.0)
    st = steps.steps(n)
    if not 0 <= st["skip"] < n - 1:
        raise ValueError(f"steps.skip={steps.skip}: leaves no step to run of {n}")
    items = [(_as_input(pipe, s, "structure", None, None), _as_input(pipe, a, "appearance",
                                                                      None, None))
             for s, a in zip(structures, appearances)]
    for (sk, sv), (ak, av) in items:
        if sk == ak == "image" and sv.shape != av.shape:
            raise ValueError(
                f"appearance: image of {av.shape[1]}×{av.shape[0]} px but the structure is "
                f"{sv.shape[1]}×{sv.shape[0]} px; the two images must have the same size "
                "(resize one; the CLI resizes both to the model's size and says so)")
    shapes = {tuple(x[1].shape[:2]) for pair in items for x in pair if x[0] == "image"}
    if len(shapes) > 1:
        raise ValueError(f"structures/appearances: images of different sizes {sorted(shapes)} "
                         "in one batch; give images of one size")
    hw = next(iter(shapes)) if shapes else (pipe.default_size, pipe.default_size)
    height, width = pipe.check_size(hw[0], hw[1], 3 * g)
    # generated inputs: generate, then invert like images
    texts = [(i, j, x[1]) for i, pair in enumerate(items) for j, x in enumerate(pair)
             if x[0] == "prompt"]
    imgs = [[x[1] if x[0] == "image" else None for x in pair] for pair in items]
    if texts:
        gen = pipe.generate([t for _, _, t in texts], num_inference_steps=generate_steps,
                            guidance_scale=generate_guidance_scale, scheduler="ddim",
                            seed=[seed + 2 * i + j for i, j, _ in texts], height=height,
                            width=width, **(sdxl or {}))
        for (i, j, _), im in zip(texts, gen.images):
            imgs[i][j] = im
    struct_imgs = np.stack([p[0] for p in imgs])
    app_imgs = np.stack([p[1] for p in imgs])
    both = np.concatenate([struct_imgs, app_imgs])                     # (2G, H, W, 3)
    inv = ddpm_invert(pipe, both, prompt, num_inference_steps=n,
                      guidance_scale=inversion_guidance_scale, skip=st["skip"],
                      seed=[seed + (0 if b < g else 1) + 2 * (b % g) for b in range(2 * g)],
                      scheduler="ddim", eta=1.0, reference_quirks=reference_quirks)
    x_s, x_a = inv.x_ts[st["skip"], :g], inv.x_ts[st["skip"], g:]     # (G, h, w, C)
    z_s, z_a = inv.noise_maps[:, :g], inv.noise_maps[:, g:]            # (n, G, h, w, C)
    x0 = np.stack([x_s, x_a, x_s], axis=1).reshape((3 * g,) + x_s.shape[1:])
    noise = np.stack([z_s, z_a, z_s], axis=2).reshape((n, 3 * g) + z_s.shape[2:])
    policy = None
    scales = np.ones(n, np.float32)
    if swap:
        policy = cross_image_policy(pipe, num_inference_steps=n, steps=steps, groups=g,
                                    contrast_strength=contrast_strength, prompt=prompt,
                                    object_word=object_word, nouns=nouns,
                                    masked_adain=masked_adain, adain=adain, height=height,
                                    width=width, reference_quirks=reference_quirks,
                                    cfg=guidance_scale > 1.0)
        span = (min(st["high"][0], st["low"][0]), max(st["high"][1], st["low"][1]))
        scales = swap_guidance_scales(n, st["skip"], swap_guidance_scale, span,
                                      reference_quirks=reference_quirks)
    second = {"second_scale": jnp.asarray(scales)} if bool((scales != 1.0).any()) else {}
    hooks = SamplerHooks(noise=jnp.asarray(noise), start_step=st["skip"], **second)
    out = pipe.generate([prompt] * (3 * g), num_inference_steps=n, guidance_scale=guidance_scale,
                        scheduler="ddim", eta=1.0, seed=list(range(3 * g)),
                        latents=x0.transpose(0, 3, 1, 2), policy=policy, hooks=hooks,
                        height=height, width=width, decode=decode)
    masks = np.ones((g, 2) + x_s.shape[1:3], np.float32)
    if policy is not None:
        for acc in out.aux:
            if isinstance(acc, dict) and "masks" in acc:
                masks = np.asarray(acc["masks"])
    high, low = swap_sites(pipe.sites(height, width))
    settings = dict(num_inference_steps=n, skip=st["skip"], swap_high=[list(high), st["high"]],
                    swap_low=[list(low) if low else None, st["low"]],
                    structure_steps=f"r % {st['period']} == 0 and r < {st['before']}",
                    adain=st["adain"] if adain else None, object_word=object_word,
                    swap_guidance_scale=swap_guidance_scale, contrast_strength=contrast_strength,
                    inversion_guidance_scale=inversion_guidance_scale, prompt=prompt,
                    guidance_scale=guidance_scale,
                    reference_quirks=reference_quirks, swap=swap)
    return CrossImageOutput(images=out.images, latents=out.latents,
                            inputs=np.stack([app_imgs, struct_imgs], axis=1), masks=masks,
                            settings=settings)
