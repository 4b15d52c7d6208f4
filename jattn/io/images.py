"""Image files in and out (pillow): loading real photos for inversion, saving PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["load_image", "save_images", "psnr"]


def load_image(path: str | Path, size: int | tuple[int, int]) -> np.ndarray:
    """Load an image as uint8 ``(H, W, 3)``: RGB, centre-cropped to square aspect, resized.

    Args:
      path: any format pillow reads.
      size: output ``(height, width)`` in pixels (an int for square).
    Raises:
      FileNotFoundError: no such file (names it).
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image={str(path)!r}: no such file")
    h, w = (size, size) if isinstance(size, int) else size
    img = Image.open(p).convert("RGB")
    iw, ih = img.size
    target = w / h
    if iw / ih > target:  # too wide: crop width
        nw = int(round(ih * target))
        left = (iw - nw) // 2
        img = img.crop((left, 0, left + nw, ih))
    else:
        nh = int(round(iw / target))
        top = (ih - nh) // 2
        img = img.crop((0, top, iw, top + nh))
    return np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), np.uint8)


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
