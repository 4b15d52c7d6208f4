"""The ``jattn`` command line.

  jattn generate [--model PATH_OR_ID] --prompt TEXT [--prompt TEXT …] --out-dir DIR
                 [SDXL: --prompt-2 TEXT --negative-prompt-2 TEXT --original-size H W
                  --crops-coords-top-left Y X --target-size H W (and --negative-*)]
  jattn sites [--model PATH_OR_ID]      (SD1/SD2/SDXL sites by diffusers path)
  jattn edit p2p | invert | maps | run CONFIG | demo   (see jattn COMMAND --help)

Every command writes ``DIR/000.png, 001.png, …`` (one per output image, in input order),
``grid.png`` where there are several, and ``result.json`` (arguments, seeds, figures, the
files written). An output folder must be empty or new; ``--overwrite`` replaces only
jattn's own earlier outputs there. A user mistake prints one line on stderr naming the
argument and the fix, with exit code 2 (``--debug`` or ``JATTN_DEBUG=1`` shows the
traceback); Ctrl-C stops within about one UNet call, exit code 130.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from jattn.commands.common import (FRACTION, GUIDANCE, SCHEDULERS, SEED, SIZE,
                                   STEPS, OutputDir, Parser, add_model_args, add_out_args,
                                   add_sampling_args, add_sdxl_args, arguments, float_type,
                                   int_type, load_npy, load_pipeline, read_image, save_grid,
                                   refuse_sdxl, sdxl_kwargs, seeds_for)


# ---------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from jattn.io.checks import float_array

    n = len(args.prompt)
    seeds = seeds_for(args, n)
    latents = None
    if args.latents:
        latents = load_npy(args.latents, "--latents")
        latents = float_array(latents, "--latents",
                              hint=" Expected float32 (B, C, h, w) unscaled noise (.npy).")
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=[args.latents])
    out.reserve(*OutputDir.image_names(n), *(["grid.png"] if n > 1 else []))
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, n)
    t0 = time.perf_counter()
    res = pipe.generate(
        args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, eta=args.eta,
        guidance_rescale=args.guidance_rescale, seed=seeds, height=args.height,
        width=args.width, latents=latents, clip_skip=args.clip_skip, **xl)
    seconds = time.perf_counter() - t0
    paths = out.images(res.images)
    if n > 1:
        save_grid(out, res.images, args.prompt)
    out.finish(dict(command="generate", arguments=arguments(args), seeds=seeds,
                    model=pipe.source, seconds=seconds))
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
        if not math.isfinite(out[word]):
            raise ValueError(f"--equalize {it!r}: the value must be a finite number, "
                             "e.g. --equalize red=3")
    return out


def cmd_edit_p2p(args) -> int:
    from jattn.io.images import psnr
    from jattn.methods.p2p import edit
    from jattn.sampling.inversion import invert, load_inversion, save_inversion

    n = 1 + len(args.target)
    seeds = seeds_for(args, 1)
    equalize = _parse_equalize(args.equalize)
    inv = None
    if args.inversion_file:
        inv = load_inversion(args.inversion_file)
        if inv.num_inference_steps != args.steps:
            raise ValueError(f"--inversion-file was made with {inv.num_inference_steps} steps; "
                             f"pass --steps {inv.num_inference_steps}")
        if inv.prompt and inv.prompt[0] != args.prompt:
            raise ValueError(f"--inversion-file was made for the prompt {inv.prompt[0]!r}, not "
                             f"{args.prompt!r}; pass --prompt {inv.prompt[0]!r} (the source "
                             "prompt must be the inverted one) or invert again.")
    out = OutputDir(args.out_dir, overwrite=args.overwrite,
                    inputs=[args.image, args.inversion_file])
    names = OutputDir.image_names(n) + ["grid.png"]
    if args.image:
        names.append("inversion.npz")
    out.reserve(*names)
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, n, "prompt (--prompt, then each --target)")
    if args.image or args.inversion_file:
        refuse_sdxl(xl, "with --image/--inversion-file the inversion fixes the source's "
                        "conditioning (--prompt alone, the image's size; SDXL null-text "
                        "embeddings included); SDXL options apply to a generated source only")
    image = None
    if inv is not None:
        _check_inversion_fits(inv, pipe)
    elif args.image:
        image = read_image(pipe, args.image)
        inv = invert(pipe, image[None], args.prompt, method=args.inversion,
                     num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        out.write("inversion.npz", lambda fh: save_inversion(inv, fh))
    kwargs = dict(mode=args.mode, cross_replace_steps=args.cross_steps,
                  self_replace_steps=args.self_steps, equalize=equalize,
                  blend_words=args.blend_words, subtract_words=args.subtract_words,
                  start_blend=args.start_blend, reference_quirks=args.reference_quirks)
    res = edit(pipe, args.prompt, args.target, num_inference_steps=args.steps,
               guidance_scale=args.guidance_scale, seed=seeds[0],
               latents=None if inv is None else inv.x_t[:1],
               uncond_per_step=None if inv is None or inv.uncond_per_step is None
               else _first_row(inv.uncond_per_step), sdxl=xl, **kwargs)
    paths = out.images(res.images)
    labels = [("reconstruction: " if inv is not None else "source: ") + args.prompt] + \
        list(args.target)
    save_grid(out, res.images, labels)
    figures = {}
    if image is not None:
        figures["reconstruction_psnr_db"] = psnr(res.images[0], image)
    out.finish(dict(command="edit p2p", arguments=arguments(args), seeds=seeds,
                    model=pipe.source, figures=figures))
    for p, label in zip(paths, labels):
        print(f"{p}\t{label}")
    if image is not None:
        print(f"reconstruction PSNR vs input: {figures['reconstruction_psnr_db']:.2f} dB")
    print(f"{out.path('grid.png')}")
    return 0


def _first_row(uncond_per_step):
    """``(T, B, …)`` null-text embeddings (SDXL: a dict of them) -> their first row."""
    import jax

    return jax.tree_util.tree_map(lambda a: a[:, :1], uncond_per_step)


def _check_inversion_fits(inv, pipe) -> None:
    if inv.uncond_per_step is not None and isinstance(inv.uncond_per_step, dict) != pipe.is_sdxl:
        made = "an SDXL" if isinstance(inv.uncond_per_step, dict) else "an SD1/SD2"
        raise ValueError(f"--inversion-file was made with {made} model, not this one "
                         f"({pipe.source}); invert the image with this --model.")
    c, f = pipe.unet_config.in_channels, pipe.vae_scale_factor
    shape = tuple(inv.x_t.shape[1:])
    if len(shape) != 3 or shape[0] != c or shape[1] * f < pipe.min_size():
        raise ValueError(f"--inversion-file holds latents of shape {shape}, which this model "
                         f"(latent channels {c}) cannot use; invert the image with this "
                         "--model.")


def cmd_invert(args) -> int:
    from jattn.io.images import psnr
    from jattn.sampling.inversion import invert, save_inversion

    names = ["000.png", "vae_roundtrip.png", "input.png", "inversion.npz"]
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=[args.image])
    out.reserve(*names)
    pipe = load_pipeline(args)
    image = read_image(pipe, args.image)
    inv = invert(pipe, image[None], args.prompt, method=args.method,
                 num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    gs = args.guidance_scale if args.method == "null-text" else 1.0
    rec = pipe.generate([args.prompt], num_inference_steps=args.steps, guidance_scale=gs,
                        scheduler="ddim", latents=inv.x_t, uncond_per_step=inv.uncond_per_step)
    vae_rt = pipe.decode(pipe.encode_images(image[None]))
    out.image("000.png", rec.images[0])
    out.image("vae_roundtrip.png", vae_rt[0])
    out.image("input.png", image)
    out.write("inversion.npz", lambda fh: save_inversion(inv, fh))
    figures = dict(reconstruction_psnr_db=psnr(rec.images[0], image),
                   vae_roundtrip_psnr_db=psnr(vae_rt[0], image))
    out.finish(dict(command="invert", arguments=arguments(args), model=pipe.source,
                    figures=figures))
    print(f"{out.path('000.png')}\tPSNR {figures['reconstruction_psnr_db']:.2f} dB "
          f"(VAE round trip {figures['vae_roundtrip_psnr_db']:.2f} dB)")
    print(f"{out.path('inversion.npz')}")
    return 0


def _file_part(token: str) -> str:
    """A token as a safe file-name part (``/``, ``..`` and the like cannot escape)."""
    s = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in token).strip("_")
    return s or "tok"


def cmd_maps(args) -> int:
    from jattn.methods.maps import default_self_resolution, generate_with_maps, maps_pictures

    n = len(args.prompt)
    seeds = seeds_for(args, n)
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    sub = (lambda i: "") if n == 1 else (lambda i: f"{i:03d}/")
    out.reserve(*OutputDir.image_names(n), *(["grid.png"] if n > 1 else []),
                *[f"{sub(i)}maps.png" for i in range(n)])
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, n)  # SDXL: --prompt-2, micro-conditioning
    res = args.self_resolution or default_self_resolution(pipe)
    gen, maps = generate_with_maps(pipe, args.prompt, seed=seeds,
                                   num_inference_steps=args.steps,
                                   guidance_scale=args.guidance_scale, self_resolution=res,
                                   **xl)
    out.images(gen.images)
    if n > 1:
        save_grid(out, gen.images, args.prompt)
    for i, prompt in enumerate(args.prompt):
        pics = maps_pictures(gen.images[i], maps, pipe.tokenizer, prompt, row=i)
        for j, (tok, img) in enumerate(pics["tokens"]):
            out.image(f"{sub(i)}token_{j + 1:02d}_{_file_part(tok)}.png", img)
        if pics["self_pca"] is not None:
            out.image(f"{sub(i)}self_attention_pca.png", pics["self_pca"])
        out.image(f"{sub(i)}maps.png", pics["grid"])
        print(f"{out.path(sub(i) + 'maps.png')}\t{prompt}")
    out.finish(dict(command="maps", arguments=arguments(args), seeds=seeds,
                    model=pipe.source, self_resolution=res))
    return 0


def cmd_demo(args) -> int:
    from jattn.demo import run_demo

    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    out.reserve("index.html")
    pipe = load_pipeline(args)
    index = run_demo(pipe, out, steps=args.steps, guidance_scale=args.guidance_scale,
                     seed=args.seed)
    out.finish(dict(command="demo", arguments=arguments(args), model=pipe.source))
    print(index)
    return 0


_CONFIG_SAMPLING_KEYS = {"steps", "guidance_scale", "seed"}


def load_config(path: str) -> dict:
    """``get_config()`` of a Python config file (big_vision style), without exec'ing it into
    this module's globals.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a syntax error, an import or ``get_config()`` that raises, no
        ``get_config``, or a result that is not a dict (each names the file).
    """
    import importlib.util

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config={path!r}: no such file")
    spec = importlib.util.spec_from_file_location(f"jattn_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ValueError(f"config {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ValueError(f"config {path}: running the file raised {type(e).__name__}: {e}"
                         ) from None
    if not hasattr(mod, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    try:
        cfg = mod.get_config()
    except Exception as e:
        raise ValueError(f"config {path}: get_config() raised {type(e).__name__}: {e}"
                         ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path}: get_config() returned {type(cfg).__name__}; it must "
                         "return a dict")
    return dict(cfg)


def _p2p_config_keys() -> set[str]:
    import inspect

    from jattn.methods.p2p import p2p_policy

    params = inspect.signature(p2p_policy).parameters
    return {k for k, v in params.items() if v.kind == v.KEYWORD_ONLY} - {"num_steps", "height",
                                                                       "width"}


def cmd_run(args) -> int:
    from jattn.methods.p2p import edit

    cfg = load_config(args.config)
    method = cfg.pop("method", None)
    if method != "p2p":
        raise ValueError(f"config {args.config}: method={method!r}; `jattn run` knows 'p2p'")
    missing = [k for k in ("prompt", "targets") if k not in cfg]
    if missing:
        raise ValueError(f"config {args.config}: missing key(s) {', '.join(missing)} (a p2p "
                         "config gives prompt= and targets=)")
    expected = cfg.pop("expected", "")
    prompt, targets = cfg.pop("prompt"), cfg.pop("targets")
    targets = [targets] if isinstance(targets, str) else targets
    known = _p2p_config_keys() | _CONFIG_SAMPLING_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"config {args.config}: unknown key(s) {', '.join(unknown)}; a p2p "
                         f"config takes {', '.join(sorted(known | {'prompt', 'targets'}))}")
    steps, gs, seed = cfg.pop("steps", 50), cfg.pop("guidance_scale", 7.5), cfg.pop("seed", 0)
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=[args.config])
    n = 1 + len(list(targets))
    out.reserve(*OutputDir.image_names(n), "grid.png")
    pipe = load_pipeline(args)
    res = edit(pipe, prompt, targets, num_inference_steps=steps, guidance_scale=gs, seed=seed,
               **cfg)
    out.images(res.images)
    save_grid(out, res.images, [prompt] + list(targets))
    out.finish(dict(command="run", config=str(args.config), arguments=arguments(args),
                    expected=expected, model=pipe.source))
    print(f"{out.path('grid.png')}\texpected: {expected}")
    return 0


def cmd_sites(args) -> int:
    pipe = load_pipeline(args)
    if args.height is not None or args.width is not None:
        pipe.check_size(args.height, args.width, 1)
    sites = pipe.sites(args.height, args.width)
    for s in sites:
        print(s.describe())
    print(f"{len(sites)} attention sites")
    if getattr(args, "features", False):
        feats = pipe.feature_sites(args.height, args.width)
        for s in feats:
            print(s.describe())
        print(f"{len(feats)} feature sites")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jattn", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="text-to-image")
    add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=STEPS, default=50, help="denoising steps (1-1000)")
    g.add_argument("--guidance-scale", type=GUIDANCE, default=7.5,
                   help="CFG scale ≥ 0 (CFG runs when > 1)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="default: the checkpoint's scheduler")
    g.add_argument("--eta", type=float_type(0.0), default=None, help="DDIM eta (>= 0)")
    g.add_argument("--guidance-rescale", type=FRACTION, default=0.0,
                   help="CFG rescale phi in [0, 1] (Lin et al. 2024; 0.7 for zero-terminal-SNR "
                        "models; default 0 = plain CFG)")
    g.add_argument("--seed", type=SEED, default=0, help="image i uses seed + i")
    g.add_argument("--height", type=SIZE, default=None)
    g.add_argument("--width", type=SIZE, default=None)
    g.add_argument("--latents", default=None,
                   help=".npy float32 (B, C, h, w): unscaled initial noise as diffusers' latents=")
    g.add_argument("--clip-skip", type=int, default=None,
                   help="diffusers' clip_skip: condition on the text encoder's k-th layer "
                        "from the default one (prompts only)")
    add_sdxl_args(g)
    add_out_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="attention-editing methods")
    esub = e.add_subparsers(dest="method", required=True, parser_class=Parser)
    p = esub.add_parser("p2p", help="Prompt-to-Prompt (Hertz et al. 2023)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="source prompt")
    p.add_argument("--target", action="append", required=True, help="edited prompt (repeat)")
    p.add_argument("--mode", choices=["replace", "refine", "reweight"], default="replace")
    p.add_argument("--cross-steps", type=float_type(), default=0.8)
    p.add_argument("--self-steps", type=float_type(), default=0.4)
    p.add_argument("--equalize", nargs="*", default=None, metavar="WORD=VALUE")
    p.add_argument("--blend-words", nargs="*", default=None)
    p.add_argument("--subtract-words", nargs="*", default=None)
    p.add_argument("--start-blend", type=FRACTION, default=0.0)
    p.add_argument("--reference-quirks", action="store_true",
                   help="reproduce google/prompt-to-prompt's quirks (post-edit stored maps, "
                        "get_word_inds word boundaries, word-swap tail mapping)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", default=None, help="real image to edit (inverted first)")
    src.add_argument("--inversion-file", default=None, help=".npz from `jattn invert`")
    p.add_argument("--inversion", choices=["null-text", "ddim"], default="null-text")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_edit_p2p)

    iv = sub.add_parser("invert", help="DDIM / null-text inversion of a real image")
    add_model_args(iv)
    iv.add_argument("--image", required=True)
    iv.add_argument("--prompt", required=True)
    iv.add_argument("--method", choices=["null-text", "ddim"], default="null-text")
    add_sampling_args(iv, seed=False)
    iv.set_defaults(func=cmd_invert)

    mp = sub.add_parser("maps", help="per-token cross-attention overlays, self-attention PCA")
    add_model_args(mp)
    mp.add_argument("--prompt", action="append", required=True)
    mp.add_argument("--self-resolution", type=int_type(1), default=None,
                    help="self-attention grid side to capture (default: largest <= 32)")
    add_sampling_args(mp)
    add_sdxl_args(mp, negative=False)
    mp.set_defaults(func=cmd_maps)

    d = sub.add_parser("demo", help="generations, attention maps and P2P edits + index.html")
    add_model_args(d)
    add_sampling_args(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run a Python config from configs/")
    add_model_args(r)
    r.add_argument("config")
    add_out_args(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sites", help="list the attention sites of the UNet")
    add_model_args(s)
    s.add_argument("--height", type=SIZE, default=None)
    s.add_argument("--width", type=SIZE, default=None)
    s.add_argument("--features", action="store_true",
                   help="also list the feature sites (resnet outputs, GroupNorms, FreeU's "
                   "backbone/skip inputs)")
    s.set_defaults(func=cmd_sites)

    import importlib

    from jattn import commands

    for mod in commands.MODULES:  # the methods' commands, one module each
        importlib.import_module(f"jattn.commands.{mod}").register(sub, esub)
    return parser


# ---------------------------------------------------------------------- errors
_USER_TYPES = (ValueError, TypeError, RuntimeError, LookupError)
_JATTN_DIR = str(Path(__file__).resolve().parent)


def _raised_by_jattn(e: BaseException) -> bool:
    """Whether the exception comes from a ``raise`` in jattn's own code (a deliberate check
    with a message for the user), not from a library deeper down (a bug of jattn's)."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(_JATTN_DIR)


def _is_user_error(e: BaseException) -> bool:
    from jattn.io.outputs import OutputDirError

    if isinstance(e, (OutputDirError, OSError)):
        return True  # file-system faults name the file; never a traceback
    return isinstance(e, _USER_TYPES) and _raised_by_jattn(e)


def _out_of_memory(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    from jattn.io import interrupt

    parser = build_parser()
    args = parser.parse_args(argv)
    name = "jattn " + args.command + (f" {args.method}" if args.command == "edit" else "")
    debug = getattr(args, "debug", False) or os.environ.get("JATTN_DEBUG") == "1"
    interrupt.enable()
    interrupt.reset()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.func(args)
        except BaseException as e:  # noqa: BLE001 - classified below, re-raised if a bug
            if isinstance(e, SystemExit):
                raise
            if interrupt.is_interrupt(e):
                print(f"{name}: interrupted; files already written are complete, nothing "
                      "half-written", file=sys.stderr)
                return 130
            if debug:
                traceback.print_exc()
            if _out_of_memory(e):
                print(f"{name}: error: out of memory ({_one_line(e)[:200]}); use smaller "
                      "images, fewer prompts per call or --dtype bfloat16", file=sys.stderr)
                return 2
            if _is_user_error(e):
                print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
                return 2
            if debug:
                return 1
            raise


if __name__ == "__main__":
    sys.exit(main())
