"""Nested Attention personalisation: images of a given subject in new prompts.

Source: Patashnik, Gal, Ostashev, Tulyakov, Aberman, Cohen-Or, "Nested Attention:
Semantic-aware Attention Values for Concept Personalization" (SIGGRAPH 2025); the authors'
inference release ``orpatashnik/NestedAttentionEncoder`` (not readable here, see
:mod:`jattn.policy.nested`).

This front-end composes:

* the subject encoder (:mod:`jattn.models.nested`): each subject image once through the CLIP
  vision tower + resampler -> R tokens -> nested K̃, Ṽ per cross-attention site;
* the placeholder s*: users write ``s*`` in prompts; it is replaced by the placeholder word
  (``config.placeholder_token``, ``"sks"``: one BPE token of the CLIP vocabulary) whose
  input-embedding row is replaced by the learned placeholder embedding
  (:func:`text_params_with_placeholder`; the vocabulary and shapes stay, nothing recompiles);
  its positions in the tokenized prompts are the ``positions`` of the op;
* :class:`jattn.policy.nested.NestedAttention` at every cross-attention site (conditional
  rows only), run by the one sampler loop (``Pipeline.generate(prompt_embeds=…,
  policy=…)``).

Subjects and prompts (:func:`plan_cases`): the j-th ``s*`` of a prompt is subject j. A prompt
with one ``s*`` is generated once per subject image (subject-major: every prompt for subject
0, then for subject 1, …); a prompt with k > 1 ``s*`` needs exactly k subject images and is
generated once with them (the paper's multi-subject images). Everything runs in one compiled
call; new subject images, prompts, seeds or λ never recompile (the batch size and the number
of ``s*`` slots are shapes).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.models import nested as nested_lib
from jattn.policy.core import Layout, Policy, compose
from jattn.policy.nested import nested_policy

__all__ = ["personalize", "PersonalizeOutput", "PLACEHOLDER", "DEFAULT_WEIGHTS",
           "placeholder_positions", "prepare_prompts", "plan_cases", "star_counts",
           "load_subject_images", "text_params_with_placeholder", "subject_kv",
           "personalize_policy", "load_weights"]

PLACEHOLDER = "s*"
DEFAULT_WEIGHTS = (Path(__file__).resolve().parent.parent / "assets" / "nested"
                   / "nested_attention.safetensors")
_STAR = re.compile(r"(?<![\w*])s\*(?!\w)")


@dataclasses.dataclass
class PersonalizeOutput:
    """Result of :func:`personalize`.

    Attributes:
      images: uint8 ``(B, H, W, 3)``, one per case, in :func:`plan_cases` order.
      prompts: the prompt of each image (as written, with ``s*``).
      subjects: the subject indices of each image (the j-th ``s*`` -> ``subjects[i][j]``).
      seeds: the seed of each image.
      settings: the method's settings (for result.json).
    """

    images: np.ndarray | None
    prompts: list[str]
    subjects: list[tuple[int, ...]]
    seeds: list[int]
    settings: dict
    latents: np.ndarray | None = None


# ------------------------------------------------------------------------- prompts
def placeholder_positions(tokenizer, prompts: Sequence[str], *,
                          placeholder_token: str = nested_lib.PLACEHOLDER_TOKEN,
                          max_length: int = 77, name: str = "prompts"
                          ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Replace ``s*`` and find its token positions.

    Args:
      tokenizer: the CLIP tokenizer.
      prompts: B prompts that write the subject as ``s*``.
      placeholder_token: the vocabulary word standing for s* (one BPE token).
    Returns:
      ``(texts, ids, positions)``: prompts with ``s*`` replaced, token ids ``(B, 77)`` int32,
      positions ``(B, J)`` int32 (J = the most ``s*`` in one prompt; -1 padded), in order.
    Raises:
      ValueError: a prompt without ``s*`` (names it and says how to write the subject); a
        prompt that already contains the placeholder word; a prompt over 77 tokens.
    """
    from jattn.io.tokenizer import tokenize

    ids_tok = tokenizer(placeholder_token, add_special_tokens=False)["input_ids"]
    if len(ids_tok) != 1:
        raise ValueError(f"placeholder_token {placeholder_token!r} is {len(ids_tok)} BPE tokens; "
                         "it must be one.")
    tok_id = ids_tok[0]
    star_counts(prompts, name=name)
    texts = []
    for i, p in enumerate(prompts):
        if re.search(rf"(?i)\b{re.escape(placeholder_token)}\b", p):
            raise ValueError(f"{name}[{i}] {p!r} contains {placeholder_token!r}, the word that "
                             f"stands for {PLACEHOLDER} inside jattn; rephrase it.")
        texts.append(_STAR.sub(placeholder_token, p))
    ids = tokenize(tokenizer, texts, max_length=max_length, name=name)
    counts = [int((row == tok_id).sum()) for row in ids]
    for i, (c, want) in enumerate(zip(counts, star_counts(prompts, name=name))):
        if c != want:  # a word whose BPE split ends in the placeholder token
            raise ValueError(f"{name}[{i}] {prompts[i]!r}: a word of it tokenizes to "
                             f"{placeholder_token!r}, the token that stands for "
                             f"{PLACEHOLDER}; rephrase that word.")
    pos = np.full((len(texts), max(counts)), -1, np.int32)
    for i, row in enumerate(ids):
        where = np.flatnonzero(row == tok_id)
        pos[i, : len(where)] = where
    return texts, ids, pos


