"""``jattn personalize``: images of a subject given by an image, in new prompts (Nested
Attention, Patashnik et al. SIGGRAPH 2025; :mod:`jattn.methods.personalize`).

  jattn personalize --subject-image PATH [--subject-image PATH2 …] --prompt TEXT [--prompt …]
      [--weights PATH] [--scale λ] [--seed N] [--steps N] [--guidance-scale S] --out-dir DIR

Write the subject as ``s*`` in each prompt ("s* at the top on a striped background"). A
prompt with one ``s*`` is made once per ``--subject-image`` (subject-major: every prompt for
the first image, then for the second, …); a prompt with k ``s*`` (several subjects in one
image) needs exactly k ``--subject-image``, the j-th ``s*`` being the j-th image. Writes
``000.png …`` in that order (one per prompt in order with one subject image), ``grid.png``
and ``result.json`` (which prompt and subject image each file shows).
"""

from __future__ import annotations

import time

from jattn.commands.common import (OutputDir, add_model_args, add_sampling_args, arguments,
                                   float_type, load_pipeline, renamed_errors, write_outputs)

_NAMES = {"subject_images": "--subject-image", "prompts": "--prompt", "seeds": "--seed",
          "weights=PATH in the API": "--weights PATH"}


def cmd_personalize(args) -> int:
    from pathlib import Path

    from jattn.methods.personalize import (DEFAULT_WEIGHTS, personalize, plan_cases,
                                           star_counts)

    prompts = list(args.prompt or [])
    subjects = list(args.subject_image or [])
    if not prompts:
        raise ValueError("--prompt: give at least one prompt writing the subject as s*, e.g. "
                         "--prompt \"s* at the top on a striped background\"")
    if not subjects:
        raise ValueError("--subject-image: give an image of the subject (PNG/JPEG showing it "
                         "alone)")
    with renamed_errors(_NAMES):
        cases = plan_cases(star_counts(prompts), len(subjects))
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"--weights {str(weights)!r}: no such file"
            + (" (no trained Nested Attention weights ship with this jattn yet)"
               if not args.weights else "")
            + ". Train them with `python scripts/train_personalize.py` (see "
            "configs/personalize_world.py), then pass the file with --weights PATH"
            + (f" or copy it to {DEFAULT_WEIGHTS}." if not args.weights else "."))
    out = OutputDir(args.out_dir, overwrite=args.overwrite, inputs=subjects + [str(weights)])
    out.reserve(*(OutputDir.image_names(len(cases)) + ["grid.png"]))
    pipe = load_pipeline(args)
    t0 = time.perf_counter()
    with renamed_errors(_NAMES):
        res = personalize(pipe, subjects, prompts, args.seed, weights=weights,
                          scale=args.scale, num_inference_steps=args.steps,
                          guidance_scale=args.guidance_scale)
    seconds = time.perf_counter() - t0
    meaning = {f"{i:03d}.png": {"prompt": p, "subject_images": [subjects[j] for j in s]}
               for i, (p, s) in enumerate(zip(res.prompts, res.subjects))}
    labels = [p if len(subjects) == 1 else f"{p} [{','.join(str(j) for j in s)}]"
              for p, s in zip(res.prompts, res.subjects)]
    write_outputs(out, res.images, labels,
                  dict(command="personalize", arguments=arguments(args), model=pipe.source,
                       seconds=seconds, prompts=res.prompts,
                       subjects=[list(s) for s in res.subjects], seeds=res.seeds,
                       settings=res.settings, files_meaning=meaning))
    return 0


def register(sub, edit_sub) -> None:
    p = sub.add_parser("personalize",
                       help="a subject given by an image in new prompts written with s* "
                            "(Nested Attention, Patashnik et al. 2025)")
    add_model_args(p)
    p.add_argument("--subject-image", action="append", default=None,
                   help="repeatable: an image of the subject (alone, roughly centred); the "
                        "j-th s* of a multi-subject prompt is the j-th image")
    p.add_argument("--prompt", action="append", default=None,
                   help="repeatable: a prompt writing the subject as s*")
    p.add_argument("--weights", default=None,
                   help="Nested Attention weights (.safetensors; default: the shipped ones)")
    p.add_argument("--scale", type=float_type(0.0), default=1.0,
                   help="λ on the subject's nested value (1 = the paper; < 1 weakens the "
                        "subject's appearance)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_personalize)
