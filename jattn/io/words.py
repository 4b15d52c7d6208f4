"""Words of a prompt → token positions (BOS = 0), the one place every layer asks.

Token positions index the S axis of cross-attention maps (S = ``max_len`` = 77 for SD's
text encoders; position 0 is BOS, see :mod:`jattn.io.tokenizer`). Prompt-to-Prompt's
mappers and equalizers, the policy layer's DAAM word heatmaps, and later methods
(self-segmentation labels, Bounded Attention's subject tokens) all take words here.

Words. A prompt's words are ``prompt.split()`` (runs of whitespace separate words); a word
given as a string matches a word of the prompt exactly (case and attached punctuation
count, as in the reference: ``"cat"`` does not match ``"cat,"``), every occurrence. A
word's tokens are found by tokenizing the word alone; CLIP's pre-tokenizer never joins
characters across whitespace, so the prompt's tokens are the concatenation of its words'
tokens (checked; a prompt where that fails raises).

Reference quirk (``reference_quirks=True``; default off): google/prompt-to-prompt@9c472e4
``ptp_utils.get_word_inds`` splits on single spaces (``"a  cat"`` has an empty word 1,
which the reference credits with the next token) and assigns tokens to words by summing
the lengths of individually decoded tokens; a character CLIP splits into several byte
tokens (an emoji, "ß") decodes to one replacement character per token, so tokens shift
onto later words and the reference fails with ``IndexError`` at the end of the prompt.
An out-of-range or negative word index gives no positions instead of an error.

(:func:`jattn.io.tokenizer.token_indices` is the world evaluation's looser lookup:
case-insensitive, phrases, whole-word match on the BPE tokens.)
"""

from __future__ import annotations

import numpy as np

from jattn.io.tokenizer import MAX_LENGTH, _ids

__all__ = ["word_token_indices", "prompt_ids", "prompt_words", "word_spans",
           "reference_word_inds", "is_index"]


def prompt_ids(tokenizer, text: str, max_len: int = MAX_LENGTH) -> list[int]:
    """Token ids of ``text`` with BOS and EOS, no padding.

    Raises:
      ValueError: more than ``max_len`` ids (BOS/EOS included); names the prompt.
    """
    ids = _ids(tokenizer, text)
    if len(ids) > max_len:
        raise ValueError(
            f"prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {len(ids)} tokens "
            f"including BOS/EOS, more than max_len={max_len}; shorten it.")
    return ids


def is_index(x) -> bool:
    """``x`` is an int word index (Python or NumPy integer, not a bool)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def prompt_words(prompt: str, reference_quirks: bool = False) -> list[str]:
    """The words of ``prompt``: ``prompt.split()`` (``split(" ")`` with the quirk)."""
    return prompt.split(" ") if reference_quirks else prompt.split()


def word_spans(tokenizer, prompt: str, max_len: int = MAX_LENGTH) -> list[np.ndarray]:
    """Token positions (BOS = 0) of every word of ``prompt.split()``, in order.

    Returns:
      one int32 array per word (several positions for a word of several BPE tokens).

    Raises:
      ValueError: the prompt is longer than ``max_len`` tokens; a word has no tokens; the
        prompt's tokens are not the concatenation of its words' tokens.
    """
    ids = prompt_ids(tokenizer, prompt, max_len)
    spans, pos, concat = [], 1, []
    for w in prompt.split():
        w_ids = prompt_ids(tokenizer, w, max_len)[1:-1]
        if not w_ids:
            raise ValueError(f"word {w!r} of prompt {prompt!r} has no tokens")
        spans.append(np.arange(pos, pos + len(w_ids), dtype=np.int32))
        pos += len(w_ids)
        concat += w_ids
    if concat != ids[1:-1]:
        raise ValueError(
            f"the tokens of prompt {prompt!r} ({ids[1:-1]}) are not the concatenation of its "
            f"words' tokens ({concat}); cannot assign tokens to words")
    return spans


def reference_word_inds(tokenizer, prompt: str, word_place, max_len: int = MAX_LENGTH
                        ) -> np.ndarray:
    """``ptp_utils.get_word_inds`` as the reference computes it (module docstring's quirk).

    Returns: int32 ``(K,)`` positions. Raises: ValueError where the reference raises
    ``IndexError`` (tokens past the last word), or for a prompt over ``max_len`` tokens.
    """
    split_text = prompt.split(" ")
    if isinstance(word_place, str):
        places = {i for i, w in enumerate(split_text) if w == word_place}
    else:
        places = {int(word_place)}
    out: list[int] = []
    if places:
        ids = prompt_ids(tokenizer, prompt, max_len)[1:-1]
        pieces = [tokenizer.decode([t], clean_up_tokenization_spaces=False).strip("#")
                  for t in ids]
        cur_len, ptr = 0, 0
        for i, piece in enumerate(pieces):
            cur_len += len(piece)
            if ptr in places:
                out.append(i + 1)
            if ptr >= len(split_text):
                raise ValueError(
                    f"reference get_word_inds fails on prompt {prompt!r}: token {i + 1} "
                    f"({piece!r}) falls past the last word (decoded token lengths do not add "
                    "up to the words' lengths; the reference raises IndexError here). Use "
                    "reference_quirks=False.")
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.asarray(out, dtype=np.int32)


def word_token_indices(tokenizer, prompt: str, word_or_index: str | int, *,
                       max_len: int = MAX_LENGTH, reference_quirks: bool = False) -> np.ndarray:
    """Token positions (BOS = 0) of a word of ``prompt``: ``ptp_utils.get_word_inds``.

    Source: Hertz et al., "Prompt-to-Prompt Image Editing with Cross-Attention Control",
    ICLR 2023; google/prompt-to-prompt@9c472e4 ``ptp_utils.py`` (``get_word_inds``).

    Args:
      tokenizer: from ``jattn.io.tokenizer.load_tokenizer``.
      prompt: the prompt.
      word_or_index: a word (str), matched exactly against the prompt's words, every
        occurrence; or a word index (int) into the prompt's words (negative counts from
        the end).
      max_len: token budget of the text encoder, BOS/EOS included.
      reference_quirks: split on single spaces and assign tokens to words by decoded
        length, as the reference does (module docstring); an out-of-range index then gives
        no positions instead of raising.

    Returns:
      int32 array (K,) of sorted positions; several per word when the word is several BPE
      tokens (``"a photo of lasagne"``, ``"lasagne"`` → ``[4, 5]``); empty when the word
      (str) does not occur.

    Raises:
      TypeError: ``word_or_index`` neither a str nor an int.
      ValueError: an int index out of range (clean mode); the prompt is longer than
        ``max_len`` tokens; its tokens cannot be assigned to words.
    """
    if not (isinstance(word_or_index, str) or is_index(word_or_index)):
        raise TypeError(f"word_or_index must be a str or an int, got {word_or_index!r}")
    if reference_quirks:
        return reference_word_inds(tokenizer, prompt, word_or_index, max_len)
    spans = word_spans(tokenizer, prompt, max_len)
    words = prompt.split()
    if isinstance(word_or_index, str):
        sel = [spans[k] for k, w in enumerate(words) if w == word_or_index]
    else:
        k = int(word_or_index)
        if not -len(words) <= k < len(words):
            raise ValueError(
                f"word index {k} out of range for the {len(words)} words of prompt {prompt!r}")
        sel = [spans[k]]
    if not sel:
        return np.zeros((0,), np.int32)
    return np.concatenate(sel).astype(np.int32)