def star_counts(prompts: Sequence[str], *, name: str = "prompts") -> list[int]:
    """The number of ``s*`` in each prompt (no tokenizer needed).

    Raises:
      TypeError: a prompt that is not a string.
      ValueError: a prompt without ``s*`` (names it and says how to write the subject).
    """
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__}")
        n = len(_STAR.findall(p))
        if n == 0:
            raise ValueError(f"{name}[{i}] {p!r} has no {PLACEHOLDER}: write the subject as "
                             f"{PLACEHOLDER}, e.g. \"a photo of {PLACEHOLDER} on the left on a "
                             "beige background\".")
        out.append(n)
    return out


def plan_cases(counts: Sequence[int], num_subjects: int, *, name: str = "prompts"
               ) -> list[tuple[int, tuple[int, ...]]]:
    """Which images to make: ``[(prompt_index, subject_indices), …]``.

    Prompts with one ``s*`` are made once per subject (subject-major order); a prompt with
    k > 1 ``s*`` uses subjects ``0 … k-1`` once.

    Raises:
      ValueError: no subject; a prompt with k > 1 ``s*`` but a different number of subjects
        (names the prompt, both counts, and the fix).
    """
    if num_subjects < 1:
        raise ValueError("subject_images: give at least one subject image (--subject-image).")
    single = [i for i, c in enumerate(counts) if c == 1]
    cases = [(i, (s,)) for s in range(num_subjects) for i in single]
    for i, c in enumerate(counts):
        if c > 1:
            if c != num_subjects:
                raise ValueError(
                    f"{name}[{i}] has {c} {PLACEHOLDER} placeholders but {num_subjects} subject "
                    f"image{'s were' if num_subjects != 1 else ' was'} given: the j-th "
                    f"{PLACEHOLDER} is subject image j, so give --subject-image {c} times "
                    f"(subject_images with {c} images), or write one {PLACEHOLDER} per prompt.")
            cases.append((i, tuple(range(c))))
    return sorted(cases, key=lambda c: (c[1][0] if len(c[1]) == 1 else num_subjects, c[0]))


def prepare_prompts(tokenizer, prompts, num_subjects, **kw):
    """:func:`placeholder_positions` + :func:`plan_cases` -> ``(cases, ids (B, 77),
    positions (B, J), subject_index (B, J))`` per case (B = number of cases; -1 = empty
    slot)."""
    texts, ids, pos = placeholder_positions(tokenizer, prompts, **kw)
    counts = [int((r >= 0).sum()) for r in pos]
    cases = plan_cases(counts, num_subjects, name=kw.get("name", "prompts"))
    j = pos.shape[1]
    rows_ids = np.stack([ids[i] for i, _ in cases])
    rows_pos = np.stack([pos[i] for i, _ in cases])
    subj = np.full((len(cases), j), -1, np.int32)
    for r, (_, s) in enumerate(cases):
        subj[r, : len(s)] = s
    return cases, rows_ids, rows_pos, subj


def text_params_with_placeholder(text_params, token_id: int, embedding) -> dict:
    """The text encoder's params with row ``token_id`` of the token embedding replaced by
    ``embedding`` ``(D_text,)`` (a dynamic change: the jitted text encoder does not
    recompile). An empty/None embedding leaves the params unchanged."""
    if embedding is None or np.size(embedding) == 0:
        return text_params
    tm = text_params["text_model"]
    emb = tm["embeddings"]["token_embedding"]["embedding"]
    if np.shape(embedding) != (emb.shape[1],):
        raise ValueError(f"placeholder embedding of shape {np.shape(embedding)} does not fit "
                         f"the text encoder's width {emb.shape[1]}: the weights belong to "
                         "another model.")
    new = emb.at[token_id].set(jnp.asarray(embedding, emb.dtype))
    return {**text_params, "text_model": {**tm, "embeddings": {
        **tm["embeddings"], "token_embedding": {"embedding": new}}}}


