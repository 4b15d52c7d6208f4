"""CLIP-style pretraining of the subject encoder's vision tower on the world.

Nested Attention (Patashnik et al., SIGGRAPH 2025) and IP-Adapter put a *pretrained,
frozen* CLIP image encoder (OpenAI/LAION ViT-H/14) in front of their resampler: the image
features already name what the subject is. The bundled model has no such tower, and a
tower trained from scratch through the diffusion loss alone learnt colour but not shape
(the session-11 evaluation: identity 0.09, colour 0.73). This module gives the bundled
encoder the same kind of prior, the way CLIP got it: a contrastive image–text objective,
here between the tower's ``image_embeds`` and the **frozen bundled text encoder**'s pooled
embedding (``pooler_output``, through a learned bias-free ``text_projection``) of the
subject's words ("a large red outlined circle", :func:`jattn.world.pairs.subject_phrase`).

Objective: the softmax over every phrase of the training subjects (the CLIP zero-shot
classifier's form, Radford et al. 2021 §3.1.4, trained as a classifier):
``logits = exp(logit_scale) · norm(image_embeds) · norm(text_features · W)ᵀ``, cross entropy
with the subject's phrase. The phrase softmax alone learns conjunctions (a "red star"
feature): on held-out (colour, shape) pairs a linear probe reads shape at chance (0.22 from
the pooled output, measured). Two more terms push the features to factorise: linear heads
for colour, shape, fill and size (``attribute_weight``), and greyscale rows under a random
luminance map (``gray_fraction``) that train the shape/fill/size heads without colour. They
do not untangle the colour view (held-out shape probe 0.11 after 800 steps) but the
luminance view reads shape on held-out pairs (0.55), hence the encoder's
``achromatic_view``. Images: the subject images of ``make_pairs(B, data_seed, "train",
start=step·B)`` (:mod:`jattn.world.pairs`; held-out subjects are never seen), with
the encoder's own preprocessing (:attr:`NestedEncoderConfig.processing`).

Train state, optimizer, checkpoints, loop and metrics are the bundled model's
(:mod:`jattn.train.steps`, :mod:`jattn.train.checkpointing`, :mod:`jattn.train.loop`); the
result is the tower in transformers' ``CLIPVisionModelWithProjection`` layout
(:func:`jattn.models.clip_vision.clip_vision_state_dict`), which
:class:`jattn.train.personalize.PersonalizeConfig` ``vision_init`` loads.

:func:`attribute_accuracy` measures what a tower's features carry: zero-shot (the phrase
argmax over all 40 subject pairs, held-out ones included) and linear probes (logistic
regression per attribute on mean-pooled ``hidden_states[feature_layer]``, fitted on
training subjects, scored on held-out subjects).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.models import clip_text as clip_lib
from jattn.models import nested as nested_lib
from jattn.models.clip_vision import (CLIPVisionModelWithProjection, clip_vision_state_dict,
                                      init_clip_vision_params, preprocess_clip_images)
from jattn.train.checkpointing import StageCheckpoints
from jattn.train.loop import StopFlag, run_steps
from jattn.train.steps import _optimizer_step, init_state, lr_schedule, make_optimizer

Array = jax.Array

__all__ = ["VisionPretrainConfig", "subject_phrases", "text_features", "init_params",
           "contrastive_loss", "make_step", "subject_batch", "train", "export_tower",
           "tower_features", "attribute_accuracy"]

_STREAM = 17
ATTRIBUTES = ("color", "shape", "fill", "size")


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
    """The recipe (hashable).

    Attributes:
      encoder: the subject encoder whose tower is trained (its ``vision`` config and
        preprocessing); None = ``NestedEncoderConfig.bundled(96)``.
      seed, data_seed: init / the subject images (``make_pairs(B, data_seed, "train",
        start=step·B)``).
      batch_size, steps, lr, warmup_steps, weight_decay, grad_clip: AdamW, warmup then
        cosine to 10 %.
      init_temperature: initial softmax temperature (CLIP's 0.07).
      attribute_weight: weight of the factorised attribute heads (linear classifiers of
        colour, shape, fill and size on the pooled output, cross entropy averaged over the
        four); 0 = the phrase objective alone.
      gray_fraction: fraction of each batch shown in greyscale (luminance in all three
        channels, under a random affine map so the grey level does not tell the colour);
        those rows train the shape, fill and size heads only (no phrase, no colour), so
        shape must be read without colour.
      checkpoint_every, keep_checkpoints, log_every: cadences.
    """

    encoder: Any = None
    seed: int = 0
    data_seed: int = 7
    batch_size: int = 128
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    init_temperature: float = 0.07
    attribute_weight: float = 1.0
    gray_fraction: float = 0.5
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10

    def replace(self, **kw) -> "VisionPretrainConfig":
        return dataclasses.replace(self, **kw)

    def encoder_config(self, context_dim: int = 96) -> nested_lib.NestedEncoderConfig:
        return self.encoder or nested_lib.NestedEncoderConfig.bundled(context_dim)


def subject_phrases(pairs) -> tuple[list[str], dict[tuple, int]]:
    """Every subject phrase of ``pairs`` ((colour, shape) tuples) × fills × sizes (no
    outlined ring), and ``{(colour, shape, fill, size): index}``."""
    from types import SimpleNamespace

    from jattn.world.pairs import subject_phrase
    from jattn.world.spec import FILLS, SIZES

    phrases, index = [], {}
    for color, shape in pairs:
        for fill in FILLS:
            if shape == "ring" and fill == "outlined":
                continue
            for size in SIZES:
                index[(color, shape, fill, size)] = len(phrases)
                phrases.append(subject_phrase(SimpleNamespace(color=color, shape=shape,
                                                              size=size, fill=fill)))
    return phrases, index


def text_features(pipe_or_base, phrases: list[str]) -> np.ndarray:
    """Frozen pooled text embeddings ``(P, D)`` float32 of ``phrases`` (the base model's
    text encoder, ``pooler_output``)."""
    tok, cfg = pipe_or_base.tokenizer, pipe_or_base.text_config
    ids = np.asarray(tok(phrases, padding="max_length", max_length=cfg.max_position_embeddings,
                         truncation=True)["input_ids"], np.int32)
    fn = jax.jit(lambda p, i: clip_lib.CLIPTextModel(cfg).apply({"params": p}, i)["pooler_output"])
    return np.asarray(fn(pipe_or_base.params["text_encoder"], ids), np.float32)


def _vocab() -> dict[str, tuple]:
    from jattn.world.spec import COLORS, FILLS, SHAPES, SIZES

    return {"color": COLORS, "shape": SHAPES, "fill": FILLS, "size": SIZES}


def init_params(cfg: VisionPretrainConfig, text_dim: int) -> dict:
    """``{"image_encoder", "text_projection" (D, E), "logit_scale" (), "heads": {attribute:
    {"kernel" (D_v, K), "bias" (K,)}}}`` (a pure function of ``cfg.seed``)."""
    enc = cfg.encoder_config()
    key = jax.random.fold_in(jax.random.key(cfg.seed), _STREAM)
    k_v, k_t, k_h = jax.random.split(key, 3)
    e, d = enc.vision.projection_dim, enc.vision.hidden_size
    heads = {a: {"kernel": jax.random.normal(jax.random.fold_in(k_h, i), (d, len(v)),
                                             jnp.float32) * 0.01,
                 "bias": jnp.zeros((len(v),), jnp.float32)}
             for i, (a, v) in enumerate(_vocab().items())}
    return {"image_encoder": init_clip_vision_params(enc.vision, k_v),
            "text_projection": jax.random.normal(k_t, (text_dim, e), jnp.float32) / np.sqrt(
                text_dim),
            "logit_scale": jnp.asarray(np.log(1.0 / cfg.init_temperature), jnp.float32),
            "heads": heads}


def _normalize(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def _ce(logits: Array, labels: Array) -> Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def _masked_mean(x: Array, w: Array) -> Array:
    """Mean of ``x`` over the rows of weight ``w`` (0 when no row counts)."""
    return jnp.sum(w * x) / jnp.maximum(w.sum(), 1.0)


def contrastive_loss(params, pixels: Array, labels: Array, text: Array, attrs=None,
                     gray=None, *, enc: nested_lib.NestedEncoderConfig,
                     attribute_weight: float = 0.0) -> tuple[Array, dict]:
    """Cross entropy of each image over all phrases (+ the attribute heads).

    Args:
      pixels: ``(B, S_img, S_img, 3)`` preprocessed subject images.
      labels: ``(B,)`` int32 phrase index.
      text: ``(P, D)`` frozen pooled text embeddings.
      attrs: ``{"color", "shape", "fill", "size"}`` ``(B,)`` int32 (with
        ``attribute_weight``).
      gray: ``(B,)`` bool, greyscale rows (no phrase or colour term); None = none.
    Returns:
      ``(loss, {"accuracy", "temperature", "phrase_loss", "<attribute>_accuracy"})``.
    """
    out = CLIPVisionModelWithProjection(enc.vision).apply(
        {"params": params["image_encoder"]}, pixels)
    img = out["image_embeds"]
    txt = _normalize(jax.lax.stop_gradient(text) @ params["text_projection"])
    scale = jnp.exp(jnp.clip(params["logit_scale"], 0.0, np.log(100.0)))
    logits = scale * _normalize(img) @ txt.T
    colour_rows = (jnp.ones(labels.shape, jnp.float32) if gray is None
                   else 1.0 - gray.astype(jnp.float32))
    phrase = _masked_mean(_ce(logits, labels), colour_rows)
    acc = _masked_mean(jnp.argmax(logits, -1) == labels, colour_rows)
    metrics = {"accuracy": acc, "temperature": 1.0 / scale, "phrase_loss": phrase}
    loss = phrase
    if attribute_weight:
        terms = []
        for a, h in params["heads"].items():
            lg = out["pooler_output"] @ h["kernel"] + h["bias"]
            w = colour_rows if a == "color" else jnp.ones_like(colour_rows)
            terms.append(_masked_mean(_ce(lg, attrs[a]), w))
            metrics[f"{a}_accuracy"] = _masked_mean(jnp.argmax(lg, -1) == attrs[a], w)
        loss = loss + attribute_weight * sum(terms) / len(terms)
    return loss, metrics


def make_step(cfg: VisionPretrainConfig, text: np.ndarray):
    """``(jitted step(state, pixels, labels, attrs, gray) -> (state, metrics), optimizer)``
    (arguments as :func:`contrastive_loss`'s)."""
    enc = cfg.encoder_config()
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.steps, 0.1, "cosine")
    tx = make_optimizer(schedule, cfg.weight_decay, cfg.grad_clip)
    text = jnp.asarray(text)

    def step_fn(state, pixels, labels, attrs, gray):
        return _optimizer_step(
            state, lambda p: contrastive_loss(p, pixels, labels, text, attrs, gray, enc=enc,
                                              attribute_weight=cfg.attribute_weight),
            tx, schedule, 0.0)

    return jax.jit(step_fn, donate_argnums=0), tx


def subject_batch(enc: nested_lib.NestedEncoderConfig, index: dict, n: int, seed: int,
                  split: str = "train", start: int = 0, gray=None
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(pixels (n, S_img, S_img, 3), phrase labels (n,), attribute labels
    {"color", "shape", "fill", "size"} (n,) int)`` of ``make_pairs(n, seed, split, start)``'s
    subject images (labels: indices into the world's COLORS, SHAPES, FILLS, SIZES); rows of
    the bool mask ``gray`` are turned to greyscale first (ITU-R 601 luminance under a random
    affine map per image: gain ±[0.5, 1.5] about mid-grey, offset ±60; a pure function of
    ``(seed, start)``)."""
    from jattn.world.pairs import make_pairs
    from jattn.world.spec import COLORS, FILLS, SHAPES, SIZES

    d = make_pairs(n, seed, split, start=start)
    attrs = {a: d[f"subject_{a}"] for a in ATTRIBUTES}
    labels = np.array([index.get((COLORS[c], SHAPES[s], FILLS[f], SIZES[z]), -1)
                       for c, s, f, z in zip(*(attrs[a] for a in ATTRIBUTES))], np.int32)
    images = d["subject_images"]
    if gray is not None and np.any(gray):
        # luminance under a random affine map per image (sign, gain, offset): the grey level
        # of an object must not tell its colour (each named colour has its own luminance)
        rng = np.random.default_rng((seed, _STREAM, start))
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        gain = rng.uniform(0.5, 1.5, n) * sign
        offset = rng.uniform(-60.0, 60.0, n)
        lum = images.astype(np.float32) @ np.array(nested_lib.LUMA_601, np.float32)
        lum = 127.5 + gain[:, None, None] * (lum - 127.5) + offset[:, None, None]
        lum = np.repeat(np.clip(np.round(lum), 0, 255).astype(np.uint8)[..., None], 3, -1)
        images = np.where(np.asarray(gray)[:, None, None, None], lum, images)
    pixels = preprocess_clip_images(list(images), enc.processing)
    return pixels, labels, attrs


def train(cfg: VisionPretrainConfig, base, workdir: str | Path, *, stop: StopFlag | None = None,
          progress: bool = True) -> tuple[dict, bool]:
    """Train (or resume) in ``workdir`` (``ckpt/``, ``metrics.jsonl``, ``config.json``);
    ``base``: anything with the frozen text encoder (``tokenizer``, ``text_config``,
    ``params["text_encoder"]``, e.g. a :class:`jattn.pipeline.Pipeline`). Returns
    ``(state, finished)``."""
    from jattn.world.pairs import subject_pairs

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enc = cfg.encoder_config()
    phrases, index = subject_phrases(subject_pairs("train"))
    text = text_features(base, phrases)
    step_fn, tx = make_step(cfg, text)
    state = init_state(init_params(cfg, text.shape[1]), tx)
    ckpts = StageCheckpoints(workdir / "ckpt", keep=cfg.keep_checkpoints)
    if ckpts.latest_step() is not None:
        state = ckpts.restore(state)
    (workdir / "config.json").write_text(json.dumps(
        {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "encoder"},
         "encoder": json.loads(enc.to_json()), "phrases": len(phrases)}, indent=1))

    def batch_fn(step):
        rng = np.random.default_rng((cfg.data_seed, _STREAM, step))
        gray = rng.random(cfg.batch_size) < cfg.gray_fraction
        px, lab, attrs = subject_batch(enc, index, cfg.batch_size, cfg.data_seed,
                                       start=step * cfg.batch_size, gray=gray)
        return (jnp.asarray(px), jnp.asarray(lab),
                {a: jnp.asarray(v, jnp.int32) for a, v in attrs.items()}, jnp.asarray(gray))

    try:
        return run_steps(name="vision pretrain", state=state, step_fn=step_fn, batch_fn=batch_fn,
                         total_steps=cfg.steps, checkpoints=ckpts,
                         metrics_path=workdir / "metrics.jsonl", log_every=cfg.log_every,
                         checkpoint_every=cfg.checkpoint_every, stop=stop, progress=progress)
    finally:
        ckpts.close()


def export_tower(path: str | Path, params) -> Path:
    """Write the tower (``params["image_encoder"]``) as transformers'
    ``CLIPVisionModelWithProjection`` safetensors."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(clip_vision_state_dict(params["image_encoder"]), str(path))
    return path


@functools.lru_cache(maxsize=4)
def _features_fn(enc: nested_lib.NestedEncoderConfig):
    def fn(p, px):
        out = CLIPVisionModelWithProjection(enc.vision).apply(
            {"params": p}, px, output_hidden_states=True)
        return {"tokens": out["hidden_states"][enc.feature_layer][:, 1:].mean(1),
                "pooled": out["pooler_output"], "embeds": out["image_embeds"]}
    return jax.jit(fn)


def tower_features(tower_params, enc: nested_lib.NestedEncoderConfig, pixels: np.ndarray,
                   chunk: int = 256) -> dict[str, np.ndarray]:
    """``{"tokens": mean-pooled hidden_states[feature_layer] patch tokens (n, D), "pooled":
    pooler_output (n, D), "embeds": image_embeds (n, E)}``."""
    fn = _features_fn(enc)
    outs = [fn(tower_params, jnp.asarray(pixels[i: i + chunk]))
            for i in range(0, len(pixels), chunk)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def attribute_accuracy(tower_params, enc: nested_lib.NestedEncoderConfig, *, base=None,
                       text_projection=None, heads=None, n_train: int = 2048,
                       n_test: int = 512, seed: int = 99) -> dict[str, float]:
    """What the tower's features say about held-out subjects (colour/shape/fill/size):

    * ``probe_<attr>`` / ``probe_pooled_<attr>``: logistic regression (scikit-learn) on
      mean-pooled ``hidden_states[feature_layer]`` patch tokens (what the resampler reads) /
      on the pooled output, fitted on ``n_train`` training subjects, accuracy on ``n_test``
      held-out subjects (pairs never seen);
    * with ``base`` and ``text_projection``: ``zero_shot_<attr>``, the attribute of the
      nearest phrase among all 40 subject pairs' phrases (held-out pairs included);
    * with ``enc.achromatic_view``: ``probe_gray_<attr>`` / ``probe_gray_pooled_<attr>``, the
      same on the luminance view;
    * with ``heads`` (the pretraining's attribute heads): ``head_<attr>``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from jattn.world.pairs import subject_pairs

    _, tr_index = subject_phrases(subject_pairs("train"))
    px_tr, _, a_tr = subject_batch(enc, tr_index, n_train, seed, "train")
    px_te, _, a_te = subject_batch(enc, tr_index, n_test, seed, "heldout")
    f_tr = tower_features(tower_params, enc, px_tr)
    f_te = tower_features(tower_params, enc, px_te)
    probes = [("tokens", "probe"), ("pooled", "probe_pooled")]
    if enc.achromatic_view:  # the luminance view the resampler also reads
        for f, px in ((f_tr, px_tr), (f_te, px_te)):
            g = tower_features(tower_params, enc, np.asarray(
                nested_lib.achromatic(jnp.asarray(px), enc.processing)))
            f.update(gray_tokens=g["tokens"], gray_pooled=g["pooled"])
        probes += [("gray_tokens", "probe_gray"), ("gray_pooled", "probe_gray_pooled")]
    out = {}
    for feat, name in probes:
        sc = StandardScaler().fit(f_tr[feat])
        for a in ATTRIBUTES:
            clf = LogisticRegression(max_iter=2000).fit(sc.transform(f_tr[feat]), a_tr[a])
            out[f"{name}_{a}"] = float(np.mean(clf.predict(sc.transform(f_te[feat])) == a_te[a]))
    if heads is not None:
        for a in ATTRIBUTES:
            lg = f_te["pooled"] @ np.asarray(heads[a]["kernel"]) + np.asarray(heads[a]["bias"])
            out[f"head_{a}"] = float(np.mean(np.argmax(lg, -1) == a_te[a]))
    if base is not None and text_projection is not None:
        pairs = tuple(subject_pairs("train")) + tuple(subject_pairs("heldout"))
        phrases, index = subject_phrases(pairs)
        keys = list(index)
        txt = text_features(base, phrases) @ np.asarray(text_projection)
        txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
        e_te = f_te["embeds"]
        pred = np.argmax(e_te / np.linalg.norm(e_te, axis=-1, keepdims=True) @ txt.T, -1)
        vocab = _vocab()
        for j, a in enumerate(ATTRIBUTES):
            got = np.array([vocab[a].index(keys[k][j]) for k in pred])
            out[f"zero_shot_{a}"] = float(np.mean(got == a_te[a]))
    return out
