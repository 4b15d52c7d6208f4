"""The reference StyleAligned timed on CPU: google/style-aligned's handler on diffusers, torch,
the same bundled weights; imported by ``scripts/bench_edit.py`` (which prints jattn's
StyleAligned / plain ratio, its 0 recompilations and jattn/reference in one run).

    python scripts/bench_style_aligned.py [--steps 25] [--members 4] [--repeats 2]
        (= python scripts/bench_edit.py --methods style_aligned …)

Reference: google/style-aligned ``sa_handler.py`` taken from the fetched snapshot
(``/work/.mirror/google+style-aligned``, ``git show HEAD:sa_handler.py`` into
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

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIRROR = Path("/work/.mirror/google+style-aligned/repo")


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


def reference_times(model, members: int, steps: int, guidance_scale: float, repeats: int,
                    ref_dir: Path, prompts: list[str] | None = None) -> dict:
    """Best-of-``repeats`` seconds (after a warm-up) of the reference StyleAligned and of
    plain diffusers for one group of ``members`` prompts: ``{"style_aligned_s", "plain_s",
    "ratio"}``. The prompts default to bench_edit's StyleAligned group."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bench_edit import COLOURS, SHAPES
    from jattn.pipeline import bundled_model_path

    prompts = prompts or [f"a {COLOURS[j % 6]} {SHAPES[(2 * j) % 5]}" for j in range(members)]
    sa_handler = _reference_module(Path(ref_dir))
    path = str(model or bundled_model_path())
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    handler = sa_handler.Handler(pipe)
    sa_args = sa_handler.StyleAlignedArgs(share_group_norm=True, share_layer_norm=True,
                                          share_attention=True, adain_queries=True,
                                          adain_keys=True, adain_values=False)

    def run():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                 output_type="latent", generator=torch.Generator().manual_seed(0))

    def best():
        run()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    handler.register(sa_args)
    t_sa = best()
    handler.remove()
    t_pl = best()
    return dict(style_aligned_s=t_sa, plain_s=t_pl, ratio=t_sa / t_pl,
                torch_threads=torch.get_num_threads())


def main(argv=None):
    from bench_edit import main as bench_edit_main

    return bench_edit_main(["--methods", "style_aligned"] + list(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
