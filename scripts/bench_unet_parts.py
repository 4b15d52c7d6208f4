"""Component timings of the SD1.5 UNet at 64² latents, batch 2, fp32: jattn vs diffusers.

Run:  python scripts/bench_unet_parts.py [--only NAME ...] [--repeats 3]

Each row times one building block in isolation (steady state, best of ``repeats``) with
random weights at the shapes it has in the SD1.5 UNet at 64² latents (512 px images):
resnets at 64²×320, 32²×640, 16²×1280, 8²×1280, the transformer at 64²×320 (T=4096 self-
attention, 77-token cross-attention) and its parts. Both frameworks use 2 threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchutil import best_time




def main():
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers.models.attention import BasicTransformerBlock as TBlock
    from diffusers.models.resnet import ResnetBlock2D as TResnet
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as TT2D

    from jattn.models import layers, unet
    from jattn.models.attention import default_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    B, L = args.batch, args.latent
    rng = np.random.default_rng(0)
    rows = []

    def run(name, tfn, jfn, jargs):
        if args.only and not any(o in name for o in args.only):
            return
        jf = jax.jit(jfn)
        t0 = time.perf_counter()
        jax.block_until_ready(jf(*jargs))
        comp = time.perf_counter() - t0
        with torch.no_grad():
            tt = best_time(tfn, args.repeats)
        jt = best_time(lambda: jax.block_until_ready(jf(*jargs)), args.repeats)
        rows.append((name, tt, jt))
        print(f"{name:34s} torch {tt:7.3f}s  jattn {jt:7.3f}s  ratio {jt / tt:5.2f}  "
              f"(compile {comp:.1f}s)", flush=True)

    def resnet(c_in, c_out, side):
        xn = rng.standard_normal((B, c_in, side, side)).astype(np.float32)
        temb = rng.standard_normal((B, 1280)).astype(np.float32)
        tm = TResnet(in_channels=c_in, out_channels=c_out, temb_channels=1280, eps=1e-5).eval()
        jm = layers.ResnetBlock2D(c_in, c_out, 1280, eps=1e-5)
        xj = jnp.asarray(xn.transpose(0, 2, 3, 1))
        p = jm.init(jax.random.key(0), xj, jnp.asarray(temb))
        xt, tt = torch.from_numpy(xn), torch.from_numpy(temb)
        run(f"resnet {c_in}->{c_out} @{side}²", lambda: tm(xt, tt),
            lambda p, x, t: jm.apply(p, x, t), (p, xj, jnp.asarray(temb)))

    resnet(320, 320, L)
    resnet(640, 640, L // 2)
    resnet(1280, 1280, L // 4)
    resnet(1280, 1280, L // 8)
    resnet(960, 320, L)  # up path, after concat

    # conv 3x3 alone, GroupNorm+SiLU alone
    for c, side in ((320, L), (640, L // 2), (1280, L // 4)):
        xn = rng.standard_normal((B, c, side, side)).astype(np.float32)
        tconv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        jconv = layers.Conv2d(c, 3)
        xj = jnp.asarray(xn.transpose(0, 2, 3, 1))
        p = jconv.init(jax.random.key(0), xj)
        xt = torch.from_numpy(xn)
        run(f"conv3x3 {c} @{side}²", lambda: tconv(xt), lambda p, x: jconv.apply(p, x), (p, xj))
    xn = rng.standard_normal((B, 320, L, L)).astype(np.float32)
    tgn = torch.nn.GroupNorm(32, 320).eval()
    jgn = layers.GroupNorm(32)
    xj = jnp.asarray(xn.transpose(0, 2, 3, 1))
    p = jgn.init(jax.random.key(0), xj)
    xt = torch.from_numpy(xn)
    run(f"groupnorm+silu 320 @{L}²", lambda: torch.nn.functional.silu(tgn(xt)),
        lambda p, x: jax.nn.silu(jgn.apply(p, x)), (p, xj))

    # transformer at 64²×320
    C, T = 320, L * L
    ctx = rng.standard_normal((B, 77, 768)).astype(np.float32)
    xn = rng.standard_normal((B, C, L, L)).astype(np.float32)
    tt2d = TT2D(num_attention_heads=8, attention_head_dim=40, in_channels=C,
                cross_attention_dim=768).eval()
    jt2d = unet.Transformer2DModel(8, 40, 1, "t", "down")
    xj, cj = jnp.asarray(xn.transpose(0, 2, 3, 1)), jnp.asarray(ctx)
    p = jt2d.init(jax.random.key(0), xj, cj, None, None)
    xt, ct = torch.from_numpy(xn), torch.from_numpy(ctx)
    run(f"transformer2d 320 @{L}²", lambda: tt2d(xt, encoder_hidden_states=ct),
        lambda p, x, c: jt2d.apply(p, x, c, None, None)[0], (p, xj, cj))

    tb = TBlock(C, 8, 40, cross_attention_dim=768, activation_fn="geglu").eval()
    jb = unet.BasicTransformerBlock(C, 8, 40, "t", "down")
    xs = rng.standard_normal((B, T, C)).astype(np.float32)
    xj = jnp.asarray(xs)
    p = jb.init(jax.random.key(0), xj, cj, (L, L), None, None)
    xt = torch.from_numpy(xs)
    run(f"basic block 320 T={T}", lambda: tb(xt, encoder_hidden_states=ct),
        lambda p, x, c: jb.apply(p, x, c, (L, L), None, None)[0], (p, xj, cj))
    q = rng.standard_normal((B, 8, T, 40)).astype(np.float32)
    qt = torch.from_numpy(q)
    qj = jnp.asarray(q.transpose(0, 2, 1, 3))
    run(f"  sdpa self T=S={T} N=8 H=40",
        lambda: torch.nn.functional.scaled_dot_product_attention(qt, qt, qt),
        lambda q: default_attention(q, q, q), (qj,))
    kc = rng.standard_normal((B, 8, 77, 40)).astype(np.float32)
    kt, kj = torch.from_numpy(kc), jnp.asarray(kc.transpose(0, 2, 1, 3))
    run(f"  sdpa cross T={T} S=77",
        lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, kt),
        lambda q, k: default_attention(q, k, k), (qj, kj))
    jff = unet.FeedForward(C)
    pff = jff.init(jax.random.key(0), xj)
    run(f"  ff geglu 320 T={T}", lambda: tb.ff(xt), lambda p, x: jff.apply(p, x), (pff, xj))
    w = rng.standard_normal((C, C)).astype(np.float32)
    wt, wj = torch.from_numpy(w), jnp.asarray(w)
    run(f"  linear 320x320 T={T}", lambda: xt @ wt, lambda x, w: x @ w, (xj, wj))

    print("\n| component | torch s | jattn s | ratio |\n|---|---|---|---|")
    for name, tt, jt in rows:
        print(f"| {name.strip()} | {tt:.3f} | {jt:.3f} | {jt / tt:.2f} |")


if __name__ == "__main__":
    main()
