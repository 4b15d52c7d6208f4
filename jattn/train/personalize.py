"""Training of the encoder-based personalisation methods on the world's pairs.

Three variants, trained on the same data (:mod:`jattn.world.pairs`) with the same encoder
(CLIP vision tower + perceiver resampler, :mod:`jattn.models.nested`), the same steps,
batch, optimizer and loss, so that the paper's comparison can be measured here:

``nested``
    Nested Attention (Patashnik et al., SIGGRAPH 2025): R subject tokens, per
    cross-attention site nested K̃/Ṽ projections (initialised from the site's to_k/to_v),
    the value of s* replaced per query (:class:`jattn.policy.nested.NestedAttention`); s*
    is the placeholder word (``"sks"``) whose input embedding is a learned vector.
``token``
    A single learned subject token (textual-inversion / PhotoMaker-like): the encoder
    (resampler with one query, output width = the text encoder's) predicts the input
    embedding of s* per subject (``CLIPTextModel(inputs_embeds=…)``); no policy.
``ip_adapter``
    Decoupled image cross-attention (IP-Adapter, Ye et al. 2023): R subject tokens as extra
    keys/values with their own projections ``to_k_ip``/``to_v_ip`` at every cross-attention
    site (initialised from to_k/to_v), ``out = Attn(q, K_txt, V_txt) + λ·Attn(q, K_img,
    V_img)`` (:class:`jattn.policy.decoupled.DecoupledImageAttention`); the caption still
    names the subject by s* with a learned embedding (as ``nested``), so the two variants
    differ only in how the image enters the attention.

The UNet, the text encoder and the VAE are frozen (the bundled model by default); the VAE
encodes the target images (posterior mean, scaled). Loss: the base model's own objective
(v- or epsilon-prediction on its training schedule, from ``scheduler_config``) with
Min-SNR-γ weights (:func:`jattn.train.steps.diffusion_loss`'s form), t uniform.

Train state, optimizer, checkpoints, loop and metrics are the bundled model's
(:mod:`jattn.train.steps`, :mod:`jattn.train.checkpointing`, :mod:`jattn.train.loop`):
AdamW with warmup, EMA of the trained params (exported), Orbax ``CheckpointManager``,
``metrics.jsonl``; the batch of step s is a pure function of ``(data_seed, s)`` and the
step's randomness of ``(seed, s)``, so a resumed run equals an uninterrupted one.

Weights files (:func:`export_weights`): ``nested`` in the layout of
:func:`jattn.models.nested.save_nested_weights`; the baselines in the same layout with
``ip_adapter.<site path>.to_{k,v}_ip.weight`` (torch ``(out, in)``) for ``ip_adapter`` and
no per-site keys for ``token``, metadata ``jattn_personalize`` = JSON ``{"format": 1,
"variant", "ip_scale", "encoder": <NestedEncoderConfig JSON>}`` (:func:`load_weights`).

Legend: B batch, R subject tokens, S text tokens, D text width, N heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.models import clip_text as clip_lib
from jattn.models import nested as nested_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.policy.core import Layout, Select, resolve
from jattn.policy.decoupled import DecoupledImageAttention
from jattn.policy.nested import nested_policy
from jattn.train.checkpointing import StageCheckpoints
from jattn.train.loop import StopFlag, run_steps
from jattn.train.steps import _optimizer_step, _step_key, init_state, lr_schedule, make_optimizer

Array = jax.Array

__all__ = ["VARIANTS", "PersonalizeConfig", "BaseModel", "base_from_pipeline", "encoder_config",
           "init_params", "personalize_loss", "make_step", "pair_batch", "train",
           "export_weights", "load_weights", "weights_state_dict", "generate", "load_tower",
           "variant_conditioning", "validation_loss"]

VARIANTS = ("nested", "token", "ip_adapter")
_STREAM = 13
_META_KEY = "jattn_personalize"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PersonalizeConfig:
    """The recipe of one variant (hashable: keys the compiled step).

    Attributes:
      variant: one of :data:`VARIANTS`.
      encoder: the subject encoder's sizes; None = ``NestedEncoderConfig.bundled(D_ctx)``.
        The ``token`` variant uses it with one query and output width D_text
        (:func:`encoder_config`).
      seed: init and per-step randomness (timesteps, noise).
      data_seed: the pairs (``make_pairs(B, data_seed, "train", start=step·B)``).
      batch_size, steps: pairs per step, optimizer steps.
      lr, warmup_steps, weight_decay, grad_clip: AdamW, linear warmup then constant.
      ema_decay: EMA of the trained params (exported).
      snr_gamma: Min-SNR-γ weighting (0 = plain MSE).
      ip_scale: λ of the ``ip_adapter`` variant (IP-Adapter trains with 1).
      subject_loss_weight: α of the subject-region weighting: the squared error of each
        latent cell is weighted ``1 + α·m`` (m: the fraction of the cell inside the subject's
        box in the target) and normalised by the mean weight, so a subject of ~4 % of the
        image (the world's objects) gets about half the loss at α = 20 instead of 4 %;
        0 = the plain objective.
      vision_init: a pretrained vision tower (transformers' ``CLIPVisionModelWithProjection``
        safetensors, e.g. :func:`jattn.train.vision_pretrain.export_tower`'s) that replaces
        the random one and stays **frozen**, as the pretrained CLIP tower of Nested Attention
        and IP-Adapter; None = a random tower trained with the rest.
      checkpoint_every, keep_checkpoints, log_every: cadences.
    """

    variant: str = "nested"
    encoder: Any = None
    seed: int = 0
    data_seed: int = 0
    batch_size: int = 8
    steps: int = 3000
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    ip_scale: float = 1.0
    subject_loss_weight: float = 0.0
    vision_init: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: use one of {VARIANTS}")

    def replace(self, **kw) -> "PersonalizeConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class BaseModel:
    """The frozen model trained against: configs, params, tokenizer, noise schedule.

    Attributes:
      alphas_bar: float32 ``(T,)`` of the model's training schedule.
      prediction_type: ``"epsilon"`` or ``"v_prediction"``.
      sample_size: latent side (h = w) of the targets.
    """

    unet_config: unet_lib.UNetConfig
    vae_config: vae_lib.VAEConfig
    text_config: clip_lib.CLIPTextConfig
    params: dict  # {"unet", "vae", "text_encoder"}
    tokenizer: Any
    alphas_bar: np.ndarray
    prediction_type: str
    sample_size: int

    @functools.cached_property
    def sites(self) -> tuple:
        return tuple(unet_lib.list_sites(self.unet_config, self.sample_size))


def base_from_pipeline(pipe) -> BaseModel:
    """The frozen base of a loaded :class:`jattn.pipeline.Pipeline` (float32)."""
    from jattn.sampling import schedulers as sch

    sc = pipe.scheduler_config
    return BaseModel(unet_config=pipe.unet_config, vae_config=pipe.vae_config,
                     text_config=pipe.text_config, params=pipe.params, tokenizer=pipe.tokenizer,
                     alphas_bar=np.asarray(sch._alphas_cumprod(sc), np.float32),
                     prediction_type=sc.prediction_type,
                     sample_size=pipe.unet_config.sample_size)


def encoder_config(cfg: PersonalizeConfig, base: BaseModel) -> nested_lib.NestedEncoderConfig:
    """The variant's encoder: the configured (or bundled-size) one; for ``token`` one query
    of the text encoder's width."""
    enc = cfg.encoder or nested_lib.NestedEncoderConfig.bundled(
        base.unet_config.cross_attention_dim)
    if cfg.variant == "token":
        enc = dataclasses.replace(enc, resampler=dataclasses.replace(
            enc.resampler, num_queries=1, output_dim=base.text_config.hidden_size))
    return enc


def _token_id(base: BaseModel, enc: nested_lib.NestedEncoderConfig) -> int:
    return base.tokenizer(enc.placeholder_token, add_special_tokens=False)["input_ids"][0]


def _token_table(base: BaseModel) -> Array:
    return base.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]


def init_params(cfg: PersonalizeConfig, base: BaseModel) -> dict:
    """Fresh trained params of the variant (a pure function of ``cfg.seed``).

    ``nested``: :func:`jattn.models.nested.init_nested_params` (encoder, ``nested``
    projections from to_k/to_v, ``placeholder`` from the initializer word's embedding).
    ``ip_adapter``: the same with the per-site projections under ``"ip"``. ``token``: the
    encoder only; its output LayerNorm starts at the initializer word's embedding (bias)
    with the gain of the embedding table's spread, so s* starts as a plausible word.
    """
    enc = encoder_config(cfg, base)
    key = jax.random.fold_in(jax.random.key(cfg.seed), _STREAM)
    cross = [s for s in base.sites if s.kind == "cross"]
    p = nested_lib.init_nested_params(
        enc if cfg.variant != "token" else dataclasses.replace(
            enc, resampler=dataclasses.replace(enc.resampler,
                                               output_dim=base.unet_config.cross_attention_dim)),
        base.params["unet"], cross, key, text_params=base.params["text_encoder"],
        tokenizer=base.tokenizer)
    # own buffers (the projections start as the UNet's kernels: never alias the frozen ones,
    # the train step donates the state)
    if cfg.vision_init:
        p["image_encoder"] = load_tower(cfg.vision_init, enc)
    p = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), p)
    if cfg.variant == "nested":
        return p
    if cfg.variant == "ip_adapter":
        return {"image_encoder": p["image_encoder"], "resampler": p["resampler"],
                "ip": p.pop("nested"), "placeholder": p["placeholder"]}
    # token: re-initialise the resampler at the text width (one query)
    from jattn.models.resampler import init_resampler_params

    res = init_resampler_params(enc.resampler, jax.random.fold_in(key, 1))
    table = np.asarray(_token_table(base), np.float32)
    res["norm_out"] = {"scale": jnp.full_like(res["norm_out"]["scale"], float(table.std())),
                       "bias": jnp.asarray(p["placeholder"]["text_encoder"], jnp.float32)}
    return {"image_encoder": p["image_encoder"], "resampler": res}


