"""The world's vocabulary, palette, geometry constants and composition specs.

The world: 128×128 RGB images of 1–3 coloured shapes on a plain or patterned background,
each with a caption that states some of their attributes. This module is the world's
definition; the generator (``scene.py``), the captions (``captions.py``) and the
detector (``detector.py``) are all written from it.

Attributes of an object and their words in captions:

  color     red orange yellow green blue purple white black   (always drawn saturated)
  shape     circle square triangle star heart ring
  size      small large  (medium is the default and has no word)
  position  "on the left" "on the right" "at the top" "at the bottom" "in the center"
  fill      striped dotted outlined  (solid is the default and has no word)

and of the scene: background gray, light gray, beige, striped, checkered
("on a gray background").

Any attribute a spec leaves as None is *unstated*: the caption does not mention it and the
renderer samples it from :data:`DEFAULTS` (and records that it was unstated).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
SIZES = ("small", "medium", "large")
STATED_SIZES = ("small", "large")  # "medium" is never written in a caption
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
FILLS = ("solid", "striped", "dotted", "outlined")
STATED_FILLS = ("striped", "dotted", "outlined")  # "solid" is never written in a caption
BACKGROUNDS = ("gray", "light gray", "beige", "striped", "checkered")

IMAGE_SIZE = 128

# Object RGB (uint8): saturated, hue-separated (hues 0, 29, 56, 127, 227, 277 degrees),
# white/black far in value from every background (backgrounds have value 0.43..0.67 and
# saturation <= 0.25).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 120, 0),
    "yellow": (245, 230, 0),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Second tone of striped / dotted fills: same hue, darker (saturated colours ×0.55);
# white and black get a gray that stays on their side of the background values.
SHADE: dict[str, tuple[int, int, int]] = {
    **{c: tuple(int(round(0.55 * v)) for v in rgb) for c, rgb in PALETTE.items()
       if c not in ("white", "black")},
    "white": (210, 210, 210),
    "black": (60, 60, 60),
}
# Backgrounds: one RGB or two tones of a pattern (low saturation, mid value).
BACKGROUND_TONES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "gray": ((128, 128, 128), (128, 128, 128)),
    "light gray": ((170, 170, 170), (170, 170, 170)),
    "beige": ((165, 150, 125), (165, 150, 125)),
    "striped": ((115, 115, 115), (145, 145, 145)),  # horizontal bands, 6 px
    "checkered": ((110, 110, 110), (150, 150, 150)),  # 16 px squares
}

# Geometry, in pixels. Size = the object's bounding-box extent (max of width, height).
SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (17, 21), "medium": (25, 29), "large": (34, 38)}
# Anchor (x, y) of each position, pixel coordinates (x right, y down, pixel centres at +0.5).
ANCHOR_OFFSET = 40.0
ANCHORS: dict[str, tuple[float, float]] = {
    "on the left": (64.0 - ANCHOR_OFFSET, 64.0),
    "on the right": (64.0 + ANCHOR_OFFSET, 64.0),
    "at the top": (64.0, 64.0 - ANCHOR_OFFSET),
    "at the bottom": (64.0, 64.0 + ANCHOR_OFFSET),
    "in the center": (64.0, 64.0),
}
# Position of a point (the rule the detector and scoring use): "in the center" when
# max(|dx|, |dy|) < CENTER_HALF_WIDTH from the image centre, else the dominant axis decides
# (|dx| >= |dy| → left/right, else top/bottom). Generated objects sit at most 3 px inward
# of their anchor along its axis and 6 px across it (the centre one ±4 px), and a shape's
# centroid is at most ~6 px from its box centre, so no object is near a boundary of this
# partition.
CENTER_HALF_WIDTH = 20.0
MIN_GAP = 4  # pixels between any two objects' masks (so masks never touch)
OUTLINE_FRACTION = 0.12  # outline width = max(2, round(0.12 × size)) pixels

# Default distributions of unstated attributes (probabilities). Position: uniform over
# the positions no other object of the scene takes; color/shape: uniform over the pairs
# allowed by the split; background: uniform.
DEFAULTS: dict[str, dict[str, float]] = {
    "size": {"small": 0.1, "medium": 0.8, "large": 0.1},
    "fill": {"solid": 1.0},
}

# Held-out split: (color, shape) pairs never drawn in the "train" split (one per colour,
# every shape at least once), for evaluation on unseen compositions. Common fixtures
# (red/blue circle/square, green triangle, yellow star) stay in training.
HELD_OUT_PAIRS = frozenset({
    ("red", "star"), ("orange", "square"), ("yellow", "ring"), ("green", "heart"),
    ("blue", "triangle"), ("purple", "circle"), ("white", "heart"), ("black", "square"),
})
SPLITS = ("train", "heldout", "all")


def heldout_specs() -> tuple["SceneSpec", ...]:
    """One-object prompts never seen in training: every held-out (color, shape) pair at
    every position (40 specs, fixed order), for evaluation on unseen compositions."""
    return tuple(SceneSpec((ObjectSpec(c, s, position=p),))
                 for c, s in sorted(HELD_OUT_PAIRS) for p in POSITIONS)


def position_of(x: float, y: float) -> str:
    """The position phrase of a point (pixels, x right, y down) in a 128×128 image."""
    dx, dy = x - IMAGE_SIZE / 2, y - IMAGE_SIZE / 2
    if max(abs(dx), abs(dy)) < CENTER_HALF_WIDTH:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def size_of(extent: float) -> str:
    """The size word of a bounding-box extent (pixels): thresholds halfway between ranges."""
    if extent < (SIZE_RANGE["small"][1] + SIZE_RANGE["medium"][0]) / 2:
        return "small"
    if extent > (SIZE_RANGE["medium"][1] + SIZE_RANGE["large"][0]) / 2:
        return "large"
    return "medium"


def _check(name: str, value, allowed: Iterable[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)} or None")


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; None = unstated (sampled from DEFAULTS).

    Raises:
      ValueError: a value outside the vocabulary, "medium"/"solid" (never stated), or an
        outlined ring (a ring is already an outline).
    """

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    fill: str | None = None

    def __post_init__(self):
        _check("color", self.color, COLORS)
        _check("shape", self.shape, SHAPES)
        _check("size", self.size, STATED_SIZES)
        _check("position", self.position, POSITIONS)
        _check("fill", self.fill, STATED_FILLS)
        if self.shape == "ring" and self.fill == "outlined":
            raise ValueError("an outlined ring is not part of the world (a ring is an outline)")

    @property
    def colour(self) -> str | None:
        return self.color

    def stated(self) -> frozenset[str]:
        """Names of the attributes this spec states."""
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A composition: 1–3 objects (distinct stated positions) and optionally the background.

    ``SceneSpec.of("red circle on the left", "blue square")`` parses short phrases.

    Raises:
      ValueError: 0 or more than 3 objects, two objects stating the same position, or an
        unknown background.
    """

    objects: tuple[ObjectSpec, ...]
    background: str | None = None

    def __post_init__(self):
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {len(objects)}")
        pos = [o.position for o in objects if o.position is not None]
        if len(set(pos)) != len(pos):
            raise ValueError(f"two objects state the same position: {pos}")
        _check("background", self.background, BACKGROUNDS)

    @staticmethod
    def of(*phrases: str, background: str | None = None) -> "SceneSpec":
        """Spec from object phrases, e.g. ``SceneSpec.of("red circle on the left")``."""
        from jattn.world.captions import parse_prompt

        objs = []
        for p in phrases:
            objs.extend(parse_prompt(p).objects)
        return SceneSpec(tuple(objs), background)
