"""The procedural world of coloured shapes with ground truth (the bundled model's data).

128×128 RGB images of 1–3 objects (colour × shape × size × position × fill) on a
background, captions in several variants, exact masks; a detector written from the
world's definition; a held-out split of (colour, shape) pairs. numpy only.

  from jattn import world
  scene = world.sample_scene(0)                          # image, caption, objects
  scene = world.render(world.SceneSpec.of("red circle on the left", "blue square"), seed=1)
  spec = world.parse_prompt("a photo of a red circle on the left")
  result = world.score_image(image, spec)                # per-object correctness
"""

from jattn.world.captions import NUM_CAPTION_VARIANTS, caption_for, object_phrase, parse_prompt
from jattn.world.detector import (
    Detection, classify_background, classify_pixels, detect, fill_holes, label_components,
    score_image,
)
from jattn.world.scene import (
    Scene, SceneObject, iter_batches, make_dataset, render, sample_scene, sample_spec, shape_mask,
)
from jattn.world.spec import (
    BACKGROUNDS, COLORS, DEFAULTS, FILLS, HELD_OUT_PAIRS, IMAGE_SIZE, PALETTE, POSITIONS,
    SHAPES, SIZES, SPLITS, STATED_FILLS, STATED_SIZES, ObjectSpec, SceneSpec, heldout_specs,
    position_of, size_of,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "DEFAULTS", "FILLS", "HELD_OUT_PAIRS", "IMAGE_SIZE",
    "NUM_CAPTION_VARIANTS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "SPLITS",
    "STATED_FILLS", "STATED_SIZES",
    "ObjectSpec", "SceneSpec", "Scene", "SceneObject", "Detection",
    "caption_for", "object_phrase", "parse_prompt", "position_of", "size_of",
    "heldout_specs", "render", "sample_scene", "sample_spec", "shape_mask", "make_dataset", "iter_batches",
    "detect", "score_image", "classify_background", "classify_pixels", "label_components", "fill_holes",
]