def load_tower(path: str | Path, enc: nested_lib.NestedEncoderConfig) -> dict:
    """The vision tower params of a ``CLIPVisionModelWithProjection`` safetensors file.

    Raises:
      FileNotFoundError: no such file (names it and how to make one).
      CheckpointMismatchError: a tower of other sizes than ``enc.vision``.
    """
    from safetensors.numpy import load_file

    from jattn.models.clip_vision import convert_clip_vision_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision_init: no file {path}; make it with "
                                "scripts/pretrain_vision.py --out DIR (DIR/vision.safetensors)")
    return convert_clip_vision_state_dict(load_file(str(path)), enc.vision)


def _freeze_labels(params) -> dict:
    return {k: jax.tree_util.tree_map(lambda _: "frozen" if k == "image_encoder" else "train", v)
            for k, v in params.items()}


# ----------------------------------------------------------------------------- loss
def _context(params, base_text: Mapping, text_config, ids: Array, tok_id: int,
             star_embedding: Array) -> Array:
    """Text encoder's last hidden state with s*'s input embedding replaced by
    ``star_embedding`` ``(D,)`` or ``(B, D)`` per row (``inputs_embeds``)."""
    table = base_text["text_model"]["embeddings"]["token_embedding"]["embedding"]
    emb = jnp.take(table, ids, axis=0).astype(jnp.float32)  # (B, S, D)
    star = jnp.broadcast_to(star_embedding.astype(jnp.float32).reshape(
        (-1, 1, emb.shape[-1])), (ids.shape[0], 1, emb.shape[-1]))
    emb = jnp.where((ids == tok_id)[..., None], star, emb)
    return clip_lib.CLIPTextModel(text_config).apply(
        {"params": base_text}, ids, inputs_embeds=emb)["last_hidden_state"]


