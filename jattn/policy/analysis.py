"""Pictures from captured attention: DAAM-style word heatmaps, self-attention PCA images,
colour overlays and labelled grids (NumPy + Pillow only, host side).

Input: the maps of :func:`jattn.policy.capture.captured_maps`, ``{key: (R, T, S)}`` float
arrays keyed ``"cross16x16"``, ``"self32x32"`` … (kind + query grid ``h x w``), each the
mean over the layers and heads of that resolution, averaged over the captured steps; R
rows (the conditional half, ``G·M`` images), T = h·w query tokens, S key tokens (77 text
tokens for cross-attention, T for self-attention).

Word heatmaps follow DAAM (Tang et al., "What the DAAM: Interpreting Stable Diffusion
Using Cross Attention", ACL 2023; castorini/daam ``trace.py`` ``compute_global_heat_map``,
``heatmap.py`` ``WordHeatMap.expand_as``, ``utils.py`` ``compute_token_merge_indices``):
every per-token map is upsampled bicubically (torch's ``F.interpolate(mode="bicubic")``
kernel, a = -0.75, half-pixel centres, edge clamping) to a common size, clamped at 0
("the clamping fixes undershoot"), averaged; the lowest resolution is skipped (DAAM skips
the 8² mid block of SD); a word's map is the mean of its sub-token maps; shown min-max
normalised. Differences from DAAM, because the capture already averages per resolution:
DAAM clamps and averages every (layer, head) map with equal weight, here each resolution's
layer/head mean is clamped and the resolutions are averaged with equal weight (or the
``weights`` given: pass each resolution's number of sites to weight layers equally as
DAAM does, which then differs only where bicubic undershoot was clamped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jattn.io.words import word_token_indices

__all__ = ["parse_key", "resize_bicubic", "cross_token_maps", "word_heatmaps",
           "token_heatmaps", "self_attention_pca", "colormap", "overlay", "grid"]

_KEY = re.compile(r"^(self|cross)(\d+)x(\d+)$")


def parse_key(key: str) -> tuple[str, tuple[int, int]] | None:
    """``"cross16x16"`` → ``("cross", (16, 16))``; None for keys that are not maps."""
    m = _KEY.match(key)
    if m is None:
        return None
    return m.group(1), (int(m.group(2)), int(m.group(3)))


# ------------------------------------------------------------------------ resampling


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractional
    positions ``t`` in [0, 1): ``(..., 4)``."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of 1-D bicubic resampling (torch semantics:
    ``align_corners=False``, source ``(dst + 0.5)·in/out − 0.5``, taps clamped to the
    edge)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    mat = np.zeros((n_out, n_in))
    for k in range(4):
        idx = np.clip(i0 - 1 + k, 0, n_in - 1)
        np.add.at(mat, (np.arange(n_out), idx), w[:, k])
    return mat


def resize_bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resampling of the last two axes, as torch's
    ``F.interpolate(x, size, mode="bicubic", align_corners=False)``.

    Args:
      x: float ``(..., h, w)``.
      size: ``(H, W)``.
    Returns:
      float32 ``(..., H, W)`` (may undershoot/overshoot the input range: clamp as needed).
    """
    x = np.asarray(x, np.float64)
    h, w = x.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return x.astype(np.float32)
    ry, rx = _bicubic_matrix(h, H), _bicubic_matrix(w, W)
    return np.einsum("Yh,...hw,Xw->...YX", ry, x, rx).astype(np.float32)


# ------------------------------------------------------------------------ word heatmaps


def _cross_entries(maps: Mapping[str, np.ndarray], resolutions, skip_lowest: bool):
    entries = {}
    for key, arr in maps.items():
        parsed = parse_key(key)
        if parsed is not None and parsed[0] == "cross":
            entries[parsed[1]] = (key, np.asarray(arr))
    if not entries:
        raise ValueError(f"no cross-attention maps among the keys {sorted(maps)}; capture "
                         "cross-attention (e.g. p2p_policy(capture=True) or a Capture op at "
                         "kind='cross' sites)")
    if resolutions is not None:
        want = [(r, r) if isinstance(r, (int, np.integer)) else tuple(r) for r in resolutions]
        missing = [r for r in want if r not in entries]
        if missing:
            raise ValueError(f"resolutions {missing} were not captured; captured: "
                             f"{sorted(entries)}")
        return [entries[r] for r in want]
    chosen = sorted(entries, key=lambda r: r[0] * r[1])
    if skip_lowest and len(chosen) > 1:
        chosen = chosen[1:]
    return [entries[r] for r in chosen]


