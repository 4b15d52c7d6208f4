"""``jattn style-aligned``: a set of images in one style by shared self-attention
(Hertz, Voynov et al. CVPR 2024; :mod:`jattn.methods.style_aligned`).

  jattn style-aligned --prompt REF --prompt … [--reference-image PATH --reference-prompt TEXT]
      [--seed N] [--steps N] [--guidance-scale S] [--shared-score-shift X]
      [--shared-score-scale X] [--no-share-group-norm] [--full-attention-share]
      [--freeu [PRESET]] --out-dir DIR

Writes ``000.png`` the reference (first ``--prompt``; with ``--reference-image``: the image's
reconstruction from its DDIM inversion), ``001.png …`` the other prompts in order (each
``--prompt`` after the first, or every ``--prompt`` with a reference image), ``grid.png``
and ``result.json``.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``style_aligned(sdxl=)``; refused with ``--reference-image``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (FRACTION, OutputDir, add_model_args, add_sampling_args,
                                   arguments, float_type, load_pipeline, read_image,
                                   renamed_errors, write_outputs, add_sdxl_args, sdxl_kwargs,
                                   refuse_sdxl)

_NAMES = {"reference_prompt": "--reference-prompt", "reference_image": "--reference-image",
          "shared_score_shift": "--shared-score-shift", "shared_score_scale":
          "--shared-score-scale", "inversion_guidance": "--inversion-guidance",
          "offset": "--offset", "prompts": "--prompt", "window": "--window",
          "FreeU preset": "--freeu"}


def cmd_style_aligned(args) -> int:
    from jattn.methods.style_aligned import style_aligned

    prompts = list(args.prompt or [])
    ref = args.reference_image
    if ref is not None and args.reference_prompt is None:
        raise ValueError("--reference-prompt: --reference-image needs the image's prompt (what "
                         "it shows, e.g. \"a red circle on a beige background\"); it is "
                         "inverted with it")
    if args.reference_prompt is not None and ref is None:
        raise ValueError("--reference-prompt: it is the prompt of --reference-image, which was "
                         "not given; give the image, or make the reference the first --prompt")
    count = len(prompts) + (1 if ref is not None else 0)
    if count < 2:
        raise ValueError("--prompt: a group of one image shares nothing; give the reference "
                         "--prompt and at least one more --prompt (or --reference-image with "
                         "one --prompt)")
    if not args.window[0] <= args.window[1]:
        raise ValueError(f"--window {args.window[0]:g} {args.window[1]:g}: start must be ≤ end "
                         "(step fractions in [0, 1])")
    out = OutputDir(args.out_dir, overwrite=args.overwrite,
                    inputs=[ref] if ref is not None else [])
    out.reserve(*(OutputDir.image_names(count) + ["grid.png"]))
    pipe = load_pipeline(args)
    image = read_image(pipe, ref, "--reference-image") if ref is not None else None
    xl = sdxl_kwargs(args, pipe, len(prompts))  # SDXL: --prompt-2, micro-conditioning
    if ref is not None:
        refuse_sdxl(xl, "with --reference-image the inversion fixes the reference's "
                        "conditioning (--reference-prompt alone, the image's size); SDXL "
                        "options apply to a generated reference only")
    t0 = time.perf_counter()
    with renamed_errors(_NAMES):
        res = style_aligned(
            pipe, prompts, seed=args.seed, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, reference_image=image,
            reference_prompt=args.reference_prompt, inversion_guidance=args.inversion_guidance,
            offset=args.offset,
            share_group_norm=False if args.no_share_group_norm else None,  # None: per family
            full_attention_share=args.full_attention_share,
            shared_score_scale=args.shared_score_scale,
            shared_score_shift=args.shared_score_shift, window=tuple(args.window),
            freeu=args.freeu, reference_quirks=args.reference_quirks, sdxl=xl)
    seconds = time.perf_counter() - t0
    group = res.prompts[0]
    labels = (["reference (reconstruction)" if ref is not None else "reference"]
              + [p for p in group[1:]])
    meaning = {f"{i:03d}.png": (("reconstruction of " + ref) if (i == 0 and ref is not None)
                                else group[i]) for i in range(len(group))}
    write_outputs(out, res.images, labels,
                  dict(command="style-aligned", arguments=arguments(args), model=pipe.source,
                       seconds=seconds, prompts=group, seeds=res.seeds, settings=res.settings,
                       files_meaning=meaning))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("style-aligned",
                       help="images sharing one style by shared self-attention "
                            "(StyleAligned, Hertz et al. 2024)")
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="repeatable; the first is the reference whose style the others take "
                        "(with --reference-image every --prompt takes the image's style)")
    p.add_argument("--reference-image", default=None,
                   help="an image whose style is shared (DDIM-inverted with "
                        "--reference-prompt; 000.png is its reconstruction)")
    p.add_argument("--reference-prompt", default=None,
                   help="the prompt of --reference-image (required with it)")
    p.add_argument("--shared-score-shift", type=float_type(), default=None,
                   help="logit bias on the reference's tokens (default 0; with "
                        "--reference-image log 2 = 0.693 as the transfer notebook)")
    p.add_argument("--shared-score-scale", type=float_type(), default=1.0,
                   help="factor on the reference's keys (default 1)")
    p.add_argument("--no-share-group-norm", action="store_true",
                   help="GroupNorm statistics per image (the SDXL notebooks' setting and the "
                        "default on SDXL models; SD1/SD2 share them by default)")
    p.add_argument("--full-attention-share", action="store_true",
                   help="every image attends to every image (no AdaIN, no reference)")
    p.add_argument("--window", type=FRACTION, nargs=2, default=[0.0, 1.0],
                   metavar=("START", "END"),
                   help="step fractions in [0, 1] where sharing is on (default 0 1: always)")
    p.add_argument("--inversion-guidance", type=float_type(1.0), default=2.0,
                   help="CFG of the reference image's DDIM inversion (the notebook: 2)")
    p.add_argument("--offset", type=int, default=5,
                   help="re-imposition offset of the reference image's trajectory (the "
                        "notebook: 5)")
    p.add_argument("--freeu", nargs="?", const="sd1.5", default=None, metavar="PRESET",
                   help="compose FreeU (preset sd1.4, sd1.5, sd2.1, sdxl, sd1-v1, sd2.1-v1; "
                        "bare --freeu: sd1.5)")
    p.add_argument("--reference-quirks", action="store_true",
                   help="google/style-aligned's layer-switch indexing (no effect on SD UNets)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=_with_defaults)


def _with_defaults(args) -> int:
    if args.shared_score_shift is None:
        import math

        args.shared_score_shift = math.log(2.0) if args.reference_image is not None else 0.0
    return cmd_style_aligned(args)
