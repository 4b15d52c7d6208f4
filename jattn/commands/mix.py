"""``jattn edit mix``: prompt mixing, shape variations of one object (Patashnik et al.
ICCV 2023; :mod:`jattn.methods.mix`).

  jattn edit mix --prompt TEXT --word OBJECT --proxy W1 [--proxy W2 …] [--seed N]
      [--steps N] [--window START END] [--blend-step F | --no-blend] [--preserve W …]
      [--reference-quirks] --out-dir DIR

Writes ``000.png`` (the original), ``001.png …`` (one per proxy, in order), ``grid.png``
and ``result.json``.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``mix(sdxl=)``, one per row (original, then proxies) or one for all.
"""

from __future__ import annotations

import time

from jattn.commands.common import (FRACTION, SCHEDULERS, OutputDir, add_model_args,
                                   add_sampling_args, arguments, load_pipeline, save_grid,
                                   seeds_for, add_sdxl_args, sdxl_kwargs)


def cmd_edit_mix(args) -> int:
    from jattn.methods.mix import mix, mix_prompts

    proxies = list(args.proxy or [])
    if not proxies:
        raise ValueError("--proxy: give at least one proxy word, e.g. --proxy square "
                         "--proxy star (each replaces --word in the prompt)")
    words = args.prompt.split()
    if args.word not in words:
        raise ValueError(f"--word {args.word!r} is not a word of --prompt {args.prompt!r} "
                         f"(its words: {words}); spell it as in the prompt.")
    for w in args.preserve or []:
        if w not in words:
            raise ValueError(f"--preserve {w!r} is not a word of --prompt {args.prompt!r}")
    s0, s1 = args.window
    if s0 > s1:
        raise ValueError(f"--window {s0:g} {s1:g}: start must be ≤ end (fractions of the "
                         "steps, reference 0.14 0.34)")
    seeds = seeds_for(args, 1)
    n = 1 + len(proxies)
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    out.reserve(*OutputDir.image_names(n), "grid.png")
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, n, "prompt (the original, then one per --proxy)")
    try:
        prompts, _ = mix_prompts(pipe.tokenizer, args.prompt, args.word, proxies,
                                 reference_quirks=args.reference_quirks)
    except ValueError as e:  # name the CLI's arguments
        raise ValueError(str(e).replace("proxies:", "--proxy:").replace("word=", "--word ")
                         ) from None
    t0 = time.perf_counter()
    res = mix(pipe, args.prompt, args.word, proxies, seed=seeds[0],
              num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
              window=(s0, s1), blend_step=None if args.no_blend else args.blend_step,
              preserve=args.preserve, scheduler=args.scheduler,
              reference_quirks=args.reference_quirks, sdxl=xl)
    seconds = time.perf_counter() - t0
    paths = out.images(res.images)
    labels = [f"original: {args.word}"] + [f"proxy: {p}" for p in proxies]
    save_grid(out, res.images, labels)
    out.finish(dict(command="edit mix", arguments=arguments(args), seeds=seeds,
                    prompts=prompts, model=pipe.source, seconds=seconds))
    for p, prompt in zip(paths, prompts):
        print(f"{p}\t{prompt}")
    print(f"{out.path('grid.png')}")
    return 0


def register(sub, edit_sub) -> None:
    p = edit_sub.add_parser("mix", help="prompt mixing: shape variations of one object "
                                         "(Patashnik et al. 2023)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="original prompt")
    p.add_argument("--word", required=True, help="the object word of the prompt")
    p.add_argument("--proxy", action="append", default=None,
                   help="proxy word replacing --word (repeat; one image each)")
    p.add_argument("--window", type=FRACTION, nargs=2, default=(7 / 50, 17 / 50),
                   metavar=("START", "END"),
                   help="fractions of the steps whose cross-attention values come from the "
                        "proxy (reference 7/50 17/50; the bundled model forms shapes late: "
                        "0.6 1 there, see configs/mix_shapes.py)")
    p.add_argument("--blend-step", type=FRACTION, default=35 / 50,
                   help="fraction of the steps after which the background is blended once "
                        "(reference 35/50)")
    p.add_argument("--no-blend", action="store_true", help="no background blend")
    p.add_argument("--preserve", nargs="*", default=None, metavar="WORD",
                   help="words whose pixels keep the original's self-attention (reference "
                        "objects_to_preserve)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="default: the checkpoint's")
    p.add_argument("--reference-quirks", action="store_true",
                   help="reproduce orpatashnik/local-prompt-mixing's quirks (last proxy's "
                        "blend mask for all; proxies of other token counts paired by position)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_edit_mix)
