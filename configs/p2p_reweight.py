"""Prompt-to-Prompt attention reweighting of a colour word and a size word.

Run this config:
  jattn run configs/p2p_reweight.py --out-dir out/p2p_reweight
Same edit from the command line:
  jattn edit p2p --mode reweight --prompt "a red circle" --target "a red circle" \
      --equalize red=4 --out-dir out/p2p_reweight
Evaluation (amount of the attribute per weight -1, 0.5, 1, 2, 4; 4 seeds):
  python scripts/eval_p2p.py --seeds 0 1 2 3
Expected: the amount of red (pixels classified red) and the object's area for "large" grow
with the weight (monotonic mean over seeds).
Measured (bundled weights v1, 4 seeds): red pixels 828, 837, 838, 844, 853 and the area for
"large" 2343, 2350, 2356, 2364, 2388 px at weights -1, 0.5, 1, 2, 4 (monotonic, Spearman 1);
a small effect: the tiny model's colour and size are set mostly by the other tokens.
"""


def get_config():
    return dict(
        method="p2p", mode="reweight",
        prompt="a red circle", targets=["a red circle"] * 4,
        equalize=[{"red": v} for v in (-1.0, 0.5, 2.0, 4.0)],
        steps=50, guidance_scale=7.5, seed=3,
        expected="amount of red grows with the weight",
    )
