"""SDXL end to end (issue 16): ``jattn.load`` of a tiny random ``StableDiffusionXLPipeline``
saved by diffusers (conftest's ``tiny_sdxl_dir``), generation against diffusers from the
same initial latents, the conditioning pytree, micro-conditioning, the loader's table and
its errors, VAE ``force_upcast``, the CLI.

Randomness: only deterministic schedulers are compared with diffusers (the checkpoint's
Euler, and DDIM with eta 0); Euler ancestral draws its noise from jattn's per-sample keys,
which torch's generator cannot reproduce (its step parity is tests/sampling's, with the
noise given).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jattn  # noqa: E402
from jattn.io.checkpoint import (CheckpointMismatchError,  # noqa: E402
                                 CheckpointNotFoundError, CheckpointUnsupportedError)

PROMPTS = ["a red circle on the left", "a blue square"]
STEPS, GS = 4, 5.0
# every SDXL-specific input at a non-default value
FULL = dict(
    negative_prompt=["blurry", "noise"], prompt_2=["a yellow star", "two green triangles"],
    negative_prompt_2=["grey", ""], original_size=(40, 24), crops_coords_top_left=(4, 2),
    target_size=(16, 16), negative_original_size=(8, 12), negative_crops_coords_top_left=(0, 6),
    negative_target_size=(20, 16))
# diffusers repeats the concatenated [negative; positive] time ids B times
# (``add_time_ids.repeat(batch_size, 1)``: rows neg, pos, neg, pos …), so for B > 1 its
# rows get the wrong time ids whenever the negative micro-conditioning differs from the
# positive one; jattn gives every row its own. Negative micro-conditioning is therefore
# compared at batch 1, and at batch 2 the negatives take diffusers' default (= positive).
NEG_SIZES = ("negative_original_size", "negative_crops_coords_top_left",
             "negative_target_size")
BATCHED = {k: v for k, v in FULL.items() if k not in NEG_SIZES}


@pytest.fixture(scope="module")
def jpipe(tiny_sdxl_dir):
    return jattn.load(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def ref_pipe(tiny_sdxl_dir):
    return diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


def _latents(b=2, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 4, 8, 8)).astype(np.float32)


def _diffusers(ref_pipe, prompts, latents, scheduler="euler", **kw):
    """diffusers' final latents and uint8 images (decoded as its pipeline does)."""
    pipe = ref_pipe
    if scheduler == "ddim":
        pipe = diffusers.StableDiffusionXLPipeline(**ref_pipe.components)
        # jattn's "ddim" on an Euler config: no x0 clipping, final alpha = alphas_cumprod[0]
        pipe.scheduler = diffusers.DDIMScheduler.from_config(
            ref_pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    with torch.no_grad():
        lat = pipe(prompts, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                   guidance_scale=GS, output_type="latent", **kw).images
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        img = pipe.image_processor.postprocess(img, output_type="np")
    return lat.numpy(), (img * 255).round().astype(np.uint8)


def _compare(out, ref_lat, ref_img, what):
    err = float(np.abs(out.latents - ref_lat).max())
    rel = err / max(1.0, float(np.abs(ref_lat).max()))
    img = int(np.abs(out.images.astype(int) - ref_img.astype(int)).max())
    print(f"{what}: final latents max-abs {err:.2e} (relative {rel:.2e}), images max "
          f"{img} uint8")
    assert rel <= 1e-4, (what, err, rel)
    assert img <= 1, (what, img)


# ------------------------------------------------------------------ parity with diffusers
def test_sdxl_pipeline_matches_diffusers(jpipe, ref_pipe):
    """Two prompts with negative prompts, prompt_2 / negative_prompt_2 and non-default
    micro-conditioning, the checkpoint's Euler scheduler, CFG 5, fp32: jattn's final
    latents and images are diffusers' StableDiffusionXLPipeline's from the same initial
    latents (≤ 1e-4 relative, ±1 uint8). Breaks if the concatenation of the encoders'
    states, the pooled text_embeds, the order of the time ids, the CFG layout of the
    pytree or the SDXL VAE scaling differ."""
    lat = _latents()
    ref = _diffusers(ref_pipe, PROMPTS, lat, **BATCHED)
    out = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS, latents=lat,
                         **BATCHED)
    _compare(out, *ref, "euler, batch 2, prompt_2, negatives, micro-conditioning")


