"""``jattn edit pnp``: Plug-and-Play diffusion features (Tumanyan et al. CVPR 2023;
:mod:`jattn.methods.pnp`).

  jattn edit pnp (--image PATH | --prompt SRC) --target TGT [--target …]
      [--attn-fraction 0.5] [--feature-fraction 0.8] [--negative-prompt TEXT]
      [--seed N] [--steps N] [--guidance-scale S] --out-dir DIR

Writes ``000.png`` the source (generated, or the real image's reconstruction), ``001.png …``
one per target, ``grid.png``, ``result.json``.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``pnp(sdxl=)`` (also ``--negative-prompt-2`` and the negative micro-conditioning), one per
row (source, then targets) or one for all; refused with ``--image``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (FRACTION, OutputDir, add_model_args, add_sampling_args,
                                   arguments, load_pipeline, need_values, read_image,
                                   renamed_errors, write_outputs, add_sdxl_args, sdxl_kwargs,
                                   refuse_sdxl)

_NAMES = {"target_prompts:": "--target:", "attn_fraction=": "--attn-fraction ",
          "feature_fraction=": "--feature-fraction ", "source_prompt:": "--prompt:"}


def cmd_pnp(args) -> int:
    from jattn.methods.pnp import pnp

    targets = need_values(args.target, "--target", "give at least one target prompt (a group "
                          "of one has nothing to translate), e.g. --target \"a blue heart\"")
    if not args.image and args.prompt is None:
        raise ValueError("--prompt: give the source prompt (a generated source) or --image")
    n = 1 + len(targets)
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=[args.image])
    out.reserve(*OutputDir.image_names(n), "grid.png")
    pipe = load_pipeline(args)
    image = read_image(pipe, args.image) if args.image else None
    xl = sdxl_kwargs(args, pipe, n, "prompt (--prompt, then each --target)")
    if image is not None:
        refuse_sdxl(xl, "with --image the inversion fixes the source's conditioning (its prompt alone, the image's size); SDXL options apply to generated sources only")
    t0 = time.perf_counter()
    with renamed_errors(_NAMES):
        res = pnp(pipe, image=image, source_prompt=args.prompt, target_prompts=targets,
                  seed=args.seed, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, attn_fraction=args.attn_fraction,
                  feature_fraction=args.feature_fraction,
                  negative_prompt=args.negative_prompt, sdxl=xl)
    seconds = time.perf_counter() - t0
    figures = {}
    if image is not None:
        from jattn.io.images import psnr

        figures["reconstruction_psnr_db"] = psnr(res.images[0], image)
    labels = [("reconstruction" if image is not None else "source: " + args.prompt)]
    labels += list(targets)
    write_outputs(out, res.images, labels, dict(
        command="edit pnp", arguments=arguments(args), model=pipe.source, seconds=seconds,
        settings=res.settings, figures=figures))
    return 0


def register(sub, edit_sub) -> None:
    from jattn.methods.pnp import REFERENCE_NEGATIVE

    p = edit_sub.add_parser("pnp", help="Plug-and-Play: translate an image to a target prompt, "
                                        "keeping its structure (Tumanyan et al. 2023)")
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", default=None, help="real image (DDIM-inverted with \"\")")
    p.add_argument("--prompt", default=None,
                   help="source prompt: generate the source (with --image: the inversion "
                        "prompt, default \"\")")
    p.add_argument("--target", action="append", default=None, help="target prompt (repeat)")
    p.add_argument("--attn-fraction", type=FRACTION, default=0.5,
                   help="Q, K injection in the first fraction of the steps (reference 0.5)")
    p.add_argument("--feature-fraction", type=FRACTION, default=0.8,
                   help="residual feature injection in the first fraction (reference 0.8)")
    p.add_argument("--negative-prompt", default=REFERENCE_NEGATIVE,
                   help=f"of the targets (default the reference's {REFERENCE_NEGATIVE!r})")
    add_sampling_args(p)
    add_sdxl_args(p)
    p.set_defaults(func=cmd_pnp)
