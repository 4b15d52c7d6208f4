"""Faithful eager re-statements of reference algorithms in torch (test/bench references only).

``torch_null_text``: google/prompt-to-prompt ``null_text_w_ptp.ipynb`` ``NullInversion``
(``ddim_loop`` + ``null_optimization``), on a diffusers-layout folder loaded by diffusers.
"""

from __future__ import annotations

import time

import numpy as np


def torch_null_text(folder, image_u8, prompt, steps, guidance, inner=10, eps=1e-5):
    """Reference NullInversion in torch. Returns ``(ddim_seconds, optimisation_seconds,
    uncond (steps, 1, 77, D), ddim latents (steps+1, 1, C, h, w))``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    unet, vae = pipe.unet, pipe.vae
    tok, te = pipe.tokenizer, pipe.text_encoder

    def emb(text):
        ids = tok([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return te(ids)[0]

    def prev_step(out, t, sample):
        prev_t = t - sched.config.num_train_timesteps // steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        x0 = (sample - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * out

    def next_step(out, t, sample):
        t, next_t = min(t - sched.config.num_train_timesteps // steps, 999), t
        a_t = sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod
        a_next = sched.alphas_cumprod[next_t]
        x0 = (sample - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * out

    t0 = time.perf_counter()
    with torch.no_grad():
        x = torch.from_numpy(np.array(image_u8)).float().permute(2, 0, 1)[None] / 127.5 - 1
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond, uncond = emb(prompt), emb("")
        all_lat = [lat]
        for i in range(steps):
            t = sched.timesteps[len(sched.timesteps) - i - 1]
            lat = next_step(unet(lat, t, encoder_hidden_states=cond).sample, t, lat)
            all_lat.append(lat)
    ddim_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    uncond_list, cur = [], all_lat[-1]
    for i in range(steps):
        uncond = uncond.clone().detach().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        target = all_lat[len(all_lat) - i - 2]
        t = sched.timesteps[i]
        with torch.no_grad():
            e_c = unet(cur, t, encoder_hidden_states=cond).sample
        for _ in range(inner):
            e_u = unet(cur, t, encoder_hidden_states=uncond).sample
            e = e_u + guidance * (e_c - e_u)
            loss = F.mse_loss(prev_step(e, t, cur), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < eps + i * 2e-5:
                break
        uncond_list.append(uncond[:1].detach())
        with torch.no_grad():
            e_u = unet(cur, t, encoder_hidden_states=uncond).sample
            cur = prev_step(e_u + guidance * (e_c - e_u), t, cur)
    nt_s = time.perf_counter() - t1
    return (ddim_s, nt_s, torch.stack(uncond_list).numpy(),
            torch.stack(all_lat).numpy())
