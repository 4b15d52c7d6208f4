"""Self-segmentation: cluster the self-attention of a generation (or of the regeneration of
an inverted real image) and label the clusters with words of the prompt.

Source: Patashnik, Garibi, Azuri, Averbuch-Elor, Cohen-Or, "Localizing Object-level Shape
Variations with Text-to-Image Diffusion Models" (ICCV 2023), §3; reference
orpatashnik/local-prompt-mixing ``src/attention_based_segmentation.py`` (``Segmentor``),
``src/attention_utils.py`` (``aggregate_attention``), ``run_segmentation.py``,
``src/prompt_to_prompt_controllers.py`` (``AttentionStore``). The clustering and labelling
are :mod:`jattn.policy.segmentation`; this module is the front-end (words, resolutions,
the capture policy, inversion, the result).

What is captured (in-graph, :class:`jattn.policy.capture.Capture`, conditional half of the
CFG batch as the reference's ``low_resource`` store): self-attention at the **self grid**
and cross-attention at the **cross grid**, each averaged over heads, over the layers of
the down and up blocks at that grid (the reference's ``from_where=("up", "down")``) and
over a step window (default every step: the reference averages its ``AttentionStore`` over
the whole generation).

Resolutions (latent cells; override with ``self_resolution`` / ``cross_resolution``):

* self grid = the largest self-attention grid of the down/up blocks with at most 32² = 1024
  query tokens (the reference's ``AttentionStore`` keeps maps with ≤ 32² queries and its
  ``Segmentor`` uses 32²). SD1/2 at 512 px (64² latents): 32²; SD2 at 768 px (96²): 24²;
  SDXL at 1024 px (128² latents, attention from 64²): 32²; the bundled model at 128 px
  (16² latents): 16², its highest; the test's tiny pipeline (8² latents): 8².
* cross grid = half the self grid on each side when a down/up cross-attention site has it
  (the reference: 16² for 32², upsampled ×2 by ``repeat``), else the self grid. Bundled
  model: 8² (``cross_resolution=16`` uses its 16² layers instead).

Words: no part-of-speech tagger (the reference labels with the prompt's nouns from NLTK).
The caller names the words; by default every word of ``prompt.split()`` that is not in
:data:`STOP_WORDS` (articles, prepositions, conjunctions, position words, and "photo",
"picture", "image", "background"), each once, in prompt order. A word matches a word of
``prompt.split()`` exactly (case and punctuation count) at every occurrence; a word of
several BPE tokens uses the mean of its tokens' maps (the reference takes the one token
at the noun's index + 1). The background word is dropped by default because label 0 is
the background already; name it in ``words`` to label background clusters with it.

Differences from the reference (clean behaviour; nothing here changes the algorithm):
k-means is :func:`jattn.policy.kmeans.kmeans` (scikit-learn's algorithm, JAX random
stream: same local optimum up to the seed, not bit for bit); ``kmeans_seed=1`` for every
image as the reference's ``np.random.seed(1)``; labels at image size by nearest upsampling
(default, as the reference's ``nn.Upsample``) or bilinear (``upsample="bilinear"``).

Shapes (legend B batch, T query tokens, S key tokens, h×w latent grid, H×W pixels, K
clusters, W words).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checks
from jattn.io.images import as_uint8_images
from jattn.io.words import word_token_indices
from jattn.policy import segmentation as seg
from jattn.policy.analysis import parse_key
from jattn.policy.capture import Capture, captured_maps
from jattn.policy.core import Layout, Policy, Select, resolve

__all__ = ["segment", "segment_from_maps", "segment_policy", "SegmentResult", "STOP_WORDS",
           "content_words", "resolve_words", "grids", "overlay_labels", "label_colours",
           "THRESHOLD", "MAX_SELF_TOKENS"]

THRESHOLD = 0.35        # run_segmentation.py (main.py's prompt mixing uses 0.3)
MAX_SELF_TOKENS = 32 * 32
INVERSIONS = ("null-text", "ddim")

STOP_WORDS = frozenset("""
a an the this that these those some
of on in at to from with by for into onto over under above below behind beside near next
and or but
left right top bottom center centre middle side
photo picture image background
""".split())

# overlay colours of labels 1, 2, … (background keeps the image); cycles past 10 words
_COLOURS = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                     [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                     [188, 189, 34], [23, 190, 207]], np.uint8)


def _bare(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word.lower())


def content_words(prompt: str) -> list[str]:
    """The default words of ``prompt``: its ``split()`` words whose lowercase form without
    leading/trailing punctuation is not in :data:`STOP_WORDS`, each once, in order
    (``"a red circle on the left"`` → ``["red", "circle"]``)."""
    out: list[str] = []
    for w in prompt.split():
        if _bare(w) and _bare(w) not in STOP_WORDS and w not in out:
            out.append(w)
    return out


def resolve_words(tokenizer, prompts: Sequence[str], words, max_len: int = 77
                  ) -> tuple[list[list[str]], np.ndarray]:
    """The words of each prompt and their token weights.

    Args:
      tokenizer: the pipeline's tokenizer.
      prompts: B prompts.
      words: None (the content words of each prompt, :func:`content_words`), a list of
        words (the same for every prompt; each must be a word of every prompt), or a list
        of B lists (one per prompt).
      max_len: S, the text encoder's tokens.
    Returns:
      ``(words per prompt, weights float32 (B, S, S))``: ``weights[b, j]`` holds ``1/n`` at
      the n token positions of word j of prompt b (rows past its words are zero; at most
      S − 2 words fit a prompt).
    Raises:
      ValueError (naming ``words``): a word that is not a word of its prompt, a word given
        twice, a prompt without words (all stop words), the wrong number of lists;
        TypeError: a word that is not a string.
    """
    b = len(prompts)
    if words is None:
        per = [content_words(p) for p in prompts]
    elif isinstance(words, str):
        per = [[words]] * b
    else:
        words = list(words)
        nested = [isinstance(w, (list, tuple)) for w in words]
        if words and all(nested):
            if len(words) != b:
                raise ValueError(f"words: {len(words)} lists for {b} prompts; give one list "
                                 "per prompt, or one flat list for all")
            per = [list(w) for w in words]
        elif any(nested):
            raise ValueError("words: mix of words and lists; give one flat list of words for "
                             "every prompt, or one list per prompt")
        else:
            per = [list(words)] * b
    weights = np.zeros((b, max_len, max_len), np.float32)
    for i, (prompt, ws) in enumerate(zip(prompts, per)):
        if not ws:
            raise ValueError(f"words: prompt {prompt!r} has no words to label segments with "
                             f"(its words {prompt.split()} are all stop words); name them "
                             "with words=[...] (CLI: --words WORD …)")
        seen = set()
        for j, w in enumerate(ws):
            if not isinstance(w, str):
                raise TypeError(f"words: {w!r} is not a string")
            if w in seen:
                raise ValueError(f"words: {w!r} is given twice for prompt {prompt!r}")
            seen.add(w)
            idx = word_token_indices(tokenizer, prompt, w, max_len=max_len)
            if idx.size == 0:
                raise ValueError(f"words: {w!r} is not a word of prompt {prompt!r} (its words: "
                                 f"{prompt.split()}); words match exactly (case and "
                                 "punctuation count)")
            weights[i, j, idx] = 1.0 / idx.size
    return per, weights


def _grid(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value), int(value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) for v in value)):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name}={value!r}: give a grid side (int) or (h, w) in latent cells")


def _select(sites, kind: str, hw: tuple[int, int], name: str) -> Select:
    """Sites of ``kind`` at grid ``hw`` in the down/up blocks (all blocks if none there)."""
    for blocks in (("down", "up"), None):
        sel = Select(kind=kind, resolutions=(hw,), blocks=blocks)
        if any(sel.matches(s) for s in sites):
            return sel
    have = sorted({s.resolution for s in sites if s.kind == kind})
    raise ValueError(f"{name}={hw[0] if hw[0] == hw[1] else hw}: this model has no "
                     f"{kind}-attention at that grid; its {kind}-attention grids (latent "
                     f"cells) are {have}")


def grids(pipe, height: int | None = None, width: int | None = None, *,
          self_resolution=None, cross_resolution=None
          ) -> tuple[tuple[int, int], tuple[int, int], Select, Select]:
    """The self and cross grids (module docstring's rule) and their site selectors.

    Returns:
      ``(self_hw, cross_hw, self_select, cross_select)``.
    Raises:
      ValueError: a requested grid with no attention sites (lists the model's grids);
      TypeError: a grid that is neither an int nor ``(h, w)``.
    """
    sites = pipe.sites(height, width)
    self_hw = _grid(self_resolution, "self_resolution")
    if self_hw is None:
        cand = sorted({s.resolution for s in sites if s.kind == "self"
                       and s.block in ("down", "up") and s.query_tokens <= MAX_SELF_TOKENS},
                      key=lambda r: r[0] * r[1])
        self_hw = cand[-1] if cand else min({s.resolution for s in sites if s.kind == "self"},
                                            key=lambda r: r[0] * r[1])
    self_sel = _select(sites, "self", self_hw, "self_resolution")
    cross_hw = _grid(cross_resolution, "cross_resolution")
    if cross_hw is None:
        half = (self_hw[0] // 2, self_hw[1] // 2)
        updown = {s.resolution for s in sites if s.kind == "cross" and s.block in ("down", "up")}
        cross_hw = half if half in updown else self_hw
    cross_sel = _select(sites, "cross", cross_hw, "cross_resolution")
    return self_hw, cross_hw, self_sel, cross_sel


def _step_window(step_window, steps: int) -> np.ndarray:
    try:
        s0, s1 = (float(v) for v in step_window)
    except (TypeError, ValueError):
        raise ValueError(f"step_window={step_window!r}: give (start, end) fractions of the "
                         "steps, e.g. (0.0, 1.0)") from None
    if not (0.0 <= s0 < s1 <= 1.0):
        raise ValueError(f"step_window={step_window!r}: need 0 <= start < end <= 1")
    a, b = int(s0 * steps), int(round(s1 * steps))
    if b <= a:
        raise ValueError(f"step_window={step_window!r} covers no step of {steps}; widen it")
    return np.asarray([a, b], np.int32)


def segment_policy(pipe, batch_size: int, *, num_steps: int, cfg: bool = True,
                   step_window=(0.0, 1.0), self_resolution=None, cross_resolution=None,
                   capture_all_cross: bool = False, height: int | None = None,
                   width: int | None = None) -> Policy:
    """The capture policy of self-segmentation for ``batch_size`` independent prompts
    (``Layout(groups=batch_size, members=1, cfg=cfg)``).

    Op 0 captures self-attention at the self grid, op 1 cross-attention at the cross grid
    (every cross site with ``capture_all_cross``, e.g. for DAAM heat maps), both over the
    steps ``[int(start·T), round(end·T))`` of ``step_window`` (a dynamic array: another
    window never recompiles).

    Raises:
      ValueError: an empty or invalid step window; a grid without sites.
    """
    _, _, self_sel, cross_sel = grids(pipe, height, width, self_resolution=self_resolution,
                                      cross_resolution=cross_resolution)
    window = jnp.asarray(_step_window(step_window, num_steps))
    if capture_all_cross:
        cross_sel = Select(kind="cross")
    return resolve([(self_sel, Capture(window=window)), (cross_sel, Capture(window=window))],
                   pipe.sites(height, width),
                   layout=Layout(groups=batch_size, members=1, cfg=cfg),
                   context_tokens=pipe.text_config.max_position_embeddings)


@dataclasses.dataclass
class SegmentResult:
    """Result of :func:`segment` / :func:`segment_from_maps`.

    Attributes:
      images: uint8 ``(B, H, W, 3)``: the generations, or the reconstructions of the input
        images (regenerated from their inversion); None from :func:`segment_from_maps`.
      labels: uint8 ``(B, H, W)``: 0 background, ``j`` the ``j``-th word of ``words[b]``.
      words: per image, the words in label order (label j = ``words[b][j − 1]``).
      scores: float32 ``(B, K, W)``: cluster k's mean normalised map of word w (W = the most
        words of any image; NaN past an image's words).
      cluster_words: int32 ``(B, K)``: each cluster's label (0 background).
      clusters: int32 ``(B, h, w)``: the cluster of each cell of the self grid.
      word_maps: float32 ``(B, W, h, w)``: the normalised word maps on the self grid (NaN
        past an image's words).
      maps: ``{key: (B, T, S)}`` the captured maps averaged over the step window
        (``"self16x16"``, ``"cross8x8"`` …; see :mod:`jattn.policy.analysis`).
      prompts: the prompts; self_grid, cross_grid: ``(h, w)`` latent cells used.
      latents: float32 ``(B, C, h, w)`` final latents (None from :func:`segment_from_maps`).
      inversion: the :class:`jattn.sampling.inversion.Inversion` of the input images, or
        None.
    """

    images: np.ndarray | None
    labels: np.ndarray
    words: list[list[str]]
    scores: np.ndarray
    cluster_words: np.ndarray
    clusters: np.ndarray
    word_maps: np.ndarray
    maps: dict
    prompts: list[str]
    self_grid: tuple[int, int]
    cross_grid: tuple[int, int]
    latents: np.ndarray | None = None
    inversion: object = None

    def segments(self, row: int = 0) -> list[dict]:
        """Per-cluster summary of image ``row``: ``[{"cluster", "label", "word", "cells",
        "scores": {word: score}}]`` (word "background" for label 0)."""
        words = self.words[row]
        out = []
        for c, lab in enumerate(self.cluster_words[row].tolist()):
            out.append({"cluster": c, "label": int(lab),
                        "word": words[lab - 1] if lab else "background",
                        "cells": int((self.clusters[row] == c).sum()),
                        "scores": {w: float(self.scores[row, c, j]) for j, w in
                                   enumerate(words)}})
        return out


def _segment_fn(pipe, k: int, n_init: int, grid_hw, cross_hw, size, upsample: str):
    """The compiled, batched clustering + labelling (cached on the pipeline)."""
    key = ("segment", k, n_init, tuple(grid_hw), tuple(cross_hw), tuple(size), upsample)
    if key not in pipe._cache:
        def run(self_maps, cross_maps, weights, valid, threshold, kmeans_key):
            pipe._count("segment")
            word_maps = seg.word_maps_from_tokens(cross_maps, weights)     # (B, W, Tc)

            def one(s, wm, v):
                r = seg.segment_maps(s, wm, v, kmeans_key, k=k, grid_hw=grid_hw,
                                     cross_hw=cross_hw, threshold=threshold, n_init=n_init)
                r["image_labels"] = seg.upsample_labels(r["clusters"], r["cluster_word"], k,
                                                        size, upsample)
                return r

            return jax.vmap(one)(self_maps, word_maps, valid)

        pipe._cache[key] = jax.jit(run)
    return pipe._cache[key]


def _check_common(clusters, threshold, n_init, kmeans_seed, upsample, grid_hw):
    clusters = checks.whole_number(clusters, "clusters")
    if clusters < 2:
        raise ValueError(f"clusters={clusters}: need at least 2 (one cluster is the whole "
                         "image); the reference uses 5")
    if clusters > grid_hw[0] * grid_hw[1]:
        raise ValueError(f"clusters={clusters}: more than the {grid_hw[0] * grid_hw[1]} cells "
                         f"of the {grid_hw[0]}×{grid_hw[1]} self-attention grid")
    threshold = checks.finite_number(threshold, "threshold",
                                     hint="The reference uses 0.3–0.35.")
    n_init = checks.whole_number(n_init, "n_init", minimum=1)
    kmeans_seed = checks.whole_number(kmeans_seed, "kmeans_seed", minimum=0,
                                      maximum=checks.MAX_SEED)
    if upsample not in seg.UPSAMPLE_MODES:
        raise ValueError(f"upsample={upsample!r}: choose one of {seg.UPSAMPLE_MODES}")
    return clusters, threshold, n_init, kmeans_seed


def segment_from_maps(pipe, maps: dict, prompts: Sequence[str], *, words=None, clusters: int = 5,
                 threshold: float = THRESHOLD, size: tuple[int, int] | None = None,
                 self_grid=None, cross_grid=None, n_init: int = 10, kmeans_seed: int = 1,
                 upsample: str = "nearest") -> SegmentResult:
    """Self-segmentation from captured maps (no generation): k-means + labelling, one
    compiled call vmapped over the batch.

    Args:
      pipe: the pipeline (tokenizer, compile cache).
      maps: ``{key: (B, T, S)}`` averaged maps (:func:`jattn.policy.capture.captured_maps`
        or ``SegmentResult.maps``) holding ``"self{h}x{w}"`` and ``"cross{hc}x{wc}"``.
      prompts: B prompts (their words label the clusters).
      words, clusters, threshold, n_init, kmeans_seed, upsample: see :func:`segment`.
      size: ``(H, W)`` pixels of the label maps (default the pipeline's image size).
      self_grid, cross_grid: which captured grids to use (default: the only captured self
        grid; the cross grid by the module's rule among the captured ones).
    Returns:
      :class:`SegmentResult` with ``images`` and ``latents`` None.
    Raises:
      ValueError: bad clusters/threshold/words (named), maps without the needed grids, a
        batch that differs from the prompts.
    """
    prompts = checks.prompt_list(prompts, "prompts")
    parsed = [p for p in map(parse_key, maps) if p is not None]
    selfs = sorted({g for kind, g in parsed if kind == "self"}, key=lambda g: g[0] * g[1])
    crosses = sorted({g for kind, g in parsed if kind == "cross"}, key=lambda g: g[0] * g[1])
    self_hw = _grid(self_grid, "self_grid") or (selfs[-1] if selfs else None)
    if self_hw is None or self_hw not in selfs:
        raise ValueError(f"maps: no self-attention map at {self_hw or 'any grid'} among "
                         f"{sorted(maps)}; capture it with segment_policy")
    cross_hw = _grid(cross_grid, "cross_grid")
    if cross_hw is None:
        half = (self_hw[0] // 2, self_hw[1] // 2)
        cross_hw = half if half in crosses else self_hw
    if cross_hw not in crosses:
        raise ValueError(f"maps: no cross-attention map at {cross_hw} among {sorted(maps)}")
    clusters, threshold, n_init, kmeans_seed = _check_common(
        clusters, threshold, n_init, kmeans_seed, upsample, self_hw)
    self_maps = np.asarray(maps[f"self{self_hw[0]}x{self_hw[1]}"], np.float32)
    cross_maps = np.asarray(maps[f"cross{cross_hw[0]}x{cross_hw[1]}"], np.float32)
    if self_maps.shape[0] != len(prompts) or cross_maps.shape[0] != len(prompts):
        raise ValueError(f"maps hold {self_maps.shape[0]} images for {len(prompts)} prompts")
    s = cross_maps.shape[-1]
    per, weights = resolve_words(pipe.tokenizer, prompts, words, max_len=s)
    valid = weights.sum(-1) > 0
    size = (pipe.default_size,) * 2 if size is None else (int(size[0]), int(size[1]))
    fn = _segment_fn(pipe, clusters, n_init, self_hw, cross_hw, size, upsample)
    r = jax.device_get(fn(self_maps, cross_maps, weights, valid, jnp.float32(threshold),
                          jax.random.key(kmeans_seed)))
    n_words = max(len(w) for w in per)
    scores = np.asarray(r["scores"][:, :, :n_words], np.float32).copy()
    wmaps = np.asarray(r["word_maps"][:, :n_words], np.float32).copy()
    for i, ws in enumerate(per):
        scores[i, :, len(ws):] = np.nan
        wmaps[i, len(ws):] = np.nan
    return SegmentResult(
        images=None, labels=np.asarray(r["image_labels"]).astype(np.uint8), words=per,
        scores=scores, cluster_words=np.asarray(r["cluster_word"], np.int32),
        clusters=np.asarray(r["clusters"], np.int32), word_maps=wmaps, maps=dict(maps),
        prompts=list(prompts), self_grid=self_hw, cross_grid=cross_hw)


def segment(pipe, prompt: str | Sequence[str], *, images: np.ndarray | None = None,
            clusters: int = 5, words=None, threshold: float = THRESHOLD,
            seed: int | Sequence[int] = 0, num_inference_steps: int = 50,
            guidance_scale: float = 7.5, scheduler: str | None = None,
            inversion="null-text", step_window=(0.0, 1.0), self_resolution=None,
            cross_resolution=None, n_init: int = 10, kmeans_seed: int = 1,
            upsample: str = "nearest", capture_all_cross: bool = False,
            latents: np.ndarray | None = None, height: int | None = None,
            width: int | None = None, sdxl: dict | None = None) -> SegmentResult:
    """Segment generated images — or real images through inversion — into the prompt's words.

    One compiled sampler call for the whole batch captures the maps in-graph; one compiled
    call clusters and labels every image (k-means vmapped over the batch). New prompts,
    words, seeds, images, thresholds or step windows reuse both programs (0 compilations);
    a new batch size, image size, ``clusters``, ``n_init`` or grid compiles once.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline`.
      prompt: B prompts (a str is one). With ``images``: the prompt describing each image.
      images: optional uint8 ``(B, H, W, 3)`` (or ``(H, W, 3)``) real images: they are
        inverted (``inversion``), regenerated from the inverted latents with the maps
        captured, and the reconstruction is segmented.
      clusters: K, k-means clusters (≥ 2; reference 5).
      words: the words labelling segments: None (content words of each prompt, see the
        module docstring), one list for every prompt, or one list per prompt.
      threshold: a cluster takes its best word when the score is ``> threshold`` (0.35, the
        reference's ``run_segmentation.py``; its prompt mixing uses 0.3).
      seed, num_inference_steps, guidance_scale, scheduler, latents, height, width: as
        :meth:`jattn.pipeline.Pipeline.generate` (generation only; inversion regenerates
        with DDIM at the inversion's settings).
      inversion: ``"null-text"`` (the reference's; regenerated with CFG ``guidance_scale``
        and the optimised null embeddings), ``"ddim"`` (regenerated without CFG, which
        plain DDIM inversion needs to reconstruct), or a precomputed
        :class:`jattn.sampling.inversion.Inversion` of these prompts (``images`` then
        unused).
      step_window: ``(start, end)`` fractions of the steps whose maps are averaged
        (default all steps, as the reference).
      self_resolution, cross_resolution: grids in latent cells (int side or ``(h, w)``);
        default: the module docstring's rule.
      n_init: k-means restarts (reference 10); kmeans_seed: the k-means key (reference 1,
        the same for every image).
      upsample: ``"nearest"`` (reference) or ``"bilinear"`` labels at image size.
      capture_all_cross: capture every cross-attention grid (``maps`` then allows DAAM
        heat maps, :func:`jattn.policy.analysis.word_heatmaps`).
      sdxl: SDXL only, generated images: ``Pipeline.generate``'s ``prompt_2`` and
        micro-conditioning keywords, forwarded to it (an error with ``images``).
    Returns:
      :class:`SegmentResult`.
    Raises:
      ValueError (naming the argument): ``clusters`` < 2 or more than the grid's cells; a
        word not in its prompt; a prompt without content words; a bad step window,
        threshold, inversion method or grid; images of the wrong shape or count; and
        every error of ``generate`` / ``invert``.
      TypeError: non-integer clusters, non-string words.
    """
    from jattn.sampling.inversion import Inversion, invert

    prompts = checks.prompt_list(prompt, "prompt")
    inv = inversion if isinstance(inversion, Inversion) else None
    if inv is None and not (isinstance(inversion, str) and inversion in INVERSIONS):
        raise ValueError(f"inversion={inversion!r}: choose 'null-text', 'ddim' or pass an "
                         "Inversion")
    if images is not None and inv is None:
        images = as_uint8_images(images, "images")
        if isinstance(prompt, str):
            prompts = prompts * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompt: {len(prompts)} prompts for {images.shape[0]} images; "
                             "give one prompt per image (or one for all)")
        height, width = int(images.shape[1]), int(images.shape[2])
    if inv is not None:
        if len(prompts) != inv.latents.shape[1]:
            raise ValueError(f"prompt: {len(prompts)} prompts for an inversion of "
                             f"{inv.latents.shape[1]} images")
        num_inference_steps = inv.num_inference_steps
        f = pipe.vae_scale_factor
        height, width = inv.latents.shape[2] * f, inv.latents.shape[3] * f
    b = len(prompts)
    height, width = pipe.check_size(height, width, b)
    steps = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1)
    self_hw, cross_hw, _, _ = grids(pipe, height, width, self_resolution=self_resolution,
                                    cross_resolution=cross_resolution)
    _check_common(clusters, threshold, n_init, kmeans_seed, upsample, self_hw)
    resolve_words(pipe.tokenizer, prompts, words, pipe.text_config.max_position_embeddings)
    _step_window(step_window, steps)
    gen = dict(seed=seed, scheduler=scheduler, latents=latents, uncond_per_step=None,
               guidance_scale=guidance_scale)
    if images is not None and inv is None:
        inv = invert(pipe, images, prompts, method=inversion, num_inference_steps=steps,
                     guidance_scale=guidance_scale)
    if inv is not None:
        null_text = inv.uncond_per_step is not None
        gen = dict(seed=0, scheduler="ddim", latents=inv.x_t,
                   uncond_per_step=inv.uncond_per_step,
                   guidance_scale=inv.guidance_scale if null_text else 1.0)
    cfg = gen["guidance_scale"] > 1.0 or gen["uncond_per_step"] is not None
    policy = segment_policy(pipe, b, num_steps=steps, cfg=cfg, step_window=step_window,
                            self_resolution=self_hw, cross_resolution=cross_hw,
                            capture_all_cross=capture_all_cross, height=height, width=width)
    if sdxl and inv is not None:
        raise ValueError(f"sdxl: {sorted(sdxl)} apply to generated images; a real image's "
                         "inversion fixes its conditioning (its prompt and the image's size)")
    out = pipe.generate(prompts, num_inference_steps=steps, height=height, width=width,
                        policy=policy, **gen, **(sdxl or {}))
    maps = {**captured_maps(out.aux[0]), **captured_maps(out.aux[1])}
    res = segment_from_maps(pipe, maps, prompts, words=words, clusters=clusters,
                       threshold=threshold, size=(height, width), self_grid=self_hw,
                       cross_grid=cross_hw, n_init=n_init, kmeans_seed=kmeans_seed,
                       upsample=upsample)
    return dataclasses.replace(res, images=out.images, latents=out.latents, inversion=inv)


def label_colours(n: int) -> np.ndarray:
    """uint8 ``(n + 1, 3)`` overlay colours of labels 0…n (row 0, the background, unused)."""
    return np.concatenate([np.zeros((1, 3), np.uint8), _COLOURS[np.arange(n) % len(_COLOURS)]])


def overlay_labels(image: np.ndarray, labels: np.ndarray, n_words: int,
                   alpha: float = 0.55) -> np.ndarray:
    """Colour each labelled segment over the image (background left as is).

    Args:
      image: uint8 ``(H, W, 3)``; labels: uint8 ``(H, W)`` in ``[0, n_words]``.
    Returns:
      uint8 ``(H, W, 3)``; label j in colour ``label_colours(n_words)[j]``.
    """
    img = np.asarray(image, np.float32)
    col = label_colours(n_words)[np.asarray(labels)].astype(np.float32)
    fg = (np.asarray(labels) > 0)[..., None]
    out = np.where(fg, (1 - alpha) * img + alpha * col, img)
    return np.round(out).astype(np.uint8)