def _one(kw, i=1):
    return {k: (v[i:i + 1] if isinstance(v, list) else v) for k, v in kw.items()}


@pytest.mark.slow
def test_sdxl_given_time_ids_reproduce_diffusers_batch_layout(jpipe, ref_pipe):
    """Negative micro-conditioning at batch 2 against diffusers: its rows take the time
    ids neg, pos, neg, pos (NEG_SIZES); handing jattn exactly those rows as "time_ids" of
    prompt_embeds / uncond_embeds reproduces its result (same compiled program as the
    first test). Breaks if given time_ids were ignored or the negative rows' conditioning
    were not the uncond half of the CFG batch."""
    lat = _latents(seed=5)
    ref = _diffusers(ref_pipe, PROMPTS, lat, **FULL)
    pos = jpipe.time_ids(1, 16, 16, FULL["original_size"], FULL["crops_coords_top_left"],
                         FULL["target_size"])
    neg = jpipe.time_ids(1, 16, 16, *(FULL[k] for k in NEG_SIZES))
    rows = np.concatenate([neg, pos])  # diffusers: cat([neg, pos]).repeat(B=2, 1)
    text = jpipe.encode_prompts(PROMPTS, prompts_2=FULL["prompt_2"])
    un = jpipe.encode_prompts(FULL["negative_prompt"], prompts_2=FULL["negative_prompt_2"])
    out = jpipe.generate(None, num_inference_steps=STEPS, guidance_scale=GS, latents=lat,
                         prompt_embeds={**text, "time_ids": rows},
                         uncond_embeds={**un, "time_ids": rows})
    _compare(out, *ref, "euler, batch 2, negative micro-conditioning in diffusers' row order")
    own = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS, latents=lat,
                         **FULL)
    assert np.abs(own.latents - out.latents).max() > 1e-3  # jattn's own rows differ


@pytest.mark.slow
def test_sdxl_negative_micro_conditioning_matches_diffusers(jpipe, ref_pipe):
    """Every SDXL input, the negative micro-conditioning included, through generate's own
    arguments (at batch 1, where diffusers' rows are right, see NEG_SIZES): diffusers'
    result. Breaks if the negative rows took the positive time ids or a negative default
    differed. (A batch-1 compile: slow.)"""
    lat = _latents(1, seed=4)
    ref = _diffusers(ref_pipe, PROMPTS[1:], lat, **_one(FULL))
    out = jpipe.generate(PROMPTS[1:], num_inference_steps=STEPS, guidance_scale=GS,
                         latents=lat, **_one(FULL))
    _compare(out, *ref, "euler, batch 1, every SDXL input incl. negative micro-conditioning")
    plain = jpipe.generate(PROMPTS[1:], num_inference_steps=STEPS, guidance_scale=GS,
                           latents=lat, **_one(BATCHED))
    assert np.abs(plain.latents - out.latents).max() > 1e-3  # the negative sizes matter


