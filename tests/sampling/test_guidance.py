"""The guidance hook: a loss on recorded attention, differentiated w.r.t. the latents
inside the compiled loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.policy.capture import Capture
from jattn.policy.core import Layout, Select, resolve
from jattn.sampling import schedulers as sch
from jattn.sampling.guidance import Guidance, apply_guidance


def left_attention_loss(acc, step):
    """1 − share of token 2's cross-attention that falls in the left half (8x8 maps)."""
    m = acc[0]["cross8x8"][:, :, 2].reshape(-1, 8, 8)      # (B, h, w)
    return 1.0 - jnp.mean(m[:, :, :4].sum((1, 2)) / (m.sum((1, 2)) + 1e-8))


@pytest.fixture(scope="module")
def setup(tiny_sd_dir):
    pipe = jattn.load(tiny_sd_dir)
    pol = resolve([(Select(kind="cross", resolutions=(8,)), Capture())], pipe.sites(),
                  layout=Layout(groups=1, members=1, cfg=False))
    return pipe, pol


def test_gradient_step_lowers_the_loss(setup):
    """One step against the gradient of the attention loss lowers it (the gradient flows
    through the UNet and the captured probabilities to the latents)."""
    pipe, pol = setup
    g = Guidance(policy=pol, step_size=jnp.full((3,), 0.5), loss_fn=left_attention_loss)
    schedule = pipe.schedule(3, "ddim")
    fn = pipe.unet_fn(pipe.params["unet"])
    cond = pipe.encode_prompts(["a red circle"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    t = schedule.timesteps[0]
    scale = lambda z: sch.scale_model_input(schedule, z, 0)  # noqa: E731
    _, loss0 = apply_guidance(g, fn, scale, x, t, cond, jnp.int32(0))
    x1, _ = apply_guidance(g, fn, scale, x, t, cond, jnp.int32(0))
    _, loss1 = apply_guidance(g, fn, scale, x1, t, cond, jnp.int32(0))
    assert np.isfinite(float(loss1)) and float(loss1) < float(loss0)
    assert float(jnp.abs(x1 - x).max()) > 0


def test_guided_generation(setup):
    """Zero step sizes reproduce plain generation; non-zero ones change it; new step sizes
    do not recompile."""
    pipe, pol = setup
    plain = pipe.generate(["a red circle"], num_inference_steps=3, seed=0)
    off = pipe.generate(["a red circle"], num_inference_steps=3, seed=0, guidance=Guidance(
        policy=pol, step_size=jnp.zeros((3,)), loss_fn=left_attention_loss))
    np.testing.assert_allclose(off.latents, plain.latents, atol=1e-6)
    before = dict(pipe.trace_counts)
    on = pipe.generate(["a red circle"], num_inference_steps=3, seed=0, guidance=Guidance(
        policy=pol, step_size=jnp.array([2.0, 2.0, 0.0]), loss_fn=left_attention_loss))
    assert pipe.trace_counts == before
    assert np.abs(on.latents - plain.latents).max() > 1e-3


def test_guidance_policy_must_be_conditional_only(setup):
    pipe, _ = setup
    pol = resolve([(Select(kind="cross"), Capture())], pipe.sites(),
                  layout=Layout(groups=1, members=1, cfg=True))
    with pytest.raises(ValueError, match="cfg=False"):
        pipe.generate(["a red circle"], num_inference_steps=2, guidance=Guidance(
            policy=pol, step_size=jnp.ones((2,)), loss_fn=left_attention_loss))
