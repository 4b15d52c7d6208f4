"""Subjects of a prompt for the layout methods (Attend-and-Excite, layout guidance, Bounded
Attention): phrases → token positions, stop words, boxes.

A subject is a phrase of the prompt (``"red circle"``): a run of consecutive words of
``prompt.split()``; its tokens are its words' tokens (:func:`jattn.io.words.word_spans`),
without stop words (``"a"``, ``"and"`` …) unless the phrase is nothing else. Two subjects
may share a word ("a red circle and a blue circle": ``"red circle"`` and ``"blue circle"``
are the first and second occurrences). Boxes are ``(x0, y0, x1, y1)`` in pixels, or
fractions of the image when all four are ≤ 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jattn.io.words import word_spans

__all__ = ["STOP_WORDS", "phrase_tokens", "subject_tokens", "parse_box", "check_boxes",
           "token_table"]

STOP_WORDS = frozenset(
    "a an the and or of on in at to with by for from into onto over under above below "
    "beside near next its their his her is are this that these those some".split())


def _norm(w: str) -> str:
    return w.strip(".,;:!?\"'()").lower()


def phrase_tokens(tokenizer, prompt: str, phrase: str, arg: str = "phrase", *,
                  occurrence: int | None = None, drop_stop_words: bool = True) -> np.ndarray:
    """Token positions (BOS = 0) of ``phrase``'s words in ``prompt``.

    Args:
      phrase: one or more words (matched case-insensitively, attached punctuation ignored)
        that occur consecutively in the prompt.
      arg: the argument named in errors.
      occurrence: which occurrence (0-based) when the phrase occurs several times; None:
        every occurrence.
      drop_stop_words: leave out stop words (``a``, ``and``, …).
    Raises:
      ValueError: the phrase is empty, does not occur in the prompt, or is only stop words.
    """
    if not isinstance(phrase, str) or not phrase.split():
        raise ValueError(f"{arg}: empty phrase {phrase!r}; give words of the prompt")
    words = [_norm(w) for w in prompt.split()]
    want = [_norm(w) for w in phrase.split()]
    spans = word_spans(tokenizer, prompt)
    starts = [k for k in range(len(words) - len(want) + 1) if words[k:k + len(want)] == want]
    if not starts:
        raise ValueError(f"{arg}: {phrase!r} is not in the prompt {prompt!r}; use words of "
                         "the prompt, e.g. " + ", ".join(repr(w) for w in prompt.split()[:6]))
    if occurrence is not None:
        starts = [starts[min(occurrence, len(starts) - 1)]]
    keep = [j for j, w in enumerate(want) if w not in STOP_WORDS] if drop_stop_words \
        else list(range(len(want)))
    if not keep:
        raise ValueError(f"{arg}: {phrase!r} is only stop words ({', '.join(want)}); name the "
                         "object (a noun or adjective of the prompt)")
    out = [spans[s + j] for s in starts for j in keep]
    return np.unique(np.concatenate(out)).astype(np.int32)


def subject_tokens(tokenizer, prompt: str, phrases: Sequence[str], arg: str
                   ) -> list[np.ndarray]:
    """Token positions of each subject phrase; a phrase given twice takes successive
    occurrences in the prompt."""
    seen: dict[str, int] = {}
    out = []
    for ph in phrases:
        key = " ".join(_norm(w) for w in str(ph).split())
        occ = seen.get(key, 0)
        seen[key] = occ + 1
        out.append(phrase_tokens(tokenizer, prompt, ph, arg, occurrence=occ))
    return out


def token_table(token_lists: Sequence[Sequence[np.ndarray]], k_max: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt, per subject, padded token positions.

    Returns ``(tokens (B, N, k_max) int32, valid (B, N, k_max) bool, subject_valid (B, N))``
    with N = the most subjects of any prompt.
    """
    b = len(token_lists)
    n = max([len(t) for t in token_lists] + [1])
    tokens = np.zeros((b, n, k_max), np.int32)
    valid = np.zeros((b, n, k_max), bool)
    sub = np.zeros((b, n), bool)
    for i, subs in enumerate(token_lists):
        for j, toks in enumerate(subs):
            toks = np.asarray(toks, np.int32)[:k_max]
            tokens[i, j, :len(toks)] = toks
            valid[i, j, :len(toks)] = True
            sub[i, j] = len(toks) > 0
    return tokens, valid, sub


