"""``jattn consistory``: one consistent subject across prompts (ConsiStory, Tewel et al.
SIGGRAPH 2024; :mod:`jattn.methods.consistory`).

  jattn consistory --subject WORDS --prompt TEXT --prompt … [--seed N] [--steps N]
      [--guidance-scale S] [--anchors 2] [--mask-dropout 0.5] [--no-share-queries]
      [--no-feature-injection] [--alpha 0.8] [--no-freeu] [--no-sdsa] --out-dir DIR

Every ``--prompt`` must contain the ``--subject`` word(s). Writes ``000.png …`` (one per
prompt, in order; the first ``--anchors`` are the anchors), ``grid.png`` and
``result.json``.

SDXL models: ``--prompt-2`` and the micro-conditioning flags (``add_sdxl_args``) reach
``consistory(sdxl=)``.
"""

from __future__ import annotations

import time

from jattn.commands.common import (FRACTION, OutputDir, add_model_args, add_sampling_args,
                                   arguments, int_type, load_pipeline, renamed_errors,
                                   write_outputs, add_sdxl_args, sdxl_kwargs)

_NAMES = {"subject:": "--subject:", "prompts:": "--prompt:", "n_anchors": "--anchors",
          "mask_dropout": "--mask-dropout", "num_inference_steps": "--steps",
          "alpha=": "--alpha="}


def cmd_consistory(args) -> int:
    from jattn.methods.consistory import consistory

    prompts = list(args.prompt or [])
    if len(prompts) < 2:
        raise ValueError("--prompt: a single prompt shares nothing; give two or more --prompt "
                         "of the same subject")
    subject = " ".join(args.subject).strip()
    if not subject:
        raise ValueError("--subject: give the subject word(s) every --prompt contains")
    out = OutputDir(args.out_dir, overwrite=args.overwrite)
    out.reserve(*(OutputDir.image_names(len(prompts)) + ["grid.png"]))
    pipe = load_pipeline(args)
    xl = sdxl_kwargs(args, pipe, len(prompts))  # SDXL: --prompt-2, micro-conditioning
    t0 = time.perf_counter()
    with renamed_errors(_NAMES):
        res = consistory(pipe, subject, prompts, seed=args.seed, num_inference_steps=args.steps,
                         guidance_scale=args.guidance_scale, n_anchors=args.anchors,
                         mask_dropout=args.mask_dropout,
                         share_queries=not args.no_share_queries, sdsa=not args.no_sdsa,
                         feature_injection=not args.no_feature_injection, alpha=args.alpha,
                         freeu=not args.no_freeu, reference_quirks=args.reference_quirks,
                         sdxl=xl)
    seconds = time.perf_counter() - t0
    labels = [("anchor: " if i < res.settings["n_anchors"] else "") + p
              for i, p in enumerate(prompts)]
    write_outputs(out, res.images, labels,
                  dict(command="consistory", arguments=arguments(args), model=pipe.source,
                       seconds=seconds, prompts=prompts, subject=subject, seeds=res.seeds,
                       settings=res.settings,
                       files_meaning={f"{i:03d}.png": p for i, p in enumerate(prompts)}))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("consistory",
                       help="one consistent subject across prompts by subject-driven shared "
                            "attention (ConsiStory, Tewel et al. 2024)")
    add_model_args(p)
    p.add_argument("--subject", nargs="+", required=True,
                   help="the subject word(s) every --prompt contains (e.g. --subject heart)")
    p.add_argument("--prompt", action="append", default=None,
                   help="repeatable (≥ 2); the first --anchors are the anchors")
    p.add_argument("--anchors", type=int_type(1), default=2,
                   help="number of anchor prompts (the reference: 2)")
    p.add_argument("--mask-dropout", type=FRACTION, default=0.5,
                   help="subject-mask dropout probability in [0, 1] (the reference: 0.5)")
    p.add_argument("--no-share-queries", action="store_true",
                   help="no query blending toward the vanilla pass (halves the batch)")
    p.add_argument("--no-feature-injection", action="store_true",
                   help="the first pass only (no second pass injecting the anchors' "
                        "self-attention outputs along DIFT correspondences: half the cost)")
    p.add_argument("--alpha", type=FRACTION, default=0.8,
                   help="feature-injection weight in [0, 1] (the reference: 0.8)")
    p.add_argument("--no-sdsa", action="store_true",
                   help="no subject-driven shared attention (the reference's ablation)")
    p.add_argument("--no-freeu", action="store_true",
                   help="without FreeU (the reference enables b1 1.1, b2 1.2, s1 0.6, s2 0.4)")
    p.add_argument("--reference-quirks", action="store_true",
                   help="one mask-dropout draw for every group (the reference's)")
    add_sampling_args(p)
    add_sdxl_args(p, negative=False)
    p.set_defaults(func=cmd_consistory, guidance_scale=5.0)
