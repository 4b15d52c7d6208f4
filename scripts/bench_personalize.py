"""Per-image cost of Nested Attention personalisation vs plain generation of the same batch
on the bundled model (the issue's goal: ≤ 1.15×), and the compilations of a second call
with new subject images, prompts and seeds (expected 0).

  python scripts/bench_personalize.py [--batch 4] [--steps 50] [--weights PATH] [--repeats 3]

Also one UNet call with CFG (2·batch rows) with and without the Nested Attention policy,
the best of 40 interleaved calls (the per-step cost, free of the encoder and text parts).
Without --weights a random encoder of the bundled size (NestedEncoderConfig.bundled, nested
projections from to_k/to_v) is used: the cost does not depend on the trained values. Times
are the best of --repeats calls after one warm-up call each, plain and personalised calls
alternated.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import jax

    import jattn
    from jattn.methods import personalize as P
    from jattn.models import nested as N

    pipe = jattn.load()
    if a.weights:
        w = N.load_nested_weights(a.weights)
    else:
        cfg = N.NestedEncoderConfig.bundled(pipe.unet_config.cross_attention_dim)
        params = N.init_nested_params(cfg, pipe.params["unet"], pipe.sites(), jax.random.key(0),
                                      text_params=pipe.params["text_encoder"],
                                      tokenizer=pipe.tokenizer)
        w = N.NestedWeights(cfg, params, "random (bundled size)")
    rng = np.random.default_rng(0)
    imgs = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(2)]
    scenes = ["on the left on a beige background", "at the top on a striped background",
              "on the right on a blue background", "at the bottom on a grey background"]
    prompts = [f"a photo of s* {scenes[i % 4]}" for i in range(a.batch)]
    plain_prompts = [p.replace("s*", "a red circle") for p in prompts]
    kw = dict(num_inference_steps=a.steps)

    def plain():
        pipe.generate(plain_prompts, seed=0, **kw)

    def nested():
        P.personalize(pipe, imgs[:1], prompts, 0, weights=w, **kw)

    plain()
    nested()
    tp, tn = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nested()
        tn.append(time.perf_counter() - t0)
    before = dict(pipe.trace_counts)
    P.personalize(pipe, imgs[1:], [p.replace("a photo of", "an image of") for p in prompts], 7,
                  weights=w, scale=0.8, **kw)
    new_compiles = {k: v - before.get(k, 0) for k, v in pipe.trace_counts.items()
                    if v != before.get(k, 0)}
    # one UNet call with CFG (2·batch rows) with and without the policy: min of many calls
    import jax.numpy as jnp

    cases, ids, pos, subj = P.prepare_prompts(pipe.tokenizer, prompts, 1)
    keys, values = P.subject_kv(pipe, w, P.load_subject_images(imgs[:1], w.config))
    pol = P.personalize_policy(pipe, keys, values, pos, subj)
    fn = jax.jit(pipe.unet_fn(pipe.params["unet"]))
    s = pipe.unet_config.sample_size
    x = jnp.asarray(rng.standard_normal((2 * a.batch, s, s, 4)), jnp.float32)
    t = jnp.full((2 * a.batch,), 500.0, jnp.float32)
    d = pipe.unet_config.cross_attention_dim
    ctx = jnp.asarray(rng.standard_normal((2 * a.batch, 77, d)), jnp.float32)
    for p in (None, pol):
        jax.block_until_ready(fn(x, t, ctx, p, jnp.int32(0)))
    ts: dict = {"plain": [], "nested": []}
    for _ in range(40):  # interleaved: the machine's load drifts
        for name, p in (("plain", None), ("nested", pol)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, t, ctx, p, jnp.int32(0)))
            ts[name].append(time.perf_counter() - t0)
    unet_t = {k: min(v) for k, v in ts.items()}
    res = dict(backend=jax.default_backend(), batch=a.batch, steps=a.steps,
               unet_call_plain_s=unet_t["plain"], unet_call_nested_s=unet_t["nested"],
               unet_ratio=unet_t["nested"] / unet_t["plain"],
               plain_s=min(tp), nested_s=min(tn), ratio=min(tn) / min(tp),
               per_image_plain_s=min(tp) / a.batch, per_image_nested_s=min(tn) / a.batch,
               second_call_compilations=new_compiles, weights=w.source)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
