"""``jattn excite``: Attend-and-Excite (Chefer et al. SIGGRAPH 2023;
:mod:`jattn.methods.excite`).

  jattn excite --prompt TEXT --excite PHRASE [--excite PHRASE …] [--prompt …] [--seed N]
      [--steps N] [--guidance-scale S] [--scale-factor 20] [--attn-res R]
      [--token-span prompt|diffusers] [--prompt-2 TEXT …] [SDXL micro-conditioning]
      --out-dir DIR

Every ``--excite`` phrase applies to every ``--prompt`` (each must occur in each prompt).
Writes ``000.png …`` (one per prompt, in order), ``grid.png`` and ``result.json``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (OutputDir, add_model_args, add_sampling_args,
                                   add_sdxl_args, arguments, float_type, int_type,
                                   load_pipeline, need_values, renamed_errors, sdxl_kwargs,
                                   seeds_for, write_outputs)


def cmd_excite(args) -> int:
    from jattn.methods.excite import excite_guidance

    prompts = list(args.prompt)
    phrases = need_values(args.excite, "--excite", "give at least one phrase of the prompt to "
                          "excite, e.g. --excite circle --excite square")
    seeds = seeds_for(args, len(prompts))
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    out.reserve(*OutputDir.image_names(len(prompts)), "grid.png")
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, len(prompts))  # SDXL: --prompt-2, micro-conditioning
    excite = [phrases for _ in prompts]
    t0 = time.perf_counter()
    # built once: checks every phrase/argument before any compute, then runs
    with renamed_errors({"excite:": "--excite:", "attn_res=": "--attn-res "}):
        g = excite_guidance(pipe, prompts, excite, num_inference_steps=args.steps,
                            scale_factor=args.scale_factor, attn_res=args.attn_res,
                            token_span=args.token_span)
    res = pipe.generate(prompts, num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale, seed=seeds, guidance=g, **xl)
    seconds = time.perf_counter() - t0
    write_outputs(out, res.images, prompts, dict(
        command="excite", arguments=arguments(args), seeds=seeds, prompts=prompts,
        excite=phrases, model=pipe.source, seconds=seconds))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("excite", help="Attend-and-Excite: every subject appears "
                                      "(Chefer et al. 2023)")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat)")
    p.add_argument("--excite", action="append", default=None,
                   help="phrase of the prompt to excite (repeat; stop words are dropped)")
    p.add_argument("--scale-factor", type=float_type(0.0), default=20.0,
                   help="step size scale (reference 20; 0 = plain generation)")
    p.add_argument("--attn-res", type=int_type(1), default=None,
                   help="cross-attention resolution of the loss (default: ceil(width/32), "
                        "diffusers' rule)")
    p.add_argument("--token-span", choices=["prompt", "diffusers"], default="prompt",
                   help="softmax over the prompt's tokens [1, EOS) (reference) or [1, 76) "
                        "(diffusers' port)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_excite)
