"""Cross-Image Attention on the bundled model: a structure render takes the appearance
render's colour, fill and background (Alaluf, Garibi et al. SIGGRAPH 2024, Fig. 1 style).

Run it from the command line (text inputs are generated first, then inverted like images;
give image files to --structure/--appearance to transfer between your own renders):
  jattn cross-image --structure "a red triangle on the left on a gray background" \
      --appearance "a blue outlined heart on the right on a beige background" \
      --prompt "a shape" --object-word shape --steps 100 --guidance-scale 3.5 \
      --out-dir out/cross_image_world
Files: 000.png the output, 001.png the appearance, 002.png the structure (as regenerated
from their inversions), grid.png (structure, appearance, output), masks.png, result.json.
Evaluation over 48 world pairs (structure and appearance renders given as images):
  python scripts/eval_cross_image.py --n 48 --steps 100 --guidance-scale 3.5
Expected: the output keeps the structure's shape and position (>= 0.85) and takes the
appearance's object colour (>= 0.8), fill (>= 0.6 on solid/outlined) and background
(>= 0.7). Measured: see README ("Cross-Image Attention") and the eval's JSON.
The reference runs without CFG (--guidance-scale 1); the bundled model needs CFG to
regenerate its inputs, so the loop runs at the inversion's scale 3.5 (both CFG halves are
swapped, each of the two passes does CFG, then swap guidance combines them).
"""


def get_config():
    return dict(
        method="cross_image",
        structure="a red triangle on the left on a gray background",
        appearance="a blue outlined heart on the right on a beige background",
        prompt="a shape", object_word="shape",
        steps=100, guidance_scale=3.5, seed=0,
        swap_guidance_scale=3.5, contrast_strength=1.67,
        expected="structure kept >= 0.85; appearance colour >= 0.8, fill >= 0.6, "
                 "background >= 0.7 (world detector)",
    )
