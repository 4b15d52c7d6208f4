"""Typed, frozen configuration of the bundled model's training recipe.

A run is described by one :class:`TrainConfig` (three stages and the export), built by a
Python config file's ``get_config(arg)`` (see ``configs/bundled_model.py``) and loaded
with :func:`load_config`. Every field is hashable, so a config (or a stage of it) can key
caches of compiled train steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["VAEStageConfig", "CacheStageConfig", "DiffusionStageConfig", "TrainConfig",
           "load_config", "freeze"]


def freeze(d: dict | None) -> tuple:
    """A dict of model-config kwargs as a hashable, sorted tuple of (key, value) pairs
    (lists become tuples)."""
    if d is None:
        return ()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class VAEStageConfig:
    """Stage A: the autoencoder.

    Attributes:
      model: ``VAEConfig`` keyword arguments as a frozen tuple (see :func:`freeze`).
      crop: side in pixels of the random square crops trained on (fully convolutional).
      object_crop_prob: probability that a crop is centred on an object (objects cover a
        few percent of an image; uniform crops mostly show background).
      batch_size: crops per step.
      steps: optimizer steps.
      lr, warmup_steps, end_lr_fraction: AdamW peak learning rate, linear warmup, cosine
        decay to ``lr * end_lr_fraction``.
      weight_decay: AdamW decoupled weight decay (kernels only).
      l1_weight, mse_weight, kl_weight: reconstruction ``l1 * |x - x'| + mse * (x - x')^2``
        (means over pixels) plus ``kl * KL(q(z|x) || N(0, I))`` (sum over latent cells,
        mean over the batch), as latent diffusion's KL-regularised autoencoder.
      ema_decay: EMA of the weights (0 disables); the EMA weights are exported.
      scale_images: images whose latents' std sets ``scaling_factor = 1 / std``.
      eval_images: full-size images the final reconstruction PSNR is measured on.
    """

    model: tuple = ()
    crop: int = 64
    object_crop_prob: float = 0.75
    batch_size: int = 16
    steps: int = 3000
    lr: float = 1e-3
    warmup_steps: int = 100
    end_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    mse_weight: float = 0.1
    kl_weight: float = 1e-6
    ema_decay: float = 0.999
    scale_images: int = 2048
    eval_images: int = 256


@dataclasses.dataclass(frozen=True)
class CacheStageConfig:
    """Stage B: the latent cache.

    Attributes:
      num_samples: world samples (image, caption) encoded to scaled latents.
      chunk: samples rendered and encoded per chunk (each chunk is saved, so an interrupted
        cache build resumes at the next missing chunk).
      split: world split the samples come from (``"train"`` keeps the held-out pairs out).
    """

    num_samples: int = 50_000
    chunk: int = 1000
    split: str = "train"


@dataclasses.dataclass(frozen=True)
class DiffusionStageConfig:
    """Stage C: UNet and text encoder, trained jointly on the cached latents.

    Attributes:
      unet: ``UNetConfig`` keyword arguments (frozen tuple); ``cross_attention_dim`` must
        equal the text encoder's ``hidden_size``.
      text_encoder: ``CLIPTextConfig`` keyword arguments (frozen tuple).
      batch_size, steps: samples per step, optimizer steps.
      lr, warmup_steps, weight_decay, grad_clip: AdamW with linear warmup, decay on kernels
        only (not embeddings, norms or biases), global-norm clipping.
      lr_schedule: ``"constant"`` after the warmup (default: raising ``steps`` later
        extends a finished run exactly as if it had been longer from the start; the EMA
        plays the role of the decay) or ``"cosine"`` (to ``lr * end_lr_fraction`` at
        ``steps``).
      ema_decay: EMA of UNet and text-encoder weights (warmed up as
        ``min(decay, (1 + step) / (10 + step))``); the EMA weights are exported.
      caption_dropout: probability that a caption is replaced by "" (for CFG).
      num_train_timesteps, beta_start, beta_end, beta_schedule: the noise schedule
        (SD's scaled_linear 0.00085 to 0.012 over 1000 steps).
      snr_gamma: Min-SNR-gamma loss weighting ``min(SNR, gamma) / SNR`` for epsilon
        prediction (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy"), ``min(SNR + 1, gamma) / (SNR + 1)`` for v-prediction; 0 disables it
        (plain MSE).
      grounding_token_weight, grounding_pixel_weight: weights of the TokenCompose token
        and pixel losses on the cross-attention of each object's words
        (:mod:`jattn.train.grounding`; world source only); 0 and 0 disable them.
      grounding_from_step: the grounding losses count from this step on (0: from the
        start).
      prediction_type: what the UNet predicts, ``"epsilon"`` (SD1.x) or ``"v_prediction"``
        (Salimans & Ho 2022; SD2.x); written into the exported scheduler config.
      reinit_text_layers: when the phase starts from a previous phase's EMA weights,
        re-initialise the text encoder's transformer layers and final layer norm (as a
        fresh run would), keeping its token and position embeddings and the UNet. Layers
        that learned to ignore a distinction the UNet needs (the bundled run's
        "on the left" / "on the right", see configs/bundled_model.py) lose that
        invariance; the UNet re-reads the new context within a few hundred steps.
      rescale_betas_zero_snr: rescale the betas to zero terminal SNR (Lin et al. 2024,
        "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1), so x_T
        holds no trace of the image and the layout must come from the text; use with
        v-prediction. The export then samples with ``"trailing"`` timesteps.
    """

    unet: tuple = ()
    text_encoder: tuple = ()
    batch_size: int = 64
    steps: int = 5000
    lr: float = 5e-4
    warmup_steps: int = 200
    lr_schedule: str = "constant"
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    snr_gamma: float = 5.0
    grounding_token_weight: float = 0.0
    grounding_pixel_weight: float = 0.0
    grounding_from_step: int = 0
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    reinit_text_layers: bool = False

    @property
    def grounding(self) -> bool:
        return bool(self.grounding_token_weight or self.grounding_pixel_weight)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole recipe.

    Attributes:
      seed: every random choice (data order, crops, noise, timesteps, dropout, init) is a
        function of ``(seed, stage, step)``, so a resumed run equals an uninterrupted one.
      source: ``"world"`` (jattn.world scenes) or ``"toy"`` (a tiny built-in source of
        coloured rectangles for tests).
      image_size: world image side in pixels (128).
      workdir: where checkpoints, caches and logs go (git-ignored ``runs/bundled``).
      export_dir: the diffusers-layout folder written by the export.
      checkpoint_every, keep_checkpoints: Orbax ``CheckpointManager`` cadence and the
        number of checkpoints kept per stage.
      log_every: steps between metrics lines.
      vae, cache, diffusion: the three stages.
      diffusion_pretrain: None, a phase of stage C, or a tuple of phases (same models),
        trained in order before ``diffusion``; each later phase starts from the previous
        phase's final EMA weights, e.g. epsilon prediction on SD's schedule followed by a
        zero-terminal-SNR v-prediction fine-tune (Lin et al. 2024). Folders:
        ``diffusion_pretrain``, ``diffusion_pretrain_2``, …, then ``diffusion``.
    """

    seed: int = 0
    source: str = "world"
    image_size: int = 128
    workdir: str = "runs/bundled"
    export_dir: str = "jattn/assets/bundled"
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 25
    vae: VAEStageConfig = VAEStageConfig()
    cache: CacheStageConfig = CacheStageConfig()
    diffusion: DiffusionStageConfig = DiffusionStageConfig()
    diffusion_pretrain: DiffusionStageConfig | tuple[DiffusionStageConfig, ...] | None = None

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    @property
    def diffusion_phases(self) -> tuple[tuple[str, DiffusionStageConfig], ...]:
        """``((folder name, phase), ...)`` of stage C in training order, ``cfg.diffusion``
        last (in ``"diffusion"``)."""
        pre = self.diffusion_pretrain
        pre = () if pre is None else (pre,) if isinstance(pre, DiffusionStageConfig) else pre
        names = ["diffusion_pretrain" + ("" if i == 0 else f"_{i + 1}") for i in range(len(pre))]
        return tuple(zip(names, pre)) + (("diffusion", self.diffusion),)


def load_config(spec: str | os.PathLike) -> TrainConfig:
    """Load ``path/to/config.py[:arg]`` and return its ``get_config(arg)``.

    Raises:
      FileNotFoundError: no such file.
      TypeError: ``get_config`` did not return a :class:`TrainConfig`.
    """
    spec = str(spec)
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_jattn_config_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    cfg: Any = module.get_config(arg or None)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{p}: get_config returned {type(cfg).__name__}, expected TrainConfig")
    return cfg
