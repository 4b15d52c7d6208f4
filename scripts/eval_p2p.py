"""Evaluate Prompt-to-Prompt on the bundled model's world (ground truth by the detector).

Run:  python scripts/eval_p2p.py [--model DIR] [--pairs 16] [--seeds 0 1 2 3] [--steps 50]
          [--out runs/eval_p2p.json]

Prints, over ≥ 16 prompt pairs × 4 seeds: colour word swap — mean IoU of the object's mask
between source and edit, fraction with IoU ≥ 0.8, fraction whose object has the target
colour, and both; shape word swap — fraction with the target shape; reweighting — the
measured amount of the reweighted attribute per weight and whether it grows monotonically.
Also null-text vs DDIM inversion of real photos (scikit-image's chelsea, astronaut,
coffee at 128²): PSNR against the photo of the VAE round trip, of the regeneration with CFG
from the null-text inversion and from plain DDIM inversion.
Expected (bundled model): colour swap IoU ≥ 0.8 and colour correct in most edits;
null-text PSNR within 1 dB of the VAE round trip, DDIM inversion several dB below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    import jattn
    from jattn.world import evaluate_edits as ev

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--cross-steps", type=float, default=0.8)
    ap.add_argument("--self-steps", type=float, default=0.4)
    ap.add_argument("--skip-inversion", action="store_true", help="no null-text/DDIM section")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pipe = jattn.load(args.model)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
              cross_replace_steps=args.cross_steps, self_replace_steps=args.self_steps)
    results = {"settings": vars(args)}
    colour = ev.evaluate_word_swap(pipe, ev.colour_swap_pairs(args.pairs), args.seeds, **kw)
    print(f"colour swap ({colour['n']} edits): mask IoU mean {colour['mask_iou_mean']:.3f}, "
          f"IoU>=0.8 {colour['iou_ge_0.8']:.1%}, target colour+shape {colour['target_attr_ok']:.1%}, "
          f"both {colour['success']:.1%} (source correct {colour['source_ok']:.1%})")
    shape = ev.evaluate_word_swap(pipe, ev.shape_swap_pairs(args.pairs), args.seeds, **kw)
    print(f"shape swap ({shape['n']} edits): target shape+colour {shape['target_attr_ok']:.1%}, "
          f"mask IoU mean {shape['mask_iou_mean']:.3f} (source correct {shape['source_ok']:.1%})")
    results.update(colour_swap=colour, shape_swap=shape)
    rw = {}
    for prompt, word in [("a large blue square", "large"), ("a red circle", "red")]:
        r = ev.evaluate_reweight(pipe, prompt, word, [-1.0, 0.5, 1.0, 2.0, 4.0], args.seeds,
                                 num_inference_steps=args.steps,
                                 guidance_scale=args.guidance_scale)
        rw[f"{prompt}|{word}"] = r
        print(f"reweight '{word}' in '{prompt}': amount per weight "
              + ", ".join(f"{v:g}:{a:.0f}" for v, a in zip(r["values"], r["amount_mean"]))
              + f"; monotonic {r['monotonic']}, spearman {r['spearman']:.2f}")
    results["reweight"] = rw
    if not args.skip_inversion:
        results["inversion"] = inversion_psnr(pipe, args.steps)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


def inversion_psnr(pipe, steps: int, guidance_scale: float = 7.5) -> dict:
    """PSNR (dB, against the photo) of the VAE round trip, null-text and DDIM inversion."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from jattn.io.images import psnr
    from jattn.sampling.inversion import invert

    out = {}
    for name, prompt in [("chelsea", "a photo of a cat"), ("astronaut", "a photo of an astronaut"),
                         ("coffee", "a photo of a cup of coffee")]:
        img = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize(
            (pipe.default_size,) * 2, Image.Resampling.LANCZOS))
        vae_rt = pipe.decode(pipe.encode_images(img[None]))[0]
        row = {"vae_round_trip": psnr(vae_rt, img)}
        for method in ("null-text", "ddim"):
            inv = invert(pipe, img[None], prompt, method=method, num_inference_steps=steps)
            rec = pipe.generate([prompt], num_inference_steps=steps, guidance_scale=guidance_scale,
                                latents=inv.x_t, uncond_per_step=inv.uncond_per_step).images[0]
            row[method] = psnr(rec, img)
        out[name] = row
        print(f"inversion '{name}' ({prompt!r}, {steps} steps, CFG {guidance_scale}): PSNR VAE "
              f"round trip {row['vae_round_trip']:.2f} dB, null-text {row['null-text']:.2f} dB, "
              f"DDIM inversion {row['ddim']:.2f} dB")
    return out


if __name__ == "__main__":
    main()
