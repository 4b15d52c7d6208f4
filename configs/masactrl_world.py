"""MasaCtrl on the bundled model (Cao et al. ICCV 2023; reference TencentARC/MasaCtrl;
jattn/methods/masactrl.py).

Command:
  jattn edit masactrl --prompt "a red heart on the left" \
      --target "a red heart on the right" --seed 0 --out-dir out/masactrl_world
  (writes 000.png the source = its plain generation bit for bit, 001.png the target,
  grid.png, result.json; --variant union|mask|auto-mask, --image PATH for a real image)
Python:
  from jattn.methods.masactrl import masactrl
  cfg = get_config(); cfg.pop("expected"); cfg.pop("method")
  out = masactrl(jattn.load(), cfg.pop("source"), cfg.pop("targets"), **cfg)

Expected figure: the heart moves to the right and keeps the source's fill, size and
background (the target generated alone from the same noise often changes its background).

Measured (scripts/eval_masactrl_pnp.py --part masactrl, bundled weights v2, 48 pairs =
32 position changes + 16 size changes, fill/size/background unstated, one seed each,
DDIM 50 steps, CFG 7.5), MasaCtrl vs the target generated alone from the same noise:

  default sites (decoder self-attention at its two largest resolutions: up_blocks.1-2,
  8² + 16²), step 4/50:
    target realised (stated position / size read back)    0.958  (baseline 0.958)  goal ≥ 0.85
    source's unstated attributes kept (fill, size, bg)    0.958  (baseline 0.667)  goal ≥ 0.8
      fill 1.00 (1.00), size 0.94 (0.91), background 1.00 (0.71)
      position pairs: realised 1.00 (1.00), kept 0.94 (0.53);
      size pairs: realised 0.88 (0.88), kept 1.00 (0.94)
  ablation --start-layer 0.625 (the reference's fraction 10/16 of the layers in call order:
  only up_blocks.2 at 16² on this UNet): realised 0.958, kept 0.771 (background 0.81):
  the 8² decoder layers carry the background on this model, hence the resolution rule
  (which on SD1/SD2 is exactly the reference's blocks 10-15).
  Fill is solid in every image (the bundled VAE renders striped/dotted fills solid,
  ../shared/BUNDLED_LIMITS.md), so fill agreement is not discriminative here.

Speed (scripts/bench_edit.py --steps 25 --members 4 --repeats 5, one run; the whole
table with its settings is in configs/style_aligned_world.py):
  method              method s  plain s  ratio   goal    member 0 vs plain  2nd-run compiles
  MasaCtrl (plain)      1.56     1.48    1.07   <= 1.1   bit-identical       0
  MasaCtrl (mask)       1.89     1.48    1.24   <= 1.1   bit-identical       0
"""


def get_config():
    return dict(
        method="masactrl",
        source="a red heart on the left",
        targets=["a red heart on the right"],
        seed=0, num_inference_steps=50, guidance_scale=7.5,
        start_step=4 / 50, start_layer=None, variant="plain",
        expected="the heart on the right, fill/size/background of the source; the source "
                 "bit-identical to plain generation of the same batch; speed "
                 "(scripts/bench_edit.py, 25 steps, 4 images): MasaCtrl / plain <= 1.1 "
                 "(measured 1.07; the mask variant 1.24)",
    )
