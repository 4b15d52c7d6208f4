"""Bounded Attention: jattn (jattn/methods/bounded.py) beside the reference implementation
(omer11a/bounded-attention, PyTorch/diffusers) on the bundled model's weights, same prompts,
boxes, token choices and initial latents; per-image wall time and the detector's read-back.

The reference's code is NOT part of this repository: export it to a scratch folder and
point --reference-dir at it; it is imported from there at run time.

  git -C <mirror of omer11a/bounded-attention> archive HEAD | tar -x -C /tmp/ba_ref
  python -m venv --system-site-packages /tmp/ba_venv
  /tmp/ba_venv/bin/pip install --no-deps torch_kmeans==0.2.0
  /tmp/ba_venv/bin/python scripts/bench_bounded_reference.py --reference-dir /tmp/ba_ref \
      [--n 4] [--steps 50] [--out out/bench_bounded_reference]

Writes OUT/ref_000.png, OUT/jattn_000.png, ... and OUT/result.json (per case: times,
eval_layout.score_case read-back for both, mean |pixel difference|, IoU of the final
subject masks). Cases: scripts/eval_layout.py binding_cases (seed of case i = i), DDIM 50
steps, CFG 7.5, run_sd.py's Bounded Attention defaults, one image per call (the reference
handles one prompt per editor).

Adaptations of the reference (all made here, from outside its files):

1. Model: the bundled diffusers folder (jattn.pipeline.bundled_model_path()) instead of
   runwayml/stable-diffusion-v1-5; float32 on CPU instead of float16 on CUDA; no xformers,
   no sequential CPU offload; no safety checker; ``cross_attention_kwargs={"scale": 0.5}``
   (unused by the reference's pipeline) dropped.
2. Scheduler: the bundled checkpoint's own DDIMScheduler config (v-prediction, zero-terminal
   SNR, "trailing" spacing) instead of run_sd.py's epsilon DDIM constructor; hence the
   pipeline's hand-written epsilon DDIM ``step`` (which divides by sqrt(alpha_bar)=0 at the
   zero-SNR first step) is replaced by ``scheduler.step`` (eta 0), and ``latent2image``
   uses the VAE's ``scaling_factor`` (1.165) instead of 0.18215, in float32.
3. dtype: the pipeline's ``latents.half()`` / ``text_embeddings.half()`` are made no-ops
   while it runs (``torch.Tensor.half`` patched to identity inside the call only).
4. Size: 128x128 images, 16x16 latents (``height=width=128``) instead of 512 / 64x64.
5. Layers: the bundled UNet has 14 attention calls per forward (down0 self/cross = 0,1,
   down1 = 2,3, mid = 4,5, up_blocks.1 = 6..9, up_blocks.2 = 10..13) instead of SD1.5's 32;
   the reference's loss layers ``range(12, 20)`` (SD: mid + up_blocks.1) become
   ``range(4, 10)`` and its mask layers ``range(14, 20)`` (SD: up_blocks.1) become
   ``range(6, 10)`` -- the same blocks jattn's loss_sites / record_sites pick. The indices
   are derived at run time from a hooked forward pass, not hard-coded.
6. Tokens: ``filter_token_indices``, ``eos_token_index`` and ``leading_token_indices`` are
   passed explicitly, computed by jattn.methods.bounded.bounded_inputs (its function-word
   list; leading token = the phrase's last token), so NLTK's tagger (data not installable
   here) is never called and both implementations mask the same tokens.
7. Missing optional imports are stubbed (only used for debug images / the demo script):
   nltk, pytorch_lightning (seed_everything), torchvision (save_image, transforms,
   read_image: no torchvision build for torch 2.13+cpu here), cv2, matplotlib.
8. Initial latents: jattn's own noise for seed i (sampler.initial_noise) is passed to both.
9. ``torch.set_flush_denormal(True)`` (a CPU speed setting; XLA's CPU backend flushes
   denormals as well): without it the reference's backward passes run several times slower
   here.

Not adapted (differences that remain): k-means (torch_kmeans, 100 random restarts then
warm starts) vs jattn's k-means++; the reference's batch-coupled stopping rule (identical
for one image).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _stub_missing():
    """Stub the reference's optional imports that are absent here (see the docstring, 7)."""
    def need(name):
        try:
            importlib.import_module(name)
            return False
        except ImportError:
            return True

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def unavailable(*a, **k):
        raise RuntimeError("stubbed for bench_bounded_reference (debug path only)")

    if need("nltk"):
        mod("nltk", pos_tag=unavailable)
    if need("pytorch_lightning"):
        mod("pytorch_lightning", seed_everything=unavailable)
    if need("torchvision"):
        tv = mod("torchvision")
        tv.utils = mod("torchvision.utils", save_image=unavailable)
        tv.transforms = mod("torchvision.transforms")
        tv.transforms.functional = mod("torchvision.transforms.functional",
                                       to_pil_image=unavailable)
        tv.io = mod("torchvision.io", read_image=unavailable)
    if need("cv2"):
        mod("cv2")
    if need("matplotlib"):
        mpl = mod("matplotlib")
        mpl.pyplot = mod("matplotlib.pyplot")


