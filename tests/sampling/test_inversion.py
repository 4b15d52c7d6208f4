"""DDIM and null-text inversion against a faithful eager torch re-statement of the
reference (google/prompt-to-prompt null_text_w_ptp.ipynb NullInversion) on the same tiny
random weights."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jattn
from jattn.sampling.inversion import invert, load_inversion, save_inversion


@pytest.fixture(scope="module")
def setup(tiny_sd_dir):
    from skimage import data

    img = np.asarray(Image.fromarray(data.astronaut()).resize((16, 16), Image.Resampling.LANCZOS))
    return jattn.load(tiny_sd_dir), img


def test_ddim_and_null_text_match_reference(tiny_sd_dir, setup):
    """Same DDIM-inversion trajectory and the same optimised null-text embeddings per step
    as the reference loop (breaks on a wrong timestep pairing, lr schedule, Adam, loss or
    early-stopping rule)."""
    from refs.null_text_torch import torch_null_text

    pipe, img = setup
    steps, inner = 4, 3
    _, _, ref_u, ref_lat = torch_null_text(str(tiny_sd_dir), img, "a photo", steps, 7.5,
                                           inner=inner)
    inv = invert(pipe, img[None], "a photo", num_inference_steps=steps, inner_steps=inner)
    lat = inv.latents.transpose(0, 1, 4, 2, 3)  # (T+1, B, C, h, w)
    assert np.abs(lat - ref_lat).max() <= 1e-4 * max(1, np.abs(ref_lat).max())
    assert inv.uncond_per_step.shape == ref_u.shape
    # Adam normalises the gradient: where it is ~0, float noise can flip an update of size
    # up to lr (1e-2); such elements are rare, so bound the max loosely and the mean tightly.
    diff = np.abs(inv.uncond_per_step - ref_u)
    assert diff.max() <= 1e-3 and diff.mean() <= 1e-5, (diff.max(), diff.mean())
    assert np.abs(ref_u[-1] - ref_u[0]).mean() > 100 * diff.mean()  # the optimisation moved
    assert (inv.inner_iterations <= inner).all()


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_null_text_beats_ddim_inversion_under_cfg(setup):
    """With CFG 7.5, regenerating from z*_T drifts; the null-text embeddings pull the
    trajectory back toward z*_0 (the point of the method)."""
    pipe, img = setup
    steps = 5
    ddim = invert(pipe, img[None], "a photo", method="ddim", num_inference_steps=steps)
    nt = invert(pipe, img[None], "a photo", num_inference_steps=steps)
    z0 = ddim.latents[0].transpose(0, 3, 1, 2)
    rec_ddim = pipe.generate(["a photo"], num_inference_steps=steps, latents=ddim.x_t,
                             scheduler="ddim", guidance_scale=7.5)
    rec_nt = pipe.generate(["a photo"], num_inference_steps=steps, latents=nt.x_t,
                           scheduler="ddim", guidance_scale=7.5,
                           uncond_per_step=nt.uncond_per_step)
    err_ddim = np.abs(rec_ddim.latents - z0).mean()
    err_nt = np.abs(rec_nt.latents - z0).mean()
    assert err_nt < err_ddim


def test_inversion_file_round_trip(setup, tmp_path):
    pipe, img = setup
    inv = invert(pipe, img[None], "a photo", method="ddim", num_inference_steps=3)
    save_inversion(inv, tmp_path / "inv.npz")
    back = load_inversion(tmp_path / "inv.npz")
    assert np.array_equal(back.latents, inv.latents) and back.uncond_per_step is None
    assert back.prompt == ["a photo"] and back.num_inference_steps == 3


def test_bad_inputs(setup):
    pipe, img = setup
    with pytest.raises(ValueError, match="method"):
        invert(pipe, img[None], "a photo", method="edit-friendly")
    with pytest.raises(ValueError, match="prompt"):
        invert(pipe, np.stack([img, img]), ["a", "b", "c"])


@pytest.mark.slow  # ~17 s; the default suite keeps to 15 min
def test_ddim_inversion_with_cfg(setup):
    """``inversion_guidance`` (StyleAligned's CFG-2 inversion): each step's model output is
    the CFG combination with the empty prompt, restated here step by step in Python."""
    import jax.numpy as jnp

    from jattn.sampling import schedulers as sch

    pipe, img = setup
    steps, g = 3, 2.0
    inv = invert(pipe, img[None], "a photo", method="ddim", num_inference_steps=steps,
                 inversion_guidance=g)
    plain = invert(pipe, img[None], "a photo", method="ddim", num_inference_steps=steps)
    schedule = pipe.schedule(steps, "ddim", 0.0)
    fn = pipe.unet_fn(pipe.params["unet"])
    c, u = pipe.encode_prompts(["a photo"]), pipe.encode_prompts([""])
    z = jnp.asarray(inv.latents[0])
    for i in range(steps - 1, -1, -1):
        t = jnp.broadcast_to(schedule.timesteps[i], (1,))
        e_c, _ = fn(z, t, c, None, None)
        e_u, _ = fn(z, t, u, None, None)
        z = sch.ddim_inversion_step(schedule, e_u + g * (e_c - e_u), i, z)
        np.testing.assert_allclose(inv.latents[steps - i], np.asarray(z), atol=1e-5, rtol=1e-5)
    assert np.abs(inv.latents[-1] - plain.latents[-1]).max() > 1e-3
    with pytest.raises(ValueError, match="inversion_guidance"):
        invert(pipe, img[None], "a photo", num_inference_steps=steps, inversion_guidance=2.0)
