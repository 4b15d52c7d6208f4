"""End-to-end pipeline tests on a tiny random SD pipeline saved by diffusers.

A tiny ``StableDiffusionPipeline`` (random weights, the bundled CLIP tokenizer) is written
with ``save_pretrained`` (safetensors) and loaded with ``jattn.load``; both generate from
the same initial latents. Also: batch-vs-single identity, no retrace on new prompts/seeds,
identity policy bit-identity, loader errors (pickle, truncated weights, offline hub id),
the 77-token limit, and the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import jattn
from jattn.io.checkpoint import CheckpointNotFoundError, PickleRefusedError
from jattn.io.convert import CheckpointMismatchError
from conftest import _tiny_diffusers_pipeline

PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_sd_dir):
    """The tiny random SD1-style pipeline folder (conftest's session fixture)."""
    return tiny_sd_dir


@pytest.fixture(scope="module")
def jpipe(tiny_dir):
    return jattn.load(tiny_dir)


def _diffusers_generate(folder, prompts, latents, steps, scheduler, guidance, negative=None,
                        guidance_rescale=0.0):
    import torch
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline)

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
           "dpm++2m": DPMSolverMultistepScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    with torch.no_grad():
        lat = pipe(prompts, negative_prompt=negative, latents=torch.from_numpy(latents),
                   num_inference_steps=steps, guidance_scale=guidance,
                   guidance_rescale=guidance_rescale, output_type="latent").images
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        img = pipe.image_processor.postprocess(img, output_type="np")
    return lat.numpy(), (img * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_pipeline_matches_diffusers(tiny_dir, jpipe, scheduler):
    """Same latents, same weights → same final latents and images as diffusers
    (breaks if any model, the scheduler, CFG order or the latent scaling differ)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref_lat, ref_img = _diffusers_generate(tiny_dir, PROMPTS, latents, 5, scheduler, 7.5,
                                           negative=["blurry", ""])
    out = jpipe.generate(PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=5,
                         guidance_scale=7.5, scheduler=scheduler, latents=latents)
    err = np.abs(out.latents - ref_lat).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref_lat).max()), err
    assert np.abs(out.images.astype(int) - ref_img.astype(int)).max() <= 1


def test_sd2_style_v_prediction_matches_diffusers(tmp_path):
    """SD2-style pipeline (linear projection, upcast attention, gelu CLIP, v-prediction)."""
    pipe = _tiny_diffusers_pipeline(seed=3, sd2=True)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref_lat, _ = _diffusers_generate(tmp_path, PROMPTS[:1], latents, 4, "ddim", 5.0)
    out = jattn.load(tmp_path).generate(PROMPTS[:1], num_inference_steps=4, guidance_scale=5.0,
                                        scheduler="ddim", latents=latents)
    assert np.abs(out.latents - ref_lat).max() <= 1e-4 * max(1.0, np.abs(ref_lat).max())


def test_zero_snr_v_prediction_with_guidance_rescale_matches_diffusers(tmp_path):
    """Zero-terminal-SNR v-prediction (rescaled betas, trailing timesteps) with CFG rescale
    phi = 0.7 (Lin et al. 2024) gives diffusers' latents; phi changes the result.

    Would break if the rescale used another axis set or sign, were applied before CFG, or
    if the zero-SNR schedule or trailing spacing differed from diffusers'.
    """
    pipe = _tiny_diffusers_pipeline(seed=4, sd2=True)
    pipe.scheduler = pipe.scheduler.__class__.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    latents = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref_lat, _ = _diffusers_generate(tmp_path, PROMPTS, latents, 4, "ddim", 6.0,
                                     guidance_rescale=0.7)
    jp = jattn.load(tmp_path)
    out = jp.generate(PROMPTS, num_inference_steps=4, guidance_scale=6.0, scheduler="ddim",
                      latents=latents, guidance_rescale=0.7)
    assert np.abs(out.latents - ref_lat).max() <= 1e-4 * max(1.0, np.abs(ref_lat).max())
    plain = jp.generate(PROMPTS, num_inference_steps=4, guidance_scale=6.0, scheduler="ddim",
                        latents=latents)
    assert np.abs(plain.latents - ref_lat).max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rescale"):
        jp.generate(PROMPTS, guidance_rescale=1.5)


def test_batch_equals_single(jpipe):
    """Image i of a batch equals the same prompt generated alone with seed + i
    (breaks if noise is drawn batch-wide)."""
    batch = jpipe.generate(PROMPTS, num_inference_steps=3, seed=10, scheduler="ddim", eta=0.5)
    alone = jpipe.generate(PROMPTS[1:], num_inference_steps=3, seed=11, scheduler="ddim",
                           eta=0.5)
    # same noise; only float rounding of batched matmuls may differ
    np.testing.assert_allclose(batch.latents[1], alone.latents[0], atol=1e-3)
    other = jpipe.generate(PROMPTS[1:], num_inference_steps=3, seed=12, scheduler="ddim",
                           eta=0.5)
    assert np.abs(other.latents[0] - alone.latents[0]).max() > 0.1  # the seed matters
    assert np.abs(batch.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1


def test_no_retrace_on_new_prompts_seeds_scale(jpipe):
    """A second call with new prompts, seeds and guidance scale does not recompile."""
    jpipe.generate(PROMPTS, num_inference_steps=3, seed=0, guidance_scale=7.5)
    before = dict(jpipe.trace_counts)
    jpipe.generate(["a green triangle", "two stars"], num_inference_steps=3, seed=123,
                   guidance_scale=4.0, negative_prompt="noise")
    assert jpipe.trace_counts == before


def test_identity_policy_bit_identical(jpipe):
    """A policy that touches no site gives bit-identical images and latents."""
    from jattn.policy.core import resolve

    class Noop:
        def attend(self, site, q, k, v, step, *, upcast):
            return None

    import jax
    jax.tree_util.register_static(Noop)
    plain = jpipe.generate(PROMPTS, num_inference_steps=3, seed=0)
    noop = jpipe.generate(PROMPTS, num_inference_steps=3, seed=0, policy=Noop())
    empty = jpipe.generate(PROMPTS, num_inference_steps=3, seed=0,
                           policy=resolve([], jpipe.sites()))
    assert np.array_equal(plain.latents, noop.latents)
    assert np.array_equal(plain.latents, empty.latents)
    assert np.array_equal(plain.images, empty.images)


def test_prompt_over_77_tokens_raises(jpipe):
    with pytest.raises(ValueError, match="77"):
        jpipe.generate(["red " * 90], num_inference_steps=2)


def test_sites_listing(jpipe):
    sites = jpipe.sites()
    assert len(sites) == 2 * 4  # down 1 + mid 1 + up 2 transformer blocks, attn1 + attn2 each
    assert sites[0].path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert {s.kind for s in sites} == {"self", "cross"}


def test_pickle_refused(tiny_dir, tmp_path):
    """A component with only .bin weights is refused unless allow_pickle=True."""
    import torch
    from safetensors.numpy import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_dir, d)
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    sd = {k: torch.from_numpy(v) for k, v in load_file(str(f)).items()}
    f.unlink()
    torch.save(sd, d / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        jattn.load(d)
    pipe = jattn.load(d, allow_pickle=True)
    assert "vae" in pipe.params


def test_truncated_checkpoint_names_missing_key(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "trunc"
    shutil.copytree(tiny_dir, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    dropped = "conv_out.weight"
    del sd[dropped]
    save_file(sd, str(f))
    with pytest.raises(CheckpointMismatchError, match=dropped.replace(".", r"\.")):
        jattn.load(d)


def test_sharded_safetensors(tiny_dir, tmp_path):
    """Sharded weights (index json) load to the same params."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "sharded"
    shutil.copytree(tiny_dir, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    wm = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / "unet" / name))
        wm.update({k: name for k in ks})
    f.unlink()
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": wm}))
    import jax
    a = jattn.load(tiny_dir).params["unet"]
    b = jattn.load(d).params["unet"]
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="model_index.json"):
        jattn.load(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="unet/diffusion_pytorch_model.safetensors"):
        jattn.load("some-org/some-model-that-is-not-here")


