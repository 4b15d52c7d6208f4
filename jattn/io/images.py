"""Image files in and out (pillow): loading real photos for inversion, saving PNGs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

__all__ = ["load_image", "save_images", "psnr", "as_uint8_images"]


CROP_WARN = 0.10  # warn when the centre crop drops more than this fraction of the image


def load_image(path: str | Path, size: int | tuple[int, int], *, arg: str = "image"
               ) -> np.ndarray:
    """Load an image as uint8 ``(H, W, 3)``: RGB, centre-cropped to the target aspect,
    resized (Lanczos).

    Args:
      path: any format pillow reads.
      size: output ``(height, width)`` in pixels (an int for square).
      arg: the argument name used in messages (e.g. ``"--image"``).
    Raises:
      FileNotFoundError: no such file (names it).
      ValueError: a folder, or a file pillow cannot read as an image (names it).
    Warns:
      UserWarning: when the centre crop drops more than 10 % of the image (e.g. a
        6000×1500 panorama made square keeps its middle quarter).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{arg}={str(path)!r} is a folder; give an image file (PNG, JPEG, …).")
    if p.exists() and not p.is_file():
        raise ValueError(f"{arg}={str(path)!r} is not a regular file (a device or pipe); give "
                         "an image file (PNG, JPEG, …).")
    if not p.is_file():
        raise FileNotFoundError(f"{arg}={str(path)!r}: no such file")
    h, w = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(p) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{arg}={str(path)!r}: not a readable image ({e}); give a PNG or "
                         "JPEG file.") from None
    iw, ih = img.size
    target = w / h
    if iw / ih > target:  # too wide: crop width
        nw = int(round(ih * target))
        left = (iw - nw) // 2
        box, kept = (left, 0, left + nw, ih), nw / iw
    else:
        nh = int(round(iw / target))
        top = (ih - nh) // 2
        box, kept = (0, top, iw, top + nh), nh / ih
    if 1.0 - kept > CROP_WARN:
        warnings.warn(f"{arg}={str(path)!r} is {iw}×{ih}; it is centre-cropped to "
                      f"{box[2] - box[0]}×{box[3] - box[1]} ({100 * (1 - kept):.0f} % cut) and "
                      f"resized to {w}×{h}. Crop it yourself to keep another part.",
                      stacklevel=2)
    img = img.crop(box)
    return np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), np.uint8)


def as_uint8_images(images, name: str = "images") -> np.ndarray:
    """Check images for the VAE: ``(B, H, W, 3)`` with values 0..255 (uint8, or an int or
    float array of whole-range values), returned as uint8.

    Raises:
      ValueError: wrong shape; a float array in [0, 1] (ambiguous: scale it to 0..255);
        values outside 0..255 or not finite.
    """
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: shape {a.shape}, expected (B, H, W, 3) RGB uint8.")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "uif":
        raise ValueError(f"{name}: dtype {a.dtype}; expected uint8 values 0..255.")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: NaN/inf values; expected uint8 values 0..255.")
        if a.size and a.min() >= 0 and a.max() <= 1.0:
            raise ValueError(f"{name}: a float array with values in [0, 1]; jattn takes uint8 "
                             "0..255: pass (x * 255).round().astype(np.uint8).")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"{name}: values in [{a.min()}, {a.max()}]; expected 0..255.")
    return np.round(a).astype(np.uint8)


def save_images(images: np.ndarray, out_dir: str | Path, start: int = 0) -> list[Path]:
    """Write uint8 ``(B, H, W, 3)`` images as ``out_dir/000.png, 001.png, …``."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out_dir / f"{start + i:03d}.png"
        Image.fromarray(np.asarray(img, np.uint8)).save(p)
        paths.append(p)
    return paths


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (peak 255)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
