"""Token grounding (TokenCompose losses from the world's masks) of the training recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.io.tokenizer import load_tokenizer, tokenize
from jattn.train import steps as steps_lib
from jattn.train.config import load_config
from jattn.train.grounding import (ROLES, grounding_loss, grounding_policy, grounding_targets,
                                   object_token_positions)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _words_at(tok, ids_row, positions):
    return [None if p < 0 else tok.convert_ids_to_tokens([int(ids_row[p])])[0].replace("</w>", "")
            for p in positions]


def test_positions_follow_object_phrases(tok):
    caps = ["a photo of a large red striped circle on the left and a blue square at the top"
            " on a striped background",
            "small yellow triangle, a green heart and a white ring"]
    ids = tokenize(tok, caps)
    pos = object_token_positions(ids, [2, 3], tok)
    assert pos.shape == (2, 3, len(ROLES))
    assert _words_at(tok, ids[0], pos[0, 0]) == ["large", "red", "striped", "circle", "left"]
    assert _words_at(tok, ids[0], pos[0, 1]) == [None, "blue", None, "square", "top"]
    assert (pos[0, 2] == -1).all()  # no third object; the background's "striped" is not one
    assert _words_at(tok, ids[1], pos[1, 0]) == ["small", "yellow", None, "triangle", None]
    assert _words_at(tok, ids[1], pos[1, 2]) == [None, "white", None, "ring", None]


def test_positions_raise_when_a_shape_noun_is_missing(tok):
    with pytest.raises(ValueError, match="shape nouns"):
        object_token_positions(tokenize(tok, ["a red circle"]), [2], tok)


def test_targets_match_the_rendered_objects(tok):
    from jattn.world import make_dataset

    d = make_dataset(6, seed=3, split="train", start=10, masks=True)
    ids = tokenize(tok, list(d["captions"]))
    masks, pos = grounding_targets("world", 3, 10, 6, ids, tok)
    assert masks.shape == (6, 3, 16, 16) and masks.dtype == np.float16
    for i in range(6):
        for k in range(3):
            has = k < d["num_objects"][i]
            assert (masks[i, k].sum() > 0) == has
            assert (pos[i, k, ROLES.index("shape")] >= 0) == has
            if has:  # the pooled mask holds the object's area (rings: holes filled)
                area = d["masks"][i, k].sum() / 64.0
                assert float(masks[i, k].astype(np.float64).sum()) >= area - 1e-2
    with pytest.raises(ValueError, match="world"):
        grounding_targets("toy", 0, 0, 2, ids[:2], tok)


def _numpy_losses(probs_by_site, res, masks, positions, keep, eps=1e-6):
    """Direct re-statement of the TokenCompose token / pixel losses with loops."""
    tok_l, pix_l = [], []
    b, k, m, _ = masks.shape
    for path, probs in probs_by_site.items():
        h, w = res[path]
        t_sum = p_sum = 0.0
        n = 0
        for i in range(b):
            for j in range(k):
                mk = masks[i, j].reshape(h, m // h, w, m // w).mean((1, 3)).ravel()
                for p in positions[i, j]:
                    if p < 0 or not keep[i]:
                        continue
                    a = probs[i, :, p]
                    inside = (a * mk).sum() / (a.sum() + eps)
                    t_sum += (1 - inside) ** 2
                    q = np.clip(a, eps, 1 - eps)
                    p_sum += np.mean(-(mk * np.log(q) + (1 - mk) * np.log1p(-q)))
                    n += 1
        tok_l.append(t_sum / max(n, 1))
        pix_l.append(p_sum / max(n, 1))
    return np.mean(tok_l), np.mean(pix_l)


def test_loss_matches_a_direct_restatement():
    rng = np.random.default_rng(0)
    b, k, r, s = 3, 2, 2, 7
    res = {"a": (4, 4), "b": (2, 2)}
    probs = {p: rng.dirichlet(np.ones(s), size=(b, h * w)) for p, (h, w) in res.items()}
    masks = (rng.random((b, k, 4, 4)) < 0.3).astype(np.float32)
    positions = rng.integers(-1, s, (b, k, r)).astype(np.int32)
    keep = np.array([True, False, True])
    aux = {p: {"0": {"probs": jnp.asarray(v, jnp.float32)}} for p, v in probs.items()}
    t, px = grounding_loss(aux, res, jnp.asarray(masks), jnp.asarray(positions), jnp.asarray(keep))
    t_ref, px_ref = _numpy_losses(probs, res, masks, positions, keep)
    np.testing.assert_allclose(float(t), t_ref, rtol=1e-5)
    np.testing.assert_allclose(float(px), px_ref, rtol=1e-5)


def test_token_loss_is_zero_on_the_mask_and_high_off_it():
    masks = np.zeros((1, 1, 4, 4), np.float32)
    masks[0, 0, :2, :2] = 1.0
    pos = np.array([[[1]]], np.int32)
    on = np.full((1, 16, 3), 0.01, np.float32)
    on[0, :, 1] = 0.0
    on[0, masks[0, 0].ravel() > 0, 1] = 0.9
    off = np.full((1, 16, 3), 0.01, np.float32)
    off[0, masks[0, 0].ravel() == 0, 1] = 0.9
    res = {"s": (4, 4)}
    keep = jnp.array([True])
    t_on, _ = grounding_loss({"s": {"0": {"probs": jnp.asarray(on)}}}, res, masks, pos, keep)
    t_off, _ = grounding_loss({"s": {"0": {"probs": jnp.asarray(off)}}}, res, masks, pos, keep)
    assert float(t_on) < 1e-6 and float(t_off) > 0.9


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_grounded_train_step_learns_to_localise(tok):
    """A tiny UNet trained on the grounding loss alone puts a word's attention on its mask."""
    cfg = load_config(ROOT / "configs" / "bundled_model.py:tiny")
    st = dataclasses.replace(cfg.diffusion, grounding_token_weight=1.0,
                             grounding_pixel_weight=0.0, caption_dropout=0.0, lr=1e-2,
                             warmup_steps=1)
    from jattn.train import stages

    fn, tx = steps_lib.make_diffusion_step(st, 0, stages._empty_ids(cfg))
    state = steps_lib.init_state(stages.init_diffusion_params(cfg.replace(diffusion=st)), tx)
    ids = tokenize(tok, ["a red circle on the left", "a blue square on the right"])
    pos = object_token_positions(ids, [1, 1], tok)
    masks = np.zeros((2, 3, 16, 16), np.float32)
    masks[0, 0, :, :8] = 1.0
    masks[1, 0, :, 8:] = 1.0
    latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    losses = []
    for _ in range(20):  # random timesteps make single steps noisy: compare 4-step means
        state, met = fn(state, latents, ids, masks, pos)
        losses.append(float(met["ground_token"]))
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert np.isfinite(float(met["loss"])) and "ground_pixel" in met
    pol = grounding_policy(steps_lib.unet_config_of(st), 2, 16)
    assert all(s.kind == "cross" for s in pol.sites_of(0))