def test_sdxl_zero_negatives_and_default_micro_conditioning(jpipe, ref_pipe):
    """Without any negative prompt, force_zeros_for_empty_prompt (model_index.json: true)
    makes the negative conditioning zeros, and the micro-conditioning defaults to
    (height, width), (0, 0), (height, width): diffusers' result. With the flag off, the
    encoded "" is used instead (and the result changes). Breaks if zeros are not used,
    or the default sizes differ from diffusers'."""
    lat = _latents(seed=1)
    ref = _diffusers(ref_pipe, PROMPTS, lat)
    out = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS, latents=lat)
    _compare(out, *ref, "euler, zero negatives, default micro-conditioning")
    jpipe.force_zeros_for_empty_prompt = False
    try:
        ref_pipe.register_to_config(force_zeros_for_empty_prompt=False)
        ref2 = _diffusers(ref_pipe, PROMPTS, lat)
        out2 = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS,
                              latents=lat)
    finally:
        jpipe.force_zeros_for_empty_prompt = True
        ref_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    _compare(out2, *ref2, "euler, encoded empty negative")
    assert np.abs(out2.latents - out.latents).max() > 1e-3


@pytest.mark.slow
def test_sdxl_ddim_matches_diffusers(jpipe, ref_pipe):
    """The same with DDIM (eta 0), the other deterministic scheduler (a second compile)."""
    lat = _latents(seed=2)
    ref = _diffusers(ref_pipe, PROMPTS, lat, scheduler="ddim", **BATCHED)
    out = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS,
                         scheduler="ddim", latents=lat, **BATCHED)
    _compare(out, *ref, "ddim, batch 2, prompt_2, negatives, micro-conditioning")


def test_time_ids_match_diffusers(jpipe, ref_pipe):
    """Pipeline.time_ids is diffusers' _get_add_time_ids (original size, crop top-left,
    target size, in that order), per row; defaults (height, width), (0, 0). Breaks if the
    order or a default changes."""
    got = np.asarray(jpipe.time_ids(3, 16, 24, (40, 24), (4, 2), (16, 8)))
    want = ref_pipe._get_add_time_ids((40, 24), (4, 2), (16, 8), dtype=torch.float32,
                                      text_encoder_projection_dim=16).numpy()
    assert got.shape == (3, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.repeat(want, 3, axis=0))
    np.testing.assert_array_equal(np.asarray(jpipe.time_ids(1, 16, 24))[0],
                                  [16, 24, 0, 0, 16, 24])


def test_encode_prompts_is_the_text_part_of_the_conditioning(jpipe, ref_pipe):
    """encode_prompts on SDXL gives {"context" (B, 77, 64), "text_embeds" (B, 16)} =
    diffusers' encode_prompt (prompt_embeds, pooled); handed back as prompt_embeds /
    uncond_embeds it gives generate's result from the prompts (bit-identical). Breaks if
    methods that encode prompts themselves could not drive SDXL."""
    text = jpipe.encode_prompts(PROMPTS, prompts_2=FULL["prompt_2"])
    assert set(text) == {"context", "text_embeds"}
    assert text["context"].shape == (2, 77, 64) and text["text_embeds"].shape == (2, 16)
    with torch.no_grad():
        pe, _, pooled, _ = ref_pipe.encode_prompt(PROMPTS, prompt_2=FULL["prompt_2"],
                                                  do_classifier_free_guidance=False)
    assert np.abs(np.asarray(text["context"]) - pe.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(text["text_embeds"]) - pooled.numpy()).max() <= 1e-5
    neg = jpipe.encode_prompts(FULL["negative_prompt"], prompts_2=FULL["negative_prompt_2"])
    micro = {k: v for k, v in FULL.items() if "size" in k or "crops" in k}
    a = jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS, seed=3, **FULL)
    b = jpipe.generate(None, num_inference_steps=STEPS, guidance_scale=GS, seed=3,
                       prompt_embeds=text, uncond_embeds=neg, **micro)
    np.testing.assert_array_equal(a.latents, b.latents)


