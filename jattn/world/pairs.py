"""Personalisation pairs of the world: (subject image, target scene, caption with s*).

Training and evaluation data of the encoder-based personalisation methods (Nested
Attention and its baselines, :mod:`jattn.train.personalize`). A pair is

* a **subject image**: the subject object drawn alone, near the centre (±4 px) of a
  128×128 image on a background different from the target's — the same silhouette,
  bounding-box extent (pixels), colour and fill as in the target, re-painted at the new
  place (a "crop" of the object moved onto another background);
* a **target scene**: the subject at a position (one of the five, uniform; stated in the
  caption w.p. 0.85) on a background (stated w.p. 0.8), beside another object w.p. 0.5
  (colour and shape stated, its position stated when the subject's is);
* a **caption** naming the subject by the placeholder ``s*`` instead of its colour, shape,
  size and fill words, in every caption variant of the world (prefix, articles, joining,
  background phrasing), e.g. "a photo of s* on the left and a blue square on a beige
  background"; the subject comes first or second with equal probability.

Subject attributes: (colour, shape) uniform over the split's pairs; fill solid 0.4,
outlined 0.3, striped 0.15, dotted 0.15 (a ring is never outlined: solid instead); size
small 0.2, medium 0.6, large 0.2. (The bundled VAE renders striped and dotted as solid,
../shared/BUNDLED_LIMITS.md: measure them separately.)

Splits (subjects): the world's held-out (colour, shape) pairs (:data:`HELD_OUT_PAIRS`,
never drawn by the bundled model in training) are never used. Of the 40 remaining pairs,
:data:`HELDOUT_SUBJECT_PAIRS` (8: one per colour, every shape at least once; fixed by
:func:`heldout_subject_pairs` with seed 0) are held out with all their fills, so the
colour/shape/fill combinations of ``"heldout"`` subjects never occur in ``"train"`` —
neither as a subject nor as the other object of a target. ``"train"`` subjects come from
the other 32 pairs; other objects always come from those 32 pairs.

Everything is a pure function of ``(seed, index)``: pair i of ``make_pairs(n, seed,
split, start)`` is ``sample_pair((seed, split, start + i))`` whatever the batching.

  pair = sample_pair(0)                 # Pair: subject_image, target, caption, spec, …
  data = make_pairs(64, seed=0, split="heldout")   # numpy arrays
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jattn.world.captions import NUM_CAPTION_VARIANTS, decode_variant, object_phrase
from jattn.world.scene import (
    Scene, SceneObject, _background, _paint, _place,
)
from jattn.world.spec import (
    BACKGROUNDS, COLORS, FILLS, HELD_OUT_PAIRS, IMAGE_SIZE, POSITIONS, SHAPES, SIZE_RANGE,
    SIZES, ObjectSpec, SceneSpec,
)

__all__ = ["PLACEHOLDER", "PAIR_SPLITS", "HELDOUT_SUBJECT_PAIRS", "heldout_subject_pairs",
           "subject_pairs", "other_pairs", "Pair", "sample_pair", "make_pairs",
           "subject_phrase", "expand_placeholder"]

PLACEHOLDER = "s*"  # how captions (and users' prompts) write the subject
PAIR_SPLITS = ("train", "heldout")

SUBJECT_FILLS = {"solid": 0.4, "outlined": 0.3, "striped": 0.15, "dotted": 0.15}
SUBJECT_SIZES = {"small": 0.2, "medium": 0.6, "large": 0.2}
P_POSITION_STATED = 0.85
P_BACKGROUND_STATED = 0.8
P_OTHER_OBJECT = 0.5
SUBJECT_JITTER = 4.0  # px around the image centre


def heldout_subject_pairs(seed: int = 0) -> frozenset:
    """8 (colour, shape) pairs held out as subjects: one per colour, every shape at least
    once, none of the world's :data:`HELD_OUT_PAIRS`; a pure function of ``seed``."""
    rng = np.random.default_rng([seed, 1313])
    while True:
        shapes = (list(rng.permutation(len(SHAPES)))
                  + list(rng.choice(len(SHAPES), 2, replace=False)))
        order = rng.permutation(len(COLORS))
        pairs = {(COLORS[c], SHAPES[shapes[i]]) for i, c in enumerate(order)}
        if not pairs & HELD_OUT_PAIRS and len(pairs) == len(COLORS):
            return frozenset(pairs)


