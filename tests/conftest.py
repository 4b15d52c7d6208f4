"""Shared test settings and helpers.

* float64 off (jattn runs in float32/bfloat16; x64 would hide dtype bugs);
* default matmul precision "highest", so float32 parity against PyTorch holds to 1e-5
  on every backend (TPU/GPU would otherwise use bf16/TF32 passes);
* XLA backend optimisation level 0 (unless XLA_FLAGS already sets one): tests run tiny
  models where compile time dominates; -O0 cuts it ~2.5x and changes no float semantics
  (XLA never reassociates float math unless fast-math is on, which it is not);
* fixtures ``torch_to_numpy_state_dict`` and ``randomize_torch_module`` (functions), for
  parity tests against diffusers/transformers on the same random weights;
* session fixture ``tiny_sd_dir``: a tiny random SD pipeline folder in diffusers layout
  (``_tiny_diffusers_pipeline``) for tests that load it with ``jattn.load``.
"""

from __future__ import annotations

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")


def _torch_to_numpy_state_dict(module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as float32 numpy arrays (detached copies)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in module.state_dict().items()}


def _randomize_torch_module(module, seed: int = 0, std: float = 0.2,
                            norm_std: float = 0.1):
    """Fill every parameter of a torch module with random normal values, in place.

    Weights get ``N(0, std)``; 1-D parameters of normalisation layers (GroupNorm,
    LayerNorm) get ``1 + N(0, norm_std)`` scales and ``N(0, norm_std)`` biases, so that
    every parameter matters (zero-initialised output layers would hide bugs) while
    activations stay O(1). Returns the module (in eval mode).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if isinstance(m, norms):
                    p.copy_((1.0 if name == "weight" else 0.0) + norm_std * noise)
                else:
                    p.copy_(std * noise)
    return module.eval()


@pytest.fixture
def torch_to_numpy_state_dict():
    """The function ``module -> {key: float32 numpy array}``."""
    return _torch_to_numpy_state_dict


@pytest.fixture
def randomize_torch_module():
    """The function ``(module, seed=0, std=0.2, norm_std=0.1) -> module`` (in place)."""
    return _randomize_torch_module


def _tiny_diffusers_pipeline(seed: int = 0, sd2: bool = False):
    """A tiny random diffusers ``StableDiffusionPipeline`` (8² latents, 16² px, bundled
    CLIP tokenizer): UNet with attention sites at 8² (down_blocks.0, up_blocks.1) and 4²
    (mid_block)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                        sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    _randomize_torch_module(unet, seed, std=0.08)
    _randomize_torch_module(vae, seed + 1, std=0.08)
    _randomize_torch_module(text, seed + 2, std=0.08)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if sd2 else "epsilon")
    from jattn.io.tokenizer import BUNDLED_TOKENIZER_DIR

    tok = CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD1-style pipeline saved in diffusers layout (safetensors), shared by
    every test module that loads it with ``jattn.load``."""
    d = tmp_path_factory.mktemp("tiny_sd")
    pipe = _tiny_diffusers_pipeline()
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def _tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A tiny random diffusers ``StableDiffusionXLPipeline`` (8² latents, 16² px): the UNet
    of tests/models/test_unet_sdxl.py's layout (DownBlock2D first, per-block depth 1/1/2
    and heads 2/4/8, linear projections, text_time added conditioning; one resnet per
    block to keep the compile short), text_encoder
    (CLIP-L style, quick_gelu, hidden 32) and text_encoder_2 (bigG style, gelu, hidden 32,
    projection 16) with the bundled CLIP tokenizer (tokenizer_2 padding with "!" as SDXL's),
    a VAE with SDXL's scaling factor 0.13025 and force_upcast, SDXL base's Euler scheduler."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    torch.manual_seed(seed)
    text_dim, pooled, time_dim = 32, 16, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=2 * text_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                        sample_size=16, scaling_factor=0.13025, force_upcast=True)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=1, hidden_size=text_dim,
                  intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  projection_dim=pooled)
    te = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common))
    _randomize_torch_module(unet, seed, std=0.08)
    _randomize_torch_module(vae, seed + 1, std=0.08)
    _randomize_torch_module(te, seed + 2, std=0.1)
    _randomize_torch_module(te2, seed + 3, std=0.1)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading", interpolation_type="linear",
                                   prediction_type="epsilon", use_karras_sigmas=False)
    from jattn.io.tokenizer import BUNDLED_TOKENIZER_DIR

    tok = CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True,
                                         pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=sched, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL pipeline (``_tiny_sdxl_pipeline``) saved in diffusers layout
    (safetensors), for tests that load it with ``jattn.load``."""
    d = tmp_path_factory.mktemp("tiny_sdxl")
    _tiny_sdxl_pipeline().save_pretrained(d, safe_serialization=True)
    return d