@pytest.mark.slow
def test_sdxl_uncond_per_step_pytree(jpipe):
    """uncond_per_step on SDXL (null-text inversion's per-step negatives): the text
    conditioning dict with a step axis; the same negatives at every step give the result
    of uncond_embeds, and a change at one step changes it. Breaks if the sampler indexed
    only one leaf per step or the negative time ids were dropped. (A new sampler trace:
    slow.)"""
    import jax.numpy as jnp

    text = jpipe.encode_prompts(PROMPTS)
    un = jpipe.encode_prompts(["blurry", "noise"])
    kw = dict(num_inference_steps=STEPS, guidance_scale=GS, seed=4, prompt_embeds=text,
              original_size=(40, 24), negative_original_size=(8, 8))
    ref = jpipe.generate(None, uncond_embeds=un, **kw)
    per = {k: jnp.broadcast_to(v, (STEPS,) + v.shape) for k, v in un.items()}
    got = jpipe.generate(None, uncond_per_step=per, **kw)
    np.testing.assert_allclose(got.latents, ref.latents, atol=1e-5)
    per2 = dict(per, text_embeds=per["text_embeds"].at[2].set(0.0))
    other = jpipe.generate(None, uncond_per_step=per2, **kw)
    assert np.abs(other.latents - got.latents).max() > 1e-4


# ------------------------------------------------------------------ batch, recompilation
@pytest.mark.slow
def test_sdxl_batch_equals_single(jpipe):
    """Row i of a batch equals the same prompt (prompt_2, micro-conditioning) generated
    alone with seed + i, up to batched-matmul rounding (breaks if a conditioning leaf is
    not per row, e.g. time_ids shared or mis-ordered across the CFG halves). (A batch-1
    compile: slow.)"""
    kw = dict(num_inference_steps=STEPS, guidance_scale=GS, seed=10, **FULL)
    batch = jpipe.generate(PROMPTS, **kw)
    alone = jpipe.generate(PROMPTS[1:], num_inference_steps=STEPS, guidance_scale=GS,
                           seed=11, **_one(FULL))
    np.testing.assert_allclose(batch.latents[1], alone.latents[0], atol=1e-4)
    assert np.abs(batch.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1


def test_sdxl_no_recompile_on_new_prompts_and_micro_conditioning(jpipe):
    """New prompts, prompt_2, negatives, seeds, guidance scale and micro-conditioning
    values (same batch size and image size) never retrace the text encoders, the sampler
    or the decoder (the conditioning pytree keeps its structure: zero negatives and
    encoded ones are the same tree)."""
    jpipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GS, **FULL)
    before = dict(jpipe.trace_counts)
    jpipe.generate(["a green triangle", "two stars"], num_inference_steps=STEPS,
                   guidance_scale=3.0, seed=7, prompt_2="a ring", original_size=(64, 64),
                   crops_coords_top_left=(8, 0))
    jpipe.generate(["a purple ring", "a star"], num_inference_steps=STEPS, guidance_scale=6.0,
                   negative_prompt="noise", negative_prompt_2=["a", "b"], seed=[1, 2],
                   target_size=(32, 8))
    assert jpipe.trace_counts == before, (before, jpipe.trace_counts)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,match", [
    (dict(prompt_2=["a", "b", "c"]), "prompt_2: got 3 for 2 prompts"),
    (dict(negative_prompt="x", negative_prompt_2=["a", "b", "c"]),
     "negative_prompt_2: got 3 for 2 prompts"),
    (dict(original_size=(16,)), "original_size=\\(16,\\): expected a pair"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left\\[0\\]=-1: must be ≥ 0"),
    (dict(negative_target_size=(0, 16)), "negative_target_size\\[0\\]=0: must be ≥ 1"),
    (dict(prompt_embeds=np.zeros((2, 77, 64), np.float32)),
     "prompt_embeds: on SDXL give the dict of Pipeline.encode_prompts"),
    (dict(prompt_embeds={"context": np.zeros((2, 77, 64), np.float32),
                         "text_embeds": np.zeros((2, 16), np.float32)}, prompt_2="x"),
     "prompt_2: given with prompt_embeds"),
])
def test_sdxl_bad_input(jpipe, kw, match):
    """One ValueError naming the argument and the fix, before any compute."""
    prompts = None if "prompt_embeds" in kw else PROMPTS
    with pytest.raises(ValueError, match=match):
        jpipe.generate(prompts, num_inference_steps=STEPS, **kw)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.parametrize("arg", ["prompt_2", "negative_prompt_2", "original_size",
                                 "crops_coords_top_left", "negative_target_size"])
