"""Benchmark: what self-segmentation adds to a generation.

Run:  python scripts/bench_segment.py [--model DIR] [--batch 8] [--steps 50] [--repeats 3]
      (default model: the bundled one)

Prints, in one run on the same model and batch (the same prompts and seeds, steady state:
compiled, best of ``--repeats`` after a warm-up, :func:`benchutil.best_time`):
  1. plain generation time (``Pipeline.generate``, no policy);
  2. ``jattn.methods.segment.segment`` time (the same generation with the self- and
     cross-attention captured in-graph, then k-means + labelling compiled and vmapped over
     the batch) and the ratio segment / plain (goal ≤ 1.10);
  3. the clustering and labelling alone (``segment_from_maps`` on the captured maps);
  4. the compilations of a second call with new prompts, words and seeds (expected 0).
Expected on this 2-core CPU with the bundled model: ratio ≤ 1.10.
"""

from __future__ import annotations

import argparse

from benchutil import best_time

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green star and a yellow "
           "heart", "a photo of a purple ring", "an orange triangle on the right",
           "a white heart at the bottom", "a black star in the center",
           "a red square and a blue circle"]


def main():
    import jattn
    from jattn.methods.segment import segment, segment_from_maps

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    pipe = jattn.load(args.model)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, seed=0)
    plain = best_time(lambda: pipe.generate(prompts, **kw), args.repeats)
    holder = {}

    def run_segment():
        holder["r"] = segment(pipe, prompts, **kw)

    seg = best_time(run_segment, args.repeats)
    r = holder["r"]
    post = best_time(lambda: segment_from_maps(pipe, r.maps, prompts), args.repeats)
    print(f"# model {pipe.source}; batch {args.batch}, {args.steps} steps, CFG 7.5; self grid "
          f"{r.self_grid}, cross grid {r.cross_grid}, 5 clusters, n_init 10")
    print(f"plain generation {plain:.2f} s; segment {seg:.2f} s; ratio {seg / plain:.3f}x "
          f"(goal <= 1.10)")
    print(f"k-means + labelling alone (batch {args.batch}): {post:.3f} s "
          f"({post / plain:.1%} of the generation)")
    before = dict(pipe.trace_counts)
    segment(pipe, prompts[::-1], words=[p.split()[-1:] for p in prompts[::-1]],
            num_inference_steps=args.steps, seed=11, threshold=0.3)
    new = {k: v - before.get(k, 0) for k, v in pipe.trace_counts.items()
           if v != before.get(k, 0)}
    print(f"compilations of a second call with new prompts, words and seeds: "
          f"{sum(new.values())} {new}")


if __name__ == "__main__":
    main()
