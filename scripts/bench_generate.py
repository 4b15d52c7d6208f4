"""Benchmark: jattn vs diffusers (torch) at the real SD1.5 configuration, random weights.

Run:  python scripts/bench_generate.py cpu [--latent 32] [--batch 2] [--repeats 3]
      python scripts/bench_generate.py gpu            (on a lent GPU: 512 px, 50 DDIM, CFG)
      python scripts/bench_generate.py cpu --sdxl [--sdxl-latents 32 64] [--batch 2]
                                                      (SDXL base UNet config, see below)

CPU part (a): builds diffusers' SD1.5-config UNet (859.5M params), VAE and CLIP-L text
encoder with random weights, converts them to jattn, and prints in one run:
  * parity: max-abs difference of UNet / VAE decode / text encoder outputs (fp32);
  * steady-state time per UNet forward (batch B at h×w latents), jattn / diffusers ratio;
  * jattn compile time; peak RSS growth of each framework.
GPU part (b): SD1.5 config, 512 px, 50 DDIM steps with CFG, batch 1 and 8, bf16:
  images/s and model-FLOPs utilisation (UNet 0.804 TFLOP per forward at 64², VAE decode
  2.5 TFLOP), jattn vs diffusers torch (SDPA; torch.compile if it works).
Expected (CPU, this 2-core machine): parity ≤ 1e-4 max-abs; ratio printed.

SDXL part (``--sdxl``, issue 16): diffusers' SDXL base UNet config (2.567 B params,
``addition_embed_type="text_time"``) with random weights, fp32, batch 2 at 32² and 64²
latents: parity against diffusers on the same weights (built once in torch, converted
without a second full copy: the numpy views are drained key by key), steady-state time per
forward jattn / diffusers (goal ≤ 1.0), jattn compile time (goal ≤ 90 s), working memory;
then XLA's cost analysis of one forward at 128² latents, batch 1 (ShapeDtypeStruct params,
nothing allocated; dense attention so no loop hides FLOPs; XLA counts a multiply-add as 2
FLOPs) beside the reference 6.83 TFLOP. Peak resident memory ≈ one fp32 copy of the UNet
(10.3 GB) + activations.

Measured 2026-11-30 (``--sdxl --repeats 2``, 2 threads each, the 2-core machine shared with
other jobs, load average ~10 throughout: absolute times are inflated and PyTorch's OpenMP
threads suffer more from the contention than XLA's, so the ratios flatter jattn):

  latents  max-abs   |ref|max  diffusers s      jattn s         ratio  compile s  mem GB torch/jattn
   32x32   2.28e-06     1.315   88.51 ( 92.01)   34.35 ( 35.26)  0.388     54.6    0.14 / 0.32
   64x64   2.09e-06     1.412  161.47 (172.58)  119.02 (119.40)  0.737     60.4    0.11 / 0.66
  XLA cost analysis at 128², batch 1: 6.77 TFLOP (multiply-add = 2) vs 6.83 reference (0.992)
  (memory = peak RSS growth above the resident weights during one forward after warm-up;
  torch reuses its freed heap, so its figure is a lower bound)

Where time goes (CPU, SD1.5 UNet, batch 2, 64² latents, fp32, 2 threads each; measured
2026-11 with scripts/bench_unet_parts.py and a jax.profiler trace of the whole forward;
the machine is shared, so absolute times drift up to 2x between runs: compare within a row):

  component (SD1.5 @64²)          torch s   jattn before   jattn after
  conv3x3 320ch @64²               0.067       0.089          0.071
  conv3x3 640ch @32²               0.066       0.081          0.072
  conv3x3 1280ch @16²              0.083       0.108          0.073
  conv3x3+SiLU 1280ch @8²          0.039       0.056          0.024
  resnet 1280 @8² / @16²           0.070/0.168  ratio 1.4/1.2  0.048/0.148
  self-attention core T=S=4096     0.30-0.34    0.52           0.36
  cross-attention core S=77        0.010        0.022          0.021
  GEGLU feed-forward T=4096        0.170        0.136          0.136
  GroupNorm+SiLU 320 @64²          ~0.012       0.006          0.006
  whole UNet forward (bench_generate, torch / jattn / ratio):
    before                          10.2 / 12.96 / 1.27
    YNNPACK off                      9.33 / 10.15 / 1.09
    + transposed attention blocks   23.7 / 18.6 / 0.78  (machine loaded by other jobs)
    32² latents, both changes        6.65 / 4.22 / 0.63  (same load)

* Before: XLA CPU (jax 0.10) routes convolutions and dots into YNNPACK fusions; on this
  AVX-512 EPYC they ran 1.2-2.3x slower than the Eigen path (whole-model trace: 7.9 s
  in 3x3 convs, 5.7 s in matmuls, 4.1 s in attention of a 17.8 s forward). jattn now
  sets ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions) in
  XLA_FLAGS at import unless the user set it (jattn/__init__.py): 17.8 s -> 10.3 s.
* Attention: the row-layout softmax reduced each 64x4096 logits block horizontally
  (a max pass costing as much as a matmul); building the logits as (S, c) blocks
  makes max/sum vertical, vectorised reductions and the matmuls plain NN products
  (jattn/models/attention.py): 0.52 s -> 0.36 s per T=S=4096 site, still ~10% behind
  PyTorch's fused flash kernel (one pass for max/exp/sum; XLA needs three).
* Remaining gap vs torch: self-attention cores (5 sites at 64², ~0.3 s total) and
  the 3x3 convs at 64²/32² (within 5-10%); resnets at 16²/8², GEGLU and GroupNorm are
  faster than torch. Tried without gain: 2 heads per loop step (unrolled or batched),
  query blocks of 128/256 rows, the row sum through a ones column of V, oneDNN
  (``--xla_cpu_use_onednn``), XNNPACK off in addition to YNNPACK.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
UNET_TFLOP_64 = 0.804
# diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (defaults omitted)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SDXL_UNET_TFLOP_128 = 6.83  # reference figure per forward, 128² latents (1024 px), batch 1
VAE_DECODE_TFLOP_512 = 2.51


def _status_gb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def working_memory(fn) -> float:
    """Peak RSS growth (GB) while ``fn`` runs: the working memory (activations, workspace)
    above what is already resident (weights of both frameworks). Linux: resets the peak
    (VmHWM) through /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_gb("VmRSS")
    fn()
    return _status_gb("VmHWM") - base