HELDOUT_SUBJECT_PAIRS = heldout_subject_pairs(0)


def _check_split(split: str) -> None:
    if split not in PAIR_SPLITS:
        raise ValueError(f"unknown pair split {split!r}; expected one of {PAIR_SPLITS}")


def subject_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs subjects of ``split`` are drawn from (sorted).

    Raises:
      ValueError: unknown split.
    """
    _check_split(split)
    if split == "heldout":
        return tuple(sorted(HELDOUT_SUBJECT_PAIRS))
    return other_pairs()


def other_pairs() -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs of training subjects and of every other object (sorted)."""
    return tuple(sorted((c, s) for c in COLORS for s in SHAPES
                        if (c, s) not in HELD_OUT_PAIRS and (c, s) not in HELDOUT_SUBJECT_PAIRS))


def subject_phrase(obj: ObjectSpec | SceneObject, articles: bool = True) -> str:
    """The words the placeholder stands for: ``[a] [size] colour [fill] shape`` (no
    position), e.g. "a large red outlined circle"; medium and solid are not written."""
    spec = ObjectSpec(obj.color, obj.shape, obj.size if obj.size in ("small", "large") else None,
                      None, obj.fill if obj.fill != "solid" else None)
    return object_phrase(spec, articles)


def expand_placeholder(caption: str, obj: ObjectSpec | SceneObject,
                       placeholder: str = PLACEHOLDER) -> str:
    """``caption`` with the placeholder replaced by the subject's words (with an article),
    e.g. for the detector's :func:`jattn.world.parse_prompt`."""
    return caption.replace(placeholder, subject_phrase(obj, articles=True))


@dataclasses.dataclass(frozen=True)
class Pair:
    """One personalisation sample.

    Attributes:
      subject_image: uint8 (128, 128, 3), the subject alone near the centre.
      subject_background: the subject image's background (never the target's).
      subject_box: (x0, y0, x1, y1) of the subject in ``subject_image`` (x1/y1 exclusive).
      subject_mask: bool (128, 128), its silhouette in ``subject_image``.
      target: the target :class:`Scene` (image, objects with masks, background); its
        ``caption`` is :attr:`caption`, its ``spec`` is :attr:`spec`.
      subject_index: index of the subject in ``target.objects``.
      caption: the caption with the placeholder, e.g. "s* on the left on a beige background".
      spec: what the caption states with the placeholder expanded to the subject's words
        (``parse_prompt(expand_placeholder(caption, subject)) == spec``).
      variant: the caption variant (:func:`jattn.world.captions.decode_variant`).
    """

    subject_image: np.ndarray = dataclasses.field(repr=False)
    subject_background: str
    subject_box: tuple[int, int, int, int]
    subject_mask: np.ndarray = dataclasses.field(repr=False, compare=False)
    target: Scene = dataclasses.field(repr=False)
    subject_index: int
    caption: str
    spec: SceneSpec
    variant: int

    @property
    def subject(self) -> SceneObject:
        """The subject as drawn in the target (colour, shape, size, fill, position, mask)."""
        return self.target.objects[self.subject_index]


def _pick(rng, dist: dict) -> str:
    keys = list(dist)
    return keys[int(rng.choice(len(keys), p=np.array([dist[k] for k in keys])))]


