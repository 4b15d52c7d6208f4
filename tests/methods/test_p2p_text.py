"""Prompt-to-Prompt prompt-side machinery against the reference google/prompt-to-prompt@9c472e4.

The ``_ref_*`` functions below restate the reference algorithms (``seq_aligner.py``:
``global_align``, ``get_aligned_sequences``, ``get_mapper``, ``get_replacement_mapper_``;
``ptp_utils.py``: ``get_word_inds``, ``update_alpha_time_word``,
``get_time_words_attention_alpha``) step for step in plain Python/NumPy, so jattn's outputs
can be compared with what the reference computes on the same tokenizer. A few
expectations are also written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from jattn.io.tokenizer import load_tokenizer
from jattn.methods import p2p_text as P


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ------------------------------------------------------- reference restatement (test-only)


def _ref_encode(tok, text):
    return list(tok(text)["input_ids"])


def _ref_get_word_inds(text, word_place, tok):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        pieces = [tok.decode([t], clean_up_tokenization_spaces=False).strip("#")
                  for t in _ref_encode(tok, text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(pieces)):
            cur_len += len(pieces[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):  # IndexError past the last word
                ptr += 1
                cur_len = 0
    return np.array(out)


def _ref_replacement_mapper(x, y, tok, max_len=77):
    words_x, words_y = x.split(" "), y.split(" ")
    assert len(words_x) == len(words_y)
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [_ref_get_word_inds(x, i, tok) for i in inds_replace]
    inds_target = [_ref_get_word_inds(y, i, tok) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur = 0
    while i < max_len and j < max_len:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            s, t = inds_source[cur], inds_target[cur]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                for i_t in t:
                    mapper[s, i_t] = 1 / len(t)
            cur += 1
            i += len(s)
            j += len(t)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return mapper.astype(np.float32)


def _ref_global_align(x, y, gap=0, match=1, mismatch=-1):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return trace_back


def _ref_aligned_mapper(x, y, trace_back):
    i, j = len(x), len(y)
    pairs = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace_back[i, j] == 1:
            j = j - 1
            pairs.append((j, -1))
        elif trace_back[i, j] == 2:
            i = i - 1
        elif trace_back[i, j] == 4:
            break
    pairs.reverse()
    return np.array(pairs, dtype=np.int64)


def _ref_get_mapper(x, y, tok, max_len=77):
    x_seq, y_seq = _ref_encode(tok, x), _ref_encode(tok, y)
    base = _ref_aligned_mapper(x_seq, y_seq, _ref_global_align(x_seq, y_seq))
    alphas = np.ones(max_len, np.float32)
    alphas[: base.shape[0]] = (base[:, 1] != -1).astype(np.float32)
    mapper = np.zeros(max_len, np.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(y_seq) + np.arange(max_len - len(y_seq))
    return mapper, alphas


def _ref_time_words_alpha(prompts, num_steps, cross_replace_steps, tok, max_num_words=77):
    def update(alpha, bounds, prompt_ind, word_inds=None):
        if type(bounds) is float:
            bounds = 0, bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        if word_inds is None:
            word_inds = np.arange(alpha.shape[2])
        alpha[:start, prompt_ind, word_inds] = 0
        alpha[start:end, prompt_ind, word_inds] = 1
        alpha[end:, prompt_ind, word_inds] = 0
        return alpha

    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0., 1.)
    alpha = np.zeros((num_steps + 1, len(prompts) - 1, max_num_words), np.float32)
    for i in range(len(prompts) - 1):
        alpha = update(alpha, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [_ref_get_word_inds(prompts[i], key, tok) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha = update(alpha, item, i, ind)
    return alpha


# Prompt pairs of the reference notebooks (and a few more with multi-token words).
REFINE_PAIRS = [
    ("a cat sitting on a car", "a cat sitting on a red car"),
    ("a photo of a house on a mountain", "a photo of a house on a mountain at winter"),
    ("a photo of a house on a mountain", "a photo of a house on a mountain at fall"),
    ("a photo of a house on a mountain", "a photo of a house on a mountain at rain"),
    ("a painting of a squirrel eating a burger",
     "a neoclassical painting of a squirrel eating a burger"),
    ("a painting of a squirrel eating a burger",
     "a watercolor painting of a squirrel eating a burger"),
    ("pink bear riding a bicycle", "pink bear riding a bicycle on the beach"),
    ("a cake with decorations.", "a cake with jelly beans decorations."),
    ("a photo of lasagne on a table", "a photo of a table"),            # deletion
    ("a cat sitting on a car", "a dog sitting on a car"),               # substitution
    ("a teddybear and hedgehogs", "hedgehogs and a teddybear at night"),  # reordering
    ("", "a cat"),
]
REPLACE_PAIRS = [  # same word count
    ("A painting of a squirrel eating a burger", "A painting of a lion eating a burger"),
    ("A painting of a squirrel eating a burger", "A painting of a cat eating a pizza"),
    ("a cat sitting next to a mirror", "a tiger sitting next to a mirror"),
    ("a photo of a house on a mountain", "a photo of a tent on a mountain"),
]
REPLACE_PAIRS_UNEQUAL_TOKENS = [  # a swapped word changes its token count
    ("a cat sitting on a car", "a hedgehogs sitting on a car"),            # 1 -> 2
    ("a photo of lasagne on a table", "a photo of pizza on a table"),     # 2 -> 1
    ("a cat and a dog", "a hedgehogs and a teddybear"),                   # 1->2, 1->2
    ("A painting of a squirrel eating a burger",
     "A painting of a squirrel eating a lasagne"),                        # last word 1->2
]


# --------------------------------------------------------------------------- refinement


def test_refinement_hand_checked_examples(tok):
    """The reference notebook's refinement examples, written out: "red" is new (alpha 0),
    every other target token reads its own source token, and padding maps to itself.
    If this fails, AttentionRefine edits read the wrong source columns."""
    mapper, alphas = P.refinement_mapper(tok, "a cat sitting on a car", "a cat sitting on a red car")
    # target: BOS a cat sitting on a red car EOS  (9 tokens); source has 8
    assert mapper[:9].tolist() == [0, 1, 2, 3, 4, 5, -1, 6, 7]
    assert mapper[9:].tolist() == list(range(9, 77))   # reference: pads n <- n
    assert alphas.tolist() == [1.0] * 6 + [0.0] + [1.0] * 70
    assert mapper.dtype == np.int32 and alphas.dtype == np.float32 and mapper.shape == (77,)

    mapper, alphas = P.refinement_mapper(
        tok, "a photo of a house on a mountain", "a photo of a house on a mountain at winter")
    assert mapper[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, 9]
    assert mapper[12:].tolist() == list(range(12, 77))
    assert np.flatnonzero(alphas == 0).tolist() == [9, 10]


@pytest.mark.parametrize("source,target", REFINE_PAIRS)
def test_refinement_matches_reference(tok, source, target):
    """jattn's aligner equals the reference's global_align + traceback (tie order left >
    up > diagonal) on insertions, deletions, substitutions and reorderings; a different
    tie order would pair other tokens and change refine edits."""
    mapper, alphas = P.refinement_mapper(tok, source, target)
    ref_mapper, ref_alphas = _ref_get_mapper(source, target, tok)
    np.testing.assert_array_equal(mapper, ref_mapper)
    np.testing.assert_array_equal(alphas, ref_alphas)


def test_refinement_substitution_is_insert_plus_delete(tok):
    """With gap 0 and mismatch −1 a swapped word is never paired: "dog" is a new token
    (alpha 0) and the words around it still align; if not, refine would copy the cat's map
    into the dog's column."""
    mapper, alphas = P.refinement_mapper(tok, "a cat sitting on a car", "a dog sitting on a car")
    assert alphas[2] == 0 and mapper[2] == -1
    assert mapper[[0, 1, 3, 4, 5, 6, 7]].tolist() == [0, 1, 3, 4, 5, 6, 7]


