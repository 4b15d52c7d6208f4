"""Edit-friendly DDPM inversion's noise extraction in torch, re-stated eagerly from the
reference (inbarhub/DDPM_inversion ``ddm_inversion/inversion_utils.py``,
``inversion_forward_process`` with ``etas=1``, ``get_variance``) on a diffusers-layout
folder. The reference draws the ``x_t`` with torch's global RNG; here they are passed in,
so that jattn's draws can be checked step for step.
"""

from __future__ import annotations

import numpy as np


def torch_ddpm_noise_maps(folder, xts_nchw: np.ndarray, prompt: str, steps: int,
                          cfg_scale: float) -> np.ndarray:
    """``zs`` ``(steps, 1, C, h, w)`` from ``xts`` ``(steps+1, 1, C, h, w)`` (``xts[i]`` at
    ``timesteps[i]``, ``xts[steps]`` = x0), as ``inversion_forward_process`` computes them
    (before its ``zs[-1] = 0``)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    alpha_bar = sched.alphas_cumprod

    def emb(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    def get_variance(t):
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = alpha_bar[t]
        a_prev = alpha_bar[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        return ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)

    xts = torch.from_numpy(np.array(xts_nchw, np.float32))  # a writable copy
    zs = torch.zeros_like(xts[:-1])
    eta = 1.0
    with torch.no_grad():
        text, uncond = emb(prompt), emb("")
        t_to_idx = {int(v): k for k, v in enumerate(sched.timesteps)}
        for t in reversed(sched.timesteps):
            idx = t_to_idx[int(t)]
            xt = xts[idx]
            out = unet(xt, t, encoder_hidden_states=uncond).sample
            if prompt != "":
                cond_out = unet(xt, t, encoder_hidden_states=text).sample
                noise_pred = out + cfg_scale * (cond_out - out)
            else:
                noise_pred = out
            xtm1 = xts[idx + 1]
            x0_pred = (xt - (1 - alpha_bar[t]) ** 0.5 * noise_pred) / alpha_bar[t] ** 0.5
            prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
            a_prev = alpha_bar[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            variance = get_variance(t)
            direction = (1 - a_prev - eta * variance) ** 0.5 * noise_pred
            mu = a_prev ** 0.5 * x0_pred + direction
            zs[idx] = (xtm1 - mu) / (eta * variance ** 0.5)
    return zs.numpy()