def variant_conditioning(cfg: PersonalizeConfig, enc: nested_lib.NestedEncoderConfig,
                         base: BaseModel, params, pixels: Array, ids: Array, positions: Array,
                         frozen_text: Mapping, tok_id: int):
    """``(context (B, S, D), policy or None)`` of the variant for a batch of subject
    pixels ``(B, S_img, S_img, 3)``, token ids ``(B, S)`` and s* positions ``(B,)``
    (one subject per row; used by training, and by evaluation with CFG-free rows)."""
    b = ids.shape[0]
    tokens = nested_lib.encode_subjects(params, enc, pixels)  # (B, R, D_ctx)
    layout = Layout(groups=b, members=1, cfg=False)
    ctx_tokens = base.text_config.max_position_embeddings
    if cfg.variant == "token":
        return _context(params, frozen_text, base.text_config, ids, tok_id, tokens[:, 0]), None
    context = _context(params, frozen_text, base.text_config, ids, tok_id,
                       params["placeholder"]["text_encoder"])
    sites = base.sites
    if cfg.variant == "nested":
        keys, values = nested_lib.nested_kv(params, tokens, sites)
        pol = nested_policy(sites, {s: a[:, None] for s, a in keys.items()},
                            {s: a[:, None] for s, a in values.items()}, positions[:, None],
                            scale=1.0, layout=layout, context_tokens=ctx_tokens)
        return context, pol
    op = DecoupledImageAttention(tokens, {s: w["to_k"] for s, w in params["ip"].items()},
                                 {s: w["to_v"] for s, w in params["ip"].items()},
                                 jnp.float32(cfg.ip_scale))
    pol = resolve([(Select(kind="cross"), op)], sites, layout=layout, context_tokens=ctx_tokens)
    return context, pol


