"""The procedural world's generator: spec → image, caption and ground truth.

Deterministic from a seed, numpy only, ~1 ms a scene. Pixel (row i, column j) has its
centre at (x, y) = (j + 0.5, i + 0.5); masks are exact (no anti-aliasing), so a pixel's
colour always says which object it belongs to.

  scene = sample_scene(0)                                  # random composition, train split
  scene = render(SceneSpec.of("red circle on the left", "blue square"), seed=3)
  data = make_dataset(1000, seed=0)                        # numpy arrays for training
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jattn.world.captions import NUM_CAPTION_VARIANTS, caption_for
from jattn.world.spec import (
    ANCHORS, BACKGROUND_TONES, BACKGROUNDS, COLORS, DEFAULTS, FILLS, HELD_OUT_PAIRS, IMAGE_SIZE,
    MIN_GAP, OUTLINE_FRACTION, PALETTE, POSITIONS, SHADE, SHAPES, SIZE_RANGE, SIZES, SPLITS,
    STATED_FILLS, STATED_SIZES, ObjectSpec, SceneSpec,
)

_SQRT3_2 = np.sqrt(3.0) / 2
_STAR_INNER = 0.48  # inner / outer radius of the 5-point star
_RING_INNER = 0.5  # inner / outer radius of the ring
_HEART_W, _HEART_YMID = 2 * 1.13832, 0.12006  # extent of (x²+y²-1)³ - x²y³ <= 0
_OUTWARD = {"on the left": (-1.0, 0.0), "on the right": (1.0, 0.0), "at the top": (0.0, -1.0),
            "at the bottom": (0.0, 1.0), "in the center": (0.0, 0.0)}
_MARGIN = 2  # pixels kept free at the image border


# ----------------------------------------------------------------------------- geometry

def shape_mask(shape: str, cx: float, cy: float, size: float, xs: np.ndarray,
               ys: np.ndarray) -> np.ndarray:
    """Silhouette of a shape whose bounding box (extent ``size`` px) is centred at (cx, cy).

    Args:
      shape: one of SHAPES. All are upright (no rotation); the triangle points up.
      cx, cy, size: pixels.
      xs, ys: broadcastable float arrays of pixel-centre coordinates.

    Returns:
      bool array, True inside (ring: the annulus).

    Raises:
      ValueError: unknown shape.
    """
    r = size / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (_RING_INNER * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":
        h = size * _SQRT3_2
        t = (dy + h / 2) / h  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "star":
        outer = size / (2 * np.sin(np.deg2rad(72)))
        yc = cy + outer - outer * (1 + np.cos(np.deg2rad(36))) / 2  # bbox centred at cy
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, outer, _STAR_INNER * outer)
        px, py = cx + rad * np.cos(ang), yc + rad * np.sin(ang)
        return _in_polygon(px, py, xs, ys)
    if shape == "heart":
        a = size / _HEART_W
        X = dx / a
        Y = -(dy / a) + _HEART_YMID
        q = X * X + Y * Y - 1
        return q * q * q - X * X * Y * Y * Y <= 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _in_polygon(px, py, xs, ys) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over points."""
    inside = np.zeros(np.broadcast(xs, ys).shape, bool)
    n = len(px)
    for i in range(n):
        x0, y0, x1, y1 = px[i], py[i], px[(i + 1) % n], py[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        xi = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < xi)
    return inside


def erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary erosion with the 3×3 square, ``iterations`` times (outside counts as False)."""
    m = mask
    for _ in range(iterations):
        p = np.pad(m, 1)
        out = m.copy()
        for di in (0, 1, 2):
            for dj in (0, 1, 2):
                out &= p[di: di + m.shape[0], dj: dj + m.shape[1]]
        m = out
    return m


def outline_width(size: float) -> int:
    """Outline width (pixels) of an outlined object of bounding-box extent ``size``."""
    return max(2, int(round(OUTLINE_FRACTION * size)))


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class SceneObject:
    """Ground truth of one drawn object.

    Attributes:
      color, shape, size, position, fill: the drawn values (size "medium" / fill "solid"
        when drawn by default).
      stated: names of the attributes the caption states (subset of color, shape, size,
        position, fill).
      mask: bool (128, 128), the silhouette (outlined objects: including the unpainted
        interior; ring: the annulus).
      box: (x0, y0, x1, y1) pixels, x1/y1 exclusive: ``mask[y0:y1, x0:x1]`` holds the object.
      center: (x, y) of the bounding-box centre as placed, pixels.
      size_px: bounding-box extent as placed, pixels.
    """

    color: str
    shape: str
    size: str
    position: str
    fill: str
    stated: frozenset
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)
    box: tuple[int, int, int, int]
    center: tuple[float, float]
    size_px: float

    @property
    def colour(self) -> str:
        return self.color

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) mean of the mask's pixel centres."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One sample: image uint8 (128, 128, 3), caption, objects, background.

    ``spec`` is what the caption states (parse_prompt(caption) == spec); the objects hold
    what was drawn. ``background_stated`` says whether the caption names the background.
    """

    image: np.ndarray = dataclasses.field(repr=False)
    caption: str
    objects: tuple[SceneObject, ...]
    background: str
    background_stated: bool
    spec: SceneSpec
    variant: int


