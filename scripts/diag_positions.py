"""Where does a model put "on the left", "on the right", "at the top", …? A diagnosis of
position words in two parts, for the bundled model or any world-trained folder:

1. Text encoder: the L2 distance between the last hidden states at the position word of
   "a red circle <position>" for every pair of position phrases (with the hidden norm).
   Phrases the UNet must tell apart need distances of the order of the others.
2. Layout at the noisiest step: a one-step sample (the model's x_0 prediction from pure
   noise on a zero-terminal-SNR schedule; on other schedules the first step's) for each
   phrase, a few objects and seeds, read by the world detector: the fraction of images
   whose objects all sit on the asked side, and how many objects it drew (a model that
   cannot tell left from right draws the object on both sides).

Usage:
  python scripts/diag_positions.py                       # the bundled model
  python scripts/diag_positions.py --model runs/export --seeds 0 1 2 3 --out grid.png

Prints both tables; ``--out`` writes the one-step images (rows: seeds; columns: object ×
phrase). About 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--objects", nargs="+", default=["a red circle", "a blue square"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--out", default=None, help="write the one-step images as a PNG grid")
    args = ap.parse_args(argv)

    import jattn
    from jattn.world.detector import detect
    from jattn.world.spec import POSITIONS

    pipe = jattn.load(args.model)
    prompts = [f"{args.objects[0]} {p}" for p in POSITIONS]
    ids = pipe.tokenize(prompts)
    hidden = np.asarray(pipe.encode_prompts(prompts), np.float32)  # (P, S, D)
    eos = pipe.tokenizer.eos_token_id
    at = [int(np.argmax(row == eos)) - 1 for row in ids]  # the last word: the position noun
    vec = np.stack([hidden[i, at[i]] for i in range(len(prompts))])
    print(f"text encoder: L2 distance of the last hidden state at the position word "
          f"(\"{args.objects[0]} …\"; hidden norm {np.linalg.norm(vec, axis=-1).mean():.2f})")
    width = max(len(p) for p in POSITIONS)
    print(" " * (width + 2) + "".join(f"{p.split()[-1]:>9}" for p in POSITIONS))
    for i, p in enumerate(POSITIONS):
        print(f"  {p:<{width}}" + "".join(f"{np.linalg.norm(vec[i] - vec[j]):9.2f}"
                                           for j in range(len(POSITIONS))))

    grid_prompts = [f"{o} {p}" for o in args.objects for p in POSITIONS]
    asked = [p for _ in args.objects for p in POSITIONS]
    rows, right, count = [], {p: [] for p in POSITIONS}, {p: [] for p in POSITIONS}
    for s in args.seeds:
        out = pipe.generate(grid_prompts, num_inference_steps=1,
                            guidance_scale=args.guidance_scale, seed=[s] * len(grid_prompts))
        images = [np.asarray(im) for im in out.images]
        rows.append(np.concatenate(images, 1))
        for p, im in zip(asked, images):
            dets = detect(im)
            right[p].append(bool(dets) and all(d.position == p for d in dets))
            count[p].append(len(dets))
    print(f"\none-step x_0 prediction ({len(args.objects)} objects x {len(args.seeds)} seeds, "
          f"CFG {args.guidance_scale}): objects all on the asked side / mean objects drawn")
    for p in POSITIONS:
        print(f"  {p:<{width}}  {np.mean(right[p]):5.2f}   {np.mean(count[p]):4.2f}")
    if args.out:
        from PIL import Image

        Image.fromarray(np.concatenate(rows, 0)).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
