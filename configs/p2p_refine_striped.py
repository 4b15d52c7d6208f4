"""Prompt-to-Prompt refinement: "a circle" -> "a striped circle" (token alignment).

Run this config:
  jattn run configs/p2p_refine_striped.py --out-dir out/p2p_refine_striped
Same edit from the command line:
  jattn edit p2p --mode refine --prompt "a red circle" --target "a red striped circle" \
      --blend-words circle --out-dir out/p2p_refine_striped
Expected: the same circle (mask IoU >= 0.8), now with a striped fill (detector fill =
striped); local blend on "circle" keeps the background.
"""


def get_config():
    return dict(
        method="p2p", mode="refine",
        prompt="a red circle", targets=["a red striped circle"], blend_words=["circle"],
        cross_replace_steps=0.8, self_replace_steps=0.4, steps=50, guidance_scale=7.5, seed=2,
        expected="mask IoU >= 0.8, fill striped",
    )