# ----------------------------------------------------------------------------- sampling

def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _pair_allowed(color: str, shape: str, split: str | None) -> bool:
    return split != "train" or (color, shape) not in HELD_OUT_PAIRS


def sample_spec(rng, split: str = "train") -> SceneSpec:
    """A random composition (what a caption states) from the world's caption distribution.

    1/2/3 objects with probability 0.4/0.35/0.25, distinct (color, shape) pairs, colour and
    shape always stated; size stated w.p. 0.4 (small/large), position w.p. 0.5 for one
    object and 0.85 each for several (distinct), fill w.p. 0.3, background w.p. 0.5.
    split "train" never uses HELD_OUT_PAIRS; "heldout" has at least one of them; "all" any.

    Raises:
      ValueError: unknown split.
    """
    _check_split(split)
    rng = _rng(rng)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    pairs: list[tuple[str, str]] = []
    if split == "heldout":
        held = sorted(HELD_OUT_PAIRS)
        pairs.append(held[rng.integers(len(held))])
    while len(pairs) < n:
        p = (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if p not in pairs and _pair_allowed(*p, split):
            pairs.append(p)
    order = rng.permutation(n)
    pairs = [pairs[i] for i in order]
    free = list(rng.permutation(len(POSITIONS)))
    p_pos = 0.5 if n == 1 else 0.85
    objs = []
    for color, shape in pairs:
        size = STATED_SIZES[rng.integers(2)] if rng.random() < 0.4 else None
        pos = POSITIONS[free.pop()] if rng.random() < p_pos else None
        fill = None
        if rng.random() < 0.3:
            fills = [f for f in STATED_FILLS if not (shape == "ring" and f == "outlined")]
            fill = fills[rng.integers(len(fills))]
        objs.append(ObjectSpec(color, shape, size, pos, fill))
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if rng.random() < 0.5 else None
    return SceneSpec(tuple(objs), bg)


def _sample_default(rng, name: str) -> str:
    dist = DEFAULTS[name]
    keys = list(dist)
    return keys[int(rng.choice(len(keys), p=np.array([dist[k] for k in keys])))]


def _resolve(spec: SceneSpec, rng, split: str | None):
    """Fill every unstated attribute from the default distributions."""
    taken = {(o.color, o.shape) for o in spec.objects if o.color and o.shape}
    used_pos = {o.position for o in spec.objects if o.position}
    free_pos = [p for p in POSITIONS if p not in used_pos]
    rng.shuffle(free_pos)
    out = []
    for o in spec.objects:
        color, shape = o.color, o.shape
        for _ in range(1000):
            c = color or COLORS[rng.integers(len(COLORS))]
            s = shape or SHAPES[rng.integers(len(SHAPES))]
            if (color and shape) or ((c, s) not in taken and _pair_allowed(c, s, split)):
                break
        else:
            raise ValueError(f"cannot draw an allowed (color, shape) for {o} in split {split!r}")
        taken.add((c, s))
        size = o.size or _sample_default(rng, "size")
        pos = o.position or free_pos.pop()
        fill = o.fill or _sample_default(rng, "fill")
        if s == "ring" and fill == "outlined":
            fill = "solid"
        lo, hi = SIZE_RANGE[size]
        out.append(dict(color=c, shape=s, size=size, position=pos, fill=fill,
                        size_px=float(rng.uniform(lo, hi)), stated=o.stated()))
    return out


def _window(cx, cy, size):
    half = size / 2 + 1
    x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)) + 1, IMAGE_SIZE)
    y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)) + 1, IMAGE_SIZE)
    return x0, y0, x1, y1


