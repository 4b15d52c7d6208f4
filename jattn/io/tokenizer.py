"""CLIP BPE tokenizer: loading, fixed-length batches of token ids, and word → token positions.

The tokenizer is transformers' ``CLIPTokenizer`` loaded offline from a folder holding
``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``)
in the layout of ``openai/clip-vit-large-patch14`` (SD1.x's ``tokenizer/`` folder). jattn
bundles those files, converted from open_clip's merge list by
``scripts/build_tokenizer.py``, in ``jattn/assets/bundled/tokenizer/``.

Token layout of one prompt, as SD1.x's text encoder sees it::

    [BOS=49406, tok_1, ..., tok_n, EOS=49407, PAD=49407, ..., PAD]   (77 ids)

Position 0 is BOS, so the k-th token of the prompt (counting from 1) sits at index k —
the index into the S axis of cross-attention maps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "bundled" / "tokenizer"
MAX_LENGTH = 77


def load_tokenizer(folder: str | os.PathLike | None = None):
    """Load a ``transformers.CLIPTokenizer`` from a local folder, offline.

    Args:
      folder: a tokenizer folder (``vocab.json``, ``merges.txt``, ...) or a checkpoint
        folder containing ``tokenizer/``; None → the bundled tokenizer.

    Returns:
      the tokenizer (vocabulary 49408 for CLIP; BOS 49406, EOS = pad 49407 for SD1.x).

    Raises:
      CheckpointNotFoundError (a FileNotFoundError): the folder has no
        ``vocab.json``/``merges.txt`` (nor a ``tokenizer/`` subfolder that has them).
      CheckpointDamagedError: a tokenizer file is a directory, unreadable, invalid JSON or
        rejected by transformers (the message names the file when it can tell which).
    """
    from transformers import CLIPTokenizer  # the one transformers use allowed at run time

    from jattn.io.checkpoint import (CheckpointDamagedError, CheckpointNotFoundError,
                                     read_json)

    path = BUNDLED_TOKENIZER_DIR if folder is None else Path(folder)
    names = ("vocab.json", "merges.txt")

    def _has_files(p: Path) -> bool:
        return (p / "tokenizer.json").exists() or all((p / n).exists() for n in names)

    if not _has_files(path) and _has_files(path / "tokenizer"):
        path = path / "tokenizer"
    fix = ("rebuild the bundled one with `python scripts/build_tokenizer.py`"
           if path.resolve() == BUNDLED_TOKENIZER_DIR.resolve() else
           "copy or re-download the checkpoint's tokenizer/ folder")
    if not _has_files(path):
        missing = [n for n in names if not (path / n).exists()]
        raise CheckpointNotFoundError(
            f"tokenizer folder {path} lacks {' + '.join(missing)} (or tokenizer.json); "
            "expected the layout of openai/clip-vit-large-patch14 (vocab.json, merges.txt, "
            f"tokenizer_config.json). Fix: {fix}.")
    files = [path / n for n in ("tokenizer.json", *names, "tokenizer_config.json",
                                "special_tokens_map.json", "added_tokens.json")]
    for f in files:
        if f.exists() and not f.is_file():
            raise CheckpointDamagedError(f"{f}: is a directory, not a tokenizer file. Fix: {fix}.")
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # locate the damaged file; transformers' messages rarely name it
        for f in files:
            if f.suffix == ".json" and f.exists():
                read_json(f)  # raises CheckpointDamagedError naming the file and position
        for f in files:
            if f.suffix == ".txt" and f.exists():
                try:
                    f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e2:
                    raise CheckpointDamagedError(
                        f"{f}: damaged or unreadable ({e2}). Fix: {fix}.") from e
        raise CheckpointDamagedError(
            f"tokenizer folder {path}: transformers could not load it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); vocab.json or merges.txt is damaged "
            f"or they do not belong together. Fix: {fix}.") from e


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with BOS/EOS, no padding, no truncation."""
    # verbose=False: the over-77 case gets our own clear error instead of transformers' warning
    return list(tokenizer(text, padding=False, truncation=False, verbose=False)["input_ids"])


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = MAX_LENGTH, *,
             name: str = "prompt") -> np.ndarray:
    """Token ids of a batch of prompts, padded to ``max_length`` with the pad id.

    Args:
      tokenizer: from ``load_tokenizer``.
      prompts: one prompt or a list of B prompts.
      max_length: ids per prompt, BOS and EOS included (77 for SD's text encoders).
      name: the argument named in errors (e.g. "negative_prompt").

    Returns:
      int32 array (B, max_length): BOS, the prompt's tokens, EOS, then pad ids
      (49407 = EOS for SD1.x).

    Raises:
      ValueError: a prompt needs more than ``max_length`` ids. jattn refuses to truncate
        silently (a cut prompt changes which words an edit can address); the message names
        the prompt index and its token count.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad token; SD1.x pads with <|endoftext|> (49407)")
    out = np.full((len(prompts), max_length), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids = _ids(tokenizer, p)
        if len(ids) > max_length:
            raise ValueError(
                f"{name} {i} has {len(ids)} tokens including BOS/EOS, more than {max_length}: "
                f"{p[:60]!r}{'...' if len(p) > 60 else ''}. Shorten the prompt; SD's text "
                f"encoder sees {max_length} tokens.")
        out[i, : len(ids)] = ids
    return out


def _word_ids(tokenizer, text: str) -> list[int]:
    ids = _ids(tokenizer, text)
    return ids[1:-1]  # drop BOS, EOS


def token_indices(tokenizer, prompt: str, word: str | int) -> list[int]:
    """Positions in the tokenized prompt (BOS at 0) of the tokens of ``word``.

    Args:
      tokenizer: from ``load_tokenizer``.
      prompt: the prompt.
      word: a word or phrase (matched case-insensitively on whole words, every occurrence),
        or an int i = the i-th whitespace-separated word of ``prompt`` (punctuation
        attached to it, e.g. "circle,", included).

    Returns:
      sorted positions, e.g. ``token_indices(tok, "a cat wearing sunglasses", "cat") == [2]``;
      a word split into several BPE tokens gives several consecutive positions.

    Raises:
      ValueError: the word does not occur in the prompt, or the index is out of range.
    """
    ids = _ids(tokenizer, prompt)
    if isinstance(word, (int, np.integer)):
        words = prompt.split()
        if not -len(words) <= word < len(words):
            raise ValueError(f"word index {word} out of range for {len(words)} words in {prompt!r}")
        word = int(word) % len(words)
        start = 1 + len(_word_ids(tokenizer, " ".join(words[:word]))) if word else 1
        n = len(_word_ids(tokenizer, words[word]))
        return list(range(start, start + n))

    target = _word_ids(tokenizer, word)
    if not target or not re.search(r"\w", word):
        raise ValueError(f"word {word!r} has no word tokens")
    end_of_word = set(
        i for i, t in enumerate(tokenizer.convert_ids_to_tokens(ids)) if t.endswith("</w>"))
    n = len(target)
    found: list[int] = []
    for s in range(1, len(ids) - n):
        # whole-word match: the previous token closes a word (or is BOS)
        if ids[s : s + n] == target and (s == 1 or (s - 1) in end_of_word):
            found.extend(range(s, s + n))
    if not found:
        raise ValueError(f"word {word!r} not found in prompt {prompt!r} (tokens {ids})")
    return sorted(set(found))