def test_refinement_batched(tok):
    """Several targets stack to (n_targets, 77) in order; a wrong stacking order would
    give target k the alignment of another target."""
    targets = [t for s, t in REFINE_PAIRS[1:4]]
    mappers, alphas = P.refinement_mappers(tok, REFINE_PAIRS[1][0], targets)
    assert mappers.shape == (3, 77) and alphas.shape == (3, 77)
    assert mappers.dtype == np.int32 and alphas.dtype == np.float32
    for k, t in enumerate(targets):
        m, a = P.refinement_mapper(tok, REFINE_PAIRS[1][0], t)
        np.testing.assert_array_equal(mappers[k], m)
        np.testing.assert_array_equal(alphas[k], a)
    with pytest.raises(ValueError, match="at least one target"):
        P.refinement_mappers(tok, "a cat", [])


# ---------------------------------------------------------------------------- word swap


@pytest.mark.parametrize("source,target", REPLACE_PAIRS + REPLACE_PAIRS_UNEQUAL_TOKENS)
def test_replacement_reference_quirks_match_reference(tok, source, target):
    """reference_quirks=True reproduces get_replacement_mapper_ exactly, tail quirk
    included; if not, parity runs against the reference notebooks would diverge."""
    np.testing.assert_array_equal(
        P.replacement_mapper(tok, source, target, reference_quirks=True),
        _ref_replacement_mapper(source, target, tok))