def _object_mask(shape, cx, cy, size):
    """(mask window, (x0, y0, x1, y1) window box) — tight box of the mask."""
    x0, y0, x1, y1 = _window(cx, cy, size)
    xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    m = shape_mask(shape, cx, cy, size, xs, ys)
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    m = m[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    return m, (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)


def _gap_ok(a, b) -> bool:
    """True when the masks are more than MIN_GAP pixels apart (Chebyshev distance)."""
    (ma, (ax0, ay0, ax1, ay1)), (mb, (bx0, by0, bx1, by1)) = a, b
    if bx0 - ax1 >= MIN_GAP or ax0 - bx1 >= MIN_GAP or by0 - ay1 >= MIN_GAP or ay0 - by1 >= MIN_GAP:
        return True
    ya, xa = np.nonzero(ma)
    yb, xb = np.nonzero(mb)
    xa, ya, xb, yb = xa + ax0, ya + ay0, xb + bx0, yb + by0
    g = MIN_GAP
    sa = (xa >= bx0 - g) & (xa < bx1 + g) & (ya >= by0 - g) & (ya < by1 + g)
    sb = (xb >= ax0 - g) & (xb < ax1 + g) & (yb >= ay0 - g) & (yb < ay1 + g)
    if not sa.any() or not sb.any():
        return True
    d = np.maximum(np.abs(xa[sa][:, None] - xb[sb][None, :]), np.abs(ya[sa][:, None] - yb[sb][None, :]))
    return int(d.min()) > g


def _in_bounds(box) -> bool:
    x0, y0, x1, y1 = box
    return x0 >= _MARGIN and y0 >= _MARGIN and x1 <= IMAGE_SIZE - _MARGIN and y1 <= IMAGE_SIZE - _MARGIN


def _place(objs, rng):
    """Centres: anchor + jitter (≤3 px inward, ≤5 px outward, ±6 px across; centre ±4),
    rejection-sampled until in bounds and MIN_GAP apart; fallback: no jitter, push the
    outer objects outward a pixel at a time."""
    def masks_at(centres):
        return [_object_mask(o["shape"], cx, cy, o["size_px"]) for o, (cx, cy) in zip(objs, centres)]

    def ok(ms):
        return all(_in_bounds(b) for _, b in ms) and all(
            _gap_ok(ms[i], ms[j]) for i in range(len(ms)) for j in range(i + 1, len(ms)))

    for _ in range(30):
        centres = []
        for o in objs:
            ax, ay = ANCHORS[o["position"]]
            ux, uy = _OUTWARD[o["position"]]
            if o["position"] == "in the center":
                jx, jy = rng.uniform(-4, 4, size=2)
            else:
                along, across = rng.uniform(-3, 5), rng.uniform(-6, 6)
                jx, jy = ux * along + uy * across, uy * along + ux * across
            centres.append((ax + jx, ay + jy))
        ms = masks_at(centres)
        if ok(ms):
            return centres, ms
    for push in range(0, 30):
        centres = [(ANCHORS[o["position"]][0] + push * _OUTWARD[o["position"]][0],
                    ANCHORS[o["position"]][1] + push * _OUTWARD[o["position"]][1]) for o in objs]
        ms = masks_at(centres)
        if ok(ms):
            return centres, ms
    raise RuntimeError(f"cannot place objects {objs} without overlap")


def _background(name: str) -> np.ndarray:
    a, b = (np.array(t, np.uint8) for t in BACKGROUND_TONES[name])
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[...] = a
    ii, jj = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    if name == "striped":
        img[(ii // 6) % 2 == 1] = b
    elif name == "checkered":
        img[(ii // 16 + jj // 16) % 2 == 1] = b
    return img


_BG_CACHE: dict[str, np.ndarray] = {}


def _paint(image, o, mask_win, box):
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    color, shade = np.array(PALETTE[o["color"]], np.uint8), np.array(SHADE[o["color"]], np.uint8)
    fill = o["fill"]
    if fill == "outlined":
        paint = mask_win & ~erode(mask_win, outline_width(o["size_px"]))
        region[paint] = color
        return
    region[mask_win] = color
    jj = np.arange(x0, x1)[None, :]
    ii = np.arange(y0, y1)[:, None]
    if fill == "striped":
        second = ((ii + jj) // 4) % 2 == 1
    elif fill == "dotted":
        second = ((ii % 8) - 3.5) ** 2 + ((jj % 8) - 3.5) ** 2 <= 2.6
    else:
        return
    region[mask_win & second] = shade


def render(spec: SceneSpec, seed=0, variant: int | None = None, split: str | None = None) -> Scene:
    """Draw a scene for ``spec``; unstated attributes are sampled from DEFAULTS.

    Args:
      spec: the composition; what it states is what the caption states.
      seed: int seed or ``np.random.Generator`` (jitter, sizes, unstated attributes).
      variant: caption variant in ``range(NUM_CAPTION_VARIANTS)``; None → sampled.
      split: restricts the (color, shape) pairs drawn for unstated colours/shapes
        ("train" avoids HELD_OUT_PAIRS); None → no restriction. Stated pairs are drawn as
        asked.

    Returns:
      Scene with image uint8 (128, 128, 3), caption, per-object ground truth.

    Raises:
      ValueError: unknown split or variant.
    """
    _check_split(split)
    rng = _rng(seed)
    objs = _resolve(spec, rng, split)
    if variant is None:
        variant = int(rng.integers(NUM_CAPTION_VARIANTS))
    background = spec.background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    centres, ms = _place(objs, rng)
    if background not in _BG_CACHE:
        _BG_CACHE[background] = _background(background)
    image = _BG_CACHE[background].copy()
    objects = []
    for o, (cx, cy), (mwin, box) in zip(objs, centres, ms):
        _paint(image, o, mwin, box)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        mask[box[1]: box[3], box[0]: box[2]] = mwin
        objects.append(SceneObject(
            color=o["color"], shape=o["shape"], size=o["size"], position=o["position"],
            fill=o["fill"], stated=o["stated"], mask=mask, box=tuple(int(v) for v in box),
            center=(float(cx), float(cy)), size_px=o["size_px"]))
    return Scene(image=image, caption=caption_for(spec, variant), objects=tuple(objects),
                 background=background, background_stated=spec.background is not None,
                 spec=spec, variant=int(variant))


def sample_scene(seed=0, spec: SceneSpec | None = None, split: str = "train") -> Scene:
    """A random scene: ``sample_spec`` (unless ``spec`` is given) then ``render``.

    Args:
      seed: int seed (or sequence of ints) or ``np.random.Generator``.
      spec: a fixed composition; None → sampled.
      split: "train" (no HELD_OUT_PAIRS anywhere), "heldout" (at least one), "all".

    Raises:
      ValueError: unknown split, or a given spec whose stated pairs violate the split.
    """
    _check_split(split)
    rng = _rng(seed)
    if spec is None:
        spec = sample_spec(rng, split)
    else:
        pairs = {(o.color, o.shape) for o in spec.objects}
        if split == "train" and pairs & HELD_OUT_PAIRS:
            raise ValueError(f"spec states held-out pairs {sorted(pairs & HELD_OUT_PAIRS)}; "
                             "use split='heldout' or 'all'")
    return render(spec, rng, split=split if split == "train" else None)


# ----------------------------------------------------------------------------- datasets

def make_dataset(n: int, seed: int = 0, split: str = "train", start: int = 0,
                 masks: bool = False) -> dict[str, np.ndarray]:
    """``n`` scenes as numpy arrays; sample i uses ``np.random.default_rng((seed, start + i))``
    so a dataset does not depend on how it is batched.

    Returns dict with (K = 3 object slots, -1 / False padding past ``num_objects``):
      images uint8 (n, 128, 128, 3); captions str (n,); num_objects int32 (n,);
      color, shape, size, position, fill int32 (n, K): indices into COLORS, SHAPES, SIZES,
      POSITIONS, FILLS; stated bool (n, K, 5) for (color, shape, size, position, fill);
      boxes int32 (n, K, 4) (x0, y0, x1, y1, exclusive); background int32 (n,) index into
      BACKGROUNDS; background_stated bool (n,); masks bool (n, K, 128, 128) if ``masks``.

    Raises:
      ValueError: unknown split.
    """
    _check_split(split)
    K = 3
    out = {
        "images": np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "captions": [],
        "num_objects": np.zeros(n, np.int32),
        **{k: np.full((n, K), -1, np.int32) for k in ("color", "shape", "size", "position", "fill")},
        "stated": np.zeros((n, K, 5), bool),
        "boxes": np.full((n, K, 4), -1, np.int32),
        "background": np.zeros(n, np.int32),
        "background_stated": np.zeros(n, bool),
    }
    if masks:
        out["masks"] = np.zeros((n, K, IMAGE_SIZE, IMAGE_SIZE), bool)
    vocab = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "fill": FILLS}
    attrs = ("color", "shape", "size", "position", "fill")
    for i in range(n):
        s = sample_scene(np.random.default_rng((seed, start + i)), split=split)
        out["images"][i] = s.image
        out["captions"].append(s.caption)
        out["num_objects"][i] = len(s.objects)
        out["background"][i] = BACKGROUNDS.index(s.background)
        out["background_stated"][i] = s.background_stated
        for k, o in enumerate(s.objects):
            for a_i, a in enumerate(attrs):
                out[a][i, k] = vocab[a].index(getattr(o, a))
                out["stated"][i, k, a_i] = a in o.stated
            out["boxes"][i, k] = o.box
            if masks:
                out["masks"][i, k] = o.mask
    out["captions"] = np.array(out["captions"], dtype=str)
    return out


def iter_batches(batch_size: int, seed: int = 0, split: str = "train", start: int = 0,
                 masks: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of :func:`make_dataset` (batch k = samples start + k·batch_size …)."""
    k = 0
    while True:
        yield make_dataset(batch_size, seed, split, start + k * batch_size, masks)
        k += 1
