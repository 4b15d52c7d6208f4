"""Object detector for the world, written from its definition (palette, shapes, positions).

It never sees the generator's masks: pixels are classified into the world's colours by
hue / saturation / value, each colour's pixels are split into connected components, and
each component's colour, shape, fill, size and position are read from its pixels:

1. colour: value < 0.33 → black; saturation < 0.2 and value > 0.74 → white;
   saturation > 0.45 → the palette colour of nearest hue; anything else is background
   (every background has saturation ≤ 0.25 and value 0.43–0.67). A colour's darker
   second tone (stripes, dots) has the same hue, so it joins the same class.
2. components: 8-connected, numpy only (min-label propagation with pointer jumping);
   components smaller than ``min_area`` pixels are dropped as noise.
3. silhouette: holes filled (after a 2×2 opening that drops noisy boundary spurs). The
   hole fraction tells solid (0) from ring (≈0.25) from outlined (≈0.15–0.6 by shape);
   the silhouette's fill of its box, solidity (area / convex-hull area),
   aspect, vertical centroid offset and compactness pick the nearest shape prototype
   (prototypes rasterised from ``scene.shape_mask`` at the world's sizes — the definition,
   not any generated scene).
4. fill: outlined from the prototype; otherwise from the second-tone pixels: under 8% →
   solid, else striped when they form long bands, dotted when small blobs.
5. size from the box extent, position from the centroid (``spec.position_of``).

The scene's background (:func:`classify_background`) is read from the pixels that are no
object colour and at least 4 px from any object pixel: their mean RGB and their pattern —
the mean over rows of the standard deviation along each row (``sx``) and the mean over
columns of the deviation along each column (``sy``) — go to the nearest background
prototype (``spec.BACKGROUND_TONES``: plain gray / light gray / beige differ in RGB;
striped, horizontal bands, has ``sy`` ≈ 15 and ``sx`` ≈ 0; checkered has both ≈ 20).

``score_image(image, spec)`` matches detections to the objects a prompt asked for and says
which stated attributes came out right (for scripts/eval_*.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from jattn.world.spec import (
    BACKGROUND_TONES, BACKGROUNDS, COLORS, PALETTE, SHADE, SHAPES, SceneSpec, position_of,
    size_of,
)

_BLACK_MAX_VALUE = 0.33
_WHITE_MAX_SAT, _WHITE_MIN_VALUE = 0.2, 0.74
_COLOR_MIN_SAT = 0.45
_SATURATED = [c for c in COLORS if c not in ("white", "black")]


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) RGB → (hue degrees [0, 360), saturation [0, 1], value [0, 1]) float32."""
    rgb = image.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    sat = np.where(mx > 0, d / np.maximum(mx, 1e-8), 0.0)
    dd = np.maximum(d, 1e-8)
    hue = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4))
    hue = np.where(d > 0, hue * 60.0, 0.0)
    return hue.astype(np.float32), sat.astype(np.float32), mx.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _palette_hues() -> np.ndarray:
    h, _, _ = rgb_to_hsv(np.array([PALETTE[c] for c in _SATURATED], np.uint8))
    return h


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour class: index into COLORS, or -1 for background.

    Args:
      image: uint8 (128, 128, 3) (any H, W works).

    Returns:
      int8 (H, W).
    """
    hue, sat, val = rgb_to_hsv(image)
    hues = _palette_hues()
    diff = np.abs(hue[..., None] - hues)
    diff = np.minimum(diff, 360.0 - diff)
    nearest = np.array([COLORS.index(c) for c in _SATURATED], np.int8)[diff.argmin(-1)]
    cls = np.full(hue.shape, -1, np.int8)
    cls = np.where((sat > _COLOR_MIN_SAT), nearest, cls)
    cls = np.where((sat < _WHITE_MAX_SAT) & (val > _WHITE_MIN_VALUE), COLORS.index("white"), cls)
    cls = np.where(val < _BLACK_MAX_VALUE, COLORS.index("black"), cls)
    return cls.astype(np.int8)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D bool mask, numpy only.

    Args:
      mask: bool (H, W).
      connectivity: 4 or 8.

    Returns:
      (labels int32 (H, W), 0 = background, components 1..n in raster order of their
      first pixel; n).

    Raises:
      ValueError: connectivity not 4 or 8.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    H, W = mask.shape
    if not mask.any():
        return np.zeros((H, W), np.int32), 0
    big = H * W
    idx = np.arange(H * W, dtype=np.int64).reshape(H, W)
    lab = np.where(mask, idx, big)
    shifts = [(1, 0), (0, 1)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    while True:
        new = lab.copy()
        for di, dj in shifts:
            # pairs (p, q) with q = p + (di, dj), both directions
            a = (slice(0, H - di), slice(max(0, -dj), W - max(0, dj)))
            b = (slice(di, H), slice(max(0, dj), W + min(0, dj)))
            m = lab[a[0], a[1]], lab[b[0], b[1]]
            both = mask[a[0], a[1]] & mask[b[0], b[1]]
            mn = np.where(both, np.minimum(m[0], m[1]), big)
            new[a[0], a[1]] = np.minimum(new[a[0], a[1]], mn)
            new[b[0], b[1]] = np.minimum(new[b[0], b[1]], mn)
        flat = new.ravel()
        fg = np.flatnonzero(flat < big)
        for _ in range(4):  # pointer jumping: a label is a pixel of the same component
            flat[fg] = flat[flat[fg]]
        new = flat.reshape(H, W)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inv = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((H, W), np.int32)
    out[mask] = inv.astype(np.int32) + 1
    return out, len(roots)


def open2x2(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with the 2×2 square: drops isolated pixels and 1-pixel spurs
    (noisy boundary pixels) and keeps every part at least 2 pixels thick (outlines)."""
    p = np.pad(mask, 1)
    er = p[:-1, :-1] & p[1:, :-1] & p[:-1, 1:] & p[1:, 1:]  # (H+1, W+1): 2x2 block at (i-1, j-1)
    return (er[:-1, :-1] | er[1:, :-1] | er[:-1, 1:] | er[1:, 1:]) & mask


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not connected (4-conn.) to the border set."""
    p = np.pad(mask, 1)
    lab, _ = label_components(~p, connectivity=4)
    outside = lab[0, 0]
    return (p | (lab != outside))[1:-1, 1:-1]


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of ``mask`` (monotone chain)."""
    rows = np.nonzero(mask.any(1))[0]
    pts = []
    for i in rows:
        cols = np.nonzero(mask[i])[0]
        l, r = cols[0], cols[-1] + 1
        pts += [(l, i), (l, i + 1), (r, i), (r, i + 1)]
    pts = sorted(set(pts))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


