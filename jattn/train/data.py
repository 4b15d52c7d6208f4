"""Training data of the bundled model: world samples, VAE crops, the latent cache, batch order.

Every choice is a pure function of ``(seed, stage, index or step)``:

* sample ``i`` of a source is the same image and caption whoever renders it, in whatever
  chunk (``render``);
* the VAE crop batch of step ``s`` and the diffusion batch of step ``s`` depend on
  ``(seed, s)`` only (``vae_crop_batch``, ``epoch_batch_indices``),

so a run resumed from a checkpoint at step ``k`` sees exactly the batches an
uninterrupted run sees.

Images are uint8 ``(B, H, W, 3)`` (NHWC) in storage and float32 in [-1, 1] for the models.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["render", "vae_crop_batch", "epoch_batch_indices", "to_model_range",
           "EVAL_OFFSET", "SCALE_OFFSET"]

# Index offsets of image sets that must not overlap the training samples.
EVAL_OFFSET = 900_000_000  # VAE reconstruction PSNR
SCALE_OFFSET = 800_000_000  # latent std for scaling_factor (not used for training either)

_STAGE_VAE, _STAGE_DIFFUSION = 1, 2


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> float32 in [-1, 1]."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- sources
_TOY_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
               "yellow": (245, 230, 0)}


def _toy_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, str, tuple]:
    """A flat background and one axis-aligned square of a named colour (tests only)."""
    rng = np.random.default_rng([seed, 7, index])
    img = np.full((size, size, 3), int(rng.integers(100, 180)), np.uint8)
    name = list(_TOY_COLORS)[int(rng.integers(len(_TOY_COLORS)))]
    side = int(rng.integers(size // 4, size // 2))
    y, x = (int(v) for v in rng.integers(0, size - side, 2))
    img[y:y + side, x:x + side] = _TOY_COLORS[name]
    where = "on the left" if x + side / 2 < size / 2 else "on the right"
    return img, f"a {name} square {where}", (x, y, x + side, y + side)


def _render_toy(seed, start, count, size, split):
    out = [_toy_sample(seed, i, size) for i in range(start, start + count)]
    boxes = np.array([[o[2]] for o in out], np.int32)  # (n, 1, 4)
    return np.stack([o[0] for o in out]), [o[1] for o in out], boxes


def _render_world(seed, start, count, size, split):
    from jattn.world import make_dataset

    d = make_dataset(count, seed=seed, split=split, start=start)
    images, captions = np.asarray(d["images"], np.uint8), [str(c) for c in d["captions"]]
    if images.shape[1:] != (size, size, 3):
        raise ValueError(f"world images are {images.shape[1:]}, config says {size}x{size}x3")
    return images, list(captions), np.asarray(d["boxes"], np.int32)


_SOURCES = {"toy": _render_toy, "world": _render_world}


def render(source: str, seed: int, start: int, count: int, *, image_size: int,
           split: str = "train", boxes: bool = False):
    """Samples ``start .. start + count - 1`` of a source.

    Args:
      source: ``"world"`` (jattn.world) or ``"toy"`` (tests).
      seed: the data seed; sample i depends on ``(seed, i)`` only.
      start, count: the index range.
      image_size: H = W in pixels.
      split: world split (``"train"`` never draws the held-out colour/shape pairs).
      boxes: also return the objects' boxes.
    Returns:
      (uint8 images ``(count, H, W, 3)``, ``count`` captions) and with ``boxes`` int32
      ``(count, K, 4)`` object boxes ``(x0, y0, x1, y1)`` in pixels (exclusive ends), rows
      of -1 past the last object.
    Raises:
      ValueError: unknown source, or images of another size than ``image_size``.
    """
    if source not in _SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {sorted(_SOURCES)}")
    images, captions, obj_boxes = _SOURCES[source](seed, start, count, image_size, split)
    return (images, captions, obj_boxes) if boxes else (images, captions)


# ----------------------------------------------------------------------------- batches
def vae_crop_batch(source: str, seed: int, step: int, batch: int, crop: int, *,
                   image_size: int, object_prob: float = 0.0) -> np.ndarray:
    """Square crops for VAE step ``step``: float32 ``(B, crop, crop, 3)`` in [-1, 1], a
    function of ``(seed, step)`` only.

    Step s crops samples ``s*B .. s*B + B - 1`` of the source (split "all": the autoencoder
    may see every colour/shape pair); rendering is cheap (about 1 ms per world image), so
    the VAE never sees the same image twice. With probability ``object_prob`` a crop is
    centred (± crop/4) on one of the image's objects, else placed uniformly: objects cover
    a few percent of a world image, and uniform crops would spend most of the training on
    plain backgrounds.
    """
    images, _, boxes = render(source, seed, step * batch, batch, image_size=image_size,
                              split="all", boxes=True)
    rng = np.random.default_rng([seed, _STAGE_VAE, step])
    h, w = images.shape[1:3]
    ys = rng.integers(0, h - crop + 1, batch)
    xs = rng.integers(0, w - crop + 1, batch)
    use_obj = rng.random(batch) < object_prob
    pick = rng.random(batch)
    jitter = rng.integers(-(crop // 4), crop // 4 + 1, (batch, 2))
    for j in range(batch):
        valid = boxes[j][boxes[j, :, 0] >= 0]
        if use_obj[j] and len(valid):
            x0, y0, x1, y1 = valid[int(pick[j] * len(valid))]
            cx, cy = (x0 + x1) // 2 + jitter[j, 0], (y0 + y1) // 2 + jitter[j, 1]
            xs[j] = np.clip(cx - crop // 2, 0, w - crop)
            ys[j] = np.clip(cy - crop // 2, 0, h - crop)
    out = np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(images, ys, xs)])
    return to_model_range(out)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _STAGE_DIFFUSION, epoch]).permutation(n)


def epoch_batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Dataset indices of diffusion step ``step``: epochs are permutations of ``range(n)``
    drawn from ``(seed, epoch)``; step s takes positions ``s*B .. s*B + B - 1`` of their
    concatenation. int64 ``(B,)``."""
    pos = step * batch + np.arange(batch)
    epochs, within = pos // n, pos % n
    out = np.empty(batch, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(n, seed, int(e))[within[sel]]
    return out