def test_bf16_load_runs(tiny_dir):
    import jax.numpy as jnp

    pipe = jattn.load(tiny_dir, dtype="bfloat16")
    out = pipe.generate(PROMPTS[:1], num_inference_steps=2, seed=0)
    assert out.images.dtype == np.uint8 and out.images.shape == (1, 16, 16, 3)
    leaf = pipe.params["unet"]["conv_in"]["kernel"]
    assert leaf.dtype == jnp.bfloat16


def test_cli_generate_and_sites(tiny_dir, tmp_path, capsys):
    from jattn.cli import main

    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", PROMPTS[0], "--prompt",
               PROMPTS[1], "--steps", "2", "--latents", str(tmp_path / "lat.npy"),
               "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000.png", "001.png", "grid.png", "result.json"]
    rc = main(["sites", "--model", str(tiny_dir)])
    assert rc == 0 and "attn2" in capsys.readouterr().out
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out-dir",
               str(tmp_path / "o2")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_clip_skip_matches_diffusers_encode_prompt(tiny_dir, jpipe):
    """``clip_skip`` = diffusers' (SD1: ``hidden_states[-(k + 1)]`` through the final layer
    norm; prompts only): the prompt embeddings equal what ``StableDiffusionPipeline.
    encode_prompt(clip_skip=1)`` computes, restated on the torch text encoder (diffusers'
    own path reads ``text_encoder.text_model.final_layer_norm``, which transformers v5's
    CLIPTextModel no longer has), differ from ``clip_skip=None``, and a value beyond the
    encoder's layers is one clear error. Breaks if the layer index or the final norm is
    wrong."""
    import torch
    from transformers import CLIPTextModel

    enc = CLIPTextModel.from_pretrained(f"{tiny_dir}/text_encoder")
    prompts = ["a red circle", "a blue square on the left"]
    ids = torch.from_numpy(np.asarray(jpipe.tokenize(prompts)).astype(np.int64))
    with torch.no_grad():
        hidden = enc(ids, output_hidden_states=True).hidden_states[-(1 + 1)]
        norm = getattr(enc, "text_model", enc).final_layer_norm
        want = norm(hidden)
    got = np.asarray(jpipe.encode_prompts(prompts, clip_skip=1))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert np.abs(got - np.asarray(jpipe.encode_prompts(prompts))).max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip"):
        jpipe.encode_prompts(prompts, clip_skip=99)