@contextlib.contextmanager
def _no_half():
    import torch

    orig = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.half = orig


def load_reference(reference_dir: str, model_dir: str):
    """The reference's pipeline class on the bundled weights, with adaptations 1-3."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: F401 (before stubs:
    # transformers probes torchvision's import spec)

    _stub_missing()
    torch.set_flush_denormal(True)  # adaptation 9 (XLA's CPU backend flushes them too)
    sys.path.insert(0, str(Path(reference_dir).resolve()))
    opt = importlib.import_module("pipeline_stable_diffusion_opt")
    inj = importlib.import_module("injection_utils")
    ba = importlib.import_module("bounded_attention")

    class Adapted(opt.StableDiffusionPipeline):
        def step(self, model_output, timestep, x, eta=0.0, verbose=False):
            r = self.scheduler.step(model_output, timestep, x, eta=0.0)
            return r.prev_sample, r.pred_original_sample

        @torch.no_grad()
        def latent2image(self, latents, return_type="np"):
            image = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
            return (image / 2 + 0.5).clamp(0, 1)

    scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = Adapted.from_pretrained(model_dir, scheduler=scheduler, torch_dtype=torch.float32,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, inj, ba


def attention_call_order(pipe):
    """Module names of the UNet's attention calls in execution order (cur_att_layer)."""
    import torch
    from diffusers.models.attention_processor import Attention

    order, hooks = [], []
    for name, m in pipe.unet.named_modules():
        if isinstance(m, Attention):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: order.append(n)))
    c = pipe.unet.config
    with torch.no_grad():
        pipe.unet(torch.zeros(1, c.in_channels, c.sample_size, c.sample_size),
                  torch.tensor(1), encoder_hidden_states=torch.zeros(
                      1, 77, c.cross_attention_dim))
    for h in hooks:
        h.remove()
    return order


def reference_layers(order):
    """(loss layers, mask layers): mid + first up block with attention; that up block."""
    ups = []
    for n in order:
        if n.startswith("up_blocks."):
            b = ".".join(n.split(".")[:2])
            if b not in ups:
                ups.append(b)
    first_up = [i for i, n in enumerate(order) if n.startswith(ups[0] + ".")]
    mid = [i for i, n in enumerate(order) if n.startswith("mid_block.")]
    return mid + first_up, first_up