def personalize_loss(params, frozen: Mapping, pixels: Array, latents: Array, ids: Array,
                     positions: Array, subject_mask: Array, key: Array, *,
                     cfg: PersonalizeConfig,
                     enc: nested_lib.NestedEncoderConfig, base: BaseModel, tok_id: int
                     ) -> tuple[Array, dict]:
    """The base model's diffusion loss on the targets, conditioned through the variant.

    Args:
      params: the trained params (:func:`init_params`).
      frozen: ``{"unet", "text_encoder"}`` params of the base (not differentiated).
      pixels: ``(B, S_img, S_img, 3)`` CLIP-preprocessed subject images.
      latents: ``(B, h, w, C)`` scaled target latents.
      ids: ``(B, S)`` int32 caption ids (s* written as the placeholder word).
      positions: ``(B,)`` int32 s* position in each caption.
      subject_mask: ``(B, h, w)`` float32, the fraction of each latent cell inside the
        subject's box (``cfg.subject_loss_weight``).
      key: the step's PRNG key (timesteps, noise).
    Returns:
      ``(loss, {"mse"})``: Min-SNR-weighted loss and the unweighted mean squared error.
    """
    frozen = jax.lax.stop_gradient(frozen)
    context, pol = variant_conditioning(cfg, enc, base, params, pixels, ids, positions,
                                        frozen["text_encoder"], tok_id)
    abar = jnp.asarray(base.alphas_bar, jnp.float32)
    k_t, k_n = jax.random.split(key)
    b = latents.shape[0]
    t = jax.random.randint(k_t, (b,), 0, abar.shape[0])
    noise = jax.random.normal(k_n, latents.shape, latents.dtype)
    a = abar[t][:, None, None, None]
    x_t = jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise
    out, _ = unet_lib.UNet2DConditionModel(base.unet_config).apply(
        {"params": frozen["unet"]}, x_t, t.astype(jnp.float32), context, policy=pol)
    v_pred = base.prediction_type == "v_prediction"
    target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * latents if v_pred else noise
    sq = jnp.square(out - target)
    mse = jnp.mean(sq)
    if cfg.subject_loss_weight:
        w = 1.0 + cfg.subject_loss_weight * subject_mask.astype(sq.dtype)[..., None]
        per = jnp.mean(w * sq, axis=(1, 2, 3)) / jnp.mean(w, axis=(1, 2, 3))
    else:
        per = jnp.mean(sq, axis=(1, 2, 3))
    if cfg.snr_gamma:
        snr = abar[t] / jnp.maximum(1.0 - abar[t], 1e-8)
        snr = snr + 1.0 if v_pred else jnp.maximum(snr, 1e-8)
        w = jnp.minimum(snr, cfg.snr_gamma) / snr
    else:
        w = jnp.ones_like(per)
    return jnp.mean(w * per), {"mse": mse}


