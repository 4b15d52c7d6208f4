"""Edit-friendly DDPM inversion (jattn.sampling.ddpm_inversion) on the tiny random pipeline:
exact regeneration through the one sampler loop with the noise-map hook, the noise maps
against a torch re-statement of the reference (inbarhub/DDPM_inversion), batch
invariance, the reference quirk, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jattn
from jattn.sampling import schedulers as sch
from jattn.sampling.ddpm_inversion import ddpm_invert, regenerate

# The tiny random UNet predicts poor eps, so |z_t| reaches ~70 and the intermediate latents
# ~10: float32 rounding of each step (~1e-6) is amplified ~3x per later step by this
# UNet's Jacobian (regeneration error measured with CFG 3.5: 4 steps 4e-5, 6 steps 1.1e-4,
# 10 steps 3.4e-4; CFG 1: a third of that). 4 steps keep the 1e-4 bound meaningful.
STEPS = 4


@pytest.fixture(scope="module")
def setup(tiny_sd_dir):
    from skimage import data

    imgs = [np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.LANCZOS))
            for a in (data.astronaut(), data.chelsea())]
    return jattn.load(tiny_sd_dir), np.stack(imgs)


@pytest.mark.parametrize("scheduler,skip", [("ddim", 0), ("ddim", 2),
                                            pytest.param("ddpm", 1, marks=pytest.mark.slow)])
def test_regeneration_reproduces_the_encoded_latents(setup, scheduler, skip):
    """Started at x_skip with the noise maps replacing the scheduler's fresh noise, the
    sampler loop lands on the encoded latents (breaks on a wrong step pairing of x_t and
    z_t, a wrong CFG, a start step off by one, or noise not replacing the draw)."""
    pipe, imgs = setup
    inv = ddpm_invert(pipe, imgs, "a photo", num_inference_steps=STEPS, skip=skip,
                      scheduler=scheduler, seed=3)
    assert inv.x_ts.shape == (STEPS + 1, 2, 8, 8, 4)
    assert inv.noise_maps.shape == (STEPS, 2, 8, 8, 4)
    out = regenerate(pipe, inv, decode=False)
    target = inv.latents0.transpose(0, 3, 1, 2)
    assert np.abs(out.latents - target).max() <= 1e-4
    # the hook matters: the same start without the noise maps lands elsewhere
    plain = pipe.generate(inv.prompts, num_inference_steps=STEPS, guidance_scale=3.5,
                          scheduler=scheduler, eta=inv.eta, latents=inv.x_ts[0].transpose(
                              0, 3, 1, 2), decode=False)
    assert np.abs(plain.latents - target).max() > 1e-2


def test_noise_maps_match_the_reference(tiny_sd_dir, setup):
    """z_t equals the reference's ``inversion_forward_process`` given the same x_t
    (DDIM eta 1, CFG 3.5 against ""); breaks on a wrong mean, variance or CFG order."""
    from refs.ddpm_inversion_torch import torch_ddpm_noise_maps

    pipe, imgs = setup
    inv = ddpm_invert(pipe, imgs[:1], "a photo", num_inference_steps=STEPS, seed=0)
    xts = inv.x_ts.transpose(0, 1, 4, 2, 3)  # (n+1, 1, C, h, w)
    ref = torch_ddpm_noise_maps(str(tiny_sd_dir), xts, "a photo", STEPS, 3.5)
    got = inv.noise_maps.transpose(0, 1, 4, 2, 3)
    assert np.abs(got - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max()), \
        np.abs(got - ref).max()


def test_x_t_are_independent_draws_around_x0(setup):
    """x_i = sqrt(abar) x0 + sqrt(1 - abar) eps_i with eps_i drawn anew for every step
    (not a Markov chain): the recovered eps_i are standard normal and uncorrelated."""
    pipe, imgs = setup
    inv = ddpm_invert(pipe, imgs, "", num_inference_steps=STEPS)
    schedule = pipe.schedule(STEPS, "ddim", 1.0)
    ab = np.asarray(schedule.alphas_cumprod)[np.asarray(schedule.timesteps)]
    x0 = inv.latents0
    eps = np.stack([(inv.x_ts[i] - np.sqrt(ab[i]) * x0) / np.sqrt(1 - ab[i])
                    for i in range(STEPS)]).reshape(STEPS, -1)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
    corr = np.corrcoef(eps)[np.triu_indices(STEPS, 1)]
    assert np.abs(corr).max() < 0.2
    assert np.array_equal(inv.x_ts[-1], x0)


def test_batch_invariance_and_one_compile(setup):
    """Image b depends on its own seed only (alone or in a batch), and a second inversion
    of other images reuses the compiled loop."""
    pipe, imgs = setup
    both = ddpm_invert(pipe, imgs, ["a photo", "a cat"], num_inference_steps=STEPS,
                       seed=[5, 6])
    before = dict(pipe.trace_counts)
    alone = ddpm_invert(pipe, imgs[1:][::-1].copy(), "a cat", num_inference_steps=STEPS,
                        seed=[6])
    np.testing.assert_allclose(alone.x_ts[:, 0], both.x_ts[:, 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alone.noise_maps[:, 0], both.noise_maps[:, 1], rtol=1e-4, atol=1e-4)
    again = ddpm_invert(pipe, imgs[::-1].copy(), "a dog", num_inference_steps=STEPS,
                        seed=[1, 2])
    assert pipe.trace_counts.get("ddpm_invert") == before.get("ddpm_invert")
    assert again.prompts == ["a dog", "a dog"] and again.seeds == [1, 2]


def test_reference_quirk_zeroes_the_last_map(setup):
    """``reference_quirks=True``: zs[-1] = 0 as the reference, so regeneration stops at
    the last step's mean, sigma_last * z_last away from x0."""
    pipe, imgs = setup
    clean = ddpm_invert(pipe, imgs[:1], "a photo", num_inference_steps=STEPS, seed=2)
    quirk = ddpm_invert(pipe, imgs[:1], "a photo", num_inference_steps=STEPS, seed=2,
                        reference_quirks=True)
    assert not quirk.noise_maps[-1].any()
    np.testing.assert_array_equal(quirk.noise_maps[:-1], clean.noise_maps[:-1])
    out = regenerate(pipe, quirk, decode=False).latents.transpose(0, 2, 3, 1)
    sigma = float(pipe.schedule(STEPS, "ddim", 1.0).coef["std"][-1])
    np.testing.assert_allclose(out, clean.latents0 - sigma * clean.noise_maps[-1], atol=1e-4)


def test_bad_inputs(setup):
    pipe, imgs = setup
    with pytest.raises(ValueError, match="scheduler='euler'"):
        ddpm_invert(pipe, imgs, "a", num_inference_steps=3, scheduler="euler")
    with pytest.raises(ValueError, match="eta=0"):
        ddpm_invert(pipe, imgs, "a", num_inference_steps=3, eta=0)
    with pytest.raises(ValueError, match="skip=3"):
        ddpm_invert(pipe, imgs, "a", num_inference_steps=3, skip=3)
    with pytest.raises(ValueError, match="prompts: 3 prompts for 2 images"):
        ddpm_invert(pipe, imgs, ["a", "b", "c"], num_inference_steps=3)
    with pytest.raises(ValueError, match="images"):
        ddpm_invert(pipe, imgs[..., :2], "a", num_inference_steps=3)
    inv = ddpm_invert(pipe, imgs[:1], "a", num_inference_steps=3)
    with pytest.raises(ValueError, match="skip=-1"):
        inv.x_start(-1)
    assert sch.KINDS  # schedulers module importable alongside