@pytest.mark.parametrize("source,target", REPLACE_PAIRS)
def test_replacement_clean_equals_reference_when_token_counts_match(tok, source, target):
    """The clean default only differs from the reference after a swap that changes the
    token count; on ordinary swaps it must give the reference's mapper."""
    np.testing.assert_array_equal(P.replacement_mapper(tok, source, target),
                                  _ref_replacement_mapper(source, target, tok))


def test_replacement_hand_checked(tok):
    """"squirrel" → "lion" at position 5: the mapper is the identity (a permutation with
    one relabelled token). If not, word swap would move maps between words."""
    m = P.replacement_mapper(tok, "A painting of a squirrel eating a burger",
                             "A painting of a lion eating a burger")
    assert m.shape == (77, 77) and m.dtype == np.float32
    np.testing.assert_array_equal(m, np.eye(77, dtype=np.float32))


def test_replacement_multi_token_spreading(tok):
    """A 1-token word swapped for a 2-token word spreads weight 1/2 onto each target token;
    a 2-token word swapped for a 1-token word sums both source columns (weight 1 each);
    equal token counts map token to token. If not, multi-token swaps would create or lose
    attention mass on the swapped word."""
    # "cat" (pos 2) -> "hedgehogs" = hedge + hogs (pos 2, 3)
    m = P.replacement_mapper(tok, "a cat sitting on a car", "a hedgehogs sitting on a car")
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5 and m[:, 2].sum() == 0.5
    # "lasagne" = lasag + ne (pos 4, 5) -> "pizza" (pos 4)
    m = P.replacement_mapper(tok, "a photo of lasagne on a table", "a photo of pizza on a table")
    assert m[4, 4] == 1 and m[5, 4] == 1 and m[:, 4].sum() == 2
    # "lasagne" (2 tokens) -> "teddybear" (teddy + bear, 2 tokens): diagonal
    m = P.replacement_mapper(tok, "a photo of lasagne", "a photo of teddybear")
    assert m[4, 4] == 1 and m[5, 5] == 1 and m[4, 5] == 0 and m[5, 4] == 0


