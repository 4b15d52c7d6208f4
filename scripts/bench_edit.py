"""Benchmark: Prompt-to-Prompt edit cost and null-text inversion speed.

Run:  python scripts/bench_edit.py [--model DIR] [--steps 50] [--targets 3]
      (default model: the bundled one)

Prints, in one run on the same model:
  1. P2P edit time / plain generation time for the same batch ``[source, targets…]``
     (steady state, compiled; goal ≤ 1.15×), for replace and refine+local blend;
  2. null-text inversion: jattn (compiled: scan + while_loop) vs a faithful eager loop of
     the reference algorithm (google/prompt-to-prompt ``null_text_w_ptp.ipynb``
     ``NullInversion``) in torch on the same weights loaded by diffusers; the speed ratio
     and both reconstructions' PSNR against the VAE round trip;
  3. the number of compilations of the second edit with new prompts (expected 0).
Expected on this CPU with the bundled model: edit/plain ≤ 1.15; inversion ratio printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from benchutil import best_time




def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from refs.null_text_torch import torch_null_text

    import jattn
    from jattn.io.images import psnr
    from jattn.methods.p2p import edit
    from jattn.sampling.inversion import invert

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    pipe = jattn.load(args.model)
    folder = pipe.source
    n = args.steps
    src = "a red circle on the left"
    tgts = ["a blue circle on the left", "a green circle on the left",
            "a yellow circle on the left", "a purple circle on the left"][:args.targets]
    m = 1 + len(tgts)
    lat = np.random.default_rng(0).standard_normal(
        (1, pipe.unet_config.in_channels) + (pipe.default_size // pipe.vae_scale_factor,) * 2
    ).astype(np.float32)
    plain = best_time(lambda: pipe.generate([src] + tgts, num_inference_steps=n, scheduler="ddim",
                                         latents=np.repeat(lat, m, 0)))
    rep = best_time(lambda: edit(pipe, src, tgts, num_inference_steps=n, latents=lat))
    ref = best_time(lambda: edit(pipe, src, ["a red striped circle on the left"],
                              mode="refine", num_inference_steps=n, latents=lat,
                              blend_words=["circle"]))
    plain_2 = best_time(lambda: pipe.generate([src, src], num_inference_steps=n, scheduler="ddim",
                                           latents=np.repeat(lat, 2, 0)))
    print(f"# model {folder}; {n} DDIM steps, CFG 7.5")
    print(f"p2p replace, batch {m}: edit {rep:.2f}s / plain {plain:.2f}s = {rep / plain:.3f}x "
          "(both include VAE decode)")
    print(f"p2p refine + local blend, batch 2: {ref:.2f}s / plain {plain_2:.2f}s = "
          f"{ref / plain_2:.3f}x")
    before = dict(pipe.trace_counts)
    edit(pipe, "a green square at the top", ["a green star at the top", "a green heart at the top",
                                             "a green triangle at the top"][:args.targets],
         num_inference_steps=n, latents=lat)
    new = {k: v - before.get(k, 0) for k, v in pipe.trace_counts.items() if v != before.get(k, 0)}
    print(f"compilations on a second edit with new prompts: {sum(new.values())} {new}")

    from skimage import data
    from PIL import Image

    img = np.asarray(Image.fromarray(data.astronaut()).resize((pipe.default_size,) * 2,
                                                               Image.Resampling.LANCZOS))
    prompt = "a photo of a person"
    invert(pipe, img[None], prompt, num_inference_steps=n)  # compile
    t0 = time.perf_counter()
    inv = invert(pipe, img[None], prompt, num_inference_steps=n)
    jax_s = time.perf_counter() - t0
    rec = pipe.generate([prompt], num_inference_steps=n, latents=inv.x_t, scheduler="ddim",
                        uncond_per_step=inv.uncond_per_step)
    vae_rt = pipe.decode(pipe.encode_images(img[None]))
    print(f"null-text inversion jattn: {jax_s:.2f}s (steady, incl. DDIM inversion); "
          f"inner iterations used {int(inv.inner_iterations.sum())}")
    print(f"PSNR vs input: null-text reconstruction {psnr(rec.images[0], img):.2f} dB, VAE round "
          f"trip {psnr(vae_rt[0], img):.2f} dB")
    if not args.skip_torch:
        ddim_s, nt_s, _, _ = torch_null_text(folder, img, prompt, n, 7.5)
        print(f"null-text inversion torch eager reference: {ddim_s + nt_s:.2f}s "
              f"(DDIM {ddim_s:.2f}s + optimisation {nt_s:.2f}s); "
              f"speed-up jattn vs torch {(ddim_s + nt_s) / jax_s:.2f}x")


if __name__ == "__main__":
    main()
