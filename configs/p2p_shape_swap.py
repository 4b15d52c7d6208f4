"""Prompt-to-Prompt word swap of a shape on the bundled model.

Run this config:
  jattn run configs/p2p_shape_swap.py --out-dir out/p2p_shape_swap
Same edit from the command line:
  jattn edit p2p --prompt "a yellow square in the center" --target "a yellow star in the center" \
      --target "a yellow heart in the center" --cross-steps 0.8 --self-steps 0.4 \
      --out-dir out/p2p_shape_swap
Expected: same colour and position, the target shape (world detector); the shape swap
changes the silhouette, so the mask IoU is lower than for a colour swap.
Measured (bundled weights v1, 64 edits of scripts/eval_p2p.py): target shape and colour
86 %, mask IoU mean 0.55.
"""


def get_config():
    return dict(
        method="p2p", mode="replace",
        prompt="a yellow square in the center",
        targets=["a yellow star in the center", "a yellow heart in the center"],
        cross_replace_steps=0.8, self_replace_steps=0.4, steps=50, guidance_scale=7.5, seed=1,
        expected="target shape detected, colour and position kept",
    )
