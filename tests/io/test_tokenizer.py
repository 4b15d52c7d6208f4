"""The bundled CLIP BPE tokenizer and the fixed-length / word-position helpers."""

import gzip
import json

import numpy as np
import pytest

from jattn.io.tokenizer import BUNDLED_TOKENIZER_DIR, load_tokenizer, token_indices, tokenize


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_ids(tok):
    """The bundled files reproduce CLIP's ids; if not, every prompt the text encoder sees
    (and every checkpoint trained with the real tokenizer) would be garbled."""
    ids = tokenize(tok, "a cat wearing sunglasses")[0]
    assert ids[:6].tolist() == [49406, 320, 2368, 3309, 12906, 49407]
    # case and punctuation handled as CLIP does: lowercased, punctuation its own token
    assert tokenize(tok, "A RED circle, on the left")[0, :9].tolist() == [
        49406, 320, 736, 7117, 267, 525, 518, 1823, 49407]


def test_vocab_and_merges_sizes():
    """Sizes and special ids of openai/clip-vit-large-patch14; a wrong merge window in
    scripts/build_tokenizer.py would shift every id above 511."""
    vocab = json.loads((BUNDLED_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    lines = (BUNDLED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 48894
    assert lines[1] == "i n" and lines[2] == "t h"
    cfg = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["pad_token"] == "<|endoftext|>"


def test_loaded_tokenizer_specials(tok):
    """SD1.x pads with EOS (49407); a different pad id changes the text embedding."""
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77


def test_build_script_reproduces_files(tmp_path):
    """scripts/build_tokenizer.py regenerates the committed files byte for byte from a
    merge list in open_clip's format (first line header, 48894 used merges); if not, the
    committed files are no longer what the script documents."""
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "build_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tokenizer", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = (BUNDLED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    extra = ["zz zz</w>"] * 10  # lines past the 48894 window are ignored, as in CLIP
    src = gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n"
                         + "\n".join(lines + extra) + "\n").encode("utf-8"))
    files = mod.build(src)
    for name, text in files.items():
        assert (BUNDLED_TOKENIZER_DIR / name).read_text(encoding="utf-8") == text, name


def test_padding_shape_dtype(tok):
    """Batches are int32 (B, 77) padded with 49407; the text encoder and the policy's
    token masks index this exact layout."""
    ids = tokenize(tok, ["a b", "a cat"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [49406, 320, 321, 49407]
    assert (ids[0, 3:] == 49407).all() and (ids[1, 4:] == 49407).all()
    assert tokenize(tok, "a cat", max_length=10).shape == (1, 10)


def test_too_long_raises(tok):
    """Prompts over 77 ids raise (no silent truncation, which would drop words an edit
    refers to); exactly 77 is accepted."""
    ok = " ".join(["cat"] * 75)  # 75 + BOS + EOS = 77
    assert tokenize(tok, ok).shape == (1, 77)
    with pytest.raises(ValueError, match=r"prompt 1 has 78 tokens.*Shorten the prompt"):
        tokenize(tok, ["a cat", ok + " cat"])


def test_token_indices(tok):
    """Word → positions (BOS offset included) for single- and multi-token words, repeated
    words, phrases and word indices; wrong positions would put edits on the wrong word."""
    p = "a photo of a cheeseburger and a jattn cat, cheeseburger"
    assert token_indices(tok, "a cat wearing sunglasses", "cat") == [2]
    assert token_indices(tok, "a cat wearing sunglasses", "Sunglasses") == [4]
    assert token_indices(tok, p, "jattn") == [8, 9]  # 'j', 'attn</w>'
    assert token_indices(tok, p, "cheeseburger") == [5, 12]  # both occurrences
    assert token_indices(tok, p, "a cheeseburger") == [4, 5]
    assert token_indices(tok, "a red outlined circle", "outlined") == [3, 4]
    assert token_indices(tok, p, 5) == [6]  # 'and'
    assert token_indices(tok, p, 8) == [10, 11]  # 'cat,' → 'cat', ','
    assert token_indices(tok, p, -1) == [12]
    # whole words only: 'attn' is a suffix token of 'jattn', not a word of the prompt
    with pytest.raises(ValueError, match="not found"):
        token_indices(tok, p, "attn")
    with pytest.raises(ValueError, match="not found"):
        token_indices(tok, p, "dog")
    with pytest.raises(ValueError, match="out of range"):
        token_indices(tok, p, 20)
