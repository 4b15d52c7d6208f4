"""Build the bundled CLIP BPE tokenizer files from open_clip's merge list.

Run:
    python scripts/build_tokenizer.py                       # pip-downloads open-clip-torch
    python scripts/build_tokenizer.py --wheel /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
    python scripts/build_tokenizer.py --bpe bpe_simple_vocab_16e6.txt.gz

Writes, into ``jattn/assets/bundled/tokenizer/`` (or ``--out``), the four files of the
Hugging Face ``openai/clip-vit-large-patch14`` tokenizer folder (the one SD1.x ships):

- ``vocab.json``: 49408 entries. Ids 0..255 are the 256 byte symbols of the byte-level
  unicode mapping (GPT-2/CLIP ``bytes_to_unicode``), ids 256..511 the same symbols with the
  end-of-word suffix ``</w>``, ids 512..49405 the concatenated results of the 48894 merges
  in rank order, 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>``.
- ``merges.txt``: ``#version: 0.2`` then the 48894 merges, one ``a b`` per line.
- ``tokenizer_config.json`` and ``special_tokens_map.json``: model_max_length 77,
  bos ``<|startoftext|>``, eos/pad/unk ``<|endoftext|>`` (pad id 49407 as SD1.x),
  do_lower_case.

The source is ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from the open-clip-torch wheel
(never installed; the wheel is only opened as a zip). The first line of that file is a
header; CLIP uses the next 49152 - 256 - 2 = 48894 lines. Output is byte-for-byte
reproducible (sorted-free, fixed key order, ``\\n`` line ends).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "jattn", "assets", "bundled", "tokenizer",
)


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255, in byte order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves;
    every other byte b maps to chr(256 + k), k counting those bytes in increasing order.
    The vocabulary lists the symbols in the order: printable bytes first (by byte), then
    the remapped ones (by byte) — the order CLIP's vocabulary uses.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    keep = set(printable)
    symbol = {b: chr(b) for b in printable}
    order = list(printable)
    k = 0
    for b in range(256):
        if b not in keep:
            symbol[b] = chr(256 + k)
            order.append(b)
            k += 1
    return [symbol[b] for b in order]


def read_bpe_lines(bpe_gz: bytes) -> list[tuple[str, str]]:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    for i, m in enumerate(merges):
        if len(m) != 2:
            raise ValueError(f"merge line {i + 1} is not a pair: {m!r}")
    return merges  # type: ignore[return-value]


def build(bpe_gz: bytes) -> dict[str, str]:
    """Return {filename: text} for the four tokenizer files."""
    merges = read_bpe_lines(bpe_gz)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    assert len(vocab) == 49408, len(vocab)
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": merges_txt,
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _bpe_from_wheel(path: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(BPE_MEMBER)


def _download_wheel(dest: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "open-clip-torch", "-d", dest],
        check=True,
    )
    wheels = glob.glob(os.path.join(dest, "open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {dest}")
    return sorted(wheels)[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="path to an open_clip_torch wheel")
    src.add_argument("--bpe", help="path to bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    args = p.parse_args(argv)

    if args.bpe:
        with open(args.bpe, "rb") as f:
            bpe_gz = f.read()
    elif args.wheel:
        bpe_gz = _bpe_from_wheel(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bpe_gz = _bpe_from_wheel(_download_wheel(tmp))
    print(f"source {BPE_MEMBER}: sha256 {hashlib.sha256(bpe_gz).hexdigest()}")

    os.makedirs(args.out, exist_ok=True)
    for name, text in build(bpe_gz).items():
        data = text.encode("utf-8")
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)
        print(f"wrote {name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