def cross_token_maps(maps: Mapping[str, np.ndarray], *, row: int = 0,
                     size: tuple[int, int] | None = None,
                     resolutions: Sequence | None = None, skip_lowest: bool = True,
                     weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Per-token cross-attention maps of one image, DAAM-aggregated over resolutions.

    Args:
      maps: ``{key: (R, T, S)}`` from ``captured_maps``; self-attention keys are ignored.
      row: which of the R images (group-major ``g·M + m``).
      size: ``(H, W)`` output size in pixels (e.g. the image size); default the largest
        selected query grid.
      resolutions: query grids to use (ints or ``(h, w)``); default every captured
        cross resolution but the lowest (``skip_lowest``; DAAM skips SD's 8²).
      weights: optional ``{key: weight}`` for the average over resolutions (default equal).
    Returns:
      float32 ``(S, H, W)``: bicubic upsampling of each resolution's map, clamped ≥ 0,
      weighted mean over resolutions. Not normalised.
    Raises:
      ValueError: no cross maps, a requested resolution not captured, row out of range.
    """
    chosen = _cross_entries(maps, resolutions, skip_lowest)
    if size is None:
        grid_hw = max((parse_key(k)[1] for k, _ in chosen), key=lambda r: r[0] * r[1])
        size = grid_hw
    total, wsum = 0.0, 0.0
    for key, arr in chosen:
        if arr.ndim != 3:
            raise ValueError(f"maps[{key!r}] has shape {arr.shape}; expected (R, T, S)")
        if not -arr.shape[0] <= row < arr.shape[0]:
            raise ValueError(f"row {row} out of range for maps[{key!r}] with {arr.shape[0]} rows")
        h, w = parse_key(key)[1]
        per_token = arr[row].T.reshape(arr.shape[2], h, w)  # (S, h, w)
        up = np.maximum(resize_bicubic(per_token, size), 0.0)
        wt = 1.0 if weights is None else float(weights.get(key, 0.0))
        total = total + wt * up
        wsum += wt
    if wsum <= 0:
        raise ValueError(f"weights {dict(weights or {})} give no weight to the selected maps "
                         f"{[k for k, _ in chosen]}")
    return (total / wsum).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (DAAM ``expand_as``: ``(x − min) / (max − min + 1e-8)``)."""
    return ((x - x.min()) / (x.max() - x.min() + 1e-8)).astype(np.float32)


def word_heatmaps(maps: Mapping[str, np.ndarray], tokenizer, prompt: str,
                  words: str | Sequence[str | int], *, row: int = 0,
                  size: tuple[int, int] | None = None, resolutions: Sequence | None = None,
                  skip_lowest: bool = True, weights: Mapping[str, float] | None = None,
                  normalize: bool = True) -> dict:
    """DAAM word heatmaps: the mean of each word's sub-token maps.

    Args:
      maps, row, size, resolutions, skip_lowest, weights: see :func:`cross_token_maps`.
      tokenizer: the pipeline's CLIP tokenizer.
      prompt: the prompt of image ``row``.
      words: words of ``prompt`` (exact match of ``prompt.split()`` items, every occurrence)
        or word indices; see :func:`jattn.io.words.word_token_indices`.
      normalize: min-max normalise each word map to [0, 1].
    Returns:
      ``{word: float32 (H, W)}`` in the order given.
    Raises:
      ValueError: a word not in the prompt (names the prompt's words), bad maps/row.
    """
    words = [words] if isinstance(words, str) else list(words)
    per_token = cross_token_maps(maps, row=row, size=size, resolutions=resolutions,
                                 skip_lowest=skip_lowest, weights=weights)
    out = {}
    for word in words:
        idx = word_token_indices(tokenizer, prompt, word, max_len=per_token.shape[0])
        if len(idx) == 0:
            raise ValueError(f"word {word!r} is not a word of prompt {prompt!r} (words: "
                             f"{prompt.split()}); words match exactly")
        m = per_token[idx].mean(0)
        out[word] = _normalise(m) if normalize else m
    return out


def token_heatmaps(maps: Mapping[str, np.ndarray], tokenizer, prompt: str, *, row: int = 0,
                   size: tuple[int, int] | None = None, resolutions: Sequence | None = None,
                   skip_lowest: bool = True, weights: Mapping[str, float] | None = None,
                   normalize: bool = True, include_special: bool = False) -> list:
    """A heatmap for every token of ``prompt`` (BPE pieces, ``</w>`` stripped).

    Args: see :func:`word_heatmaps`; ``include_special`` adds BOS (position 0) and EOS.
    Returns:
      ``[(token_text, float32 (H, W)), …]`` in token order (positions 1…n, BOS = 0).
    Raises:
      ValueError: the prompt has more tokens than the maps' S; bad maps/row.
    """
    per_token = cross_token_maps(maps, row=row, size=size, resolutions=resolutions,
                                 skip_lowest=skip_lowest, weights=weights)
    ids = list(tokenizer(prompt, padding=False, truncation=False)["input_ids"])
    if len(ids) > per_token.shape[0]:
        raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens (BOS/EOS included), more "
                         f"than the {per_token.shape[0]} keys of the maps")
    positions = range(len(ids)) if include_special else range(1, len(ids) - 1)
    pieces = tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
    out = []
    for p, piece in zip(positions, pieces):
        m = per_token[p]
        text = piece[:-4] if piece.endswith("</w>") else piece
        out.append((text, _normalise(m) if normalize else m))
    return out


# ------------------------------------------------------------------------ self-attention PCA


def self_attention_pca(self_map: np.ndarray, *, grid_hw: tuple[int, int] | None = None,
                       size: tuple[int, int] | None = None) -> np.ndarray:
    """The self-attention "PCA picture": each query pixel's attention row projected on the
    top-3 principal components, shown as RGB (the visualisation of P2P's and
    Plug-and-Play's papers).

    Args:
      self_map: float ``(T, T)`` self-attention of one image (e.g.
        ``captured_maps(acc)["self16x16"][row]``).
      grid_hw: ``(h, w)`` with ``h·w = T`` (default square).
      size: output ``(H, W)`` (nearest upsampling, so each latent cell is a flat block);
        default ``(h, w)``.
    Returns:
      uint8 ``(H, W, 3)``: components 1–3 → R, G, B, each shifted to start at 0 and all
      scaled by the first component's range (so R spans 0..255 and weaker components are
      dimmer, never stretched noise); the sign of each component is fixed (largest
      loading positive), so equal maps give equal pictures.
    Raises:
      ValueError: not a square ``(T, T)`` array, or T not ``h·w``.
    """
    a = np.asarray(self_map, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"self_map must be (T, T), got {a.shape}")
    t = a.shape[0]
    if grid_hw is None:
        side = int(round(np.sqrt(t)))
        grid_hw = (side, side)
    h, w = grid_hw
    if h * w != t:
        raise ValueError(f"grid_hw {grid_hw} does not hold T={t} query tokens")
    x = a - a.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    proj = x @ comps.T  # (T, k)
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    # one scale for all channels: a component with little variance stays dark instead of
    # stretching noise over the full range
    lo = proj.min(0)
    span = float((proj.max(0) - lo).max())
    rgb = (proj - lo) / (span if span > 0 else 1.0)
    img = np.round(rgb.reshape(h, w, 3) * 255).astype(np.uint8)
    if size is not None and tuple(size) != (h, w):
        H, W = size
        img = img[(np.arange(H) * h) // H][:, (np.arange(W) * w) // W]
    return img


# ------------------------------------------------------------------------ colour


# viridis sampled at 0, 1/8, …, 1 (sRGB), linearly interpolated in between
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 82, 139], [44, 113, 142],
                     [33, 145, 140], [39, 173, 129], [92, 200, 99], [170, 220, 50],
                     [253, 231, 37]], np.float64)


