"""``jattn layout``: layout guidance (Chen et al. WACV 2024; :mod:`jattn.methods.layout`),
Bounded Attention (Dahary et al. ECCV 2024; :mod:`jattn.methods.bounded`) or
Attend-and-Excite (:mod:`jattn.methods.excite`) from boxes/phrases.

  jattn layout [--method layout-guidance|bounded|attend-excite] --prompt TEXT
      [--box "PHRASE=x0,y0,x1,y1" …] [--excite PHRASE …] [--seed N] [--steps N]
      [--reference-quirks] --out-dir DIR

Boxes in pixels, or fractions of the image when all four numbers are ≤ 1. Every --box
applies to every --prompt. Bounded Attention accepts overlapping boxes (a pixel in two
boxes belongs to both subjects until the masks are refined). Writes ``000.png …`` (one per
prompt), ``grid.png`` (several) and ``result.json`` (with the boxes used, as fractions;
bounded: also the final subject masks, as lists per prompt and phrase and in
``masks.npy`` ``(prompts, phrases, h, w)``).

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``pipe.generate`` (layout guidance, attend-excite) or ``bounded_generate(sdxl=)``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (OutputDir, add_model_args, add_sampling_args, arguments,
                                   load_pipeline, need_values, renamed_errors, seeds_for,
                                   write_outputs, add_sdxl_args, sdxl_kwargs)

BOX_EXAMPLE = "needs at least one box, e.g. --box \"red circle=0,0,64,64\""


def cmd_layout(args) -> int:
    from jattn.methods.subjects import check_boxes, parse_box

    prompts = list(args.prompt)
    method = args.method
    boxes = [parse_box(b, "--box") for b in (args.box or [])]
    if method in ("layout-guidance", "bounded"):
        label = "layout guidance" if method == "layout-guidance" else "bounded"
        need_values(boxes, "--box", f"{label} {BOX_EXAMPLE}")
    if method == "attend-excite" and boxes:
        raise ValueError("--box: attend-excite takes no boxes (it excites --excite phrases); "
                         "use --method layout-guidance or bounded for boxes")
    if method != "attend-excite" and args.excite:
        raise ValueError(f"--excite: only --method attend-excite excites phrases; {method} "
                         "takes --box")
    seeds = seeds_for(args, len(prompts))
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    names = [*OutputDir.image_names(len(prompts)), "grid.png"]
    if method == "bounded":
        names.append("masks.npy")
    out.reserve(*names)
    pipe = load_pipeline(args)
    h = w = pipe.default_size
    xl = sdxl_kwargs(args, pipe, len(prompts))  # SDXL: --prompt-2, micro-conditioning
    extra = {}
    phrases = [[p for p, _ in boxes] for _ in prompts]
    bx = [[b for _, b in boxes] for _ in prompts]
    t0 = time.perf_counter()
    if method == "layout-guidance":
        from jattn.methods.layout import layout_guidance

        with renamed_errors({"boxes": "--box"}):
            g = layout_guidance(pipe, prompts, phrases, bx, num_inference_steps=args.steps,
                                reference_quirks=args.reference_quirks)
        res = pipe.generate(prompts, num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, seed=seeds, guidance=g,
                            **xl)
    elif method == "bounded":
        import numpy as np

        from jattn.methods.bounded import bounded_generate, bounded_inputs

        bounded_inputs(pipe.tokenizer, prompts, phrases, bx, h, w, arg="--box")  # checks
        res, masks = bounded_generate(pipe, prompts, phrases, bx,
                                      num_inference_steps=args.steps,
                                      guidance_scale=args.guidance_scale, seed=seeds,
                                      reference_quirks=args.reference_quirks,
                                      return_masks=True, sdxl=xl)
        masks = np.asarray(masks, np.float32)
        out.write("masks.npy", lambda fh: np.save(fh, masks))
        extra["masks"] = [{p: masks[i, j].astype(int).tolist() for j, p in
                           enumerate(phrases[i])} for i in range(len(prompts))]
        extra["masks_file"] = "masks.npy"
    else:
        from jattn.methods.excite import excite_guidance

        excite = need_values(args.excite, "--excite",
                             "give at least one phrase of the prompt to excite")
        with renamed_errors({"excite:": "--excite:"}):
            g = excite_guidance(pipe, prompts, [excite for _ in prompts],
                                num_inference_steps=args.steps)
        res = pipe.generate(prompts, num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, seed=seeds, guidance=g,
                            **xl)
        extra["excite"] = excite
    if boxes:
        extra["boxes"] = {p: check_boxes([b], h, w, "--box")[0].tolist() for p, b in boxes}
    seconds = time.perf_counter() - t0
    write_outputs(out, res.images, prompts, dict(
        command="layout", method=method, arguments=arguments(args), seeds=seeds,
        prompts=prompts, model=pipe.source, seconds=seconds, **extra))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("layout", help="layout from boxes: layout guidance (Chen et al. 2024), "
                                      "Bounded Attention (Dahary et al. 2024) or "
                                      "Attend-and-Excite")
    add_model_args(p)
    p.add_argument("--method", choices=["layout-guidance", "bounded", "attend-excite"],
                   default="layout-guidance")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat)")
    p.add_argument("--box", action="append", default=None,
                   help="PHRASE=x0,y0,x1,y1 (pixels, or fractions when all <= 1; repeat)")
    p.add_argument("--excite", action="append", default=None,
                   help="attend-excite: phrase to excite (repeat)")
    p.add_argument("--reference-quirks", action="store_true",
                   help="layout guidance: the reference's loss persisting across steps and "
                        "second half of the heads; bounded: the batch-coupled stopping rule")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_layout)
