"""Personalisation pairs of the world (jattn/world/pairs.py): subject and target agree on
the object, captions name it by s* and say what was drawn, the held-out split is disjoint,
everything is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from jattn import world
from jattn.world import pairs as P
from jattn.world.spec import BACKGROUND_TONES, COLORS, FILLS, HELD_OUT_PAIRS, SHAPES, SIZES


def _mask_of_colour(image, rgb, shade=None):
    m = np.all(image == np.asarray(rgb, np.uint8), axis=-1)
    if shade is not None:
        m |= np.all(image == np.asarray(shade, np.uint8), axis=-1)
    return m


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_subject_is_the_targets_object(split):
    """The subject image shows exactly the target's subject object: same silhouette (mask
    translated), same painted pixels (colour, fill pattern up to its phase), same bounding
    box size; its background differs from the target's; the subject sits near the centre.
    Breaks if the subject is re-sampled instead of copied, or the attributes drift."""
    for i in range(40):
        p = P.sample_pair((5, i), split)
        s = p.subject
        x0, y0, x1, y1 = p.subject_box
        tx0, ty0, tx1, ty1 = s.box
        assert (x1 - x0, y1 - y0) == (tx1 - tx0, ty1 - ty0)
        np.testing.assert_array_equal(p.subject_mask[y0:y1, x0:x1], s.mask[ty0:ty1, tx0:tx1])
        assert abs((x0 + x1) / 2 - 64) <= P.SUBJECT_JITTER + 1
        assert abs((y0 + y1) / 2 - 64) <= P.SUBJECT_JITTER + 1
        assert p.subject_background != p.target.background
        # painted pixels: the palette colour (and its shade for striped/dotted) only, and
        # as many of them as in the target for solid/outlined objects
        rgb = world.PALETTE[s.color]
        shade = world.spec.SHADE[s.color] if s.fill in ("striped", "dotted") else None
        sub = _mask_of_colour(p.subject_image, rgb, shade) & p.subject_mask
        tgt = _mask_of_colour(p.target.image, rgb, shade) & s.mask
        if s.fill in ("solid", "outlined"):
            assert sub.sum() == tgt.sum() > 0
        else:
            assert sub.sum() == p.subject_mask.sum() == s.mask.sum()
        # outside the subject: only the subject background's tones
        bg = np.asarray(BACKGROUND_TONES[p.subject_background], np.uint8)
        outside = p.subject_image[~p.subject_mask]
        assert np.all(np.any(np.all(outside[:, None] == bg[None], -1), -1))


def test_caption_names_the_subject_by_placeholder_and_matches_the_scene():
    """Each caption has one s* and none of the subject's colour/shape words for it; with s*
    expanded to the subject's words it parses to the pair's spec, and that spec agrees with
    the target's ground truth (objects, stated positions, background). Breaks if a caption
    leaks or misstates an attribute."""
    seen_other = seen_alone = 0
    for i in range(60):
        p = P.sample_pair((9, i))
        assert p.caption.count(P.PLACEHOLDER) == 1
        assert "sks" not in p.caption
        s = p.subject
        full = P.expand_placeholder(p.caption, s)
        assert world.parse_prompt(full) == p.spec
        so = p.spec.objects[p.subject_index]
        assert (so.color, so.shape) == (s.color, s.shape)
        assert (so.fill or "solid") == s.fill and (so.size or "medium") == s.size
        for o_spec, o in zip(p.spec.objects, p.target.objects):
            assert o_spec.color == o.color and o_spec.shape == o.shape
            assert o_spec.position in (None, o.position)
        assert p.spec.background in (None, p.target.background)
        assert (p.spec.background is not None) == p.target.background_stated
        if len(p.target.objects) == 2:
            seen_other += 1
            other = p.target.objects[1 - p.subject_index]
            assert (other.color, other.shape) != (s.color, s.shape)
        else:
            seen_alone += 1
    assert seen_other > 10 and seen_alone > 10


def test_heldout_split_is_disjoint_and_covers_the_world():
    """Held-out subjects are 8 (colour, shape) pairs, one per colour, every shape at least
    once, none of the world's own held-out pairs; no training pair (subject or other
    object) ever uses them, so every held-out colour/shape/fill combination is unseen in
    training. Breaks if the split leaks."""
    held = P.HELDOUT_SUBJECT_PAIRS
    assert len(held) == 8 and {c for c, _ in held} == set(COLORS)
    assert {s for _, s in held} == set(SHAPES) and not held & HELD_OUT_PAIRS
    assert P.heldout_subject_pairs(0) == held and P.heldout_subject_pairs(1) != held
    train = P.make_pairs(300, seed=1, split="train")
    test = P.make_pairs(100, seed=1, split="heldout")

    def combos(d, prefix):
        return {(COLORS[c], SHAPES[s]) for c, s in zip(d[f"{prefix}_color"], d[f"{prefix}_shape"])
                if c >= 0}

    assert not combos(train, "subject") & held and not combos(train, "other") & held
    assert combos(test, "subject") <= held and not combos(test, "other") & held
    assert not combos(train, "subject") & HELD_OUT_PAIRS
    train_triples = {(c, s, f) for c, s, f in zip(train["subject_color"], train["subject_shape"],
                                                  train["subject_fill"])}
    test_triples = {(c, s, f) for c, s, f in zip(test["subject_color"], test["subject_shape"],
                                                 test["subject_fill"])}
    assert not train_triples & test_triples
    assert {FILLS[f] for f in train["subject_fill"]} == set(FILLS)
    assert {SIZES[z] for z in train["subject_size"]} == set(SIZES)
    with pytest.raises(ValueError, match="unknown pair split 'all'"):
        P.sample_pair(0, "all")


def test_deterministic_and_batch_independent():
    """Pair i of make_pairs depends on (seed, split, i) only: a resumed training run sees
    the same data. Breaks if sampling depends on batching or global state."""
    full = P.make_pairs(6, seed=3)
    part = P.make_pairs(3, seed=3, start=3)
    for k in ("subject_images", "target_images", "captions", "subject_color", "target_boxes"):
        np.testing.assert_array_equal(full[k][3:], part[k])
    again = P.make_pairs(6, seed=3)
    np.testing.assert_array_equal(full["target_images"], again["target_images"])
    other = P.make_pairs(6, seed=4)
    assert not np.array_equal(full["target_images"], other["target_images"])
    held = P.make_pairs(3, seed=3, split="heldout")
    assert not np.array_equal(full["subject_images"][:3], held["subject_images"])
    d = full
    assert d["subject_images"].dtype == np.uint8 and d["subject_images"].shape == (6, 128, 128, 3)
    assert d["captions"].shape == (6,) and d["target_boxes"].shape == (6, 2, 4)
