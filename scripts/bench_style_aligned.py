"""Speed of StyleAligned against plain generation of the same batch, and against the
reference implementation (google/style-aligned's handler on diffusers, torch, CPU).

    python scripts/bench_style_aligned.py [--steps 50] [--groups 1 4] [--members 4]
        [--repeats 2] [--reference] [--reference-dir /tmp/style_aligned_ref]

jattn: the compiled loop of G groups × M members (CFG 7.5, DDIM, StyleAligned with the SD1
notebook's settings: shared GroupNorm, AdaIN of Q and K, shift 0) against plain generation
of the same prompts, seeds and steps in the same process; latents only (``decode=False``:
decoding is the same for both and would hide the ratio); best of ``--repeats`` after a
warm-up call (compilation reported apart). Then a second StyleAligned run with new prompts,
seeds, score scale and shift (non-zero both times): it must compile nothing
(``pipe.trace_counts``). Figures depend on the device (CPU here).

Reference (``--reference``): google/style-aligned ``sa_handler.py`` taken from the fetched
snapshot (``/work/.mirror/google+style-aligned``, ``git show HEAD:sa_handler.py`` into
``--reference-dir`` outside the repository; never committed), registered on diffusers'
``StableDiffusionPipeline`` loaded from the bundled weights (``jattn/assets/bundled``, its
DDIM scheduler), ``StyleAlignedArgs(share_group_norm=True, share_layer_norm=True,
share_attention=True, adain_queries=True, adain_keys=True, adain_values=False)``; the same
prompts, steps, CFG, ``output_type="latent"``; torch with this machine's threads. Plain
diffusers (``Handler.remove()``) timed too. Adaptations: none to the handler's code; it
imports ``StableDiffusionXLPipeline`` only for type hints (works on SD1 pipelines) and needs
``einops`` (installed with pip for the benchmark; used only by ``full_attention_share``).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star", "heart")
MIRROR = Path("/work/.mirror/google+style-aligned/repo")


def prompts_for(g: int, m: int, offset: int = 0) -> list[list[str]]:
    return [[f"a {COLOURS[(gi + j + offset) % 6]} {SHAPES[(gi + 2 * j + offset) % 5]}"
             for j in range(m)] for gi in range(g)]


def _timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def bench_jattn(args) -> dict:
    import jattn
    from jattn.methods.style_aligned import style_aligned

    pipe = jattn.load(args.model)
    out = {}
    for g in args.groups:
        p = prompts_for(g, args.members)
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  seed=0, decode=False)
        f_sa, t_sa = _timed(lambda: style_aligned(pipe, p, **kw), args.repeats)  # noqa: B023
        f_pl, t_pl = _timed(lambda: style_aligned(pipe, p, share=False, **kw),  # noqa: B023
                            args.repeats)
        # 0 compilations for new prompts, seeds, scale, shift
        style_aligned(pipe, p, shared_score_shift=0.5, **kw)
        before = dict(pipe.trace_counts)
        style_aligned(pipe, prompts_for(g, args.members, 3), shared_score_shift=math.log(2),
                      shared_score_scale=0.8, **dict(kw, seed=17))
        compiles = sum(pipe.trace_counts.values()) - sum(before.values())
        n_img = g * args.members
        out[g] = dict(style_aligned_s=t_sa, plain_s=t_pl, ratio=t_sa / t_pl,
                      per_image_sa=t_sa / n_img, per_image_plain=t_pl / n_img,
                      compile_sa=f_sa - t_sa, compile_plain=f_pl - t_pl,
                      second_run_compilations=compiles)
        print(f"jattn  G={g} M={args.members} ({n_img} images, {args.steps} steps): "
              f"StyleAligned {t_sa:.2f} s, plain {t_pl:.2f} s, ratio {t_sa / t_pl:.3f}; "
              f"{t_sa / n_img:.3f} s/image; compile ≈ {f_sa - t_sa:.1f} s; second run with "
              f"new prompts/scale/shift: {compiles} compilations", flush=True)
    return out


def _reference_module(ref_dir: Path):
    ref_dir.mkdir(parents=True, exist_ok=True)
    dst = ref_dir / "sa_handler.py"
    if not dst.exists():
        src = subprocess.run(["git", "--git-dir", str(MIRROR), "show", "HEAD:sa_handler.py"],
                             check=True, capture_output=True, text=True).stdout
        dst.write_text(src)
    sys.path.insert(0, str(ref_dir))
    import sa_handler  # noqa: E402

    return sa_handler


def bench_reference(args) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from jattn.pipeline import bundled_model_path

    sa_handler = _reference_module(Path(args.reference_dir))
    path = str(args.model or bundled_model_path())
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    handler = sa_handler.Handler(pipe)
    sa_args = sa_handler.StyleAlignedArgs(share_group_norm=True, share_layer_norm=True,
                                          share_attention=True, adain_queries=True,
                                          adain_keys=True, adain_values=False)
    out = {}
    for g in args.reference_groups or args.groups:
        # the handler shares with row 0 of each CFG half (no group axis): G groups run as
        # G calls of M prompts
        flat = [x for grp in prompts_for(g, args.members) for x in grp]

        def run_sa():
            with torch.no_grad():
                for gi in range(g):
                    pipe(flat[gi * args.members:(gi + 1) * args.members],
                         num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                         output_type="latent",
                         generator=torch.Generator().manual_seed(gi))

        handler.register(sa_args)
        f_sa, t_sa = _timed(run_sa, args.repeats)
        handler.remove()
        f_pl, t_pl = _timed(run_sa, args.repeats)
        out[g] = dict(style_aligned_s=t_sa, plain_s=t_pl, ratio=t_sa / t_pl)
        print(f"reference G={g} M={args.members}: StyleAligned {t_sa:.2f} s, plain diffusers "
              f"{t_pl:.2f} s, ratio {t_sa / t_pl:.3f} (torch threads "
              f"{torch.get_num_threads()})", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--reference-dir", default="/tmp/style_aligned_ref")
    ap.add_argument("--reference-groups", type=int, nargs="+", default=None,
                    help="group counts timed for the reference (default: --groups)")
    ap.add_argument("--no-jattn", action="store_true")
    args = ap.parse_args(argv)
    res = {} if args.no_jattn else bench_jattn(args)
    if args.reference:
        ref = bench_reference(args)
        for g in args.groups:
            if g in res and g in ref:
                print(f"G={g}: jattn/reference StyleAligned "
                      f"{res[g]['style_aligned_s'] / ref[g]['style_aligned_s']:.3f}, plain "
                      f"{res[g]['plain_s'] / ref[g]['plain_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
