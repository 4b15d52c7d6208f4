"""Plug-and-Play on the bundled model (Tumanyan et al. CVPR 2023; reference
MichalGeyer/pnp-diffusers; jattn/methods/pnp.py).

Command:
  jattn edit pnp --prompt "a red heart on the left" --target "a blue heart on the left" \
      --negative-prompt "" --seed 0 --out-dir out/pnp_world
  jattn edit pnp --image render.png --target "a blue heart on the left" \
      --negative-prompt "" --out-dir out/pnp_world_real
  (000.png the source = its plain generation bit for bit, or the real image's
  reconstruction; 001.png … one per target; grid.png, result.json)
Python:
  from jattn.methods.pnp import pnp
  cfg = get_config(); cfg.pop("expected"); cfg.pop("method")
  out = pnp(jattn.load(), **cfg)

Expected figure: the heart turns blue and keeps the source's silhouette and place.

Sites on this UNet: Q, K of every decoder self-attention layer but the first
(up_blocks.1.attentions.1 at 8², up_blocks.2 at 16²; on SD1/SD2 exactly the reference's
res_dict) during the first 50 % of the steps; the residual branch of up_blocks.1.resnets.1
(conv2's output before the shortcut add, 8²) during the first 80 %.

Measured (scripts/eval_masactrl_pnp.py --part pnp --negative "", bundled weights v2, DDIM
50 steps, CFG 7.5; 48 generated pairs = 24 colour + 24 background translations, and 24
world renders given as images), PnP vs baseline:

  generated sources (baseline: the target alone from the same noise)
    object-mask IoU with the source: mean 0.863 (0.788); ≥ 0.8 in 0.833 (0.521)  goal ≥ 0.8
    target attribute read back: 0.792 (1.000)                                    goal ≥ 0.9
      colour translations 1.00 (1.00); background translations 0.58 (1.00)
  world renders given as images (DDIM inversion with "", 50 steps; baseline: plain
  regeneration from the inverted noise with the target prompt)
    IoU mean 0.598 (0.599); ≥ 0.8 in 0.083 (0.042)                               goal ≥ 0.8
    target attribute 0.833 (1.000): colour 1.00, background 0.67
    the source row's reconstruction (decode of z*_0): IoU 0.915 with the render
  With the reference's negative prompt "ugly, blurry, black, low res, unrealistic" (words
  the bundled text encoder never saw; and "a orange" prompts) the colour is lost even
  without PnP: generated IoU 0.663 (0.635), target attribute 0.583 (baseline 0.729).
  Ablation --feature-fraction 0.4 (residual injection in the first 40 % only): generated IoU
  ≥ 0.8 in 0.750, target attribute 0.812 (background 0.62); renders: IoU ≥ 0.8 in 0.083,
  target attribute 0.917 (background 0.83).
  Ablation --feature-fraction 0 (Q, K only): generated IoU ≥ 0.8 in 0.500 (= baseline
  0.521), target attribute 0.917 (background 0.83); renders: IoU ≥ 0.8 0.083, attribute
  0.875. So on this UNet the residual feature carries both the silhouette and the
  background: the one trade-off behind both shortfalls.
Shortfalls: background translations keep the source background in ~40 % (the injected 8²
residual features carry the background on this small UNet), and the real-image path does
not keep the silhouette: DDIM inversion at CFG 7.5 does not regenerate the bundled
model's renders (baseline IoU 0.6), and the injected layers do not recover it.

Speed (scripts/bench_edit.py --steps 25 --members 4 --repeats 5, one run; the whole
table with its settings is in configs/style_aligned_world.py):
  method              method s  plain s  ratio   goal    member 0 vs plain  2nd-run compiles
  PnP (source incl.)    1.54     1.34    1.16   <= 1.2   bit-identical       0
"""

from jattn.methods.pnp import REFERENCE_NEGATIVE  # noqa: F401  (the reference's default)


def get_config():
    return dict(
        method="pnp",
        source_prompt="a red heart on the left",
        target_prompts=["a blue heart on the left"],
        seed=0, num_inference_steps=50, guidance_scale=7.5,
        attn_fraction=0.5, feature_fraction=0.8, negative_prompt="",
        expected="a blue heart with the source's silhouette and place; the source "
                 "bit-identical to plain generation of the same batch; speed "
                 "(scripts/bench_edit.py, 25 steps, 4 images, the source pass included): "
                 "PnP / plain <= 1.2 (measured 1.16)",
    )
