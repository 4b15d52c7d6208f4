"""Prompt-to-Prompt, the prompt side: token positions, token mappers, equalizers, windows.

Source: Hertz et al., "Prompt-to-Prompt Image Editing with Cross-Attention Control",
ICLR 2023; reference google/prompt-to-prompt@9c472e4, ``seq_aligner.py``
(``get_replacement_mapper``, ``get_refinement_mapper``, ``global_align``) and
``ptp_utils.py`` (``get_word_inds``, ``get_time_words_attention_alpha``), plus the
notebooks' ``get_equalizer`` and ``AttentionControlEdit.num_self_replace``.

Everything here is host-side NumPy, run once before ``jit``: the outputs are small arrays
that become dynamic leaves of a P2P attention policy, so editing a prompt pair or a window
changes array values only and never recompiles.

Token positions count BOS as position 0 (the index into the S axis of cross-attention
maps, S = ``max_len`` = 77 for SD's text encoders). The first prompt of a P2P batch is the
*source*; the others are *targets*. Word swap re-routes the source's cross maps to the
target's token positions with a mapper M of shape (S, S):
``edited[..., n] = sum_w source[..., w] * M[w, n]`` (reference einsum
``'hpw,bwn->bhpn'``). Refinement gathers ``source[..., mapper]`` and blends with the
target's own maps by ``alphas`` (0 for tokens with no source).

Words and their token positions come from :mod:`jattn.io.words` (``word_token_indices``
is re-exported here): a prompt's words are ``prompt.split()``, a word matches exactly
(case and attached punctuation count), every occurrence.

Reference quirks (``reference_quirks=True`` reproduces them; default off):

* ``get_word_inds``' word splitting and token assignment (see :mod:`jattn.io.words`).
* ``get_replacement_mapper_`` maps the tokens *after the last swapped word* by
  ``M[j, j] = 1`` (target position to the same source position) instead of following
  the alignment ``M[i, j] = 1``. When the swapped words have different token counts
  (``"cat"`` → ``"hedgehogs"``: 1 → 2 tokens) every later token, EOS and the padding
  read the source's neighbour token (off by the count difference). With equal token
  counts both agree.

Not quirks, reproduced always: a swapped word of ``a`` source tokens and ``b ≠ a``
target tokens links every source token to every target token with weight ``1/b`` (so a
1 → 2 swap halves the map, a 2 → 1 swap sums the two source columns); the refinement
mapper holds ``-1`` for target tokens with no source token (alpha 0 there; NumPy/JAX
``x[..., mapper]`` indexing wraps it to position S-1, a padding column, multiplied by 0 —
gather with wrap-around or clipping, never with a NaN fill) and maps padding
positions ``n >= len(target tokens)`` to ``n`` itself; cross windows use
``int(b * (num_steps + 1))`` while the self window uses ``int(b * num_steps)``.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import numpy as np

from jattn.io.words import (is_index, prompt_ids, prompt_words, reference_word_inds,
                            word_spans, word_token_indices)

__all__ = [
    "word_token_indices",
    "replacement_mapper",
    "replacement_mappers",
    "refinement_mapper",
    "refinement_mappers",
    "equalizer",
    "cross_replace_alphas",
    "self_replace_window",
    "DEFAULT_KEY",
]

MAX_LEN = 77
DEFAULT_KEY = "default_"  # the reference's key for the window of all tokens

# Global alignment scores of the reference (seq_aligner.ScoreParams(0, 1, -1)).
_GAP, _MATCH, _MISMATCH = 0, 1, -1
# Traceback codes of the reference: 1 left (target token inserted), 2 up (source token
# dropped), 3 diagonal (tokens paired), 4 origin.
_LEFT, _UP, _DIAG, _STOP = 1, 2, 3, 4


# ----------------------------------------------------------------------- word swap


def replacement_mapper(tokenizer, source: str, target: str, max_len: int = MAX_LEN, *,
                       reference_quirks: bool = False) -> np.ndarray:
    """Token mapper of a word swap (AttentionReplace): ``seq_aligner.get_replacement_mapper_``.

    Words at the same index that differ are swapped; the rest keep their tokens in order.
    ``M[w, n]`` is the weight of source token w in target token n; the edited cross map is
    ``einsum('BNTS,SU->BNTU', source_probs, M)``. A swapped word of equal token count maps
    token to token; otherwise every source token of the word links to every target token
    with weight ``1 / (target token count)``. BOS, EOS and padding map in order.

    Args:
      tokenizer: from ``load_tokenizer``.
      source: the source prompt.
      target: the edited prompt, with the same number of words.
      max_len: S, tokens per prompt (77).
      reference_quirks: reproduce the reference's tail mapping ``M[j, j]`` after the last
        swapped word and its word splitting (module docstring).

    Returns:
      float32 array (S, S).

    Raises:
      ValueError: the prompts have different numbers of words (message names both and
        says to use mode='refine'); a prompt is longer than ``max_len`` tokens.
    """
    words_x = prompt_words(source, reference_quirks)
    words_y = prompt_words(target, reference_quirks)
    if len(words_x) != len(words_y):
        raise ValueError(
            f"word swap (mode='replace') needs prompts with the same number of words, but "
            f"the source {source!r} has {len(words_x)} words and the target {target!r} has "
            f"{len(words_y)}; use mode='refine' for prompts of different lengths.")
    prompt_ids(tokenizer, source, max_len)  # length checks
    prompt_ids(tokenizer, target, max_len)
    swapped = [k for k, (a, b) in enumerate(zip(words_x, words_y)) if a != b]
    if reference_quirks:
        src = [reference_word_inds(tokenizer, source, k, max_len) for k in swapped]
        tgt = [reference_word_inds(tokenizer, target, k, max_len) for k in swapped]
        for k, s, t in zip(swapped, src, tgt):
            if len(s) == 0 or len(t) == 0:
                raise ValueError(
                    f"word {k} ({words_x[k]!r} -> {words_y[k]!r}) has no tokens in the "
                    "reference's word split (an empty word from repeated spaces?); the "
                    "reference raises IndexError here. Use reference_quirks=False.")
    else:
        spans_x = word_spans(tokenizer, source, max_len)
        spans_y = word_spans(tokenizer, target, max_len)
        src = [spans_x[k] for k in swapped]
        tgt = [spans_y[k] for k in swapped]

    mapper = np.zeros((max_len, max_len), np.float32)
    i = j = 0  # next source / target position
    for s, t in zip(src, tgt):
        # tokens up to the swapped word map in order
        while i < s[0]:
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
        if len(s) == len(t):
            mapper[s, t] = 1.0
        else:
            mapper[np.ix_(s, t)] = 1.0 / len(t)
        i, j = i + len(s), j + len(t)
    # the rest (later words, EOS, padding) in order, until either side runs out
    while i < max_len and j < max_len:
        mapper[j if reference_quirks else i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def replacement_mappers(tokenizer, source: str, targets: str | Sequence[str],
                        max_len: int = MAX_LEN, *, reference_quirks: bool = False) -> np.ndarray:
    """``replacement_mapper`` for several targets: ``seq_aligner.get_replacement_mapper``.

    Returns:
      float32 array (n_targets, S, S).

    Raises:
      ValueError: as ``replacement_mapper`` (the message names the offending target), or
        no targets.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("replacement_mappers needs at least one target prompt")
    return np.stack([replacement_mapper(tokenizer, source, t, max_len,
                                        reference_quirks=reference_quirks) for t in targets])