def parse_box(text: str, arg: str = "--box") -> tuple[str, tuple[float, float, float, float]]:
    """``"PHRASE=x0,y0,x1,y1"`` → ``(phrase, box)``."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"{arg}: {text!r} is not PHRASE=x0,y0,x1,y1 (e.g. "
                         "\"red circle=0,0,64,64\")")
    phrase, _, nums = text.rpartition("=")
    parts = nums.split(",")
    try:
        box = tuple(float(v) for v in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise ValueError(f"{arg}: {text!r}: the box must be four numbers x0,y0,x1,y1")
    if not phrase.strip():
        raise ValueError(f"{arg}: {text!r}: name the phrase before '='")
    return phrase.strip(), box  # type: ignore[return-value]


def check_boxes(boxes: Sequence[Sequence[float]], height: int, width: int, arg: str = "boxes",
                *, allow_overlap: bool = True) -> np.ndarray:
    """Validate boxes, return them as fractions ``(K, 4)`` float32 ``(x0, y0, x1, y1)``.

    Pixels, or fractions of the image when all four numbers are ≤ 1.
    Raises:
      ValueError: not four numbers, outside the image, x1 ≤ x0 or y1 ≤ y0, overlapping
        boxes where ``allow_overlap`` is False.
    """
    out = []
    for k, b in enumerate(boxes):
        try:
            x0, y0, x1, y1 = (float(v) for v in b)
        except (TypeError, ValueError):
            raise ValueError(f"{arg}[{k}]: {b!r} is not four numbers x0,y0,x1,y1") from None
        if not all(np.isfinite([x0, y0, x1, y1])):
            raise ValueError(f"{arg}[{k}]: {b!r} has a non-finite number")
        frac = max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0
        sx, sy = (1.0, 1.0) if frac else (float(width), float(height))
        if min(x0, y0, x1, y1) < 0 or x1 > sx or y1 > sy or x0 > sx or y0 > sy:
            raise ValueError(
                f"{arg}[{k}]: box {b!r} lies outside the {width}x{height} image (pixels "
                "0..width/height, or fractions 0..1 when all four are <= 1)")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{arg}[{k}]: box {b!r} needs x1 > x0 and y1 > y0")
        out.append((x0 / sx, y0 / sy, x1 / sx, y1 / sy))
    arr = np.asarray(out, np.float32).reshape(-1, 4)
    if not allow_overlap:
        for a in range(len(arr)):
            for c in range(a + 1, len(arr)):
                ix = min(arr[a, 2], arr[c, 2]) - max(arr[a, 0], arr[c, 0])
                iy = min(arr[a, 3], arr[c, 3]) - max(arr[a, 1], arr[c, 1])
                if ix > 1e-6 and iy > 1e-6:
                    raise ValueError(
                        f"{arg}: boxes {a} and {c} overlap; this method gives each pixel to "
                        "one subject (a subject's pixels may not attend to another's), so "
                        "boxes must be disjoint")
    return arr


def box_masks(boxes_frac: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(K, h, w)`` float32: 1 inside each box at an ``h × w`` grid (pixel centres)."""
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    m = np.zeros((len(boxes_frac), h, w), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes_frac):
        m[k] = ((ys[:, None] >= y0) & (ys[:, None] < y1) & (xs[None] >= x0)
                & (xs[None] < x1)).astype(np.float32)
    return m


def mid_and_first_up(sites):
    """``(mid-block sites, sites of the first up block among ``sites``)``, in site order: the
    attention that layout guidance and Bounded Attention guide on (the references' mid
    block + first up block with attention, SD's 8² and 16² layers). The rule is by block,
    not by path: on SDXL (first up block with attention ``up_blocks.0``, no attention-free
    first decoder block) it gives mid_block + up_blocks.0, SDXL's 32² layers at 1024 px
    (latent/4, as SD's 16²); Bounded Attention narrows it on SDXL
    (:func:`jattn.methods.bounded.loss_sites`)."""
    up = []
    for s in sites:
        if s.block == "up":
            blk = ".".join(s.path.split(".")[:2])
            if blk not in up:
                up.append(blk)
    first_up = [s for s in sites if up and s.path.startswith(up[0] + ".")]
    return [s for s in sites if s.block == "mid"], first_up
