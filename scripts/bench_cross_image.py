"""Speed of Cross-Image Attention per output image, against plain generation, same process.

    python scripts/bench_cross_image.py [--steps 100] [--groups 1 8] [--repeats 2]
        [--guidance-scale 1.0]

For each batch of G output images (G groups [OUT, APP, STRUCT]): the whole transfer
(DDPM inversion of 2G images + the compiled loop with two UNet passes per swap step) and
plain generation of G images with the same steps and CFG; seconds per
output image after a warm-up call (compilation excluded, reported apart). Figures depend on
the device: CPU here; GPU/TPU whenever one is lent.

Reference implementation on the same weights and CPU (garibida/cross-image-attention@ee2080c
fetched to /tmp, never committed; run its ``invert_images`` + ``run_appearance_transfer``
twice, time the second). Adaptations: "cuda" → "cpu"; the model = jattn/assets/bundled
(``from_pretrained``, DDIM from its scheduler folder with ``rescale_betas_zero_snr=False,
timestep_spacing="leading"``, because the reference divides by sqrt(ᾱ_T), 0 under zero
terminal SNR); its 64² / 32² attention tests and segmentation resolutions mapped to 16² / 8²
(cross maps 16 → 4, 32 → 8); image size 512 → 128; FreeU UNet → diffusers' plain
UNet2DConditionModel (FreeU's channel constants are SD1.5's); pipeline ``__init__`` and
``_encode_prompt`` calls fixed for diffusers 0.42 (keywords, ``image_encoder``,
``encode_prompt`` without CFG); NLTK and pyrallis replaced by offline stand-ins ("shape" is
the noun). The bundled model predicts v, which the reference reads as epsilon: its images
are not meaningful, its cost is (same UNet calls).

Expected cost ratio, from the work: the loop runs 3 rows (OUT, APP, STRUCT) and a second UNet
pass on the swap steps (58 of the 68 steps run at 100 steps), i.e. ≈ 3 · (68 + 58) / 100 ≈
3.8 UNet row-evaluations per plain one, plus the inversion of two images (100 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--groups", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    args = ap.parse_args(argv)

    import jattn
    from jattn.methods.cross_image import cross_image_batch
    from jattn.world.scene import render
    from jattn.world.spec import ObjectSpec, SceneSpec

    pipe = jattn.load()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{args.steps} steps, CFG {args.guidance_scale}")
    s_img = render(SceneSpec((ObjectSpec(color="red", shape="circle"),), background="gray"),
                   seed=1).image
    a_img = render(SceneSpec((ObjectSpec(color="blue", shape="square"),), background="beige"),
                   seed=2).image
    rows = []
    for g in args.groups:
        kw = dict(prompt="a shape", num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale)
        full = lambda: cross_image_batch(pipe, [s_img] * g, [a_img] * g, **kw)  # noqa: E731
        plain = lambda: pipe.generate(["a shape"] * g, num_inference_steps=args.steps,  # noqa
                                      guidance_scale=args.guidance_scale, scheduler="ddim",
                                      eta=1.0)
        f_first, f_best = _timed(full, args.repeats)
        p_first, p_best = _timed(plain, args.repeats)
        rows.append((g, f_best / g, p_best / g, f_best / p_best, f_first, p_first))
        print(f"G={g:3d}: cross-image {f_best / g:7.3f} s/output (first call {f_first:.1f} s), "
              f"plain generation {p_best / g:7.3f} s/image (first {p_first:.1f} s), "
              f"ratio {f_best / p_best:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
