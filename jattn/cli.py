"""The ``jattn`` command line.

  jattn generate [--model PATH_OR_ID] --prompt TEXT [--prompt TEXT …] --out-dir DIR
  jattn sites [--model PATH_OR_ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from jattn.io.images import save_images

SCHEDULERS = ["ddim", "ddpm", "euler", "dpm++2m"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-layout folder or Hugging Face hub id (default: bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickle weights (unsafe; refused by default)")


def _add_sampling_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """--steps, --guidance-scale, [--seed], --out-dir (shared by the method commands)."""
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)


def _load(args):
    import jattn

    return jattn.load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle)


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
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        latents=latents,
    )
    paths = save_images(out.images, Path(args.out_dir))
    for p, prompt in zip(paths, args.prompt):
        print(f"{p}\t{prompt}")
    return 0


def _parse_equalize(items) -> dict[str, float]:
    out = {}
    for it in items or []:
        word, sep, val = it.partition("=")
        try:
            out[word] = float(val)
        except ValueError:
            sep = ""
        if not sep or not word:
            raise ValueError(f"--equalize {it!r}: use WORD=VALUE, e.g. --equalize red=3")
    return out


def _grid(images, labels, path: Path) -> None:
    from jattn.policy.analysis import grid

    grid(list(images), rows=1, cols=len(images), labels=labels).save(path)


def cmd_edit_p2p(args) -> int:
    from jattn.io.images import load_image, psnr
    from jattn.methods.p2p import edit
    from jattn.sampling.inversion import invert, load_inversion, save_inversion

    pipe = _load(args)
    out_dir = Path(args.out_dir)
    inv = None
    if args.inversion_file:
        inv = load_inversion(args.inversion_file)
        if inv.num_inference_steps != args.steps:
            raise ValueError(f"--inversion-file was made with {inv.num_inference_steps} steps; "
                             f"pass --steps {inv.num_inference_steps}")
    elif args.image:
        size = pipe.default_size
        image = load_image(args.image, size)
        inv = invert(pipe, image[None], args.prompt, method=args.inversion,
                     num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_inversion(inv, out_dir / "inversion.npz")
    kwargs = dict(mode=args.mode, cross_replace_steps=args.cross_steps,
                  self_replace_steps=args.self_steps, equalize=_parse_equalize(args.equalize),
                  blend_words=args.blend_words, subtract_words=args.subtract_words,
                  start_blend=args.start_blend, reference_quirks=args.reference_quirks)
    res = edit(pipe, args.prompt, args.target, num_inference_steps=args.steps,
               guidance_scale=args.guidance_scale, seed=args.seed,
               latents=None if inv is None else inv.x_t[:1],
               uncond_per_step=None if inv is None or inv.uncond_per_step is None
               else inv.uncond_per_step[:, :1], **kwargs)
    paths = save_images(res.images, out_dir)
    labels = [("reconstruction: " if inv is not None else "source: ") + args.prompt] + \
        list(args.target)
    _grid(res.images, labels, out_dir / "grid.png")
    for p, label in zip(paths, labels):
        print(f"{p}\t{label}")
    if args.image and not args.inversion_file:
        print(f"reconstruction PSNR vs input: {psnr(res.images[0], image):.2f} dB")
    print(f"{out_dir / 'grid.png'}")
    return 0


def cmd_invert(args) -> int:
    from jattn.io.images import load_image, psnr
    from jattn.sampling.inversion import invert, save_inversion

    pipe = _load(args)
    out_dir = Path(args.out_dir)
    image = load_image(args.image, pipe.default_size)
    inv = invert(pipe, image[None], args.prompt, method=args.method,
                 num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    gs = args.guidance_scale if args.method == "null-text" else 1.0
    rec = pipe.generate([args.prompt], num_inference_steps=args.steps, guidance_scale=gs,
                        scheduler="ddim", latents=inv.x_t, uncond_per_step=inv.uncond_per_step)
    vae_rt = pipe.decode(pipe.encode_images(image[None]))
    out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(rec.images[0]).save(out_dir / "reconstruction.png")
    Image.fromarray(vae_rt[0]).save(out_dir / "vae_roundtrip.png")
    Image.fromarray(image).save(out_dir / "input.png")
    save_inversion(inv, out_dir / "inversion.npz")
    print(f"{out_dir / 'reconstruction.png'}\tPSNR {psnr(rec.images[0], image):.2f} dB "
          f"(VAE round trip {psnr(vae_rt[0], image):.2f} dB)")
    print(f"{out_dir / 'inversion.npz'}")
    return 0


def cmd_maps(args) -> int:
    from PIL import Image

    from jattn.methods.maps import default_self_resolution, generate_with_maps, maps_pictures

    pipe = _load(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = args.self_resolution or default_self_resolution(pipe)
    out, maps = generate_with_maps(pipe, args.prompt, seed=args.seed,
                                   num_inference_steps=args.steps,
                                   guidance_scale=args.guidance_scale, self_resolution=res)
    for i, prompt in enumerate(args.prompt):
        pics = maps_pictures(out.images[i], maps, pipe.tokenizer, prompt, row=i)
        d = out_dir if len(args.prompt) == 1 else out_dir / f"{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out.images[i]).save(d / "image.png")
        for j, (tok, img) in enumerate(pics["tokens"]):
            Image.fromarray(img).save(d / f"token_{j + 1:02d}_{tok}.png")
        if pics["self_pca"] is not None:
            Image.fromarray(pics["self_pca"]).save(d / "self_attention_pca.png")
        pics["grid"].save(d / "maps.png")
        print(f"{d / 'maps.png'}\t{prompt}")
    return 0


def cmd_demo(args) -> int:
    from jattn.demo import run_demo

    pipe = _load(args)
    index = run_demo(pipe, args.out_dir, steps=args.steps, guidance_scale=args.guidance_scale,
                     seed=args.seed)
    print(index)
    return 0


def load_config(path: str) -> dict:
    """``get_config()`` of a Python config file (big_vision style), without exec'ing it into
    this module's globals."""
    import importlib.util

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config={path!r}: no such file")
    spec = importlib.util.spec_from_file_location(f"jattn_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    return dict(mod.get_config())


def cmd_run(args) -> int:
    from jattn.methods.p2p import edit

    cfg = load_config(args.config)
    method = cfg.pop("method", None)
    if method != "p2p":
        raise ValueError(f"{args.config}: method={method!r}; `jattn run` knows 'p2p'")
    pipe = _load(args)
    expected = cfg.pop("expected", "")
    prompt, targets = cfg.pop("prompt"), cfg.pop("targets")
    steps, gs, seed = cfg.pop("steps", 50), cfg.pop("guidance_scale", 7.5), cfg.pop("seed", 0)
    res = edit(pipe, prompt, targets, num_inference_steps=steps, guidance_scale=gs, seed=seed,
               **cfg)
    out_dir = Path(args.out_dir)
    save_images(res.images, out_dir)
    _grid(res.images, [prompt] + list(targets), out_dir / "grid.png")
    print(f"{out_dir / 'grid.png'}\texpected: {expected}")
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
    g.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="CFG rescale phi in [0, 1] (Lin et al. 2024; 0.7 for zero-terminal-SNR "
                        "models; default 0 = plain CFG)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--latents", default=None,
                   help=".npy float32 (B, C, h, w): unscaled initial noise as diffusers' latents=")
    g.add_argument("--out-dir", required=True)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="attention-editing methods")
    esub = e.add_subparsers(dest="method", required=True)
    p = esub.add_parser("p2p", help="Prompt-to-Prompt (Hertz et al. 2023)")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="source prompt")
    p.add_argument("--target", action="append", required=True, help="edited prompt (repeat)")
    p.add_argument("--mode", choices=["replace", "refine", "reweight"], default="replace")
    p.add_argument("--cross-steps", type=float, default=0.8)
    p.add_argument("--self-steps", type=float, default=0.4)
    p.add_argument("--equalize", nargs="*", default=None, metavar="WORD=VALUE")
    p.add_argument("--blend-words", nargs="*", default=None)
    p.add_argument("--subtract-words", nargs="*", default=None)
    p.add_argument("--start-blend", type=float, default=0.0)
    p.add_argument("--reference-quirks", action="store_true",
                   help="reproduce google/prompt-to-prompt's quirks (post-edit stored maps, "
                        "get_word_inds word boundaries, word-swap tail mapping)")
    p.add_argument("--image", default=None, help="real image to edit (inverted first)")
    p.add_argument("--inversion", choices=["null-text", "ddim"], default="null-text")
    p.add_argument("--inversion-file", default=None, help=".npz from `jattn invert`")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_edit_p2p)

    iv = sub.add_parser("invert", help="DDIM / null-text inversion of a real image")
    _add_model_args(iv)
    iv.add_argument("--image", required=True)
    iv.add_argument("--prompt", required=True)
    iv.add_argument("--method", choices=["null-text", "ddim"], default="null-text")
    _add_sampling_args(iv, seed=False)
    iv.set_defaults(func=cmd_invert)

    mp = sub.add_parser("maps", help="per-token cross-attention overlays, self-attention PCA")
    _add_model_args(mp)
    mp.add_argument("--prompt", action="append", required=True)
    mp.add_argument("--self-resolution", type=int, default=None,
                    help="self-attention grid side to capture (default: largest <= 32)")
    _add_sampling_args(mp)
    mp.set_defaults(func=cmd_maps)

    d = sub.add_parser("demo", help="generations, attention maps and P2P edits + index.html")
    _add_model_args(d)
    _add_sampling_args(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run a Python config from configs/")
    _add_model_args(r)
    r.add_argument("config")
    r.add_argument("--out-dir", required=True)
    r.set_defaults(func=cmd_run)

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
