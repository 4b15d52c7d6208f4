"""The ``jattn`` command line.

  jattn generate [--model PATH_OR_ID] --prompt TEXT [--prompt TEXT …] --out-dir DIR
  jattn sites [--model PATH_OR_ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SCHEDULERS = ["ddim", "ddpm", "euler", "dpm++2m"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-layout folder or Hugging Face hub id (default: bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickle weights (unsafe; refused by default)")


def _load(args):
    import jattn

    return jattn.load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle)


def save_images(images: np.ndarray, out_dir: Path, start: int = 0) -> list[Path]:
    """Write uint8 ``(B, H, W, 3)`` images as ``out_dir/000.png, 001.png, …``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out_dir / f"{start + i:03d}.png"
        Image.fromarray(np.asarray(img)).save(p)
        paths.append(p)
    return paths


def cmd_generate(args) -> int:
    pipe = _load(args)
    latents = None
    if args.latents:
        latents = np.load(args.latents).astype(np.float32)
    out = pipe.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        eta=args.eta,
        seed=args.seed,
        height=args.height,
        width=args.width,
        latents=latents,
    )
    paths = save_images(out.images, Path(args.out_dir))
    for p, prompt in zip(paths, args.prompt):
        print(f"{p}\t{prompt}")
    return 0


def cmd_sites(args) -> int:
    pipe = _load(args)
    sites = pipe.sites(args.height, args.width)
    for s in sites:
        print(s.describe())
    print(f"{len(sites)} attention sites")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="default: the checkpoint's scheduler")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (>= 0)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--latents", default=None,
                   help=".npy float32 (B, C, h, w): unscaled initial noise as diffusers' latents=")
    g.add_argument("--out-dir", required=True)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("sites", help="list the attention sites of the UNet")
    _add_model_args(s)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.set_defaults(func=cmd_sites)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"jattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