# ------------------------------------------------------------------------- subjects
def load_subject_images(images, config: nested_lib.NestedEncoderConfig, *,
                        name: str = "subject_images") -> np.ndarray:
    """Subject images -> CLIP-preprocessed ``(U, S_img, S_img, 3)`` float32.

    Accepted: paths, PIL images, uint8 arrays ``(H, W, 3|4)``. The image should show the
    subject alone, roughly centred: it is resized (shorter side to the encoder's
    ``resize_edge``, default S_img) and centre-cropped to S_img, so with the bundled encoder
    (``resize_edge`` 128, S_img 64) the subject should lie in the centre half of the image,
    as the world's subject images (an object 17–38 px wide in 128²).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: unreadable, or of the wrong size: smaller than S_img/2 on a side or more
        than 2:1 (the centre crop would cut the subject) — names the image and the fix.
    """
    from PIL import Image

    from jattn.models.clip_vision import _to_rgb_pil, preprocess_clip_image

    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        images = [images]
    out = []
    lo = max(8, config.image_size // 2)
    for i, im in enumerate(images):
        what = f"{name}[{i}]" + (f" {os.fspath(im)!r}" if isinstance(im, (str, os.PathLike))
                                 else "")
        if isinstance(im, (str, os.PathLike)):
            p = Path(im)
            if not p.exists():
                raise FileNotFoundError(f"{what}: no such file.")
            if not p.is_file():
                raise ValueError(f"{what}: not a file; give a PNG/JPEG image of the subject.")
        try:
            pil = _to_rgb_pil(im)
        except ValueError as e:
            raise ValueError(f"{what}: cannot be read as an image ({e}).") from None
        w, h = pil.size
        if min(w, h) < lo or max(w, h) > 2 * min(w, h):
            raise ValueError(f"{what}: {w}×{h} pixels is the wrong size for a subject image: "
                             f"it must be at least {lo} px on each side and at most 2:1 (the "
                             f"encoder sees a centre crop of it). Crop the "
                             "image around the subject.")
        out.append(preprocess_clip_image(pil if isinstance(pil, Image.Image) else im,
                                         config.processing))
    return np.stack(out)


def _encoder_fn(pipe, config: nested_lib.NestedEncoderConfig):
    key = ("nested_encoder", config)
    if key not in pipe._cache:
        sites = tuple(pipe.sites())

        def run(params, pixels):
            pipe._count("nested_encoder")
            tokens = nested_lib.encode_subjects(params, config, pixels)
            return nested_lib.nested_kv(params, tokens, sites)

        pipe._cache[key] = jax.jit(run)
    return pipe._cache[key]


def subject_kv(pipe, weights: nested_lib.NestedWeights, pixels) -> tuple[dict, dict]:
    """Nested keys/values ``{site_path: (U, R, N, H)}`` of U preprocessed subject images,
    the encoder run once per subject (jitted, cached on the pipeline)."""
    return _encoder_fn(pipe, weights.config)(weights.params, jnp.asarray(pixels, jnp.float32))


def personalize_policy(pipe, keys: dict, values: dict, positions, subject_index, *,
                       scale: float = 1.0, layout: Layout | None = None) -> Policy:
    """:func:`jattn.policy.nested.nested_policy` with per-subject K̃/Ṽ ``(U, R, N, H)``
    gathered per row: ``subject_index`` ``(B, J)`` (-1 = empty slot), ``positions``
    ``(B, J)``."""
    subj = jnp.asarray(subject_index, jnp.int32)
    pos = jnp.where(subj >= 0, jnp.asarray(positions, jnp.int32), -1)
    idx = jnp.clip(subj, 0, None)
    rows_k = {s: a[idx] for s, a in keys.items()}
    rows_v = {s: a[idx] for s, a in values.items()}
    layout = layout or Layout(groups=int(subj.shape[0]), members=1, cfg=True)
    return nested_policy(pipe.sites(), rows_k, rows_v, pos, scale=scale, layout=layout,
                         context_tokens=pipe.text_config.max_position_embeddings)


def _placeholder_text_params(pipe, w: nested_lib.NestedWeights) -> dict:
    """The text encoder's params with the placeholder row, cached per (weights, text params)
    on the pipeline (one copy of the embedding table per weights, not per call)."""
    emb = w.params.get("placeholder", {}).get("text_encoder")
    base = pipe.params["text_encoder"]
    key = ("nested_text_params", id(emb), id(base), w.config.placeholder_token)
    hit = pipe._cache.get(key)
    if hit is None or hit[0] is not emb or hit[1] is not base:
        ids = pipe.tokenizer(w.config.placeholder_token, add_special_tokens=False)["input_ids"]
        hit = (emb, base, text_params_with_placeholder(base, ids[0], emb))
        pipe._cache[key] = hit
    return hit[2]


def load_weights(weights) -> nested_lib.NestedWeights:
    """``None`` -> the shipped default (:data:`DEFAULT_WEIGHTS`), a path -> that file, a
    :class:`NestedWeights` as is."""
    if isinstance(weights, nested_lib.NestedWeights):
        return weights
    return nested_lib.load_nested_weights(DEFAULT_WEIGHTS if weights is None else weights)


# ------------------------------------------------------------------------- API
def personalize(pipe, subject_images, prompts: str | Sequence[str], seeds: int | Sequence[int]
                = 0, *, weights: Any = None, scale: float = 1.0, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, scheduler: str | None = None,
                negative_prompt: str = "", extra_policy: Policy | None = None,
                decode: bool = True) -> PersonalizeOutput:
    """Images of the subject(s) in ``subject_images`` in the scenes of ``prompts``.

    Args:
      pipe: a loaded :class:`jattn.pipeline.Pipeline`.
      subject_images: one image or a list (paths, PIL images, uint8 arrays).
      prompts: prompts writing the subject as ``s*`` (see :func:`plan_cases`).
      seeds: an int (image i uses seed + i) or one per image.
      weights: a weights file path, a :class:`jattn.models.nested.NestedWeights`, or None
        (the shipped default, :data:`DEFAULT_WEIGHTS`).
      scale: λ on the nested value V* (1 = the paper).
      extra_policy: a policy composed after Nested Attention, whose layout (groups ×
        members = the number of images, rows in :func:`plan_cases` order) the call adopts,
        e.g. ``style_aligned_policy(pipe, members=n, num_steps=…)`` (the subject in one
        style, image 0 the style reference) or a Prompt-to-Prompt policy.
    Returns:
      :class:`PersonalizeOutput`.
    Raises:
      FileNotFoundError: weights missing (says how to train or pass ``weights``), a subject
        image path missing.
      ValueError: an SDXL pipeline (no SDXL Nested Attention weights exist yet).
      ValueError: a prompt without ``s*``; k > 1 ``s*`` with another number of subject
        images; an unreadable or wrong-size subject image; weights for another model.
    """
    from jattn.io.checks import prompt_list, seed_list

    if getattr(pipe, "is_sdxl", False):  # issue 16: no SDXL encoder weights yet
        raise ValueError(
            f"personalize: {pipe.source} is an SDXL model; Nested Attention's encoder and "
            "placeholder embedding are trained for one CLIP text encoder and the SD1-family "
            "UNet (jattn.train.personalize), and no SDXL weights (two text encoders, "
            "2048-wide context) exist yet. Fix: use an SD1/SD2 model (e.g. the bundled one), "
            "or train weights for this SDXL model first.")
    prompts = prompt_list(prompts, "prompts")
    w = load_weights(weights)
    cfg = w.config
    pixels = load_subject_images(subject_images, cfg)
    cases, ids, pos, subj = prepare_prompts(pipe.tokenizer, prompts, len(pixels),
                                            placeholder_token=cfg.placeholder_token,
                                            max_length=pipe.text_config.max_position_embeddings)
    b = len(cases)
    seed_vals = seed_list(seeds, b, "seeds")
    text_params = _placeholder_text_params(pipe, w)
    cond = pipe._text_fn()(text_params, jnp.asarray(ids))
    keys, values = subject_kv(pipe, w, pixels)
    do_cfg = float(guidance_scale) > 1.0  # the pipeline's rule
    layout = Layout(groups=b, members=1, cfg=do_cfg)
    if extra_policy is not None:
        layout = extra_policy.layout
        if layout.groups * layout.members != b or layout.cfg != do_cfg:
            raise ValueError(
                f"extra_policy: its layout {layout} does not fit the {b} images of this call "
                f"(groups × members must be {b}, cfg {do_cfg}); build it for the cases of "
                "plan_cases (e.g. style_aligned_policy(pipe, members=number of images)).")
    pol = personalize_policy(pipe, keys, values, pos, subj, scale=scale, layout=layout)
    if extra_policy is not None:
        pol = compose(pol, extra_policy)
    uncond = pipe.encode_prompts([negative_prompt] * b, name="negative_prompt")
    out = pipe.generate([prompts[i] for i, _ in cases], prompt_embeds=cond, uncond_embeds=uncond,
                        seed=seed_vals, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, scheduler=scheduler, policy=pol,
                        decode=decode)
    settings = dict(method="nested_attention", weights=w.source, scale=float(scale),
                    placeholder=cfg.placeholder_token, subject_tokens=cfg.num_tokens,
                    encoder_image_size=cfg.image_size, steps=num_inference_steps,
                    guidance_scale=float(guidance_scale), cfg_halves="conditional only")
    return PersonalizeOutput(images=out.images, prompts=[prompts[i] for i, _ in cases],
                             subjects=[s for _, s in cases], seeds=seed_vals,
                             settings=settings, latents=out.latents)