def mask_iou(a, b) -> list[float]:
    out = []
    for x, y in zip(a, b):
        x, y = np.asarray(x) > 0.5, np.asarray(y) > 0.5
        u = np.logical_or(x, y).sum()
        out.append(round(float(np.logical_and(x, y).sum() / u) if u else 1.0, 3))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-dir", required=True)
    ap.add_argument("--n", type=int, default=4, help="binding cases (eval_layout)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="out/bench_bounded_reference")
    a = ap.parse_args(argv)

    import torch
    from PIL import Image

    import jattn
    from eval_layout import binding_cases, score_case
    from jattn.methods.bounded import bounded_generate, bounded_inputs
    from jattn.pipeline import bundled_model_path
    from jattn.sampling import sampler as sampler_lib

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(bundled_model_path())
    cases = binding_cases(a.n)

    pipe = jattn.load()
    h = w = 128
    lat = np.asarray(sampler_lib.initial_noise(
        sampler_lib.per_sample_keys(np.arange(a.n, dtype=np.uint32)), (h // 8, w // 8, 4)))
    lat = lat.transpose(0, 3, 1, 2).copy()  # NCHW, the same noise jattn draws for seed i

    ref, inj, ba = load_reference(a.reference_dir, model_dir)
    order = attention_call_order(ref)
    loss_layers, mask_layers = reference_layers(order)
    print(f"attention calls: {len(order)}; loss layers {loss_layers}; mask layers "
          f"{mask_layers}", flush=True)

    rows = []
    # jattn: one image per call (as the reference), compiled once
    t0 = time.perf_counter()
    c0 = cases[0]
    bounded_generate(pipe, [c0["prompt"]], [c0["phrases"]], [c0["boxes"]],
                     num_inference_steps=a.steps, latents=lat[:1], return_masks=True)
    jattn_first = time.perf_counter() - t0
    print(f"jattn first call (compile + run): {jattn_first:.1f} s", flush=True)

    for i, c in enumerate(cases):
        inp = bounded_inputs(pipe.tokenizer, [c["prompt"]], [c["phrases"]], [c["boxes"]],
                             h, w)
        subj = [[int(t) for t, v in zip(inp["tokens"][0, j], inp["valid"][0, j]) if v]
                for j in range(len(c["phrases"]))]
        filt = [int(t) for t in np.flatnonzero(inp["blocked"][0])]
        eos = int(np.flatnonzero(inp["eos"][0])[0])
        lead = [int(t) for t in inp["leading"][0]]

        t0 = time.perf_counter()
        jo, jm = bounded_generate(pipe, [c["prompt"]], [c["phrases"]], [c["boxes"]],
                                  num_inference_steps=a.steps, latents=lat[i:i + 1],
                                  return_masks=True)
        jimg = np.asarray(jo.images)[0]
        tj = time.perf_counter() - t0

        editor = ba.BoundedAttention(
            [list(b) for b in c["boxes"]], [c["prompt"]], subj, loss_layers, loss_layers,
            cross_mask_layers=mask_layers, self_mask_layers=mask_layers,
            filter_token_indices=filt, eos_token_index=eos, leading_token_indices=lead,
            cross_loss_coef=1.5, self_loss_coef=0.5, max_guidance_iter=15,
            max_guidance_iter_per_step=5, start_step_size=8, end_step_size=2,
            loss_stopping_value=0.2, min_clustering_step=15, num_clusters_per_box=3)
        inj.register_attention_editor_diffusers(ref, editor)
        t0 = time.perf_counter()
        with _no_half(), contextlib.redirect_stdout(sys.stderr):
            img = ref([c["prompt"]], latents=torch.from_numpy(lat[i:i + 1]), height=h,
                      width=w, num_inference_steps=a.steps, guidance_scale=7.5)
        tr = time.perf_counter() - t0
        rimg = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rm = editor.self_masks
        if rm is not None:
            r = int(rm.shape[-1] ** 0.5)
            rm = rm[0].reshape(-1, r, r).float().numpy()
        Image.fromarray(rimg).save(out / f"ref_{i:03d}.png")
        Image.fromarray(jimg).save(out / f"jattn_{i:03d}.png")
        sj, sr = score_case(jimg, c), score_case(rimg, c)
        row = dict(prompt=c["prompt"], boxes=c["boxes"], tokens=subj, filter=filt, eos=eos,
                   leading=lead, jattn_s=round(tj, 2), reference_s=round(tr, 2),
                   jattn=sj, reference=sr,
                   pixel_mad=round(float(np.abs(jimg.astype(float) - rimg).mean()), 2),
                   mask_iou=None if (rm is None or jm is None) else mask_iou(jm[0], rm))
        rows.append(row)
        print(f"case {i} {c['prompt']!r}: jattn {tj:.1f} s, reference {tr:.1f} s; "
              f"jattn in_box={sj.get('in_box')} right={sj['right']} leak={sj['leak']} "
              f"{sj['detected']}; reference in_box={sr.get('in_box')} right={sr['right']} "
              f"leak={sr['leak']} {sr['detected']}; |dpix|={row['pixel_mad']} "
              f"mask IoU={row['mask_iou']}", flush=True)

    tj = float(np.median([r["jattn_s"] for r in rows]))
    tr = float(np.median([r["reference_s"] for r in rows]))
    summary = dict(jattn_first_call_s=round(jattn_first, 1), jattn_median_s=round(tj, 2),
                   reference_median_s=round(tr, 2), ratio_jattn_over_reference=round(tj / tr, 3),
                   attention_calls=order, loss_layers=loss_layers, mask_layers=mask_layers)
    for k in ("in_box", "right", "leak"):
        for who in ("jattn", "reference"):
            summary[f"{who}_{k}"] = float(np.mean([bool(r[who].get(k)) for r in rows]))
    (out / "result.json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=1,
                                                default=str))
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
