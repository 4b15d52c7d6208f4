"""Benchmark (issue §4): cost of every editing method over plain generation of the same
batch, recompilation on a second run, StyleAligned against its reference, null-text
inversion.

Run:  python scripts/bench_edit.py [--model DIR] [--steps 25] [--members 4] [--repeats 2]
          [--methods style_aligned masactrl pnp consistory p2p] [--null-text]
          [--skip-reference] [--reference-dir /tmp/style_aligned_ref]
      (default model: the bundled one)

Prints, in one run on the same model (steady state: compiled, after a warm-up call; the
best of ``--repeats`` rounds that call the method and plain generation in turn; the ratio
is the median over the rounds of method / plain within a round, so machine load hits both
alike; latents only, ``decode=False``, except P2P which decodes in both):

  1. per method, its time / plain generation of the same prompts, seeds, steps, CFG:
     StyleAligned (one group of M, the SD1 notebook's settings; goal ≤ 1.3×), MasaCtrl
     (M − 1 targets; plain variant and mask variant; goal ≤ 1.1×), Plug-and-Play
     (generated source = member 0 of the batch, its pass included; goal ≤ 1.2×),
     ConsiStory (``jattn.methods.consistory.consistory`` with its defaults: two passes,
     FreeU; goal ≤ 2.2×), P2P replace / refine + local blend (decoded; goal ≤ 1.15×);
  2. whether each method's source member (member 0) is bit-identical to plain generation
     of the same batch (max |Δ|; StyleAligned, MasaCtrl, PnP);
  3. the compilations of a second run of each with new prompts, seeds, masks and step
     windows (``pipe.trace_counts``; goal 0);
  4. the reference StyleAligned (google/style-aligned ``sa_handler.py`` on diffusers,
     torch, same bundled weights, same prompts, steps and CFG; see
     ``scripts/bench_style_aligned.py``) and jattn/reference;
  5. with ``--null-text``: null-text inversion, jattn vs an eager torch loop of the
     reference algorithm (google/prompt-to-prompt ``null_text_w_ptp.ipynb``), PSNR.

Figures depend on the machine (a shared 2-core CPU here): see configs/*_world.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "heart")
GOALS = {"style_aligned": 1.3, "masactrl": 1.1, "masactrl (mask)": 1.1, "pnp": 1.2,
         "consistory": 2.2, "p2p replace": 1.15, "p2p refine + blend": 1.15}


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``(best, ts)``: the best wall time of each ``fns[k]()`` over ``repeats`` rounds that
    call every function once (after one warm-up call each, which compiles), and every
    round's times ``{k: [s, …]}`` (:func:`median_ratio`)."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in ts.items()}, ts


def median_ratio(ts: dict, k: str, base: str = "plain") -> float:
    """Median over the rounds of ``t_k / t_base`` within a round: robust to load that changes
    between rounds on a shared machine."""
    return float(np.median(np.asarray(ts[k]) / np.asarray(ts[base])))


def _latents(out):
    return np.asarray(out.latents)


def _new_traces(pipe, before: dict) -> int:
    return sum(pipe.trace_counts.values()) - sum(before.values())


def bench_methods(pipe, args) -> tuple[list, dict]:
    """Rows ``(name, method_s, plain_s, ratio, member0_maxabs or None, recompiles)``."""
    from jattn.methods import masactrl as mc
    from jattn.methods import pnp as pp
    from jattn.methods import style_aligned as sa

    n, m = args.steps, args.members
    rows: list = []
    times: dict = {}
    kw = dict(num_inference_steps=n, decode=False)

    def plain_of(prompts, seeds, gs=7.5, negative=None):
        return lambda: _latents(pipe.generate(prompts, seed=seeds, scheduler="ddim",
                                              guidance_scale=gs, negative_prompt=negative,
                                              **kw))

    def record(name, fns, src_of=None, second=None):
        t, ts = interleaved(fns, args.repeats)
        ratio = {k: median_ratio(ts, k) for k in fns}
        meth = [k for k in fns if k != "plain"]
        diff = None
        if src_of is not None:
            a, b = src_of()
            diff = float(np.abs(a - b).max())
        before = dict(pipe.trace_counts)
        if second is not None:
            second()
        rec = _new_traces(pipe, before) if second is not None else None
        for k in meth:
            rows.append((k, t[k], t["plain"], ratio[k], diff, rec))
            print(f"  {k:22s} {t[k]:6.2f} s, plain {t['plain']:6.2f} s (best): median ratio "
                  f"{ratio[k]:.3f}x (goal <= {GOALS.get(k, float('nan'))}x); "
                  f"member 0 max|d| vs plain {diff}; second run compiles {rec}", flush=True)
        times[name] = t

    if "style_aligned" in args.methods:
        prompts = [f"a {COLOURS[j % 6]} {SHAPES[(2 * j) % 5]}" for j in range(m)]
        seeds = list(range(m))
        run = lambda: _latents(sa.style_aligned(pipe, prompts, seed=seeds, **kw))  # noqa: E731
        plain = plain_of(prompts, seeds)
        record("style_aligned", {"style_aligned": run, "plain": plain},
               src_of=lambda: (run()[0], plain()[0]),
               second=lambda: sa.style_aligned(
                   pipe, [f"a {COLOURS[(j + 3) % 6]} {SHAPES[(j + 1) % 5]}" for j in range(m)],
                   seed=[s + 11 for s in seeds], shared_score_scale=0.8, window=(0.1, 0.9),
                   **kw))
    if "masactrl" in args.methods:
        src = "a red heart on the left"
        tgts = ["a red heart on the right", "a red heart at the top", "a big red heart",
                "a small red heart", "a red heart at the bottom"][:m - 1]
        lh = pipe.default_size // pipe.vae_scale_factor
        left = np.zeros((lh, lh), np.float32)
        left[:, :lh // 2] = 1
        run = lambda: _latents(mc.masactrl(pipe, src, tgts, seed=5,  # noqa: E731
                                           num_inference_steps=n))
        run_mask = lambda: _latents(mc.masactrl(pipe, src, tgts, seed=5,  # noqa: E731
                                                num_inference_steps=n, variant="mask",
                                                mask_s=left, mask_t=left[:, ::-1].copy()))
        plain = plain_of([src] + tgts, [5] * m)
        record("masactrl", {"masactrl": run, "masactrl (mask)": run_mask, "plain": plain},
               src_of=lambda: (run_mask()[0], plain()[0]),
               second=lambda: (
                   mc.masactrl(pipe, "a blue star on the right", ["a blue star on the left"]
                               + tgts[1:], seed=9, num_inference_steps=n, start_step=0.2),
                   mc.masactrl(pipe, "a blue star on the right", ["a blue star on the left"]
                               + tgts[1:], seed=9, num_inference_steps=n, start_step=0.3,
                               variant="mask", mask_s=left[:, ::-1].copy(), mask_t=left)))
    if "pnp" in args.methods:
        src = "a red heart on a beige background"
        tgts = ["a blue heart on a beige background", "a green heart on a beige background",
                "a red heart on a grey background", "a yellow heart on a beige background",
                "a red star on a beige background"][:m - 1]
        run = lambda: _latents(pp.pnp(pipe, source_prompt=src,  # noqa: E731
                                      target_prompts=tgts, seed=3, num_inference_steps=n))
        plain = plain_of([src] + tgts, [3] * m, negative=pp.REFERENCE_NEGATIVE)
        record("pnp", {"pnp": run, "plain": plain}, src_of=lambda: (run()[0], plain()[0]),
               second=lambda: pp.pnp(pipe, source_prompt="a green star on a white background",
                                     target_prompts=["a purple star on a white background"]
                                     + tgts[1:], seed=8, num_inference_steps=n,
                                     attn_fraction=0.3, feature_fraction=0.6))
    if "consistory" in args.methods:
        from jattn.methods.consistory import consistory

        places = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
        prompts = [f"a heart {places[j % 5]} on a beige background" for j in range(m)]
        seeds = [20 + j for j in range(m)]
        run = lambda: _latents(consistory(pipe, "heart", prompts, seed=seeds,  # noqa: E731
                                          **kw))
        plain = plain_of(prompts, seeds, gs=5.0)  # ConsiStory's default CFG 5.0
        record("consistory", {"consistory": run, "plain": plain},
               second=lambda: consistory(
                   pipe, "star", [p.replace("heart", "star").replace("beige", "grey")
                                  for p in prompts], seed=[s + 7 for s in seeds], **kw))
    return rows, times


def bench_p2p(pipe, args) -> list:
    from jattn.methods.p2p import edit

    n = args.steps
    src = "a red circle on the left"
    tgts = ["a blue circle on the left", "a green circle on the left",
            "a yellow circle on the left", "a purple circle on the left",
            "an orange circle on the left"][:args.members - 1]
    m = 1 + len(tgts)
    lat = np.random.default_rng(0).standard_normal(
        (1, pipe.unet_config.in_channels) + (pipe.default_size // pipe.vae_scale_factor,) * 2
    ).astype(np.float32)
    fns = {
        "p2p replace": lambda: edit(pipe, src, tgts, num_inference_steps=n, latents=lat),
        "plain": lambda: pipe.generate([src] + tgts, num_inference_steps=n, scheduler="ddim",
                                       latents=np.repeat(lat, m, 0)),
        "p2p refine + blend": lambda: edit(pipe, src, ["a red striped circle on the left"],
                                           mode="refine", num_inference_steps=n, latents=lat,
                                           blend_words=["circle"]),
        "plain (batch 2)": lambda: pipe.generate([src, src], num_inference_steps=n,
                                                 scheduler="ddim", latents=np.repeat(lat, 2, 0)),
    }
    t, ts = interleaved(fns, args.repeats)
    before = dict(pipe.trace_counts)
    edit(pipe, "a green square at the top",
         ["a green star at the top", "a green heart at the top", "a green triangle at the top",
          "a green moon at the top", "a green circle at the top"][:m - 1],
         num_inference_steps=n, latents=lat)
    rec = _new_traces(pipe, before)
    rows = [("p2p replace", t["p2p replace"], t["plain"], median_ratio(ts, "p2p replace"), None,
             rec),
            ("p2p refine + blend", t["p2p refine + blend"], t["plain (batch 2)"],
             median_ratio(ts, "p2p refine + blend", "plain (batch 2)"), None, None)]
    for r in rows:
        print(f"  {r[0]:22s} {r[1]:6.2f} s, plain {r[2]:6.2f} s (best): median ratio "
              f"{r[3]:.3f}x (goal <= "
              f"{GOALS[r[0]]}x, decoded); second edit compiles {r[5]}", flush=True)
    return rows


def bench_null_text(pipe, args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from PIL import Image
    from refs.null_text_torch import torch_null_text
    from skimage import data

    from jattn.io.images import psnr
    from jattn.sampling.inversion import invert

    n = args.steps
    img = np.asarray(Image.fromarray(data.astronaut()).resize((pipe.default_size,) * 2,
                                                               Image.Resampling.LANCZOS))
    prompt = "a photo of a person"
    invert(pipe, img[None], prompt, num_inference_steps=n)  # compile
    t0 = time.perf_counter()
    inv = invert(pipe, img[None], prompt, num_inference_steps=n)
    jax_s = time.perf_counter() - t0
    rec = pipe.generate([prompt], num_inference_steps=n, latents=inv.x_t, scheduler="ddim",
                        uncond_per_step=inv.uncond_per_step)
    vae_rt = pipe.decode(pipe.encode_images(img[None]))
    print(f"null-text inversion jattn: {jax_s:.2f}s (steady, incl. DDIM inversion); inner "
          f"iterations used {int(inv.inner_iterations.sum())}; PSNR vs input: reconstruction "
          f"{psnr(rec.images[0], img):.2f} dB, VAE round trip {psnr(vae_rt[0], img):.2f} dB")
    ddim_s, nt_s, _, _ = torch_null_text(pipe.source, img, prompt, n, 7.5)
    print(f"null-text inversion torch eager reference: {ddim_s + nt_s:.2f}s (DDIM {ddim_s:.2f}s "
          f"+ optimisation {nt_s:.2f}s); speed-up jattn vs torch {(ddim_s + nt_s) / jax_s:.2f}x")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--members", type=int, default=4, help="batch of one group (M images)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+",
                    default=["style_aligned", "masactrl", "pnp", "consistory", "p2p"])
    ap.add_argument("--skip-reference", action="store_true",
                    help="skip the torch reference StyleAligned")
    ap.add_argument("--reference-dir", default="/tmp/style_aligned_ref")
    ap.add_argument("--null-text", action="store_true", help="also time null-text inversion")
    args = ap.parse_args(argv)
    import jattn

    pipe = jattn.load(args.model)
    print(f"# model {pipe.source}; {args.steps} DDIM steps, batch of {args.members} images "
          f"(one group), CFG 7.5 (ConsiStory 5.0); best of {args.repeats} after warm-up",
          flush=True)
    rows, times = bench_methods(pipe, args)
    if "p2p" in args.methods:
        rows += bench_p2p(pipe, args)
    ref = None
    if "style_aligned" in args.methods and not args.skip_reference:
        from bench_style_aligned import reference_times

        ref = reference_times(args.model, args.members, args.steps, 7.5, args.repeats,
                              Path(args.reference_dir))
        print(f"  reference StyleAligned (sa_handler on diffusers, torch): "
              f"{ref['style_aligned_s']:.2f} s, plain diffusers {ref['plain_s']:.2f} s "
              f"({ref['ratio']:.2f}x); jattn/reference: StyleAligned "
              f"{times['style_aligned']['style_aligned'] / ref['style_aligned_s']:.3f}, plain "
              f"{times['style_aligned']['plain'] / ref['plain_s']:.3f}", flush=True)
    print("\n| method | method s (best) | plain s (best) | ratio (median of rounds) | goal | "
          "member 0 max abs vs plain | 2nd-run compiles |")
    print("|---|---|---|---|---|---|---|")
    for name, a, b, r, d, c in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {r:.3f} | <= {GOALS.get(name)} | "
              f"{'-' if d is None else f'{d:.1e}'} | {'-' if c is None else c} |")
    if args.null_text:
        bench_null_text(pipe, args)
    return {"rows": rows, "reference": ref}


if __name__ == "__main__":
    main()
