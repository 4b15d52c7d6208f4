"""``jattn edit masactrl``: MasaCtrl mutual self-attention control (Cao et al. ICCV 2023;
:mod:`jattn.methods.masactrl`).

  jattn edit masactrl --prompt SRC --target TGT [--target …] [--image PATH]
      [--variant plain|union|mask|auto-mask] [--mask-source PNG --mask-target PNG]
      [--token WORD] [--threshold 0.1] [--start-step 0.08] [--start-layer F]
      [--follow-inversion] [--seed N] [--steps N] [--guidance-scale S] --out-dir DIR

Writes ``000.png`` the source (with ``--image``: its regeneration from the inverted
noise), ``001.png …`` the targets, ``grid.png``, ``result.json`` (``masks.png`` for the
mask variants).

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``masactrl(sdxl=)``, one per row (source, then targets) or one for all; refused with
``--image``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (FRACTION, OutputDir, add_model_args, add_sampling_args,
                                   arguments, float_type, load_pipeline, need_values,
                                   read_image, renamed_errors, save_grid, write_outputs,
                                   add_sdxl_args, sdxl_kwargs, refuse_sdxl)

_NAMES = {"target_prompts:": "--target:", "mask_s:": "--mask-source:",
          "mask_t:": "--mask-target:", "mask_s, mask_t:": "--mask-source, --mask-target:",
          "mask_s/mask_t:": "--mask-source/--mask-target:", "token:": "--token:",
          "start_step=": "--start-step ", "start_layer=": "--start-layer ",
          "source_prompt:": "--prompt:"}


def read_mask(path: str, arg: str):
    """A PNG mask as float32 ``(H, W)`` in [0, 1] (grey levels / 255)."""
    import numpy as np
    from PIL import Image

    from jattn.io.images import load_image  # noqa: F401  (same error style for files)
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg} {path!r}: no such file.")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except Exception:  # noqa: BLE001 - any pillow failure is "not an image"
        raise ValueError(f"{arg} {path!r}: not a readable image; give a PNG mask (white = "
                         "object)") from None


def cmd_masactrl(args) -> int:
    from jattn.methods.masactrl import masactrl

    targets = need_values(args.target, "--target", "give at least one target prompt (a group "
                          "of one has nothing to edit), e.g. --target \"a red heart on the right\"")
    if (args.mask_source or args.mask_target) and args.variant != "mask":
        raise ValueError("--mask-source/--mask-target: masks need --variant mask")
    if args.variant == "mask" and not (args.mask_source and args.mask_target):
        raise ValueError("--mask-source, --mask-target: --variant mask needs both masks")
    if args.variant == "auto-mask" and not args.token:
        raise ValueError("--token: --variant auto-mask needs the subject word, e.g. --token heart")
    n = 1 + len(targets)
    out = OutputDir(args.out_dir, overwrite=args.overwrite,
                    inputs=[args.image, args.mask_source, args.mask_target])
    out.reserve(*OutputDir.image_names(n), "grid.png", "masks.png")
    ms = read_mask(args.mask_source, "--mask-source") if args.mask_source else None
    mt = read_mask(args.mask_target, "--mask-target") if args.mask_target else None
    pipe = load_pipeline(args)
    image = read_image(pipe, args.image) if args.image else None
    xl = sdxl_kwargs(args, pipe, n, "prompt (--prompt, then each --target)")
    if image is not None:
        refuse_sdxl(xl, "with --image the inversion fixes the source's conditioning (its prompt alone, the image's size); SDXL options apply to generated sources only")
    t0 = time.perf_counter()
    with renamed_errors(_NAMES):
        res = masactrl(pipe, args.prompt, targets, image=image, seed=args.seed,
                       num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                       start_step=args.start_step, start_layer=args.start_layer,
                       variant=args.variant, mask_s=ms, mask_t=mt, token=args.token,
                       threshold=args.threshold, follow_inversion=args.follow_inversion,
                       sdxl=xl)
    seconds = time.perf_counter() - t0
    if res.masks is not None:
        import numpy as np

        f = res.images.shape[1] // res.masks.shape[1]
        pics = [np.stack([np.repeat(np.repeat((mm * 255).astype(np.uint8), f, 0), f, 1)] * 3, -1)
                for mm in res.masks[:2]]
        save_grid(out, pics, ["source mask", "target mask"], name="masks.png")
    labels = [("regenerated: " if image is not None else "source: ") + (args.prompt or '""')]
    labels += list(targets)
    write_outputs(out, res.images, labels, dict(
        command="edit masactrl", arguments=arguments(args), model=pipe.source,
        seconds=seconds, settings=res.settings))
    return 0


def register(sub, edit_sub) -> None:
    p = edit_sub.add_parser("masactrl", help="MasaCtrl: the target keeps the source's content "
                                             "(mutual self-attention, Cao et al. 2023)")
    add_model_args(p)
    p.add_argument("--prompt", default=None,
                   help="source prompt (with --image: the inversion prompt, default \"\")")
    p.add_argument("--target", action="append", default=None, help="target prompt (repeat)")
    p.add_argument("--image", default=None, help="real image to edit (DDIM-inverted first)")
    p.add_argument("--variant", choices=["plain", "union", "mask", "auto-mask"],
                   default="plain")
    p.add_argument("--mask-source", default=None, help="--variant mask: source mask PNG "
                   "(white = object; image or latent size)")
    p.add_argument("--mask-target", default=None, help="--variant mask: target mask PNG")
    p.add_argument("--token", default=None,
                   help="--variant auto-mask: the subject word (in every prompt)")
    p.add_argument("--threshold", type=FRACTION, default=0.1,
                   help="--variant auto-mask: threshold of the min-max cross map (0.1)")
    p.add_argument("--start-step", type=float_type(), default=4 / 50,
                   help="first edited step as a fraction of --steps (reference 4/50 = 0.08)")
    p.add_argument("--start-layer", type=float_type(), default=None,
                   help="first edited self-attention layer as a fraction of the layers in "
                        "call order (0.625 = the reference's block 10 of 16 on SD1/SD2); "
                        "default: decoder self-attention at its two largest resolutions "
                        "(= the reference's layers on SD1/SD2)")
    p.add_argument("--follow-inversion", action="store_true",
                   help="with --image: the source follows the inverted trajectory (default: "
                        "regenerated from the inverted noise, as the reference notebook)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_masactrl)
