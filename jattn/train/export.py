"""Write a trained model in diffusers layout (what ``jattn.load`` and diffusers'
``StableDiffusionPipeline.from_pretrained`` read).

Folder layout::

    model_index.json                  StableDiffusionPipeline, no safety checker
    unet/config.json                  + diffusion_pytorch_model.safetensors (float32)
    vae/config.json                   + diffusion_pytorch_model.safetensors (float32)
    text_encoder/config.json          + model.safetensors (float32; the token embedding
                                        may be float16 to keep the folder small)
    scheduler/scheduler_config.json   DDIMScheduler with SD's betas
    tokenizer/                        kept if present, else copied from ``tokenizer_src``
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jattn.io.checkpoint import save_state_dict
from jattn.models import clip_text as clip_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib

__all__ = ["write_diffusers_folder", "ddim_scheduler_config", "model_index",
           "DIFFUSERS_VERSION", "TOKEN_EMBEDDING_KEY"]

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the layout was checked against
TOKEN_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


def model_index() -> dict:
    """``model_index.json`` of a Stable Diffusion 1.x pipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def ddim_scheduler_config(*, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                          beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                          prediction_type: str = "epsilon",
                          rescale_betas_zero_snr: bool = False) -> dict:
    """SD1.x's ``scheduler_config.json`` (DDIM, epsilon prediction, ``steps_offset`` 1,
    ``set_alpha_to_one`` False, ``clip_sample`` False); with ``rescale_betas_zero_snr``
    the timesteps are ``"trailing"`` (Lin et al. 2024: sampling must start at t = T-1)."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "num_train_timesteps": num_train_timesteps,
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing" if rescale_betas_zero_snr else "leading",
        "rescale_betas_zero_snr": bool(rescale_betas_zero_snr),
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_diffusers_folder(
    folder: str | Path, *,
    unet_config: unet_lib.UNetConfig, unet_params: Mapping,
    vae_config: vae_lib.VAEConfig, vae_params: Mapping,
    text_config: clip_lib.CLIPTextConfig, text_params: Mapping,
    scheduler_config: dict | None = None,
    tokenizer_src: str | Path | None = None,
    token_embedding_dtype=np.float16,
) -> dict[str, int]:
    """Write the diffusers-layout folder (see the module docstring).

    Existing component folders are replaced; an existing ``tokenizer/`` is kept.

    Args:
      folder: the output folder (created).
      unet_config/unet_params, vae_config/vae_params, text_config/text_params: models and
        their Flax params (float32 is written; ``vae_config.scaling_factor`` goes into the
        VAE config).
      scheduler_config: default :func:`ddim_scheduler_config`.
      tokenizer_src: a tokenizer folder copied when ``folder/tokenizer`` is missing.
      token_embedding_dtype: dtype of the text encoder's token embedding (float16 halves
        the largest tensor of a small model; None keeps float32).
    Returns:
      ``{relative file path: bytes}`` of the weight files written.
    Raises:
      FileNotFoundError: no ``tokenizer/`` in the folder and no ``tokenizer_src``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = folder / "tokenizer"
    if not tok.is_dir():
        if tokenizer_src is None:
            raise FileNotFoundError(f"{tok} is missing and no tokenizer_src was given")
        shutil.copytree(tokenizer_src, tok)
    for comp in ("unet", "vae", "text_encoder", "scheduler"):
        if (folder / comp).is_dir():
            shutil.rmtree(folder / comp)

    _write_json(folder / "model_index.json", model_index())
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler_config or ddim_scheduler_config())

    unet_cfg = dict(unet_config.to_diffusers(), _diffusers_version=DIFFUSERS_VERSION)
    _write_json(folder / "unet" / "config.json", unet_cfg)
    save_state_dict(unet_lib.unet_state_dict(unet_params, dtype=np.float32),
                    folder / "unet" / "diffusion_pytorch_model.safetensors")

    vae_cfg = dict(vae_config.to_diffusers(), _diffusers_version=DIFFUSERS_VERSION)
    _write_json(folder / "vae" / "config.json", vae_cfg)
    save_state_dict(vae_lib.vae_state_dict(vae_params, dtype=np.float32),
                    folder / "vae" / "diffusion_pytorch_model.safetensors")

    text_sd = clip_lib.clip_text_state_dict(text_params, dtype=np.float32)
    if token_embedding_dtype is not None:
        text_sd[TOKEN_EMBEDDING_KEY] = text_sd[TOKEN_EMBEDDING_KEY].astype(token_embedding_dtype)
    # the dtype the model is built in when loaded; fp16 tensors are upcast on load
    text_cfg = dict(text_config.to_transformers(), torch_dtype="float32", dtype="float32")
    _write_json(folder / "text_encoder" / "config.json", text_cfg)
    save_state_dict(text_sd, folder / "text_encoder" / "model.safetensors")

    return {str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*.safetensors"))}