def test_sdxl_only_arguments_on_sd1(sd1_pipe, arg):
    """SDXL-only arguments on an SD1 model: a ValueError naming the argument (no silent
    ignore)."""
    pipe = sd1_pipe
    value = "x" if "prompt" in arg else (8, 8)
    with pytest.raises(ValueError, match=f"{arg}: this model has one text encoder"):
        pipe.generate(["a"], num_inference_steps=2, **{arg: value})
    with pytest.raises(ValueError, match="prompt_2: this model has one text encoder"):
        pipe.encode_prompts(["a"], prompts_2=["b"])
    assert not pipe.is_sdxl and pipe.vae_dtype == pipe.dtype


# ------------------------------------------------------------------ loader
def _copy(src, dst, drop=(), index_drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if index_drop:
        f = dst / "model_index.json"
        index = json.loads(f.read_text())
        for k in index_drop:
            index.pop(k, None)
        f.write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_2", "text_encoder"])
def test_sdxl_folder_missing_a_text_component(tiny_sdxl_dir, tmp_path, missing):
    """An SDXL folder without one text encoder or tokenizer: one CheckpointNotFoundError
    naming the folder, what it is and the fix (not a KeyError or a shape error later)."""
    d = _copy(tiny_sdxl_dir, tmp_path / "m", drop=(missing,))
    with pytest.raises(CheckpointNotFoundError) as e:
        jattn.load(d)
    msg = str(e.value)
    assert f"{d / missing}: missing folder" in msg and "Fix:" in msg, msg
    assert "SDXL checkpoint needs" in msg, msg


def test_sdxl_unet_without_second_encoder_in_index(tiny_sdxl_dir, tmp_path):
    """text_encoder_2/ and tokenizer_2/ gone from the folder AND from model_index.json: the
    SDXL UNet (addition_embed_type text_time) still names the missing text_encoder_2."""
    d = _copy(tiny_sdxl_dir, tmp_path / "m", drop=("text_encoder_2", "tokenizer_2"),
              index_drop=("text_encoder_2", "tokenizer_2", "_class_name"))
    with pytest.raises(CheckpointNotFoundError, match="text_encoder_2: missing folder.*text_time"):
        jattn.load(d)


def test_sdxl_components_that_do_not_belong_together(tiny_sdxl_dir, tmp_path):
    """text_encoder_2's projection width that the UNet's added embedding cannot take, and a
    null text_encoder (SDXL refiner): clear errors at load."""
    d = _copy(tiny_sdxl_dir, tmp_path / "m")
    f = d / "text_encoder_2" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["projection_dim"] = 24
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError,
                       match="projection_class_embeddings_input_dim=64 but text_encoder_2"):
        jattn.load(d)
    d2 = _copy(tiny_sdxl_dir, tmp_path / "r")
    index = json.loads((d2 / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (d2 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointUnsupportedError, match="text_encoder is null"):
        jattn.load(d2)


def test_sdxl_loaded_from_the_table(jpipe, tiny_sdxl_dir):
    """model_index.json makes it SDXL: both encoders and tokenizers (tokenizer_2 pads with
    "!"), force_zeros_for_empty_prompt, VAE scaling factor 0.13025 and force_upcast, the
    params of every model row."""
    from jattn.pipeline import SDXL_COMPONENTS

    assert jpipe.is_sdxl and jpipe.force_zeros_for_empty_prompt
    assert jpipe.tokenizer_2.pad_token_id == 0 and jpipe.tokenizer.pad_token_id != 0
    assert jpipe.vae_config.scaling_factor == 0.13025 and jpipe.vae_config.force_upcast
    assert set(jpipe.params) == {c.name for c in SDXL_COMPONENTS if c.kind == "model"}
    assert jpipe.text_config_2.projection_dim == 16


# ------------------------------------------------------------------ VAE force_upcast
@pytest.mark.slow
def test_force_upcast_decodes_in_float32(tiny_sdxl_dir, jpipe):
    """bfloat16 SDXL pipeline with force_upcast: the VAE decodes in float32 — its images
    equal a float32 decode with the bf16-rounded weights exactly (a second load and
    compile: slow; SD1 keeping its dtype is in test_sdxl_only_arguments_on_sd1)."""
    import jax
    import jax.numpy as jnp

    bf = jattn.load(tiny_sdxl_dir, dtype="bfloat16")
    assert bf.vae_dtype == jnp.float32
    lat = jnp.asarray(_latents(1, 5).transpose(0, 2, 3, 1)) * 0.5
    got = bf.decode(lat)
    rounded = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), bf.params["vae"])
    want = np.asarray(jpipe._decode_fn()(rounded, lat))
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ CLI
def test_cli_sdxl_flags_and_sites(tiny_sdxl_dir, tiny_sd_dir, jpipe, tmp_path, capsys):
    """`jattn generate` with --prompt-2 and the micro-conditioning flags gives the API's
    images; the flags on an SD1 model: exit 2 and one line naming the flag; `jattn sites`
    lists the SDXL sites by diffusers path."""
    from jattn.cli import main
    from jattn.commands import common

    # the CLI's per-process pipeline cache, primed with the loaded pipeline (no recompile)
    common._PIPES[(str(tiny_sdxl_dir), "float32", False)] = jpipe
    lat = _latents()
    np.save(tmp_path / "lat.npy", lat)
    rc = main(["generate", "--model", str(tiny_sdxl_dir), "--prompt", PROMPTS[0], "--prompt",
               PROMPTS[1], "--prompt-2", "a yellow star", "--negative-prompt", "blurry",
               "--original-size", "40", "24", "--crops-coords-top-left", "4", "2",
               "--target-size", "16", "16", "--steps", str(STEPS), "--guidance-scale",
               str(GS), "--latents", str(tmp_path / "lat.npy"), "--out-dir",
               str(tmp_path / "out")])
    assert rc == 0
    api = jpipe.generate(PROMPTS, negative_prompt="blurry", prompt_2="a yellow star",
                         original_size=(40, 24), crops_coords_top_left=(4, 2),
                         target_size=(16, 16), num_inference_steps=STEPS, guidance_scale=GS,
                         latents=lat)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "001.png")),
                                  api.images[1])
    capsys.readouterr()
    rc = main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a", "--prompt-2", "b",
               "--steps", "1", "--out-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt-2: this model" in err and "SDXL" in err, err
    assert len(err.strip().splitlines()) == 1
    rc = main(["sites", "--model", str(tiny_sdxl_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in out
    assert "mid_block.attentions.0.transformer_blocks.1.attn1" in out
    assert f"{len(jpipe.sites())} attention sites" in out


def test_clip_skip_matches_diffusers_encode_prompt(jpipe, ref_pipe):
    """SDXL ``clip_skip`` (``hidden_states[-(k + 2)]`` of both encoders, prompts only): the
    context equals ``StableDiffusionXLPipeline.encode_prompt(clip_skip=1)`` and the pooled
    embedding is unchanged. Breaks if the index is SD1's or the pooled output moves."""
    import torch

    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        want, _, pooled, _ = ref_pipe.encode_prompt(prompts, device="cpu",
                                                    do_classifier_free_guidance=False,
                                                    clip_skip=1)
    got = jpipe.encode_prompts(prompts, clip_skip=1)
    np.testing.assert_allclose(np.asarray(got["context"]), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["text_embeds"]), pooled.numpy(), atol=1e-5)
    base = jpipe.encode_prompts(prompts)
    assert np.abs(np.asarray(got["context"]) - np.asarray(base["context"])).max() > 1e-3