# ---------------------------------------------------------------------- refinement


def _global_align(x: Sequence[int], y: Sequence[int]) -> np.ndarray:
    """Needleman-Wunsch over token ids (gap 0, match +1, mismatch -1) as the reference.

    Returns the target→source map (len(y),): source index of each target token, -1 where
    the target token is inserted. Ties prefer left (insert), then up (drop), then the
    diagonal, and the traceback walks from the end, exactly as ``seq_aligner.global_align``
    / ``get_aligned_sequences``.
    """
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), np.int64)
    score[0, 1:] = np.arange(1, m + 1) * _GAP
    score[1:, 0] = np.arange(1, n + 1) * _GAP
    trace = np.zeros((n + 1, m + 1), np.int8)
    trace[0, 1:] = _LEFT
    trace[1:, 0] = _UP
    trace[0, 0] = _STOP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i, j - 1] + _GAP
            up = score[i - 1, j] + _GAP
            diag = score[i - 1, j - 1] + (_MATCH if x[i - 1] == y[j - 1] else _MISMATCH)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = _LEFT if best == left else _UP if best == up else _DIAG
    y_to_x = np.full((m,), -1, np.int32)
    i, j = n, m
    while i > 0 or j > 0:
        t = trace[i, j]
        if t == _DIAG:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif t == _LEFT:
            j -= 1  # y_to_x[j] stays -1
        elif t == _UP:
            i -= 1
        else:
            break
    return y_to_x


