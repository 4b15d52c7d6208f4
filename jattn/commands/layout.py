"""``jattn layout``: layout guidance (Chen et al. WACV 2024; :mod:`jattn.methods.layout`)
or Attend-and-Excite (:mod:`jattn.methods.excite`) from boxes/phrases.

  jattn layout [--method layout-guidance|attend-excite] --prompt TEXT
      [--box "PHRASE=x0,y0,x1,y1" …] [--excite PHRASE …] [--seed N] [--steps N]
      [--reference-quirks] --out-dir DIR

Boxes in pixels, or fractions of the image when all four numbers are ≤ 1. Every --box
applies to every --prompt. Writes ``000.png …`` (one per prompt), ``grid.png`` (several) and
``result.json`` (with the boxes used, as fractions).
"""

from __future__ import annotations

import time

from jattn.commands.common import (OutputDir, add_model_args, add_sampling_args, arguments,
                                   load_pipeline, seeds_for, write_outputs)


def cmd_layout(args) -> int:
    from jattn.methods.subjects import check_boxes, parse_box

    prompts = list(args.prompt)
    method = args.method
    boxes = [parse_box(b, "--box") for b in (args.box or [])]
    if method == "layout-guidance" and not boxes:
        raise ValueError("--box: layout guidance needs at least one box, e.g. "
                         "--box \"red circle=0,0,64,64\"")
    if method == "attend-excite" and boxes:
        raise ValueError("--box: attend-excite takes no boxes (it excites --excite phrases); "
                         "use --method layout-guidance for boxes")
    seeds = seeds_for(args, len(prompts))
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    out.reserve(*OutputDir.image_names(len(prompts)), "grid.png")
    pipe = load_pipeline(args)
    h = w = pipe.default_size
    t0 = time.perf_counter()
    extra = {}
    if method == "layout-guidance":
        from jattn.methods.layout import layout_generate, layout_guidance

        phrases = [[p for p, _ in boxes] for _ in prompts]
        bx = [[b for _, b in boxes] for _ in prompts]
        try:
            layout_guidance(pipe, prompts, phrases, bx, num_inference_steps=args.steps)
        except ValueError as e:
            raise ValueError(str(e).replace("boxes", "--box")) from None
        res = layout_generate(pipe, prompts, phrases, bx, num_inference_steps=args.steps,
                              guidance_scale=args.guidance_scale, seed=seeds,
                              reference_quirks=args.reference_quirks)
        extra["boxes"] = {p: check_boxes([b], h, w, "--box")[0].tolist() for p, b in boxes}
    else:
        from jattn.methods.excite import attend_and_excite, excite_guidance

        phrases = list(args.excite or [])
        if not phrases:
            raise ValueError("--excite: give at least one phrase of the prompt to excite")
        excite = [phrases for _ in prompts]
        try:
            excite_guidance(pipe, prompts, excite, num_inference_steps=args.steps)
        except ValueError as e:
            raise ValueError(str(e).replace("excite:", "--excite:")) from None
        res = attend_and_excite(pipe, prompts, excite, num_inference_steps=args.steps,
                                guidance_scale=args.guidance_scale, seed=seeds)
        extra["excite"] = phrases
    seconds = time.perf_counter() - t0
    write_outputs(out, res.images, prompts, dict(command="layout", method=method, arguments=arguments(args), seeds=seeds,
                    prompts=prompts, model=pipe.source, seconds=seconds, **extra))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("layout", help="layout guidance from boxes (Chen et al. 2024) or "
                                      "Attend-and-Excite")
    add_model_args(p)
    p.add_argument("--method", choices=["layout-guidance", "attend-excite"],
                   default="layout-guidance")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat)")
    p.add_argument("--box", action="append", default=None,
                   help="PHRASE=x0,y0,x1,y1 (pixels, or fractions when all <= 1; repeat)")
    p.add_argument("--excite", action="append", default=None,
                   help="attend-excite: phrase to excite (repeat)")
    p.add_argument("--reference-quirks", action="store_true",
                   help="layout guidance: the reference's loss persisting across steps and "
                        "second half of the heads")
    add_sampling_args(p)
    p.set_defaults(func=cmd_layout)