def _lut(name: str) -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        # piecewise-linear jet: dark blue → blue → cyan → yellow → red → dark red
        rgb = np.stack([np.clip(1.5 - np.abs(4 * x - 3), 0, 1),
                        np.clip(1.5 - np.abs(4 * x - 2), 0, 1),
                        np.clip(1.5 - np.abs(4 * x - 1), 0, 1)], axis=-1) * 255
    elif name == "viridis":
        pos = np.linspace(0.0, 1.0, len(_VIRIDIS))
        rgb = np.stack([np.interp(x, pos, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    elif name == "gray":
        rgb = np.repeat(x[:, None] * 255, 3, axis=1)
    else:
        raise ValueError(f"colormap {name!r}: choose 'jet', 'viridis' or 'gray'")
    return np.round(rgb).astype(np.uint8)


_LUTS: dict[str, np.ndarray] = {}


def colormap(x: np.ndarray, name: str = "jet") -> np.ndarray:
    """Map values in [0, 1] (clipped) to colours: float ``(...)`` → uint8 ``(..., 3)``.

    ``name``: ``"jet"`` (DAAM's), ``"viridis"`` or ``"gray"``. NaN maps to 0.
    """
    if name not in _LUTS:
        _LUTS[name] = _lut(name)
    x = np.nan_to_num(np.asarray(x, np.float64), nan=0.0)
    idx = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.int64)
    return _LUTS[name][idx]


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4); got {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    return a


def overlay(image, heatmap: np.ndarray, alpha: float = 0.5, *, cmap: str = "jet",
            normalize: bool = False) -> np.ndarray:
    """Blend a coloured heatmap over an image.

    Args:
      image: uint8 ``(H, W, 3)`` (or PIL image, or float in [0, 1]).
      heatmap: float ``(h, w)`` in [0, 1]; resized bicubically to ``(H, W)`` when the sizes
        differ, then clipped to [0, 1].
      alpha: weight of the colour (0 = image only, 1 = heatmap only).
      cmap: see :func:`colormap`.
      normalize: min-max normalise the heatmap first.
    Returns:
      uint8 ``(H, W, 3)``: ``round((1 − alpha)·image + alpha·colormap(heatmap))``.
    Raises:
      ValueError: alpha outside [0, 1], bad shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    img = _as_rgb(image)
    hm = np.asarray(heatmap, np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got {hm.shape}")
    if hm.shape != img.shape[:2]:
        hm = resize_bicubic(hm, img.shape[:2])
    if normalize:
        hm = _normalise(hm)
    color = colormap(np.clip(hm, 0.0, 1.0), cmap).astype(np.float64)
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * color
    return np.round(out).astype(np.uint8)


def grid(images: Sequence, rows: int, cols: int, labels: Sequence[str] | None = None, *,
         pad: int = 2, background: int = 255) -> Image.Image:
    """Tile images into a ``rows × cols`` grid, optionally labelled below each cell.

    Args:
      images: uint8 ``(H, W, 3)`` / ``(H, W)`` arrays, float arrays in [0, 1], or PIL
        images; cells are the largest height × width, smaller images sit top-left.
      labels: one text per image (PIL's default font), drawn in a band under each cell,
        wrapped at spaces to the cell's width.
      pad: pixels between cells; background: grey level of the canvas.
    Returns:
      an RGB ``PIL.Image``.
    Raises:
      ValueError: more images than cells, label count differs from image count, no images.
    """
    arrays = [_as_rgb(im) for im in images]
    if not arrays:
        raise ValueError("grid: no images")
    if rows < 1 or cols < 1 or len(arrays) > rows * cols:
        raise ValueError(f"grid: {len(arrays)} images do not fit {rows}x{cols} cells")
    if labels is not None and len(labels) != len(arrays):
        raise ValueError(f"grid: {len(labels)} labels for {len(arrays)} images")
    ch = max(a.shape[0] for a in arrays)
    cw = max(a.shape[1] for a in arrays)
    font = ImageFont.load_default()
    band = 0
    wrapped: list[str] = []
    if labels is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        wrapped = [_wrap_label(probe, str(t), font, cw - 2) for t in labels]
        band = max(probe.multiline_textbbox((0, 0), t or " ", font=font)[3] for t in wrapped) + 4
    cell_h = ch + band
    canvas = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad),
                       (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if background >= 128 else (255, 255, 255)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cw + pad), pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(a), (x0, y0))
        if labels is not None:
            draw.multiline_text((x0 + 1, y0 + ch + 2), wrapped[i], fill=ink, font=font)
    return canvas


def _wrap_label(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a single word
    wider than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)