def timeit(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def timeit_mem(fn, repeats):
    """``timeit`` whose first timed call also measures the working memory (GB): saves one
    extra forward where a forward takes minutes. Returns (best, median, memory)."""
    box = {}
    mem = working_memory(lambda: box.setdefault("t", timeit(fn, 1)))
    best, med = timeit(fn, repeats - 1) if repeats > 1 else box["t"]
    ts = [box["t"][0]] + ([best] if repeats > 1 else [])
    return min(ts), (float(np.median([box["t"][0], med])) if repeats > 1 else box["t"][1]), mem


def torch_sd(module):
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def bench_cpu(args):
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jattn.models import clip_text, unet as unet_lib, vae as vae_lib

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, h = args.batch, args.latent
    print(f"# CPU benchmark: SD1.5 UNet, batch {b}, {h}x{h} latents, 77-token context, fp32")
    print(f"# jax {jax.__version__} devices {jax.devices()}; torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")

    # ---------------- UNet
    tu = UNet2DConditionModel(**SD15_UNET).eval()
    cfg = unet_lib.UNetConfig.from_diffusers(dict(tu.config))
    params = unet_lib.convert_unet_state_dict(torch_sd(tu), cfg)
    params = jax.device_put(params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, 4, h, h)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, 768)).astype(np.float32)
    t = np.array([999, 500][:b] + [10] * max(0, b - 2), np.int64)
    xt, tt, ct = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def run_torch():
        with torch.no_grad():
            return tu(xt, tt, encoder_hidden_states=ct).sample

    ref = run_torch().numpy()
    torch_best, torch_med = timeit(run_torch, args.repeats)
    torch_mem = working_memory(run_torch)
    model = unet_lib.UNet2DConditionModel(cfg)
    fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)[0])
    xj, tj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32), jnp.asarray(ctx)
    t0 = time.perf_counter()
    compiled = fwd.lower(params, xj, tj, cj).compile()
    compile_s = time.perf_counter() - t0
    out = np.asarray(compiled(params, xj, tj, cj)).transpose(0, 3, 1, 2)
    jax_best, jax_med = timeit(lambda: compiled(params, xj, tj, cj).block_until_ready(),
                               args.repeats)
    jax_mem = working_memory(lambda: compiled(params, xj, tj, cj).block_until_ready())
    err = float(np.abs(out - ref).max())
    print(f"unet  max-abs {err:.3e} (|ref| max {np.abs(ref).max():.3f})")
    print(f"unet  torch {torch_best:.2f}s (median {torch_med:.2f})  jattn {jax_best:.2f}s "
          f"(median {jax_med:.2f})  ratio jattn/diffusers {jax_best / torch_best:.3f}")
    print(f"unet  jattn compile {compile_s:.1f}s; working memory of one forward (peak RSS "
          f"above resident weights): torch {torch_mem:.2f} GB, jattn {jax_mem:.2f} GB")
    del tu, params, compiled

    if args.skip_vae_text:
        return
    # ---------------- VAE decode (at the same latent size)
    tv = AutoencoderKL(**SD15_VAE).eval()
    vcfg = vae_lib.VAEConfig.from_diffusers(dict(tv.config))
    vparams = vae_lib.convert_vae_state_dict(torch_sd(tv), vcfg)
    z = rng.standard_normal((1, 4, h, h)).astype(np.float32)
    with torch.no_grad():
        vref = tv.decode(torch.from_numpy(z)).sample.numpy()
    vmod = vae_lib.AutoencoderKL(vcfg)
    dec = jax.jit(lambda p, z: vmod.apply({"params": p}, z, method=vmod.decode))
    vout = np.asarray(dec(vparams, jnp.asarray(z.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    print(f"vae   decode max-abs {np.abs(vout - vref).max():.3e}")
    # ---------------- CLIP-L
    tc = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    ccfg = clip_text.CLIPTextConfig.from_transformers(tc.config.to_dict())
    cparams = clip_text.convert_clip_text_state_dict(torch_sd(tc), ccfg)
    ids = rng.integers(0, 49406, (2, 77)).astype(np.int64)
    ids[:, 0] = 49406
    ids[:, 10:] = 49407
    with torch.no_grad():
        cref = tc(torch.from_numpy(ids)).last_hidden_state.numpy()
    cmod = clip_text.CLIPTextModel(ccfg)
    cout = np.asarray(jax.jit(lambda p, i: cmod.apply({"params": p}, i)["last_hidden_state"])(
        cparams, jnp.asarray(ids, jnp.int32)))
    print(f"clip  last_hidden_state max-abs {np.abs(cout - cref).max():.3e}")


class _Draining:
    """A state dict whose ``items()`` pops each entry as it is handed out, so a converter
    holding only the converted copy frees the source array key by key (one full copy of
    the weights resident at a time, not two)."""

    def __init__(self, sd: dict):
        self.sd = sd

    def items(self):
        while self.sd:
            key = next(iter(self.sd))
            yield key, self.sd.pop(key)


class _DenseAttention:
    """Policy for the cost analysis: every site through XLA's plain dot-product attention
    (the CPU path maps over heads with ``lax.map``, whose body XLA's cost analysis counts
    once)."""

    def attend(self, site, q, k, v, step, *, upcast):
        import jax

        return jax.nn.dot_product_attention(q, k, v, implementation="xla"), {}


def sdxl_cost_analysis(cfg, latent: int = 128, batch: int = 1, tokens: int = 77) -> dict:
    """XLA cost analysis (lowered HLO) of one SDXL UNet forward; ShapeDtypeStruct params."""
    import jax
    import jax.numpy as jnp

    from jattn.models import unet as unet_lib

    model = unet_lib.UNet2DConditionModel(cfg)
    sds = jax.ShapeDtypeStruct
    args = (unet_lib.param_shapes(cfg), sds((batch, latent, latent, 4), jnp.float32),
            sds((batch,), jnp.int32), sds((batch, tokens, cfg.cross_attention_dim), jnp.float32),
            {"text_embeds": sds((batch, 1280), jnp.float32),
             "time_ids": sds((batch, 6), jnp.float32)})
    fwd = jax.jit(lambda p, x, t, c, a: model.apply({"params": p}, x, t, c, added_cond=a,
                                                    policy=_DenseAttention())[0])
    cost = fwd.lower(*args).cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def bench_sdxl(args):
    """SDXL base UNet config, random weights, fp32, batch B at each of --sdxl-latents."""
    import gc

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from jattn.models import unet as unet_lib

    torch.set_num_threads(args.threads)
    b, sizes = args.batch, args.sdxl_latents
    cfg = unet_lib.UNetConfig.from_diffusers(SDXL_UNET)
    print(f"# CPU benchmark: SDXL base UNet config, random weights, batch {b}, latents "
          f"{', '.join(f'{h}x{h}' for h in sizes)}, 77-token context (2048 wide), fp32")
    print(f"# jax {jax.__version__} devices {jax.devices()}; torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((b, 77, 2048)).astype(np.float32)
    text = rng.standard_normal((b, 1280)).astype(np.float32)
    ids = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (b, 1))
    ids[1:, :2] = (768, 1280)
    t = np.array([999, 500][:b] + [10] * max(0, b - 2), np.int64)
    xs = {h: rng.standard_normal((b, 4, h, h)).astype(np.float32) for h in sizes}

    # ---------------- diffusers first; its weights then move to jattn (never two copies)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tu = UNet2DConditionModel(**SDXL_UNET).eval()
    n_params = sum(p.numel() for p in tu.parameters())
    print(f"diffusers UNet built in {time.perf_counter() - t0:.0f} s: {n_params:,} params "
          f"({n_params * 4 / 1e9:.2f} GB fp32)")
    added_t = {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}
    rows = {}
    for h in sizes:
        xt = torch.from_numpy(xs[h])

        def run_torch():
            with torch.no_grad():
                return tu(xt, torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                          added_cond_kwargs=added_t).sample

        ref = run_torch().numpy()  # warm-up and reference
        best, med, mem = timeit_mem(run_torch, args.repeats)
        rows[h] = dict(ref=ref, torch=(best, med), torch_mem=mem)
        print(f"  diffusers {h}x{h}: {best:.2f} s (median {med:.2f}), working memory "
              f"{mem:.2f} GB", flush=True)
    sd = {k: v.detach().numpy() for k, v in tu.state_dict().items()}  # views, no copy
    del tu
    gc.collect()
    t0 = time.perf_counter()
    flat = unet_lib.convert_unet_state_dict(_Draining(sd), cfg)
    del sd
    gc.collect()
    # to device leaf by leaf, dropping each host array once it is on the device
    from flax import traverse_util
    flat = traverse_util.flatten_dict(flat)
    params = {}
    for path in list(flat):
        params[path] = jax.device_put(flat.pop(path))
    params = traverse_util.unflatten_dict(params)
    print(f"converted to jattn in {time.perf_counter() - t0:.0f} s; resident "
          f"{_status_gb('VmRSS'):.1f} GB")

    model = unet_lib.UNet2DConditionModel(cfg)
    fwd = jax.jit(lambda p, x, t, c, a: model.apply({"params": p}, x, t, c, added_cond=a)[0])
    added_j = {"text_embeds": jnp.asarray(text), "time_ids": jnp.asarray(ids)}
    cj, tj = jnp.asarray(ctx), jnp.asarray(t, jnp.int32)
    for h in sizes:
        xj = jnp.asarray(xs[h].transpose(0, 2, 3, 1))
        t0 = time.perf_counter()
        compiled = fwd.lower(params, xj, tj, cj, added_j).compile()
        compile_s = time.perf_counter() - t0
        run = lambda: compiled(params, xj, tj, cj, added_j).block_until_ready()  # noqa: E731
        out = np.asarray(compiled(params, xj, tj, cj, added_j)).transpose(0, 3, 1, 2)
        best, med, mem = timeit_mem(run, args.repeats)
        r = rows[h]
        r.update(jattn=(best, med), jattn_mem=mem, compile=compile_s,
                 err=float(np.abs(out - r["ref"]).max()), scale=float(np.abs(r["ref"]).max()))
        print(f"  jattn {h}x{h}: {best:.2f} s (median {med:.2f}), compile {compile_s:.1f} s, "
              f"working memory {mem:.2f} GB, max-abs {r['err']:.2e}", flush=True)
        del compiled
        gc.collect()
    del params
    gc.collect()

    print(f"\n  SDXL UNet, batch {b}, fp32, {args.threads} threads each; time = best of "
          f"{args.repeats} (median)")
    print("  latents  max-abs    |ref|max  diffusers s      jattn s          ratio  "
          "compile s  mem torch/jattn GB")
    for h in sizes:
        r = rows[h]
        print(f"  {h:3d}x{h:<3d}  {r['err']:.2e}  {r['scale']:8.3f}  "
              f"{r['torch'][0]:6.2f} ({r['torch'][1]:6.2f})  {r['jattn'][0]:6.2f} "
              f"({r['jattn'][1]:6.2f})  {r['jattn'][0] / r['torch'][0]:5.3f}  "
              f"{r['compile']:7.1f}    {r['torch_mem']:.2f} / {r['jattn_mem']:.2f}")
    t0 = time.perf_counter()
    cost = sdxl_cost_analysis(cfg)
    flops = float(cost.get("flops", float("nan")))
    print(f"\n  XLA cost analysis, one SDXL UNet forward at 128x128 latents, batch 1, 77 "
          f"tokens (lowered HLO, {time.perf_counter() - t0:.0f} s): {flops / 1e12:.2f} TFLOP "
          f"(a multiply-add counts 2 FLOPs) vs reference {SDXL_UNET_TFLOP_128} TFLOP "
          f"(ratio {flops / 1e12 / SDXL_UNET_TFLOP_128:.3f}); bytes accessed "
          f"{float(cost.get('bytes accessed', float('nan'))) / 1e9:.1f} GB")


def bench_gpu(args):  # pragma: no cover - needs a lent GPU
    """SD1.5 config, 512 px, 50 DDIM steps with CFG, bf16, batch 1 and 8: jattn vs diffusers."""
    import jax
    import jax.numpy as jnp

    from jattn.models import unet as unet_lib, vae as vae_lib
    from jattn.sampling import sampler, schedulers as sch

    print(f"# GPU benchmark on {jax.devices()}")
    cfg = unet_lib.UNetConfig.from_diffusers(dict(SD15_UNET))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16),
                                    unet_lib.init_params(cfg, jax.random.key(0)))
    vcfg = vae_lib.VAEConfig.from_diffusers(dict(SD15_VAE))
    vparams = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16),
                                     vae_lib.init_vae_params(vcfg, jax.random.key(1)))
    model = unet_lib.UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim"), 50)

    def unet_fn(x, t, c, policy, step):
        return model.apply({"params": params}, x.astype(jnp.bfloat16), t, c, policy=policy,
                           step=step)

    @jax.jit
    def gen(x, cond, uncond, keys):
        lat, _ = sampler.sample(unet_fn, schedule, x, cond, uncond, 7.5, keys)
        return vae_lib.decode_latents(vparams, vcfg, lat.astype(jnp.bfloat16))

    results = {}
    for b in (1, 8):
        x = jax.random.normal(jax.random.key(0), (b, 64, 64, 4))
        cond = jnp.zeros((b, 77, 768), jnp.bfloat16)
        keys = sampler.per_sample_keys(np.arange(b))
        t0 = time.perf_counter()
        gen(x, cond, cond, keys).block_until_ready()
        compile_s = time.perf_counter() - t0
        best, _ = timeit(lambda: gen(x, cond, cond, keys).block_until_ready(), 3)
        tflop = b * (100 * UNET_TFLOP_64 + VAE_DECODE_TFLOP_512)
        results[b] = best
        print(f"jattn     batch {b}: {b / best:.2f} images/s ({best:.2f} s, first call "
              f"{compile_s:.1f} s), MFU {tflop / best / 989:.1%} of 989 TFLOP/s")
    try:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    except ImportError as e:
        print(f"diffusers/torch not available: {e}")
        return
    tu = UNet2DConditionModel(**SD15_UNET).to("cuda", torch.bfloat16).eval()
    tv = AutoencoderKL(**SD15_VAE).to("cuda", torch.bfloat16).eval()
    ts = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def torch_gen(b, unet):
        ts.set_timesteps(50)
        x = torch.randn(b, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
        ctx = torch.zeros(2 * b, 77, 768, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for t in ts.timesteps:
                e = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
                eu, ec = e.chunk(2)
                x = ts.step(eu + 7.5 * (ec - eu), t, x).prev_sample
            img = tv.decode(x / 0.18215).sample
        torch.cuda.synchronize()
        return img

    variants = [("diffusers SDPA", tu)]
    try:
        variants.append(("diffusers torch.compile", torch.compile(tu, mode="max-autotune")))
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile unavailable: {e}")
    for name, unet in variants:
        for b in (1, 8):
            try:
                torch_gen(b, unet)
                best, _ = timeit(lambda: torch_gen(b, unet), 3)
            except Exception as e:  # noqa: BLE001
                print(f"{name} batch {b}: failed ({type(e).__name__}: {e})")
                continue
            tflop = b * (100 * UNET_TFLOP_64 + VAE_DECODE_TFLOP_512)
            print(f"{name:24s} batch {b}: {b / best:.2f} images/s ({best:.2f} s), MFU "
                  f"{tflop / best / 989:.1%}; jattn/diffusers time {results[b] / best:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["cpu", "gpu"], nargs="?", default="cpu")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-vae-text", action="store_true")
    ap.add_argument("--sdxl", action="store_true",
                    help="SDXL base UNet config (random weights) instead of SD1.5")
    ap.add_argument("--sdxl-latents", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--sdxl-cost-only", action="store_true",
                    help="only the XLA cost analysis at 128² (no weights)")
    args = ap.parse_args()
    if args.sdxl_cost_only:
        from jattn.models import unet as unet_lib
        cost = sdxl_cost_analysis(unet_lib.UNetConfig.from_diffusers(SDXL_UNET))
        print(f"SDXL UNet 128² batch 1: {float(cost['flops']) / 1e12:.3f} TFLOP "
              f"(multiply-add = 2) vs reference {SDXL_UNET_TFLOP_128}")
    elif args.sdxl:
        if args.mode != "cpu":
            ap.error("--sdxl runs on the CPU part only (mode cpu)")
        bench_sdxl(args)
    else:
        bench_cpu(args) if args.mode == "cpu" else bench_gpu(args)


if __name__ == "__main__":
    main()
