"""Per-image cost of the layout methods in one run on the same bundled weights and CPU:
Attend-and-Excite (jattn vs plain generation vs diffusers'
StableDiffusionAttendAndExcitePipeline), layout guidance and Bounded Attention (vs plain
generation; the Bounded reference run is scripts/bench_bounded_reference.py), and the
compilations of a second call with new prompts and boxes (expected 0).

  python scripts/bench_layout.py [--batch 4] [--steps 50] [--no-diffusers]

Times are the second call (jattn compiled once before; diffusers warmed up by one call).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-diffusers", action="store_true")
    a = ap.parse_args()
    import torch
    from diffusers import StableDiffusionAttendAndExcitePipeline

    import jattn
    from jattn.methods.excite import attend_and_excite
    from jattn.pipeline import bundled_model_path

    prompts = ["a red circle and a blue square", "a green star and a yellow ring",
               "a purple triangle and an orange circle", "a blue heart and a red star",
               ][:a.batch] * max(1, a.batch // 4)
    prompts = prompts[:a.batch]
    words = [[" ".join(p.split()[1:3]), " ".join(p.split()[-2:])] for p in prompts]
    pipe = jattn.load()
    kw = dict(num_inference_steps=a.steps, seed=list(range(a.batch)))
    pipe.generate(prompts, **kw)
    t0 = time.perf_counter()
    pipe.generate(prompts, **kw)
    plain = (time.perf_counter() - t0) / a.batch
    attend_and_excite(pipe, prompts, words, **kw)
    t0 = time.perf_counter()
    attend_and_excite(pipe, prompts, words, **kw)
    ae = (time.perf_counter() - t0) / a.batch
    from jattn.methods.bounded import bounded_generate
    from jattn.methods.layout import layout_generate

    left, right = (0.03, 0.33, 0.37, 0.67), (0.63, 0.33, 0.97, 0.67)
    boxes = [[left, right]] * a.batch
    rows = {}
    for name, fn in (("layout guidance", layout_generate), ("Bounded", bounded_generate)):
        fn(pipe, prompts, words, boxes, **kw)
        before = dict(pipe.trace_counts)
        t0 = time.perf_counter()
        fn(pipe, prompts[::-1], words[::-1], [[right, left]] * a.batch, **kw)
        rows[name] = ((time.perf_counter() - t0) / a.batch,
                      sum(pipe.trace_counts.values()) - sum(before.values()))
    for name, (t, c) in rows.items():
        print(f"per image, batch {a.batch}, {a.steps} steps: {name} {t:.2f} s "
              f"({t / plain:.2f}x plain {plain:.2f} s); compilations of a second call with "
              f"new prompts and boxes: {c}")
    if a.no_diffusers:
        print(f"A&E jattn {ae:.2f} s ({ae / plain:.2f}x plain)")
        return
    tp = StableDiffusionAttendAndExcitePipeline.from_pretrained(
        str(bundled_model_path()), safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    idx = []
    for p, w in zip(prompts, words):
        ids = tp.tokenizer(p).input_ids
        toks = tp.tokenizer.convert_ids_to_tokens(ids)
        idx.append([i for i, t in enumerate(toks) if t.replace("</w>", "") in
                    " ".join(w).split()])
    lat = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (a.batch, 4, 16, 16)).astype(np.float32))
    t0 = time.perf_counter()
    tp(prompts, token_indices=idx, num_inference_steps=a.steps, latents=lat,
       output_type="np")
    dif = (time.perf_counter() - t0) / a.batch
    print(f"per image, batch {a.batch}, {a.steps} steps: plain jattn {plain:.2f} s, "
          f"A&E jattn {ae:.2f} s ({ae / plain:.2f}x plain), A&E diffusers {dif:.2f} s; "
          f"jattn/diffusers = {ae / dif:.2f}")


if __name__ == "__main__":
    main()