def make_step(cfg: PersonalizeConfig, base: BaseModel):
    """``(step(state, pixels, latents, ids, positions, subject_mask) -> (state, metrics),
    optimizer)`` (the batch of :func:`pair_batch`);
    the frozen params are passed to the jitted step as arguments (not baked in)."""
    enc = encoder_config(cfg, base)
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.steps, 1.0, "constant")
    tx = make_optimizer(schedule, cfg.weight_decay, cfg.grad_clip)
    if cfg.vision_init:  # the pretrained tower stays as loaded (no update, no decay)
        import optax

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _freeze_labels)
    tok_id = _token_id(base, enc)
    loss_fn = functools.partial(personalize_loss, cfg=cfg, enc=enc, base=base, tok_id=tok_id)

    def frozen_tower(p):
        if not cfg.vision_init:
            return p
        return {**p, "image_encoder": jax.lax.stop_gradient(p["image_encoder"])}

    def step_fn(state, frozen, pixels, latents, ids, positions, subject_mask):
        key = _step_key(cfg.seed, _STREAM, state["step"])
        return _optimizer_step(
            state, lambda p: loss_fn(frozen_tower(p), frozen, pixels, latents, ids, positions,
                                     subject_mask, key), tx, schedule, cfg.ema_decay)

    jitted = jax.jit(step_fn, donate_argnums=0)
    frozen = {"unet": base.params["unet"], "text_encoder": base.params["text_encoder"]}
    return (lambda state, *batch: jitted(state, frozen, *batch)), tx


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def _vae_encode(config: vae_lib.VAEConfig):
    return jax.jit(lambda p, x: vae_lib.encode_latents(p, config, x))


def pair_batch(cfg: PersonalizeConfig, base: BaseModel, step: int, *, split: str = "train",
               batch_size: int | None = None):
    """The batch of step ``step``: pairs ``step·B … step·B + B − 1`` of ``make_pairs(…,
    cfg.data_seed, split)`` as ``(pixels (B, S_img, S_img, 3), latents (B, h, w, C),
    ids (B, 77) int32, positions (B,) int32, subject_mask (B, h, w) float32)`` (numpy / jax
    arrays; subject_mask: the fraction of each latent cell inside the subject's box)."""
    from jattn.methods.personalize import placeholder_positions
    from jattn.models.clip_vision import preprocess_clip_images
    from jattn.world.pairs import make_pairs

    enc = encoder_config(cfg, base)
    b = batch_size or cfg.batch_size
    d = make_pairs(b, cfg.data_seed, split, start=step * b)
    pixels = preprocess_clip_images(list(d["subject_images"]), enc.processing)
    x = jnp.asarray(d["target_images"], jnp.float32) / 127.5 - 1.0
    latents = _vae_encode(base.vae_config)(base.params["vae"], x)
    _, ids, pos = placeholder_positions(
        base.tokenizer, [str(c) for c in d["captions"]], placeholder_token=enc.placeholder_token,
        max_length=base.text_config.max_position_embeddings, name="captions")
    return (jnp.asarray(pixels), latents, jnp.asarray(ids, jnp.int32),
            jnp.asarray(pos[:, 0], jnp.int32), jnp.asarray(_box_fractions(d, latents.shape[1:3])))