def refinement_mapper(tokenizer, source: str, target: str,
                      max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Token alignment of a refinement edit (AttentionRefine): ``seq_aligner.get_mapper``.

    The source and target token ids (BOS and EOS included, no padding) are aligned
    globally (gap 0, match +1, mismatch -1; with these scores a mismatch never beats two
    gaps, so the alignment keeps a longest common subsequence). The edited cross map is
    ``source_probs[..., mapper] * alphas + target_probs * (1 - alphas)``.

    Args:
      tokenizer: from ``load_tokenizer``.
      source: the source prompt.
      target: the refined prompt (any number of words).
      max_len: S (77).

    Returns:
      ``(mapper, alphas)``: int32 (S,) source position of each target position (-1 for a
      target token with no source token; position n itself for padding
      ``n >= len(target tokens)``), and float32 (S,) 1 where a source token is used, 0 for
      new tokens. E.g. "a cat sitting on a car" → "a cat sitting on a red car":
      mapper ``[0, 1, 2, 3, 4, 5, -1, 6, 7, 9, 10, ...]``, alphas 0 at position 6 only.

    Raises:
      ValueError: a prompt is longer than ``max_len`` tokens.
    """
    x = prompt_ids(tokenizer, source, max_len)
    y = prompt_ids(tokenizer, target, max_len)
    y_to_x = _global_align(x, y)
    mapper = np.arange(max_len, dtype=np.int32)
    mapper[: len(y)] = y_to_x
    alphas = np.ones((max_len,), np.float32)
    alphas[: len(y)] = (y_to_x != -1).astype(np.float32)
    return mapper, alphas


def refinement_mappers(tokenizer, source: str, targets: str | Sequence[str],
                       max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """``refinement_mapper`` for several targets: ``seq_aligner.get_refinement_mapper``.

    Returns:
      ``(mappers, alphas)``: int32 (n_targets, S) and float32 (n_targets, S).

    Raises:
      ValueError: no targets; a prompt is longer than ``max_len`` tokens.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("refinement_mappers needs at least one target prompt")
    pairs = [refinement_mapper(tokenizer, source, t, max_len) for t in targets]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ------------------------------------------------------------------------ reweight


def equalizer(tokenizer, prompt: str, words: str | int | Sequence[str | int],
              values: float | Sequence[float], max_len: int = MAX_LEN, *,
              reference_quirks: bool = False) -> np.ndarray:
    """Per-token scale of a reweight edit (AttentionReweight): the notebooks' ``get_equalizer``.

    Ones, except the tokens of each word set to its value (later words win on overlap).
    The edited cross map is ``source_probs * eq`` over S, not renormalised.
    Words pair with values as in the null-text notebook (``zip(word_select, values)``);
    a single value applies to every word.

    Args:
      tokenizer: from ``load_tokenizer``.
      prompt: the prompt whose tokens are reweighted (the reference uses the target).
      words: a word (str, every occurrence) or word index (int), or a sequence of them.
      values: one scale, or one per word (e.g. 5, -1, 3, 10 in the reference's examples).
      max_len: S (77).
      reference_quirks: the reference's word splitting (see ``word_token_indices``).

    Returns:
      float32 array (S,).

    Raises:
      ValueError: a word is not in the prompt (message names the word and the prompt);
        the number of values differs from the number of words.
    """
    if isinstance(words, str) or is_index(words):
        words = [words]
    words = list(words)
    if isinstance(values, numbers.Real):
        values = [float(values)] * len(words)
    values = [float(v) for v in values]
    if len(values) != len(words):
        raise ValueError(f"equalizer got {len(words)} words {words!r} but {len(values)} "
                         f"values {values!r}; give one value per word or a single value")
    eq = np.ones((max_len,), np.float32)
    for w, v in zip(words, values):
        inds = word_token_indices(tokenizer, prompt, w, max_len=max_len,
                                  reference_quirks=reference_quirks)
        if len(inds) == 0:
            raise ValueError(
                f"equalizer word {w!r} is not a word of prompt {prompt!r} (words: "
                f"{prompt_words(prompt, reference_quirks)}); words match exactly, punctuation "
                "included")
        eq[inds] = v
    return eq


# ------------------------------------------------------------------------- windows


def _window(value, name: str) -> tuple[float, float]:
    """A float b → (0, b), or a (start, end) pair; both fractions in [0, 1], start <= end."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        start, end = 0.0, float(value)
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                  for v in value)):
        start, end = float(value[0]), float(value[1])
    else:
        raise ValueError(f"{name} must be a fraction of the steps b (window [0, b)) or a "
                         f"pair (start, end) of fractions, got {value!r}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{name} = {value!r} is not a window inside [0, 1]: need "
                         f"0 <= start <= end <= 1 (fractions of the denoising steps)")
    return start, end


def _check_steps(num_steps) -> int:
    if not is_index(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return int(num_steps)


def cross_replace_alphas(prompts: Sequence[str], num_steps: int,
                         cross_replace_steps: float | tuple[float, float] | Mapping,
                         tokenizer, max_len: int = MAX_LEN, *,
                         reference_quirks: bool = False) -> np.ndarray:
    """Per-step, per-token weight of the edited cross maps: ``get_time_words_attention_alpha``.

    Row ``step`` is used at denoising step index ``step`` (0 = first step); the blend is
    ``edited * alpha + target_own * (1 - alpha)``. A window ``(s, e)`` sets alpha 1 on
    steps ``[int(s * (num_steps + 1)), int(e * (num_steps + 1)))`` and 0 elsewhere; a
    float b means ``(0, b)`` (cross 0.8 over 50 steps → steps 0..39).

    Args:
      prompts: ``[source, target_1, ..., target_n]``.
      num_steps: denoising steps T.
      cross_replace_steps: a window for all tokens, or a dict of windows: key
        ``"default_"`` (all tokens; ``(0, 1)`` when absent) and word keys (str word or int
        word index), looked up in each *target* prompt and applied in dict order after the
        default, to that word's tokens in the targets that contain it (an int index out
        of range for a target raises, as in ``word_token_indices``).
      tokenizer: from ``load_tokenizer``.
      max_len: S (77).
      reference_quirks: the reference's word splitting (see ``word_token_indices``).

    Returns:
      float32 array (T + 1, n_targets, S) of 0/1 (the reference's extra last row kept).

    Raises:
      ValueError: a window outside [0, 1] or reversed (message names the argument and
        key); fewer than two prompts; a word key found in none of the targets (the
        reference silently ignores it — a key naming a source-only word does nothing).
    """
    num_steps = _check_steps(num_steps)
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(f"cross_replace_alphas needs a source and at least one target "
                         f"prompt, got {len(prompts)} prompt(s)")
    targets = prompts[1:]
    windows = (dict(cross_replace_steps) if isinstance(cross_replace_steps, Mapping)
               else {DEFAULT_KEY: cross_replace_steps})
    windows.setdefault(DEFAULT_KEY, (0.0, 1.0))
    rows = num_steps + 1

    def steps(key) -> slice:
        name = ("cross_replace_steps" if not isinstance(cross_replace_steps, Mapping)
                else f"cross_replace_steps[{key!r}]")
        start, end = _window(windows[key], name)
        return slice(int(start * rows), int(end * rows))

    alphas = np.zeros((rows, len(targets), max_len), np.float32)
    alphas[steps(DEFAULT_KEY)] = 1.0
    for key in windows:
        if key == DEFAULT_KEY:
            continue
        if not (isinstance(key, str) or is_index(key)):
            raise ValueError(f"cross_replace_steps key {key!r} must be {DEFAULT_KEY!r}, a "
                             "word (str) or a word index (int)")
        window = steps(key)
        found = False
        for b, target in enumerate(targets):
            inds = word_token_indices(tokenizer, target, key, max_len=max_len,
                                      reference_quirks=reference_quirks)
            if len(inds):
                found = True
                alphas[:, b, inds] = 0.0
                alphas[window, b, inds] = 1.0
        if not found:
            raise ValueError(
                f"cross_replace_steps word {key!r} is in none of the target prompts "
                f"{targets!r}; per-word windows are looked up in the targets (prompts[1:]), "
                "words match exactly")
    return alphas


def self_replace_window(num_steps: int,
                        self_replace_steps: float | tuple[float, float]) -> tuple[int, int]:
    """Steps where target self-attention maps are replaced by the source's.

    Reference: ``AttentionControlEdit.__init__`` (``num_self_replace``): a float s means
    ``(0, s)``; the window is ``[int(num_steps * s0), int(num_steps * s1))`` of step
    indices (note: ``num_steps``, where the cross window uses ``num_steps + 1``). Self 0.4
    over 50 steps → steps 0..19.

    Returns:
      ``(start_step, end_step)``, Python ints, end exclusive.

    Raises:
      ValueError: the window is outside [0, 1] or reversed; num_steps not a positive int.
    """
    num_steps = _check_steps(num_steps)
    start, end = _window(self_replace_steps, "self_replace_steps")
    return int(num_steps * start), int(num_steps * end)