def _draw(objs: list[dict], background: str, rng) -> tuple[np.ndarray, list]:
    """Place (anchor + jitter, no overlap) and paint ``objs`` on ``background``; returns
    the image and ``(mask window, box, centre)`` per object."""
    centres, ms = _place(objs, rng)
    image = _background(background)
    for o, (mwin, box) in zip(objs, ms):
        _paint(image, o, mwin, box)
    return image, [(m, b, c) for (m, b), c in zip(ms, centres)]


def _full_mask(mwin, box) -> np.ndarray:
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[box[1]: box[3], box[0]: box[2]] = mwin
    return mask


def sample_pair(seed=0, split: str = "train", placeholder: str = PLACEHOLDER) -> Pair:
    """A random pair (see the module docstring for the distribution).

    Args:
      seed: int, sequence of ints or ``np.random.Generator``.
      split: ``"train"`` or ``"heldout"`` (subjects of :data:`HELDOUT_SUBJECT_PAIRS`).
      placeholder: the subject's word in the caption.
    Raises:
      ValueError: unknown split.
    """
    _check_split(split)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pairs = subject_pairs(split)
    color, shape = pairs[int(rng.integers(len(pairs)))]
    fill = _pick(rng, SUBJECT_FILLS)
    if shape == "ring" and fill == "outlined":
        fill = "solid"
    size = _pick(rng, SUBJECT_SIZES)
    size_px = float(rng.uniform(*SIZE_RANGE[size]))
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    pos_stated = rng.random() < P_POSITION_STATED
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_stated = rng.random() < P_BACKGROUND_STATED
    subj = dict(color=color, shape=shape, size=size, position=position, fill=fill,
                size_px=size_px)
    objs = [subj]
    if rng.random() < P_OTHER_OBJECT:
        others = [p for p in other_pairs() if p != (color, shape)]
        oc, osh = others[int(rng.integers(len(others)))]
        free = [p for p in POSITIONS if p != position]
        osize = _pick(rng, {"small": 0.1, "medium": 0.8, "large": 0.1})
        objs.append(dict(color=oc, shape=osh, size=osize,
                         position=free[int(rng.integers(len(free)))], fill="solid",
                         size_px=float(rng.uniform(*SIZE_RANGE[osize]))))
    subject_first = len(objs) == 1 or rng.random() < 0.5
    if not subject_first:
        objs = objs[::-1]
    s_idx = 0 if subject_first else 1
    variant = int(rng.integers(NUM_CAPTION_VARIANTS))
    image, placed = _draw(objs, background, rng)

    # object specs: what the caption states (subject: every attribute it shows)
    specs, stated_sets = [], []
    for i, o in enumerate(objs):
        pos = o["position"] if pos_stated else None
        if i == s_idx:
            sp = ObjectSpec(o["color"], o["shape"], o["size"] if o["size"] != "medium" else None,
                            pos, o["fill"] if o["fill"] != "solid" else None)
        else:
            sp = ObjectSpec(o["color"], o["shape"], None, pos, None)
        specs.append(sp)
        stated_sets.append(sp.stated())
    spec = SceneSpec(tuple(specs), background if bg_stated else None)
    prefix, articles, comma_join, bg_form = decode_variant(variant)
    phrases = []
    for i, sp in enumerate(specs):
        if i == s_idx:
            phrases.append(placeholder + (f" {sp.position}" if sp.position else ""))
        else:
            phrases.append(object_phrase(sp, articles))
    if len(phrases) > 2 and comma_join:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        body = " and ".join(phrases)
    caption = prefix + body + (bg_form.format(background) if bg_stated else "")

    objects = tuple(SceneObject(
        color=o["color"], shape=o["shape"], size=o["size"], position=o["position"],
        fill=o["fill"], stated=(frozenset({"color", "shape", "size", "fill"}) | (
            {"position"} if pos_stated else set())) if i == s_idx else stated_sets[i],
        mask=_full_mask(m, box), box=tuple(int(v) for v in box),
        center=(float(c[0]), float(c[1])), size_px=o["size_px"])
        for i, (o, (m, box, c)) in enumerate(zip(objs, placed)))
    target = Scene(image=image, caption=caption, objects=objects, background=background,
                   background_stated=bg_stated, spec=spec, variant=variant)

    # the subject image: the same silhouette re-painted near the centre of another background
    s_bg = [b for b in BACKGROUNDS if b != background][int(rng.integers(len(BACKGROUNDS) - 1))]
    mwin = placed[s_idx][0]  # exactly the target's silhouette
    h, w = mwin.shape
    jx, jy = rng.uniform(-SUBJECT_JITTER, SUBJECT_JITTER, size=2)
    x0 = int(round(IMAGE_SIZE / 2 + jx - w / 2))
    y0 = int(round(IMAGE_SIZE / 2 + jy - h / 2))
    sbox = (x0, y0, x0 + w, y0 + h)
    s_image = _background(s_bg)
    _paint(s_image, subj, mwin, sbox)
    return Pair(subject_image=s_image, subject_background=s_bg, subject_box=sbox,
                subject_mask=_full_mask(mwin, sbox), target=target, subject_index=s_idx,
                caption=caption, spec=spec, variant=variant)