def test_replacement_clean_tail_follows_alignment(tok):
    """After a swap that changes the token count, the clean mapper keeps later words on
    their own source tokens (target "sitting" at 4 reads source "sitting" at 3), while the
    reference quirk reads the neighbour (source 4, "on"). Edited maps must carry each
    unchanged word's own map; if not, every word after the swap gets its neighbour's."""
    src, tgt = "a cat sitting on a car", "a hedgehogs sitting on a car"
    clean = P.replacement_mapper(tok, src, tgt)
    quirk = P.replacement_mapper(tok, src, tgt, reference_quirks=True)
    for w in (2, 3, 4, 5):  # sitting, on, a, car
        i = P.word_token_indices(tok, src, w)[0]
        j = P.word_token_indices(tok, tgt, w)[0]
        assert clean[i, j] == 1 and clean[:, j].sum() == 1
    assert quirk[4, 4] == 1 and quirk[3, 4] == 0
    # EOS: source 7 -> target 8
    assert clean[7, 8] == 1
    # On a random stochastic map, unchanged words' columns are copied exactly.
    probs = np.random.default_rng(0).dirichlet(np.ones(77), size=(2, 5)).astype(np.float32)
    edited = np.einsum("nts,su->ntu", probs, clean)
    np.testing.assert_array_equal(edited[..., [1, 4, 5, 6, 7, 8]], probs[..., [1, 3, 4, 5, 6, 7]])
    np.testing.assert_allclose(edited[..., 2], probs[..., 2] / 2, rtol=1e-6)


def test_replacement_different_word_counts_raises(tok):
    """Word swap needs equal word counts; the error names both prompts and their counts and
    points to refine mode, instead of the reference's message without a fix."""
    with pytest.raises(ValueError) as e:
        P.replacement_mapper(tok, "a cat sitting on a car", "a cat sitting on a red car")
    msg = str(e.value)
    assert "'a cat sitting on a car'" in msg and "'a cat sitting on a red car'" in msg
    assert "6 words" in msg and "has 7" in msg
    assert "use mode='refine' for prompts of different lengths" in msg
    with pytest.raises(ValueError, match="mode='refine'"):
        P.replacement_mappers(tok, "a cat", ["a dog", "a big dog"])


def test_replacement_batched(tok):
    """Several targets stack to (n_targets, 77, 77) in order."""
    src = REPLACE_PAIRS[0][0]
    targets = [REPLACE_PAIRS[0][1], REPLACE_PAIRS[1][1]]
    ms = P.replacement_mappers(tok, src, targets)
    assert ms.shape == (2, 77, 77) and ms.dtype == np.float32
    for k, t in enumerate(targets):
        np.testing.assert_array_equal(ms[k], P.replacement_mapper(tok, src, t))
    assert P.replacement_mappers(tok, src, targets[0]).shape == (1, 77, 77)


# ------------------------------------------------------------------------- word indices


WORD_CASES = [
    ("a cat sitting on a car", "a"),
    ("a cat sitting on a car", "car"),
    ("a cat sitting on a car", 2),
    ("a photo of lasagne on a table", "lasagne"),
    ("a photo of lasagne on a table", 3),
    ("a photo of lasagne on a table", "table"),
    ("a cake with jelly beans decorations.", "decorations."),
    ("a cake with jelly beans decorations.", "decorations"),  # no match: punctuation counts
    ("the dog's hedgehogs, sleeping", "hedgehogs,"),
    ("the dog's hedgehogs, sleeping", 3),
    ("a cat", "dog"),
]


@pytest.mark.parametrize("prompt,word", WORD_CASES)
def test_word_token_indices_match_reference(tok, prompt, word):
    """Both modes give the reference's get_word_inds positions on ordinary prompts (every
    occurrence of a string, multi-token words, punctuation attached to a word); if not,
    equalizers, per-word windows and local blend would address the wrong tokens."""
    ref = _ref_get_word_inds(prompt, word, tok).astype(np.int64).tolist()
    assert P.word_token_indices(tok, prompt, word).tolist() == ref
    assert P.word_token_indices(tok, prompt, word, reference_quirks=True).tolist() == ref


def test_word_token_indices_hand_checked(tok):
    """Positions count BOS as 0; a string finds every occurrence; a multi-token word gives
    consecutive positions; negative indices count from the end."""
    assert P.word_token_indices(tok, "a cat on a mat", "a").tolist() == [1, 4]
    assert P.word_token_indices(tok, "a photo of lasagne on a table", "lasagne").tolist() == [4, 5]
    assert P.word_token_indices(tok, "a photo of lasagne on a table", -1).tolist() == [8]
    assert P.word_token_indices(tok, "a cat", "dog").tolist() == []
    assert P.word_token_indices(tok, "a cat", "cat").dtype == np.int32