FEATURES = ("box_fill", "solidity", "aspect", "y_offset", "compactness", "hole_fraction")
# Scale of each feature in the prototype distance (roughly its spread across sizes).
_FEATURE_SCALE = np.array([0.04, 0.04, 0.06, 0.02, 0.04, 0.08])


def shape_features(component: np.ndarray) -> np.ndarray:
    """Features (FEATURES order) of one component (bool, tight or not) for shape matching.

    Computed on the silhouette (holes filled) except hole_fraction = holes / silhouette.
    """
    rows, cols = np.nonzero(component.any(1))[0], np.nonzero(component.any(0))[0]
    m = component[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    f = fill_holes(m)
    h, w = f.shape
    area = float(f.sum())
    ys, xs = np.nonzero(f)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    inertia = ((ys + 0.5 - cy) ** 2).sum() + ((xs + 0.5 - cx) ** 2).sum() + area / 6.0
    return np.array([
        area / (h * w),
        area / max(_hull_area(f), 1.0),
        w / h,
        (cy - h / 2) / h,
        area * area / (2 * np.pi * inertia),
        1.0 - m.sum() / area,
    ])


@functools.lru_cache(maxsize=None)
def _prototypes() -> tuple[tuple[tuple[str, bool], ...], np.ndarray]:
    """Mean features of every (shape, outlined) the world draws, from scene.shape_mask."""
    from jattn.world.scene import erode, outline_width, shape_mask

    keys, feats = [], []
    grid = np.arange(64, dtype=np.float64) + 0.5
    for shape in SHAPES:
        for outlined in ((False,) if shape == "ring" else (False, True)):
            fs = []
            for size in (18.0, 22.0, 27.0, 31.0, 36.0):
                for off in (0.0, 0.3):
                    m = shape_mask(shape, 32 + off, 32 + off / 2, size, grid[None, :], grid[:, None])
                    if outlined:
                        m = m & ~erode(m, outline_width(size))
                    fs.append(shape_features(open2x2(m)))
            keys.append((shape, outlined))
            feats.append(np.mean(fs, 0))
    return tuple(keys), np.array(feats)


def classify_shape(component: np.ndarray) -> tuple[str, bool, float]:
    """(shape, outlined, distance to the nearest prototype) of one component."""
    keys, protos = _prototypes()
    f = shape_features(component)
    d = np.sqrt((((protos - f) / _FEATURE_SCALE) ** 2).sum(-1))
    k = int(d.argmin())
    return keys[k][0], keys[k][1], float(d[k])


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
      color, shape, fill, size, position: words of the world ("solid"/"medium" included).
      mask: bool (128, 128) silhouette (holes of outlined objects filled; ring: annulus).
      box: (x0, y0, x1, y1) pixels, exclusive ends.
      centroid: (x, y) pixels, mean of the mask's pixel centres.
      area: mask pixels.
      shape_distance: distance to the nearest shape prototype (large = unsure).
    """

    color: str
    shape: str
    fill: str
    size: str
    position: str
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    shape_distance: float

    @property
    def colour(self) -> str:
        return self.color


def _fill_of(image_win: np.ndarray, painted: np.ndarray, color: str, outlined: bool) -> str:
    """Fill of a component.

    Outlined comes from the shape prototype. Otherwise look at the second-tone pixels
    (value past the midpoint of the colour's two tones) away from the boundary: fewer than
    8% → solid; else stripes are long bands and dots small blobs (12 px): striped when a
    second-tone pixel's 4-connected blob has 20 pixels or more on average.
    """
    if outlined:
        return "outlined"
    inner = _erode3(_erode3(painted))
    if inner.sum() < 24:
        inner = _erode3(painted) if _erode3(painted).sum() >= 12 else painted
    _, _, val = rgb_to_hsv(image_win)
    v1, v2 = max(PALETTE[color]) / 255.0, max(SHADE[color]) / 255.0
    mid = (v1 + v2) / 2
    tone = (val > mid if v2 > v1 else val < mid) & painted
    frac = float((tone & inner).sum()) / float(inner.sum())
    if frac < 0.08:
        return "solid"
    labels, n = label_components(tone, connectivity=4)
    sizes = np.bincount(labels[tone])
    blob = float((sizes[1:] ** 2).sum()) / max(float(sizes[1:].sum()), 1.0)
    return "striped" if blob >= 20 else "dotted"


def _erode3(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    out = m.copy()
    for di in range(3):
        for dj in range(3):
            out &= p[di: di + m.shape[0], dj: dj + m.shape[1]]
    return out


def detect(image: np.ndarray, min_area: int = 40) -> list[Detection]:
    """Find the world's objects in an image.

    Args:
      image: uint8 (128, 128, 3) RGB.
      min_area: components with fewer pixels are ignored (noise).

    Returns:
      detections sorted by centroid x then y.

    Raises:
      ValueError: image not uint8 (H, W, 3).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    cls = classify_pixels(image)
    out = []
    for ci, color in enumerate(COLORS):
        cmask = cls == ci
        if cmask.sum() < min_area:
            continue
        rows, cols = np.nonzero(cmask.any(1))[0], np.nonzero(cmask.any(0))[0]
        oy, ox = rows[0], cols[0]  # label only the colour's bounding window
        labels, n = label_components(cmask[oy: rows[-1] + 1, ox: cols[-1] + 1], 8)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if areas[k] < min_area:
                continue
            comp = labels == k
            rows, cols = np.nonzero(comp.any(1))[0], np.nonzero(comp.any(0))[0]
            win = comp[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
            y0, y1, x0, x1 = oy + rows[0], oy + rows[-1] + 1, ox + cols[0], ox + cols[-1] + 1
            core = open2x2(win)  # shape and fill from the component without boundary spurs
            if core.sum() < min_area // 2:
                core = win
            shape, outlined, dist = classify_shape(core)
            sil = win if shape == "ring" else fill_holes(win)
            mask = np.zeros(cls.shape, bool)
            mask[y0:y1, x0:x1] = sil
            ys, xs = np.nonzero(sil)
            cx, cy = float(xs.mean() + x0 + 0.5), float(ys.mean() + y0 + 0.5)
            out.append(Detection(
                color=color, shape=shape,
                fill=_fill_of(image[y0:y1, x0:x1], core, color, outlined),
                size=size_of(max(x1 - x0, y1 - y0)), position=position_of(cx, cy),
                mask=mask, box=(int(x0), int(y0), int(x1), int(y1)), centroid=(cx, cy),
                area=int(sil.sum()), shape_distance=dist))
    out.sort(key=lambda d: (d.centroid[0], d.centroid[1]))
    return out


BACKGROUND_FEATURES = ("r", "g", "b", "sx", "sy")
_BG_MARGIN = 3  # background pixels are at least this + 1 px from any object-coloured pixel
_BG_MIN_PIXELS = 200


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation with the (2r + 1)² square."""
    H, W = mask.shape
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for di in range(2 * r + 1):
        for dj in range(2 * r + 1):
            out |= p[di: di + H, dj: dj + W]
    return out


def _dir_std(v: np.ndarray, m: np.ndarray) -> float:
    """Mean over rows (with >= 8 masked pixels) of the std of ``v`` along the row, on ``m``."""
    cnt = m.sum(1)
    s1, s2 = (v * m).sum(1), (v * v * m).sum(1)
    ok = cnt >= 8
    if not ok.any():
        return 0.0
    var = s2[ok] / cnt[ok] - (s1[ok] / cnt[ok]) ** 2
    return float(np.sqrt(np.maximum(var, 0.0)).mean())


@functools.lru_cache(maxsize=None)
def _background_prototypes() -> np.ndarray:
    """(5 backgrounds, 5 features): the world's backgrounds' features (from their tones)."""
    from jattn.world.scene import _background

    return np.array([_bg_features(img, np.ones(img.shape[:2], bool))
                     for img in (_background(b) for b in BACKGROUNDS)])


def _bg_features(image: np.ndarray, bg: np.ndarray) -> np.ndarray:
    v = image.astype(np.float64).mean(-1)
    rgb = image[bg].astype(np.float64).mean(0)
    return np.array([*rgb, _dir_std(v, bg), _dir_std(v.T, bg.T)])


def background_features(image: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray | None:
    """Background features (BACKGROUND_FEATURES: mean R, G, B in 0..255; ``sx``, ``sy``:
    mean std of the gray value along rows / along columns) of an image, on the pixels of no
    object colour farther than 3 px from any object-coloured pixel (all non-object pixels
    when fewer than 200 remain).

    Args:
      image: uint8 (H, W, 3) RGB.
      cls: ``classify_pixels(image)`` when already computed.

    Returns:
      float64 (5,), or None when no pixel is background.
    """
    cls = classify_pixels(image) if cls is None else cls
    obj = cls >= 0
    bg = ~_dilate(obj, _BG_MARGIN)
    if bg.sum() < _BG_MIN_PIXELS:
        bg = ~obj
    if not bg.any():
        return None
    return _bg_features(image, bg)


def classify_background(image: np.ndarray, cls: np.ndarray | None = None) -> str | None:
    """The scene's background (one of ``spec.BACKGROUNDS``), or None when the image has no
    background pixel.

    Nearest prototype (Euclidean, features in 0..255 units) among the world's backgrounds:
    gray (128, 128, 128, sx 0, sy 0), light gray (170, …), beige (165, 150, 125, 0, 0),
    striped (≈130 gray, sx 0, sy 15), checkered (≈130 gray, sx 20, sy 20); prototypes are
    computed from ``spec.BACKGROUND_TONES`` with the renderer's patterns.

    Args:
      image: uint8 (H, W, 3) RGB.
      cls: ``classify_pixels(image)`` when already computed.

    Raises:
      ValueError: image not uint8 (H, W, 3).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    f = background_features(image, cls)
    if f is None:
        return None
    d = np.sqrt(((_background_prototypes() - f) ** 2).sum(-1))
    return BACKGROUNDS[int(d.argmin())]


_SCORED = ("color", "shape", "size", "position", "fill")


def score_image(image: np.ndarray, spec: SceneSpec, detections: list[Detection] | None = None,
                min_area: int = 40) -> dict:
    """How well an image shows what ``spec`` (e.g. ``parse_prompt(prompt)``) asks for.

    Detections are matched one-to-one to the spec's objects, maximising the number of
    stated attributes that agree (colour and shape first); each object then scores its
    stated attributes.

    Returns:
      dict with
        objects: per spec object {"found": bool, "color"/"shape"/"size"/"position"/"fill":
          True/False, or None when the spec leaves it unstated; "all": all stated correct},
          plus "detection": the matched Detection or None;
        count_ok: number of detections == number of objects;
        all_correct: every object found with all stated attributes right and count_ok;
        color_acc, shape_acc, position_acc: fraction of objects (stating it) right
          (None when no object states it);
        background: the detected background (:func:`classify_background`, always);
        background_ok: it equals the spec's background, None when the spec leaves the
          background unstated (not part of all_correct, which is about the objects);
        detections: all detections.
    """
    dets = detect(image, min_area) if detections is None else detections
    objs = spec.objects

    def agree(o, d):
        s = 0.0
        for a, w in (("color", 4.0), ("shape", 2.0), ("position", 1.0), ("size", 0.5), ("fill", 0.5)):
            v = getattr(o, a)
            if v is not None and getattr(d, a) == v:
                s += w
        return s

    best, best_score = None, -1.0
    slots = list(range(len(dets))) + [None] * len(objs)
    for perm in itertools.permutations(slots, len(objs)):
        sc = sum(agree(o, dets[p]) + 0.01 for o, p in zip(objs, perm) if p is not None)
        if sc > best_score:
            best, best_score = perm, sc
    per = []
    for o, p in zip(objs, best):
        d = dets[p] if p is not None else None
        r = {"found": d is not None, "detection": d}
        for a in _SCORED:
            v = getattr(o, a)
            r[a] = None if v is None else (d is not None and getattr(d, a) == v)
        r["all"] = d is not None and all(r[a] is not False for a in _SCORED)
        per.append(r)

    def acc(a):
        vals = [r[a] for r in per if r[a] is not None]
        return float(np.mean(vals)) if vals else None

    count_ok = len(dets) == len(objs)
    background = classify_background(image)
    return {
        "objects": per,
        "count_ok": count_ok,
        "all_correct": count_ok and all(r["all"] for r in per),
        "color_acc": acc("color"),
        "shape_acc": acc("shape"),
        "position_acc": acc("position"),
        "background": background,
        "background_ok": None if spec.background is None else background == spec.background,
        "detections": dets,
    }
