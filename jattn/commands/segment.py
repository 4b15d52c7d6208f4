"""``jattn segment``: self-segmentation of a generation or of a real image (inverted).

  jattn segment --prompt TEXT [--words W …] [--clusters 5] [--seed N] [--steps N] --out-dir DIR
  jattn segment --image PATH --prompt TEXT [--inversion null-text|ddim] … --out-dir DIR

Writes ``DIR/000.png`` (the generation, or the input's reconstruction), ``DIR/labels.png``
(uint8 label map at image size: 0 background, k the k-th labelled word, as listed in
``result.json``), ``DIR/overlay.png`` (segments coloured over the image) and
``DIR/result.json`` (arguments, words, labels, per-segment scores). See
:mod:`jattn.methods.segment`.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``segment(sdxl=)``; refused with ``--image``.
"""

from __future__ import annotations

from jattn.commands.common import (FRACTION, OutputDir, add_model_args, add_sampling_args,
                                   arguments, float_type, int_type, load_pipeline, read_image,
                                   seeds_for, add_sdxl_args, sdxl_kwargs, refuse_sdxl)

NAMES = ("000.png", "labels.png", "overlay.png")


def cmd_segment(args) -> int:
    from jattn.methods.segment import label_colours, overlay_labels, segment

    if args.prompt is None:
        raise ValueError("--prompt is required: the words of the prompt label the segments"
                         + (" (with --image: the prompt describing the image)"
                            if args.image else ""))
    if args.clusters < 2:
        raise ValueError(f"--clusters {args.clusters}: need at least 2 (the reference uses 5)")
    if args.start_step >= args.end_step:
        raise ValueError(f"--start-step {args.start_step:g} must be below --end-step "
                         f"{args.end_step:g} (fractions of the steps whose maps are averaged)")
    for w in args.words or []:
        if w not in args.prompt.split():
            raise ValueError(f"--words {w!r} is not a word of --prompt {args.prompt!r} (its "
                             f"words: {args.prompt.split()}); words match exactly")
    seeds = seeds_for(args, 1)
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=[args.image])
    out.reserve(*NAMES)
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, 1)  # SDXL: --prompt-2, micro-conditioning
    if args.image:
        refuse_sdxl(xl, "with --image the inversion fixes the image's conditioning (--prompt "
                        "alone, the image's size); SDXL options apply to generated images only")
    kwargs = dict(clusters=args.clusters, words=args.words, threshold=args.threshold,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  step_window=(args.start_step, args.end_step), upsample=args.upsample,
                  self_resolution=args.self_resolution, cross_resolution=args.cross_resolution)
    if args.image:
        image = read_image(pipe, args.image)
        res = segment(pipe, args.prompt, images=image[None], inversion=args.inversion,
                      **kwargs)
    else:
        res = segment(pipe, args.prompt, seed=seeds[0], sdxl=xl, **kwargs)
    words = res.words[0]
    out.image("000.png", res.images[0])
    out.write("labels.png", lambda fh: _save_labels(fh, res.labels[0]))
    out.image("overlay.png", overlay_labels(res.images[0], res.labels[0], len(words)))
    colours = label_colours(len(words))
    figures = {}
    if args.image:
        from jattn.io.images import psnr

        figures["reconstruction_psnr_db"] = psnr(res.images[0], image)
    out.finish(dict(
        command="segment", arguments=arguments(args), seeds=None if args.image else seeds,
        model=pipe.source, words=words,
        labels={"0": "background", **{str(j + 1): w for j, w in enumerate(words)}},
        label_colours={w: colours[j + 1].tolist() for j, w in enumerate(words)},
        pixels_per_label={("background" if j == 0 else words[j - 1]): int(n) for j, n in
                          enumerate(_bincount(res.labels[0], len(words) + 1))},
        segments=res.segments(0), self_grid=list(res.self_grid),
        cross_grid=list(res.cross_grid), figures=figures))
    print(f"{out.path('labels.png')}\t0 = background, "
          + ", ".join(f"{j + 1} = {w}" for j, w in enumerate(words)))
    print(out.path("overlay.png"))
    return 0


def _bincount(labels, n: int):
    import numpy as np

    return np.bincount(np.asarray(labels).ravel(), minlength=n)[:n]


def _save_labels(fh, labels) -> None:
    from PIL import Image

    Image.fromarray(labels, mode="L").save(fh, format="PNG")


def register(sub, edit_sub=None) -> None:
    """Add ``jattn segment`` to the top-level subparsers ``sub``."""
    p = sub.add_parser("segment", help="self-segmentation into the prompt's words "
                                       "(Patashnik et al. 2023)")
    add_model_args(p)
    p.add_argument("--prompt", default=None,
                   help="the prompt to generate, or the one describing --image (required)")
    p.add_argument("--image", default=None,
                   help="real image to segment (inverted, then regenerated with the maps "
                        "captured)")
    p.add_argument("--inversion", choices=["null-text", "ddim"], default="null-text",
                   help="inversion of --image (default null-text, the reference's)")
    p.add_argument("--words", nargs="+", default=None, metavar="WORD",
                   help="words of the prompt that label segments, in label order (default: "
                        "every word but articles, prepositions, position words, photo/"
                        "picture/image/background)")
    p.add_argument("--clusters", type=int_type(), default=5,
                   help="k-means clusters (>= 2; reference 5)")
    p.add_argument("--threshold", type=float_type(), default=0.35,
                   help="a cluster takes its best word when its score is above this "
                        "(reference 0.35; 0.3 in its prompt mixing)")
    p.add_argument("--start-step", type=FRACTION, default=0.0,
                   help="fraction of the steps where map averaging starts (default 0)")
    p.add_argument("--end-step", type=FRACTION, default=1.0,
                   help="fraction of the steps where it ends (default 1: every step)")
    p.add_argument("--self-resolution", type=int_type(1), default=None,
                   help="self-attention grid side in latent cells (default: the largest "
                        "with <= 32x32 tokens)")
    p.add_argument("--cross-resolution", type=int_type(1), default=None,
                   help="cross-attention grid side (default: half the self grid if the "
                        "model has it, else the self grid)")
    p.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest",
                   help="label map to image size (default nearest, as the reference)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_segment)


__all__ = ["register", "cmd_segment"]
