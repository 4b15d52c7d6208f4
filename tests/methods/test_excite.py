"""Attend-and-Excite: loss vs a NumPy restatement of the references' formula, parity with
diffusers' StableDiffusionAttendAndExcitePipeline on a tiny random pipeline, zero step sizes
= plain generation, no recompiles, bad input."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.excite import (attend_and_excite, excite_guidance, excite_losses,
                                  gaussian_kernel, step_sizes)


def np_excite_loss(maps, indices, last):
    """Restatement of the reference's loss for one sample: maps (r, r, S)."""
    a = maps[:, :, 1:last] * 100.0
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    x = np.arange(3, dtype=np.float64)
    g = 1 / (0.5 * math.sqrt(2 * math.pi)) * np.exp(-(((x - 1) / (2 * 0.5)) ** 2))
    k = np.outer(g, g)
    k = k / k.sum()
    maxes = []
    for i in indices:
        img = np.pad(a[:, :, i - 1], 1, mode="reflect")
        r = a.shape[0]
        sm = np.zeros((r, r))
        for u in range(3):
            for v in range(3):
                sm += k[u, v] * img[u:u + r, v:v + r]
        maxes.append(sm.max())
    return max(max(0.0, 1.0 - m) for m in maxes), maxes


def test_loss_matches_numpy_restatement():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 16, 77)).astype(np.float32) * 0.05
    lasts = [6, 9]
    idx = [[2, 5], [3]]
    tokens = np.zeros((2, 4), np.int32)
    valid = np.zeros((2, 4), bool)
    span = np.zeros((2, 77), bool)
    for b in range(2):
        tokens[b, :len(idx[b])] = idx[b]
        valid[b, :len(idx[b])] = True
        span[b, 1:lasts[b]] = True
    loss, mx = excite_losses(jnp.asarray(maps), jnp.asarray(tokens), jnp.asarray(valid),
                             jnp.asarray(span))
    for b in range(2):
        want, wmax = np_excite_loss(maps[b].reshape(4, 4, 77).astype(np.float64), idx[b],
                                    lasts[b])
        np.testing.assert_allclose(float(loss[b]), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mx[b, :len(idx[b])]), wmax, atol=1e-5)
    assert abs(gaussian_kernel()[1, 1] - 1 / (1 + 2 * math.exp(-1)) ** 2) < 1e-6
    np.testing.assert_allclose(step_sizes(50)[:3], 20 * np.sqrt(np.linspace(1, .5, 50)[:3]),
                               rtol=1e-6)
    assert step_sizes(50)[25:].max() == 0


@pytest.fixture(scope="module")
def jpipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.slow
def test_zero_steps_reproduce_plain_generation(jpipe):
    plain = jpipe.generate(["a cat and a frog"], num_inference_steps=4, seed=3)
    off = attend_and_excite(jpipe, "a cat and a frog", ["cat", "frog"], num_inference_steps=4,
                            seed=3, scale_factor=0.0, attn_res=8)
    np.testing.assert_array_equal(off.latents, plain.latents)
    np.testing.assert_array_equal(off.images, plain.images)


@pytest.mark.slow  # ~45-80 s; the default suite keeps to 15 min
def test_guidance_lowers_the_loss_and_no_recompiles(jpipe):
    from jattn.sampling import schedulers as sch
    from jattn.sampling.guidance import apply_guidance

    g = excite_guidance(jpipe, ["a cat and a frog"], [["cat", "frog"]], num_inference_steps=3,
                        attn_res=8, scale_factor=100.0, thresholds={})
    schedule = jpipe.schedule(3, "ddim")
    fn = jpipe.unet_fn(jpipe.params["unet"])
    cond = jpipe.encode_prompts(["a cat and a frog"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    t = schedule.timesteps[0]
    scale = lambda z: sch.scale_model_input(schedule, z, 0)  # noqa: E731
    x1, l0 = apply_guidance(g, fn, scale, x, t, cond, jnp.int32(0))
    _, l1 = apply_guidance(g, fn, scale, x1, t, cond, jnp.int32(0))
    assert float(l1) < float(l0)
    kw = dict(num_inference_steps=3, attn_res=8, thresholds={0: 0.9})
    attend_and_excite(jpipe, "a cat and a frog", ["cat", "frog"], **kw)
    before = dict(jpipe.trace_counts)
    attend_and_excite(jpipe, "a red dog and a blue bird", ["dog", "blue bird"], seed=4, **kw)
    assert jpipe.trace_counts == before


def test_parity_with_diffusers(tiny_sd_dir, jpipe):
    """Same weights, same initial latents: final latents and images within the fp32 noise
    floor of plain generation (jattn vs diffusers' StableDiffusionPipeline, measured here).
    The tiny model's latents are 8²: diffusers' attn_res is given as (8, 8) (its default
    rule ceil(16 px / 32) = 1 has no cross site)."""
    import torch
    from diffusers import StableDiffusionAttendAndExcitePipeline, StableDiffusionPipeline

    tp = StableDiffusionAttendAndExcitePipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    sp = StableDiffusionPipeline(**tp.components)
    sp.set_progress_bar_config(disable=True)
    prompt, n = "a cat and a frog", 6
    th = {0: 0.05, 3: 0.5}
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=n, guidance_scale=7.5)
    ref = tp(prompt, token_indices=[2, 5], latents=torch.from_numpy(lat), attn_res=(8, 8),
             thresholds=th, max_iter_to_alter=5, output_type="np", **kw).images
    ref_lat = tp(prompt, token_indices=[2, 5], latents=torch.from_numpy(lat), attn_res=(8, 8),
                 thresholds=th, max_iter_to_alter=5, output_type="latent",
                 **kw).images.numpy()
    plain_t = sp(prompt, latents=torch.from_numpy(lat), output_type="latent",
                 **kw).images.numpy()
    plain_j = jpipe.generate([prompt], latents=lat, decode=False, **kw).latents
    floor = float(np.abs(plain_t - plain_j).max())
    out = attend_and_excite(jpipe, prompt, token_indices=[2, 5], latents=lat, attn_res=8,
                            token_span="diffusers", thresholds=th, max_iter_to_alter=5, **kw)
    effect = float(np.abs(ref_lat - plain_t).max())
    diff = float(np.abs(out.latents - ref_lat).max())
    print(f"plain floor {floor:.2e}  A&E jattn-diffusers {diff:.2e}  A&E effect {effect:.2e}")
    assert effect > 100 * max(floor, 1e-6)
    assert diff <= max(10 * floor, 1e-4)
    img = (out.images.astype(np.float32) / 255.0)
    assert np.abs(img - ref).max() <= 2 / 255 + 10 * floor


def test_bad_input(jpipe):
    with pytest.raises(ValueError, match="excite.*stop words"):
        excite_guidance(jpipe, ["a cat and a frog"], [["a", "and"]], attn_res=8)
    with pytest.raises(ValueError, match="excite.*not in the prompt"):
        excite_guidance(jpipe, ["a cat and a frog"], [["dog"]], attn_res=8)
    with pytest.raises(ValueError, match="attn_res"):
        excite_guidance(jpipe, ["a cat and a frog"], [["cat"]], attn_res=5)
