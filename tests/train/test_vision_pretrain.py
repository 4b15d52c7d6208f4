"""CLIP-style pretraining of the subject encoder's vision tower
(jattn/train/vision_pretrain.py) on a tiny tower and a tiny random text encoder."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.io.tokenizer import load_tokenizer
from jattn.models import clip_text
from jattn.models.clip_vision import CLIPVisionConfig
from jattn.models.nested import NestedEncoderConfig
from jattn.models.resampler import ResamplerConfig
from jattn.train import vision_pretrain as V
from jattn.world.pairs import subject_pairs


def _tiny_encoder():
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8,
                              num_hidden_layers=1, num_attention_heads=2, image_size=32,
                              patch_size=8, hidden_act="gelu")
    res = ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=2, embedding_dim=16,
                          output_dim=16, ff_mult=2)
    return NestedEncoderConfig(vision=vision, resampler=res, resize_edge=64)


@pytest.fixture(scope="module")
def text_base():
    cfg = clip_text.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)
    return SimpleNamespace(tokenizer=load_tokenizer(), text_config=cfg,
                           params={"text_encoder": clip_text.init_clip_text_params(
                               cfg, jax.random.key(0))})


def test_subject_phrases_cover_every_training_subject_once():
    """One phrase per (colour, shape, fill, size) of the training pairs, no outlined ring,
    all distinct, and the phrase is the subject's words ("a large red outlined circle").
    Breaks if two subjects share a phrase (the classifier could not tell them apart)."""
    pairs = subject_pairs("train")
    phrases, index = V.subject_phrases(pairs)
    rings = sum(s == "ring" for _, s in pairs)
    assert len(phrases) == len(index) == (len(pairs) * 4 - rings) * 3
    assert len(set(phrases)) == len(phrases)
    assert not any(k[1] == "ring" and k[2] == "outlined" for k in index)
    c, s = pairs[0]
    assert phrases[index[(c, s, "outlined", "large")]] == f"a large {c} outlined {s}"
    assert phrases[index[(c, s, "solid", "medium")]] == f"a {c} {s}"


def test_subject_batch_labels_match_the_rendered_subjects():
    """The phrase label of each image is the index of its (colour, shape, fill, size), the
    pixels are the encoder's preprocessing (a 32² crop of the 64² resize), held-out subjects
    get -1, and greyscale rows have equal channels, the others unchanged. Breaks if labels
    and images are misaligned or the grey mask is applied to the wrong rows."""
    enc = _tiny_encoder()
    _, index = V.subject_phrases(subject_pairs("train"))
    keys = list(index)
    px, lab, attrs = V.subject_batch(enc, index, 8, seed=3)
    assert px.shape == (8, 32, 32, 3) and lab.shape == (8,) and (lab >= 0).all()
    from jattn.world.spec import COLORS, FILLS, SHAPES, SIZES

    for i in range(8):
        assert keys[lab[i]] == (COLORS[attrs["color"][i]], SHAPES[attrs["shape"][i]],
                                FILLS[attrs["fill"][i]], SIZES[attrs["size"][i]])
    _, lab_h, _ = V.subject_batch(enc, index, 4, seed=3, split="heldout")
    assert (lab_h == -1).all()
    gray = np.array([True, False] * 4)
    px_g, lab_g, _ = V.subject_batch(enc, index, 8, seed=3, gray=gray)
    np.testing.assert_array_equal(lab_g, lab)
    np.testing.assert_array_equal(px_g[~gray], px[~gray])
    raw = px_g * np.asarray(enc.processing.image_std) + np.asarray(enc.processing.image_mean)
    assert np.ptp(raw[gray], axis=-1).max() < 2e-2  # equal channels (bicubic rounding)
    assert np.ptp(raw[~gray], axis=-1).max() > 0.2


def test_steps_reduce_the_contrastive_loss_and_the_tower_exports(text_base, tmp_path):
    """A few AdamW steps on one batch lower its loss; the exported tower loads back (the
    file personalize training's vision_init reads) equal. Breaks if gradients do not reach
    the tower or the text projection, or the export layout drifts."""
    from jattn.train.personalize import load_tower
    from jattn.train.steps import init_state

    enc = _tiny_encoder()
    cfg = V.VisionPretrainConfig(encoder=enc, batch_size=16, steps=20, lr=3e-3, warmup_steps=1)
    phrases, index = V.subject_phrases(subject_pairs("train"))
    text = V.text_features(text_base, phrases)
    assert text.shape == (len(phrases), 16)
    step_fn, tx = V.make_step(cfg, text)
    state = init_state(V.init_params(cfg, text.shape[1]), tx)
    gray = np.arange(16) % 2 == 0
    px, lab, attrs = V.subject_batch(enc, index, 16, seed=0, gray=gray)
    attrs = {a: jnp.asarray(v, jnp.int32) for a, v in attrs.items()}
    loss = jax.jit(lambda p: V.contrastive_loss(p, jnp.asarray(px), jnp.asarray(lab),
                                                jnp.asarray(text), attrs, jnp.asarray(gray),
                                                enc=enc, attribute_weight=1.0)[0])
    l0 = float(loss(state["params"]))
    for _ in range(15):
        state, m = step_fn(state, jnp.asarray(px), jnp.asarray(lab), attrs, jnp.asarray(gray))
    l1 = float(loss(state["params"]))
    assert np.isfinite(l0) and l1 < 0.8 * l0, (l0, l1)
    path = V.export_tower(tmp_path / "v.safetensors", state["params"])
    got = load_tower(path, enc)
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(state["params"]["image_encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    small = dataclasses.replace(enc, vision=dataclasses.replace(enc.vision, hidden_size=8,
                                                                intermediate_size=16),
                                resampler=dataclasses.replace(enc.resampler, embedding_dim=8))
    with pytest.raises(Exception, match="image_encoder"):
        load_tower(path, small)