_SPLIT_CODE = {"train": 0, "heldout": 1}


def make_pairs(n: int, seed: int = 0, split: str = "train", start: int = 0,
               placeholder: str = PLACEHOLDER) -> dict[str, np.ndarray]:
    """``n`` pairs as numpy arrays; pair i is ``sample_pair(default_rng((seed, split code,
    start + i)))``, independent of the batching.

    Returns dict:
      subject_images, target_images uint8 (n, 128, 128, 3); captions str (n,);
      subject_color, subject_shape, subject_size, subject_fill, subject_position int32
      (n,): indices into COLORS, SHAPES, SIZES, FILLS, POSITIONS (the subject as drawn in
      the target); position_stated, background_stated bool (n,); background,
      subject_background int32 (n,) into BACKGROUNDS; subject_index int32 (n,);
      num_objects int32 (n,); other_color, other_shape int32 (n,) (-1 without another
      object); target_boxes int32 (n, 2, 4) (-1 padding).
    Raises:
      ValueError: unknown split.
    """
    _check_split(split)
    out = {k: np.full(n, -1, np.int32) for k in (
        "subject_color", "subject_shape", "subject_size", "subject_fill", "subject_position",
        "background", "subject_background", "subject_index", "num_objects", "other_color",
        "other_shape")}
    out.update(subject_images=np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
               target_images=np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
               position_stated=np.zeros(n, bool), background_stated=np.zeros(n, bool),
               target_boxes=np.full((n, 2, 4), -1, np.int32))
    captions = []
    for i in range(n):
        p = sample_pair(np.random.default_rng((seed, _SPLIT_CODE[split], start + i)), split,
                        placeholder)
        s = p.subject
        out["subject_images"][i] = p.subject_image
        out["target_images"][i] = p.target.image
        captions.append(p.caption)
        out["subject_color"][i] = COLORS.index(s.color)
        out["subject_shape"][i] = SHAPES.index(s.shape)
        out["subject_size"][i] = SIZES.index(s.size)
        out["subject_fill"][i] = FILLS.index(s.fill)
        out["subject_position"][i] = POSITIONS.index(s.position)
        out["position_stated"][i] = "position" in s.stated
        out["background"][i] = BACKGROUNDS.index(p.target.background)
        out["background_stated"][i] = p.target.background_stated
        out["subject_background"][i] = BACKGROUNDS.index(p.subject_background)
        out["subject_index"][i] = p.subject_index
        out["num_objects"][i] = len(p.target.objects)
        for k, o in enumerate(p.target.objects):
            out["target_boxes"][i, k] = o.box
            if k != p.subject_index:
                out["other_color"][i] = COLORS.index(o.color)
                out["other_shape"][i] = SHAPES.index(o.shape)
    out["captions"] = np.array(captions, dtype=str)
    return out