def _box_fractions(d: Mapping, hw: tuple[int, int]) -> np.ndarray:
    """``(B, h, w)`` float32: the fraction of each latent cell covered by the subject's box
    (``target_boxes[i, subject_index[i]]``, pixels, x1/y1 exclusive), rasterised at pixel
    resolution by :func:`jattn.methods.subjects.box_masks` and averaged per cell."""
    from jattn.methods.subjects import box_masks

    n = len(d["subject_index"])
    size = d["target_images"].shape[1]
    boxes = d["target_boxes"][np.arange(n), d["subject_index"]] / size
    pix = box_masks(boxes, size, size)
    h, w = hw
    return pix.reshape(n, h, size // h, w, size // w).mean(axis=(2, 4))


# ----------------------------------------------------------------------------- run
def train(cfg: PersonalizeConfig, base: BaseModel, workdir: str | Path, *,
          stop: StopFlag | None = None, progress: bool = True,
          batch_fn=None) -> tuple[dict, bool]:
    """Train (or resume) the variant in ``workdir`` (``ckpt/``, ``metrics.jsonl``).

    Resumes from the newest checkpoint; stops at ``cfg.steps`` or when ``stop`` says so
    (with a checkpoint). Returns ``(state, finished)``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    step_fn, tx = make_step(cfg, base)
    state = init_state(init_params(cfg, base), tx)
    ckpts = StageCheckpoints(workdir / "ckpt", keep=cfg.keep_checkpoints)
    if ckpts.latest_step() is not None:
        state = ckpts.restore(state)
    (workdir / "config.json").write_text(json.dumps(
        {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "encoder"},
         "encoder": json.loads(encoder_config(cfg, base).to_json())}, indent=1))
    bf = batch_fn or (lambda s: pair_batch(cfg, base, s))
    try:
        return run_steps(name=f"personalize {cfg.variant}", state=state, step_fn=step_fn,
                         batch_fn=bf, total_steps=cfg.steps, checkpoints=ckpts,
                         metrics_path=workdir / "metrics.jsonl", log_every=cfg.log_every,
                         checkpoint_every=cfg.checkpoint_every, stop=stop, progress=progress)
    finally:
        ckpts.close()


def validation_loss(cfg: PersonalizeConfig, base: BaseModel, params, *, batches: int = 4,
                    split: str = "heldout", seed: int = 1234) -> dict[str, float]:
    """Mean loss / mse of ``params`` on ``batches`` fixed batches of ``split`` pairs (data
    seed ``seed``, fixed timesteps and noise), with the subject (``"loss"``) and with the
    subject's pixels replaced by another subject's (``"loss_shuffled"``: the batch rolled
    by one): the gap is what the encoder's identity information is worth."""
    vcfg = cfg.replace(data_seed=seed)
    enc = encoder_config(cfg, base)
    frozen = {"unet": base.params["unet"], "text_encoder": base.params["text_encoder"]}
    fn = jax.jit(lambda p, px, lat, ids, pos, m, k: personalize_loss(
        p, frozen, px, lat, ids, pos, m, k, cfg=cfg, enc=enc, base=base,
        tok_id=_token_id(base, enc)))
    out = {"loss": [], "mse": [], "loss_shuffled": []}
    for i in range(batches):
        px, lat, ids, pos, mask = pair_batch(vcfg, base, i, split=split)
        key = jax.random.key(seed + i)
        loss, m = fn(params, px, lat, ids, pos, mask, key)
        out["loss"].append(float(loss))
        out["mse"].append(float(m["mse"]))
        out["loss_shuffled"].append(float(fn(params, jnp.roll(px, 1, axis=0), lat, ids, pos,
                                             mask, key)[0]))
    return {k: float(np.mean(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- weights
def weights_state_dict(variant: str, params: Mapping) -> dict[str, np.ndarray]:
    """Trained params -> the flat safetensors layout (module docstring)."""
    if variant == "nested":
        return nested_lib.nested_state_dict(params)
    base = {"image_encoder": params["image_encoder"], "resampler": params["resampler"],
            "nested": {}, "placeholder": params.get("placeholder", {})}
    sd = {k: v for k, v in nested_lib.nested_state_dict(base).items()}
    for path, w in params.get("ip", {}).items():
        sd[f"ip_adapter.{path}.to_k_ip.weight"] = np.ascontiguousarray(
            np.asarray(w["to_k"], np.float32).T)
        sd[f"ip_adapter.{path}.to_v_ip.weight"] = np.ascontiguousarray(
            np.asarray(w["to_v"], np.float32).T)
    return sd


def export_weights(path: str | Path, cfg: PersonalizeConfig, base: BaseModel, params: Mapping
                   ) -> Path:
    """Write the variant's (EMA) params to a safetensors file (``nested``: exactly
    :func:`jattn.models.nested.save_nested_weights`; every variant also carries the
    ``jattn_personalize`` metadata)."""
    from safetensors.numpy import save_file

    enc = encoder_config(cfg, base)
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_META_KEY: json.dumps({"format": FORMAT_VERSION, "variant": cfg.variant,
                                   "ip_scale": cfg.ip_scale, "encoder": enc.to_json()})}
    if cfg.variant == "nested":
        meta["jattn_nested"] = enc.to_json()
    tmp = path.with_suffix(".tmp")
    save_file(weights_state_dict(cfg.variant, params), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_weights(path: str | Path) -> tuple[str, nested_lib.NestedEncoderConfig, dict, dict]:
    """Read a file of :func:`export_weights`: ``(variant, encoder config, params, info)``
    (info: the metadata, e.g. ``ip_scale``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not such a file (no ``jattn_personalize`` metadata), or keys that do not
        fit the encoder config.
    """
    from safetensors import safe_open

    from jattn.models.clip_vision import convert_clip_vision_state_dict
    from jattn.models.resampler import convert_resampler_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"personalisation weights {str(path)!r}: no such file; train "
                                "them with scripts/train_personalize.py")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if _META_KEY not in meta:
        raise ValueError(f"{path}: no {_META_KEY!r} metadata (not written by "
                         "jattn.train.personalize.export_weights)")
    info = json.loads(meta[_META_KEY])
    enc = nested_lib.NestedEncoderConfig.from_json(info["encoder"])
    variant = info["variant"]
    if variant == "nested":
        return variant, enc, nested_lib.convert_nested_state_dict(sd, enc), info
    params = {"image_encoder": convert_clip_vision_state_dict(
        {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")},
        enc.vision),
        "resampler": convert_resampler_state_dict(
            {k: v for k, v in sd.items() if k.startswith("image_proj.")}, enc.resampler,
            layout="ip_adapter", prefix="image_proj.")}
    ph = {k[len("placeholder."):]: jnp.asarray(v) for k, v in sd.items()
          if k.startswith("placeholder.")}
    if ph:
        params["placeholder"] = ph
    ip: dict = {}
    for k, v in sd.items():
        if k.startswith("ip_adapter."):
            site, name = k[len("ip_adapter."):].rsplit(".", 2)[:2]
            ip.setdefault(site, {})[name[:4]] = jnp.asarray(np.asarray(v, np.float32).T)
    if ip:
        params["ip"] = ip
    return variant, enc, params, info


# ----------------------------------------------------------------------------- generation
@functools.lru_cache(maxsize=8)
def _context_fn(text_config: clip_lib.CLIPTextConfig, tok_id: int):
    return jax.jit(lambda p, t, ids, e: _context(p, t, text_config, ids, tok_id, e))


@functools.lru_cache(maxsize=8)
def _encode_fn(enc: nested_lib.NestedEncoderConfig):
    return jax.jit(lambda p, x: nested_lib.encode_subjects(p, enc, x))


def ip_adapter_policy(pipe, params: Mapping, tokens: Array, scale: float, sites):
    """Baseline (b)'s inference policy: every cross-attention site adds
    ``scale · Attn(q, tokens·W_k, tokens·W_v)`` with the trained ``params["ip"]``
    projections, in the conditional CFG half only (the unconditional half has scale 0).

    Args:
      tokens: ``(B, R', D)`` image tokens per image (R' = R per subject × subjects).
      scale: λ (training used ``ip_scale``).
      sites: the pipeline's attention sites.
    """
    b = tokens.shape[0]
    op = DecoupledImageAttention(
        jnp.concatenate([tokens, tokens]),
        {s: w["to_k"] for s, w in params["ip"].items()},
        {s: w["to_v"] for s, w in params["ip"].items()},
        jnp.concatenate([jnp.zeros((b,)), jnp.full((b,), scale)]).astype(jnp.float32))
    return resolve([(Select(kind="cross"), op)], sites,
                   layout=Layout(groups=b, members=1, cfg=True),
                   context_tokens=pipe.text_config.max_position_embeddings)


def generate(pipe, weights, subject_images, prompts, seeds=0, *, scale: float | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 7.5,
             scheduler: str | None = None, decode: bool = True):
    """Images of any trained variant, one per (subject image, prompt) pair, in one call —
    the same interface for Nested Attention and the baselines (for the evaluation).

    Row i shows ``subject_images[i]`` in ``prompts[i]`` (one ``s*`` each). CFG with the
    empty prompt; the subject acts on the conditional rows only (nested: as
    :func:`jattn.methods.personalize.personalize`; ip_adapter: λ = 0 on the unconditional
    rows; token: the unconditional prompt has no s*).

    Args:
      pipe: the base :class:`jattn.pipeline.Pipeline` the weights were trained for.
      weights: a path of :func:`export_weights` or ``(variant, encoder config, params)``.
      subject_images: B images (paths, PIL, uint8 arrays), see
        :func:`jattn.methods.personalize.load_subject_images`.
      prompts: B prompts with one ``s*`` each.
      seeds: an int (image i uses seed + i) or B seeds.
      scale: λ (nested: on V*, default 1; ip_adapter: the image branch, default the
        trained ``ip_scale``); ignored by ``token``.
    Returns:
      :class:`jattn.pipeline.GenerateOutput` (``images`` uint8 ``(B, H, W, 3)``).
    Raises:
      ValueError: different numbers of images and prompts, a prompt without exactly one
        ``s*``, an unreadable or wrong-size subject image.
    """
    from jattn.methods.personalize import (load_subject_images, personalize_policy,
                                           placeholder_positions)

    if isinstance(weights, (str, Path)):
        variant, enc, params, info = load_weights(weights)
    else:
        variant, enc, params = weights
        info = {}
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pixels = load_subject_images(subject_images, enc)
    if len(pixels) != len(prompts):
        raise ValueError(f"generate: {len(pixels)} subject images but {len(prompts)} prompts; "
                         "give one subject image per prompt")
    _, ids, pos = placeholder_positions(pipe.tokenizer, prompts,
                                        placeholder_token=enc.placeholder_token,
                                        max_length=pipe.text_config.max_position_embeddings)
    if pos.shape[1] != 1:
        raise ValueError("generate: write s* once per prompt (one subject per image)")
    b = len(prompts)
    tok_id = pipe.tokenizer(enc.placeholder_token, add_special_tokens=False)["input_ids"][0]
    text = pipe.params["text_encoder"]
    tokens = _encode_fn(enc)(params, jnp.asarray(pixels, jnp.float32))  # (B, R, D)
    ctx_fn = _context_fn(pipe.text_config, tok_id)
    ids = jnp.asarray(ids, jnp.int32)
    pol = None
    if variant == "token":
        cond = ctx_fn(None, text, ids, tokens[:, 0])
    else:
        cond = ctx_fn(None, text, ids, params["placeholder"]["text_encoder"])
        sites = pipe.sites()
        if variant == "nested":
            keys, values = nested_lib.nested_kv(params, tokens, sites)
            pol = personalize_policy(pipe, keys, values, pos, np.arange(b)[:, None],
                                     scale=1.0 if scale is None else scale)
        else:
            lam = float(info.get("ip_scale", 1.0) if scale is None else scale)
            pol = ip_adapter_policy(pipe, params, tokens, lam, sites)
    uncond = pipe.encode_prompts([""] * b, name="negative_prompt")
    return pipe.generate(prompts, prompt_embeds=cond, uncond_embeds=uncond, seed=seeds,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         scheduler=scheduler, policy=pol, decode=decode)
