#!/usr/bin/env python
"""Quality of a model on the world of coloured shapes, judged by the world's detector.

  python scripts/eval_world.py                                   # bundled model, 40+40 prompts × 3 seeds
  python scripts/eval_world.py --n-prompts 24 --seeds 0 1 --out results.json
  python scripts/eval_world.py --model PATH --steps 25 --guidance-scale 4

Prompts are never seen verbatim in training: single-object prompts on the held-out
(colour, shape) pairs at every position and two-object prompts pairing a held-out pair with
a training pair, in rotating caption wordings (``jattn/world/evaluate.py`` says exactly
which). Every prompt runs once per seed (DDIM by default), in fixed-size batches (one
compiled program), with cross-attention captured in-graph. Figures and targets:

  single-object: colour and shape correct ≥ 0.90, position correct ≥ 0.85
  two-object:    both objects with every stated attribute correct ≥ 0.70
  attention:     IoU of the thresholded colour-/shape-token heat map (head/layer/step mean
                 at the highest cross resolution, upsampled to 128², min-max normalised,
                 ≥ 0.5) with the detected object's mask, mean ≥ 0.5

Prints a table; ``--out`` writes every figure, the prompts, seeds and settings, and one
record per image (detections, per-attribute correctness, IoUs) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _threshold(s: str):
    if s == "otsu":
        return s
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"threshold {v} not in [0, 1]")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (default 5)")
    ap.add_argument("--guidance-rescale", type=float, default=0.0,
                    help="CFG rescale phi (Lin et al. 2024; default 0)")
    ap.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm, euler, dpm++2m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds; each prompt runs once per seed (default 0 1 2)")
    ap.add_argument("--n-prompts", type=int, default=40,
                    help="single-object prompts, and two-object prompts (default 40 each)")
    ap.add_argument("--n-two", type=int, default=None,
                    help="two-object prompts (default: --n-prompts)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per pipeline call (default 8)")
    ap.add_argument("--threshold", type=_threshold, default=0.5,
                    help="heat map threshold in [0, 1] of the normalised map, or 'otsu' "
                         "(default 0.5)")
    ap.add_argument("--heatmap", choices=("highest", "all"), default="highest",
                    help="highest cross resolution only, or mean of all upsampled "
                         "(default highest)")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    import jattn
    from jattn.world.evaluate import evaluate

    t0 = time.time()
    pipe = jattn.load(args.model, dtype=args.dtype)
    t_load = time.time() - t0
    res = evaluate(pipe, n_single=args.n_prompts,
                   n_two=args.n_prompts if args.n_two is None else args.n_two,
                   seeds=args.seeds, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                   batch_size=args.batch, threshold=args.threshold, heatmap_mode=args.heatmap,
                   progress=not args.no_progress, guidance_rescale=args.guidance_rescale)
    wall = time.time() - t0
    s = res["settings"]
    print(f"model {s['model']}  {s['scheduler']} {s['num_inference_steps']} steps, guidance "
          f"{s['guidance_scale']} (rescale {s['guidance_rescale']}), seeds {s['seeds']}, batch {s['batch_size']}, "
          f"{len(res['records'])} images in {wall:.0f} s (load {t_load:.1f} s)")
    print(res["table"])
    if args.out:
        res["settings"]["wall_s"] = round(wall, 1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
