"""Nested Attention personalisation (jattn.methods.personalize, ``jattn personalize``) on the
tiny random pipeline with tiny random encoder weights: prompt side (s* positions, cases),
the placeholder embedding, one compiled call for several subjects and prompts with zero
recompilations for new ones, batch independence, identity through the UNet, the CLI and the
errors of bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods import personalize as P
from jattn.models import nested as N
from jattn.models.clip_vision import CLIPVisionConfig
from jattn.models.resampler import ResamplerConfig
from jattn.policy.nested import nested_policy

CFG = N.NestedEncoderConfig(
    vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8,
                            num_hidden_layers=2, num_attention_heads=2, image_size=16,
                            patch_size=8, hidden_act="gelu"),
    resampler=ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=3,
                              embedding_dim=16, output_dim=32, ff_mult=2))


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    import jattn

    return jattn.load(tiny_sd_dir)


@pytest.fixture(scope="module")
def weights(pipe, tmp_path_factory):
    """Tiny random weights (nested projections from to_k/to_v, scaled up so that the subject
    visibly matters; placeholder from "object"), saved and loaded as a file."""
    params = N.init_nested_params(CFG, pipe.params["unet"], pipe.sites(), jax.random.key(0),
                                  text_params=pipe.params["text_encoder"],
                                  tokenizer=pipe.tokenizer)
    params["nested"] = jax.tree_util.tree_map(lambda a: a * 4.0, params["nested"])
    path = tmp_path_factory.mktemp("nested") / "w.safetensors"
    N.save_nested_weights(path, params, CFG)
    return path


def _img(seed, size=24):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def test_prompt_side(pipe):
    """s* becomes the placeholder token and its positions (BOS at 0) are found, several per
    prompt in order; one-s* prompts are made once per subject (subject-major), a k-s* prompt
    once with subjects 0..k-1. Breaks if a position is off by one or the order changes."""
    texts, ids, pos = P.placeholder_positions(pipe.tokenizer,
                                              ["a photo of s* on the left", "s* and s*"])
    assert texts == ["a photo of sks on the left", "sks and sks"]
    tok = pipe.tokenizer("sks", add_special_tokens=False)["input_ids"][0]
    assert pos.tolist() == [[4, -1], [1, 3]]  # BOS a photo of sks
    assert all(ids[i, p] == tok for i, row in enumerate(pos) for p in row if p >= 0)
    assert P.plan_cases([1, 2, 1], 2) == [(0, (0,)), (2, (0,)), (0, (1,)), (2, (1,)),
                                          (1, (0, 1))]
    assert P.plan_cases([1, 1], 1) == [(0, (0,)), (1, (0,))]


def test_placeholder_embedding_changes_only_its_row(pipe):
    """The placeholder embedding replaces one row of the token embedding: prompts without
    the placeholder encode bit-identically, prompts with it change. Breaks if the override
    touched other rows or did not reach the text encoder."""
    tp = pipe.params["text_encoder"]
    tok = pipe.tokenizer("sks", add_special_tokens=False)["input_ids"][0]
    new = P.text_params_with_placeholder(tp, tok, jnp.ones((32,)))
    enc = pipe._text_fn()
    plain = pipe.tokenize(["a red circle", "a sks circle"])
    a, b = enc(tp, jnp.asarray(plain)), enc(new, jnp.asarray(plain))
    np.testing.assert_array_equal(a[0], b[0])
    assert float(jnp.abs(a[1] - b[1]).max()) > 1e-3


def test_personalize_one_call_no_recompile(pipe, weights):
    """Two subjects × one prompt + a two-subject prompt run as one batch of 3 images in
    plan_cases order; a second call with new subject images, new prompts, new seeds and
    another λ compiles nothing (encoder, text, sampler, decoder trace counts unchanged), the
    encoder runs once per call (not per step or per prompt), and the subject changes the
    image. Breaks if anything dynamic became static or the encoder ran in the loop."""
    out = P.personalize(pipe, [_img(0), _img(1)], ["s* on the left", "s* and s*"], 3,
                        weights=weights, num_inference_steps=2)
    assert out.images.shape == (3, 16, 16, 3)
    assert out.prompts == ["s* on the left", "s* on the left", "s* and s*"]
    assert out.subjects == [(0,), (1,), (0, 1)] and out.seeds == [3, 4, 5]
    counts = dict(pipe.trace_counts)
    assert counts["nested_encoder"] == 1
    out2 = P.personalize(pipe, [_img(2, 40), _img(3)], ["s* at the top", "s* or s*"], [7, 8, 9],
                         weights=weights, scale=0.5, num_inference_steps=2)
    assert pipe.trace_counts == counts
    assert not np.array_equal(out.latents, out2.latents)
    # subjects swapped with their seeds: the single-subject rows swap, the two-subject
    # image changes (the subject, not the batch position, decides the image)
    out3 = P.personalize(pipe, [_img(1), _img(0)], ["s* on the left", "s* and s*"], [4, 3, 5],
                         weights=weights, num_inference_steps=2)
    np.testing.assert_allclose(out3.latents[0], out.latents[1], atol=1e-5)
    np.testing.assert_allclose(out3.latents[1], out.latents[0], atol=1e-5)
    assert float(np.abs(out3.latents[2] - out.latents[2]).max()) > 1e-3
    assert pipe.trace_counts == counts


def test_no_subject_is_bit_identical_through_unet(pipe, weights):
    """Through the jitted UNet with CFG: the Nested Attention policy with every position -1
    gives eps bit-identical to no policy; with a subject it differs only in the conditional
    half. Breaks if the op perturbed rows it should not touch."""
    w = N.load_nested_weights(weights)
    sites = pipe.sites()
    keys, values = P.subject_kv(pipe, w, P.load_subject_images([_img(0)], CFG))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([500.0, 500.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
    fn = jax.jit(pipe.unet_fn(pipe.params["unet"]))
    ref, _ = fn(x, t, ctx, None, jnp.int32(0))
    rows_k = {s: a[:, None] for s, a in keys.items()}
    rows_v = {s: a[:, None] for s, a in values.items()}
    from jattn.policy.core import Layout

    lay = Layout(groups=1, members=1, cfg=True)
    off = nested_policy(sites, rows_k, rows_v, np.array([[-1]]), layout=lay)
    out, _ = fn(x, t, ctx, off, jnp.int32(0))
    np.testing.assert_array_equal(out, ref)
    on = nested_policy(sites, rows_k, rows_v, np.array([[3]]), layout=lay)
    out, _ = fn(x, t, ctx, on, jnp.int32(0))
    np.testing.assert_array_equal(out[0], ref[0])
    assert float(jnp.abs(out[1] - ref[1]).max()) > 1e-4


def test_api_errors(pipe, weights, tmp_path):
    """Bad input -> one clear error naming the argument: a prompt without s*, two s* with
    one subject image, an unreadable subject image, a wrong-size one (too small, too
    elongated), a missing file, weights missing (says how to train / pass weights), a prompt
    using the placeholder word or a word whose BPE split ends in it."""
    with pytest.raises(ValueError, match=r"prompts\[1\].*has no s\*"):
        P.personalize(pipe, [_img(0)], ["s* here", "a red circle"], weights=weights)
    with pytest.raises(ValueError, match=r"2 s\* placeholders but 1 subject image was given"):
        P.personalize(pipe, [_img(0)], ["s* and s*"], weights=weights)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"subject_images\[0\].*cannot be read"):
        P.personalize(pipe, [str(bad)], ["s*"], weights=weights)
    with pytest.raises(FileNotFoundError, match="no such file"):
        P.personalize(pipe, [str(tmp_path / "absent.png")], ["s*"], weights=weights)
    for im in (_img(0, 4), np.zeros((16, 40, 3), np.uint8)):
        with pytest.raises(ValueError, match="wrong size for a subject image"):
            P.personalize(pipe, [im], ["s*"], weights=weights)
    with pytest.raises(FileNotFoundError, match="train_personalize.py.*weights"):
        P.personalize(pipe, [_img(0)], ["s*"], weights=tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="contains 'sks'"):
        P.personalize(pipe, [_img(0)], ["s* next to sks"], weights=weights)
    with pytest.raises(ValueError, match="tokenizes to 'sks'"):  # BPE: 'z' + 'sks</w>'
        P.personalize(pipe, [_img(0)], ["s* next to zsks"], weights=weights)


def test_cli(tiny_sd_dir, weights, tmp_path, capsys):
    """``jattn personalize`` writes 000.png … in plan order, grid.png and result.json (which
    prompt and subject image each file shows); mistakes exit 2 with one line naming the
    option: no s*, two s* with one --subject-image, weights missing (default path absent ->
    how to train / --weights)."""
    from PIL import Image

    from jattn.cli import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(_img(0)).save(a)
    Image.fromarray(_img(1)).save(b)
    out = tmp_path / "out"
    rc = main(["personalize", "--model", str(tiny_sd_dir), "--weights", str(weights),
               "--subject-image", str(a), "--subject-image", str(b), "--prompt", "s* left",
               "--prompt", "s* and s*", "--steps", "2", "--out-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png",
                                                     "grid.png", "result.json"]
    res = json.loads((out / "result.json").read_text())
    assert res["files_meaning"]["001.png"] == {"prompt": "s* left", "subject_images": [str(b)]}
    assert res["subjects"] == [[0], [1], [0, 1]]
    base = ["personalize", "--model", str(tiny_sd_dir), "--subject-image", str(a), "--steps",
            "2"]
    cases = [(["--weights", str(weights), "--prompt", "a circle", "--out-dir",
               str(tmp_path / "o1")], r"--prompt\[0\] 'a circle' has no s\*"),
             (["--weights", str(weights), "--prompt", "s* and s*", "--out-dir",
               str(tmp_path / "o2")], r"--prompt\[0\] has 2 s\* placeholders.*--subject-image 2"),
             (["--weights", str(tmp_path / "none.safetensors"), "--prompt", "s*", "--out-dir",
               str(tmp_path / "o3")], "no such file.*train_personalize.py.*--weights PATH")]
    for extra, msg in cases:
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jattn personalize: error:")
        assert __import__("re").search(msg, err), err


@pytest.mark.slow  # two more sampler programs: 41 s measured with the machine loaded 5×
def test_composes_with_style_aligned(pipe, weights):
    """Nested Attention composed with StyleAligned (one group of 2, member 0 the style
    reference): member 0 equals personalisation alone (StyleAligned leaves the reference's
    own attention and statistics), member 1 differs from it alone (it shares the reference's
    attention and GroupNorm statistics). Breaks if the layouts were not adopted, the
    composition dropped an op, or the nested op indexed rows by group instead of row."""
    from jattn.methods.style_aligned import style_aligned_policy

    prompts = ["s* on the left", "s* at the top"]
    kw = dict(weights=weights, num_inference_steps=2)
    alone = P.personalize(pipe, [_img(0)], prompts, 0, **kw)
    sa = style_aligned_policy(pipe, members=2, num_steps=2)
    both = P.personalize(pipe, [_img(0)], prompts, 0, extra_policy=sa, **kw)
    np.testing.assert_allclose(both.latents[0], alone.latents[0], atol=1e-4)
    assert float(np.abs(both.latents[1] - alone.latents[1]).max()) > 1e-3
    with pytest.raises(ValueError, match="extra_policy: its layout"):
        P.personalize(pipe, [_img(0)], prompts[:1], 0, extra_policy=sa, **kw)