def test_word_token_indices_quirks(tok):
    """Where the reference's decoded-length walk goes wrong the clean default stays right:
    repeated spaces (the reference's empty word takes the next token) and characters split
    into byte tokens (the reference shifts tokens onto later words, then fails)."""
    prompt = "a  cat sitting"  # two spaces
    assert P.word_token_indices(tok, prompt, "sitting").tolist() == [3]
    assert P.word_token_indices(tok, prompt, 1).tolist() == [2]          # "cat"
    ref = _ref_get_word_inds(prompt, 1, tok).tolist()                      # the empty word
    assert ref == [2]
    assert P.word_token_indices(tok, prompt, 1, reference_quirks=True).tolist() == ref
    # ... so the reference's "cat" is the "sitting" token
    assert _ref_get_word_inds(prompt, "cat", tok).tolist() == [3]
    assert P.word_token_indices(tok, prompt, "cat", reference_quirks=True).tolist() == [3]
    assert P.word_token_indices(tok, prompt, "cat").tolist() == [2]
    # out-of-range index: the reference returns nothing, the clean mode raises
    assert P.word_token_indices(tok, "a cat", 5, reference_quirks=True).tolist() == []
    with pytest.raises(ValueError, match="out of range"):
        P.word_token_indices(tok, "a cat", 5)
    # "🦔" is two byte tokens: the clean mode finds both; the reference breaks
    assert P.word_token_indices(tok, "a 🦔 x", "🦔").tolist() == [2, 3]
    assert P.word_token_indices(tok, "a 🦔 x", "x").tolist() == [4]
    with pytest.raises(IndexError):
        _ref_get_word_inds("a 🦔 x", "x", tok)
    with pytest.raises(ValueError, match="IndexError"):
        P.word_token_indices(tok, "a 🦔 x", "x", reference_quirks=True)


def test_prompt_too_long_raises(tok):
    """A prompt over 77 tokens would have its mapper silently cut; it must raise."""
    long = " ".join(["cat"] * 80)
    with pytest.raises(ValueError, match="more than max_len=77"):
        P.refinement_mapper(tok, "a cat", long)
    with pytest.raises(ValueError, match="more than max_len=77"):
        P.word_token_indices(tok, long, "cat")


# -------------------------------------------------------------------------- equalizer


def test_equalizer(tok):
    """Ones except each word's tokens at its value (multi-token words entirely; a single
    value for all words); if not, reweighting would scale the wrong columns."""
    eq = P.equalizer(tok, "a smiling bear eating lasagne", "smiling", 5)
    assert eq.shape == (77,) and eq.dtype == np.float32
    expected = np.ones(77, np.float32)
    expected[2] = 5
    np.testing.assert_array_equal(eq, expected)

    eq = P.equalizer(tok, "a smiling bear eating lasagne", ("smiling", "lasagne"), (-1, 3))
    expected = np.ones(77, np.float32)
    expected[2], expected[[5, 6]] = -1, 3
    np.testing.assert_array_equal(eq, expected)

    eq = P.equalizer(tok, "a smiling bear eating lasagne", [1, "bear"], 10.0)
    expected = np.ones(77, np.float32)
    expected[[2, 3]] = 10
    np.testing.assert_array_equal(eq, expected)


def test_equalizer_errors(tok):
    """An unknown word is an error naming the word and the prompt (the reference silently
    reweights nothing); mismatched counts of words and values are an error."""
    with pytest.raises(ValueError) as e:
        P.equalizer(tok, "a smiling bear", "cat", 5)
    assert "'cat'" in str(e.value) and "'a smiling bear'" in str(e.value)
    with pytest.raises(ValueError, match="2 words"):
        P.equalizer(tok, "a smiling bear", ("smiling", "bear"), (1, 2, 3))


# ---------------------------------------------------------------------------- windows


