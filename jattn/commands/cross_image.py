"""``jattn cross-image``: Cross-Image Attention appearance transfer (Alaluf, Garibi et al.
SIGGRAPH 2024; :mod:`jattn.methods.cross_image`).

  jattn cross-image --structure PATH|TEXT --appearance PATH|TEXT [--prompt TEXT]
      [--object-word WORD] [--seed N] [--steps N] [--guidance-scale S] --out-dir DIR

Writes ``000.png`` the output, ``001.png`` the appearance and ``002.png`` the structure (as
the loop regenerates them from their inversions, or generated from a text), ``grid.png``
(structure, appearance, output) and ``result.json``. An argument that names an existing file,
or looks like a file (an image extension or a folder separator), is an image; otherwise a
prompt from which the image is generated first.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``cross_image(sdxl=)``: the inputs given as prompts only (the inversions and the loop use
``--prompt``); refused when both inputs are images.
"""

from __future__ import annotations

import os
import time
import warnings

from jattn.commands.common import (GUIDANCE, SEED, STEPS, OutputDir, add_model_args,
                                   add_out_args, arguments, float_type, load_pipeline,
                                   read_image, save_grid, add_sdxl_args, sdxl_kwargs,
                                   refuse_sdxl)

_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_arg(text: str) -> bool:
    """Whether a ``--structure``/``--appearance`` value means an image file (else a prompt)."""
    return (os.path.exists(text) or text.lower().endswith(_EXTS) or os.sep in text
            or "/" in text)


def cmd_cross_image(args) -> int:
    from jattn.methods.cross_image import cross_image

    names = OutputDir.image_names(3) + ["grid.png", "masks.png"]
    inputs = [a for a in (args.structure, args.appearance) if is_image_arg(a)]
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=inputs)
    out.reserve(*names)
    if not args.prompt and args.object_word:
        raise ValueError("--object-word: it must be a word of --prompt, and no --prompt was "
                         "given; add --prompt (e.g. \"a photo of a cat\")")
    pipe = load_pipeline(args)
    given = {}
    sizes = {}
    for arg, value in (("--structure", args.structure), ("--appearance", args.appearance)):
        if is_image_arg(value):
            from PIL import Image

            if os.path.isfile(value):
                try:
                    with Image.open(value) as im:
                        sizes[arg] = im.size
                except Exception:  # noqa: BLE001 - read_image names the problem below
                    pass
            given[arg] = read_image(pipe, value, arg)
        else:
            given[arg] = value
    if len(set(sizes.values())) > 1:
        warnings.warn(f"--structure is {sizes['--structure'][0]}×{sizes['--structure'][1]} px "
                      f"and --appearance {sizes['--appearance'][0]}×"
                      f"{sizes['--appearance'][1]} px: both are resized to "
                      f"{pipe.default_size}×{pipe.default_size} px", stacklevel=1)
    texts = [v for v in given.values() if isinstance(v, str)]
    xl = sdxl_kwargs(args, pipe, len(texts) or None,  # the generated inputs' conditioning
                     "input given as a prompt (--structure, --appearance)")
    if not texts:
        refuse_sdxl(xl, "--structure and --appearance are both images (inverted with --prompt "
                        "at their size); SDXL options apply to an input given as a prompt")
    t0 = time.perf_counter()
    res = cross_image(pipe, given["--structure"], given["--appearance"], args.prompt,
                      num_inference_steps=args.steps, seed=args.seed,
                      swap_guidance_scale=args.swap_guidance_scale,
                      contrast_strength=args.contrast_strength,
                      guidance_scale=args.guidance_scale,
                      object_word=args.object_word if args.object_word else "",
                      masked_adain=not args.no_masked_adain,
                      reference_quirks=args.reference_quirks, sdxl=xl)
    seconds = time.perf_counter() - t0
    out.images(res.images)
    save_grid(out, [res.images[2], res.images[1], res.images[0]],
              ["structure", "appearance", "output"])
    import numpy as np

    m = res.masks[0]                                          # (2, h, w) [APP, STRUCT]
    f = res.images.shape[1] // m.shape[1]
    pics = [np.repeat(np.repeat((mm * 255).astype(np.uint8), f, 0), f, 1) for mm in m]
    save_grid(out, [np.stack([p] * 3, -1) for p in pics[::-1]],
              ["structure mask", "appearance mask"], name="masks.png")
    out.finish(dict(command="cross-image", arguments=arguments(args), model=pipe.source,
                    seconds=seconds, settings=res.settings,
                    files_meaning={"000.png": "output", "001.png": "appearance",
                                   "002.png": "structure"}))
    print(f"{out.path('000.png')}\toutput ({seconds:.1f} s)")
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("cross-image",
                       help="appearance transfer by Cross-Image Attention (Alaluf et al. 2024)")
    add_model_args(p)
    p.add_argument("--structure", required=True,
                   help="image file (its shapes and layout are kept) or a prompt to generate it")
    p.add_argument("--appearance", required=True,
                   help="image file (its colours and textures are taken) or a prompt")
    p.add_argument("--prompt", default=None,
                   help="prompt of the inversions and the output (default \"\"; the reference: "
                        "\"a photo of a <domain>\")")
    p.add_argument("--object-word", default=None,
                   help="noun of --prompt whose self-segmentation masks restrict AdaIN "
                        "(default: the prompt's last word; no prompt: AdaIN everywhere)")
    p.add_argument("--steps", type=STEPS, default=100,
                   help="denoising steps of the inversion and the loop (the reference: 100; "
                        "step settings scale with it)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--swap-guidance-scale", type=GUIDANCE, default=3.5,
                   help="swap guidance (second UNet pass without swap; <= 1: off)")
    p.add_argument("--contrast-strength", type=float_type(0.0), default=1.67)
    p.add_argument("--guidance-scale", type=GUIDANCE, default=1.0,
                   help="CFG of the loop (the reference: 1 = none; 3.5 = the inversion's scale "
                        "regenerates the inputs exactly, which the bundled model needs)")
    p.add_argument("--no-masked-adain", action="store_true",
                   help="AdaIN over the whole latents instead of inside the object masks")
    p.add_argument("--reference-quirks", action="store_true",
                   help="garibida/cross-image-attention's quirks (attention sees the previous "
                        "step's index, inclusive guidance end, contrast mean broadcast)")
    add_sdxl_args(p, negative=False)
    add_out_args(p)
    p.set_defaults(func=cmd_cross_image)