ALPHA_CASES = [
    (["a cat sitting on a car", "a dog sitting on a car"], 50, 0.8),
    (["a cat sitting on a car", "a dog sitting on a car"], 50, (0.2, 0.6)),
    (["a cat sitting on a car", "a dog sitting on a car", "a hedgehogs sitting on a car"], 50,
     {"default_": 1.0, "dog": 0.2, "hedgehogs": (0.1, 0.5)}),
    (["pink bear riding a bicycle", "pink bear riding a bicycle on the beach"], 20,
     {"beach": 0.4}),  # no default key: (0, 1)
    (["a photo of lasagne", "a photo of lasagne and pizza"], 7,
     {"default_": 0.8, "lasagne": (0.3, 0.9), "a": 0.0}),
]


@pytest.mark.parametrize("prompts,num_steps,cross", ALPHA_CASES)
def test_cross_replace_alphas_match_reference(tok, prompts, num_steps, cross):
    """Equal to get_time_words_attention_alpha (int(b·(T+1)) rounding, default first, word
    windows looked up in the targets, multi-token words); if not, cross maps would be
    replaced on other steps than in the reference."""
    out = P.cross_replace_alphas(prompts, num_steps, cross, tok)
    ref = _ref_time_words_alpha(prompts, num_steps, dict(cross) if isinstance(cross, dict)
                                else cross, tok)
    assert out.shape == (num_steps + 1, len(prompts) - 1, 77) and out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)


def test_cross_replace_alphas_hand_checked(tok):
    """Cross 0.8 over 50 steps: alpha 1 on steps 0..39 (int(0.8·51) = 40); a word window
    0.2 on "dog" → steps 0..9 for its token only."""
    a = P.cross_replace_alphas(["a cat", "a dog"], 50, {"default_": 0.8, "dog": 0.2}, tok)
    assert a[:40, 0, 1].tolist() == [1.0] * 40 and a[40:, 0, 1].tolist() == [0.0] * 11
    assert a[:10, 0, 2].tolist() == [1.0] * 10 and a[10:, 0, 2].sum() == 0
    assert P.cross_replace_alphas(["a cat", "a dog"], 10, 1, tok).min() == 1.0  # int accepted


def test_cross_replace_alphas_errors(tok):
    """Windows outside [0, 1] (or reversed) name the argument; a word in no target raises
    (in the reference a key naming a source-only word silently does nothing)."""
    prompts = ["a cat", "a dog"]
    with pytest.raises(ValueError, match=r"cross_replace_steps = 1\.5"):
        P.cross_replace_alphas(prompts, 50, 1.5, tok)
    with pytest.raises(ValueError, match=r"cross_replace_steps\['dog'\]"):
        P.cross_replace_alphas(prompts, 50, {"dog": (0.5, 1.2)}, tok)
    with pytest.raises(ValueError, match=r"cross_replace_steps\['default_'\]"):
        P.cross_replace_alphas(prompts, 50, {"default_": (0.6, 0.2)}, tok)
    with pytest.raises(ValueError, match=r"'cat' is in none of the target prompts"):
        P.cross_replace_alphas(prompts, 50, {"cat": 0.2}, tok)
    with pytest.raises(ValueError, match="at least one target"):
        P.cross_replace_alphas(["a cat"], 50, 0.8, tok)
    with pytest.raises(ValueError, match="num_steps"):
        P.cross_replace_alphas(prompts, 0, 0.8, tok)


def test_self_replace_window():
    """int(T·s0), int(T·s1) with T (not T + 1) as the reference: self 0.4 over 50 steps →
    steps [0, 20); invalid windows name the argument."""
    assert P.self_replace_window(50, 0.4) == (0, 20)
    assert P.self_replace_window(50, (0.2, 0.6)) == (10, 30)
    assert P.self_replace_window(7, 1.0) == (0, 7)
    assert all(type(v) is int for v in P.self_replace_window(50, 0.4))
    with pytest.raises(ValueError, match="self_replace_steps"):
        P.self_replace_window(50, -0.1)
    with pytest.raises(ValueError, match="self_replace_steps"):
        P.self_replace_window(50, (0.5, 0.4))
    with pytest.raises(ValueError, match="self_replace_steps"):
        P.self_replace_window(50, "0.4")
