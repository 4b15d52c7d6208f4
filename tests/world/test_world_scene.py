"""The world generator: determinism, ground truth consistent with pixels and captions,
default distributions, held-out split, caption variants and parsing."""

import collections
import time

import numpy as np
import pytest

from jattn import world
from jattn.world.spec import (
    BACKGROUND_TONES, MIN_GAP, PALETTE, SHADE, ObjectSpec, SceneSpec, position_of, size_of,
)


def test_deterministic_and_batch_independent():
    """Same seed → same image and caption, and make_dataset's sample i does not depend on
    the batch it is generated in; otherwise training data and evaluations don't reproduce."""
    a, b = world.sample_scene(7), world.sample_scene(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(world.sample_scene(8).image, a.image)
    full = world.make_dataset(6, seed=3, masks=True)
    part = world.make_dataset(4, seed=3, start=2, masks=True)
    for k in ("images", "captions", "color", "shape", "boxes", "masks", "stated"):
        assert np.array_equal(full[k][2:], part[k]), k
    batch = next(world.iter_batches(3, seed=3, start=3))
    assert np.array_equal(batch["images"], full["images"][3:6])


def test_dataset_arrays():
    """make_dataset's arrays have the documented shapes/dtypes and padding; the training
    script indexes them directly."""
    d = world.make_dataset(5, seed=0)
    assert d["images"].shape == (5, 128, 128, 3) and d["images"].dtype == np.uint8
    assert d["captions"].shape == (5,)
    assert "masks" not in d
    for i in range(5):
        n = d["num_objects"][i]
        assert 1 <= n <= 3
        assert (d["color"][i, :n] >= 0).all() and (d["color"][i, n:] == -1).all()
        assert (d["boxes"][i, n:] == -1).all()
        spec = world.parse_prompt(str(d["captions"][i]))
        assert len(spec.objects) == n


def test_speed():
    """Generation stays fast (10k samples well under a minute); a slow generator would make
    training input-bound."""
    world.sample_scene(0)
    t = time.perf_counter()
    world.make_dataset(300, seed=1)
    per = (time.perf_counter() - t) / 300
    print(f"generation: {per * 1e3:.2f} ms/sample → 10k in {per * 1e4:.1f} s")
    assert per < 5e-3


def _check_scene(s):
    img = s.image
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    union = np.zeros((128, 128), bool)
    for o in s.objects:
        m = o.mask
        assert m.shape == (128, 128) and m.dtype == bool and m.any()
        ys, xs = np.nonzero(m)
        assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        x0, y0, x1, y1 = o.box
        assert x0 >= 2 and y0 >= 2 and x1 <= 126 and y1 <= 126  # never touches the border
        assert position_of(*o.centroid) == o.position
        assert size_of(max(x1 - x0, y1 - y0)) == o.size
        # pixels of the object: its colour, its second tone, or (outlined) background
        px = img[m]
        allowed = [PALETTE[o.color], SHADE[o.color]] if o.fill in ("striped", "dotted") else [PALETTE[o.color]]
        is_obj = np.zeros(len(px), bool)
        for c in allowed:
            is_obj |= (px == np.array(c, np.uint8)).all(-1)
        if o.fill == "outlined":
            assert 0.2 < is_obj.mean() < 0.95
        else:
            assert is_obj.all()
            if o.fill in ("striped", "dotted"):
                assert (px == np.array(SHADE[o.color], np.uint8)).all(-1).any()
        assert not (union & m).any()
        union |= m
    # masks are more than MIN_GAP pixels apart (Chebyshev)
    for i, a in enumerate(s.objects):
        grown = a.mask.copy()
        for _ in range(MIN_GAP):
            p = np.pad(grown, 1)
            grown = np.max([p[di: di + 128, dj: dj + 128] for di in range(3) for dj in range(3)], 0)
        for b in s.objects[i + 1:]:
            assert not (grown & b.mask).any()
    # everything else is background
    tones = [np.array(t, np.uint8) for t in BACKGROUND_TONES[s.background]]
    bg = img[~union]
    assert ((bg == tones[0]).all(-1) | (bg == tones[1]).all(-1)).all()
    # the caption states exactly the spec, and the spec agrees with what was drawn
    assert world.parse_prompt(s.caption) == s.spec
    for o, so in zip(s.objects, s.spec.objects):
        assert o.stated == so.stated()
        for a in so.stated():
            assert getattr(o, a) == getattr(so, a)
    assert s.background_stated == (s.spec.background is not None)


def test_ground_truth_consistent_with_pixels_and_caption():
    """Over 300 random scenes: boxes match masks, masks never overlap or come within
    MIN_GAP px, positions/sizes agree with the geometry rules the detector uses, pixels
    are exactly the object's tones and the background's, and the caption parses back to
    the stated spec. Any failure makes the ground truth lie to evaluations."""
    for i in range(300):
        _check_scene(world.sample_scene(i, split="all"))


def test_render_requested_composition():
    """render() draws what a spec asks for (tests ask for compositions by phrase)."""
    spec = SceneSpec.of("red circle on the left", "large blue striped square on the right",
                        background="checkered")
    s = world.render(spec, seed=4, variant=0)
    assert s.caption == ("a red circle on the left and a large blue striped square on the right "
                         "on a checkered background")
    red, blue = s.objects
    assert (red.color, red.shape, red.position, red.fill) == ("red", "circle", "on the left", "solid")
    assert (blue.color, blue.shape, blue.size, blue.fill) == ("blue", "square", "large", "striped")
    cx, cy = (int(v) for v in red.center)
    assert tuple(s.image[cy, cx]) == PALETTE["red"]
    _check_scene(s)


def test_crowded_layouts_are_placeable():
    """The tightest compositions (three large objects, centre + neighbours) still place
    without overlap; otherwise render raises for valid prompts."""
    for shapes in (("square", "square", "square"), ("circle", "heart", "star")):
        for positions in (("on the left", "in the center", "on the right"),
                          ("at the top", "in the center", "at the bottom"),
                          ("on the left", "at the top", "in the center")):
            spec = SceneSpec(tuple(ObjectSpec(c, sh, "large", p) for c, sh, p in
                                   zip(("red", "green", "blue"), shapes, positions)))
            for seed in range(3):
                _check_scene(world.render(spec, seed=seed))


def test_unstated_attributes_follow_defaults():
    """Unstated size/fill/position/background are drawn from the documented default
    distribution and recorded as unstated; a biased default would leak into what the model
    learns for "a red circle"."""
    spec = SceneSpec.of("red circle")
    sizes, fills, positions, bgs = (collections.Counter() for _ in range(4))
    n = 400
    for i in range(n):
        s = world.render(spec, seed=i)
        o = s.objects[0]
        assert o.stated == {"color", "shape"} and not s.background_stated
        sizes[o.size] += 1
        fills[o.fill] += 1
        positions[o.position] += 1
        bgs[s.background] += 1
    assert fills == {"solid": n}
    for size, p in world.DEFAULTS["size"].items():
        assert abs(sizes[size] / n - p) < 4 * np.sqrt(p * (1 - p) / n), sizes
    assert set(positions) == set(world.POSITIONS) and min(positions.values()) > n / 5 * 0.6
    assert set(bgs) == set(world.BACKGROUNDS)


def test_heldout_split():
    """The train split never draws a held-out (colour, shape) pair, the heldout split
    always does; otherwise "unseen prompt" evaluations are contaminated."""
    for i in range(400):
        s = world.sample_scene(i, split="train")
        assert not {(o.color, o.shape) for o in s.objects} & world.HELD_OUT_PAIRS
        h = world.sample_scene(i, split="heldout")
        assert {(o.color, o.shape) for o in h.objects} & world.HELD_OUT_PAIRS
    # unstated colours / shapes respect the split too
    for i in range(100):
        s = world.render(SceneSpec((ObjectSpec(shape="ring"), ObjectSpec(color="green"))), seed=i,
                         split="train")
        assert not {(o.color, o.shape) for o in s.objects} & world.HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="held-out"):
        world.sample_scene(0, spec=SceneSpec.of("red star"), split="train")
    assert world.sample_scene(0, spec=SceneSpec.of("red star"), split="heldout").objects[0].shape == "star"
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_scene(0, split="test")
    specs = world.heldout_specs()
    assert len(specs) == 40 and all(
        (o.color, o.shape) in world.HELD_OUT_PAIRS for sp in specs for o in sp.objects)


def test_caption_variants_roundtrip_and_move_tokens():
    """Every caption variant parses back to the same spec, and variants move the object
    words to different token positions (so attention methods are not tested on one
    fixed layout)."""
    from jattn.io.tokenizer import load_tokenizer, token_indices, tokenize

    tok = load_tokenizer()
    spec = SceneSpec.of("red circle on the left", "blue square on the right", "green star",
                        background="gray")
    positions = set()
    for v in range(world.NUM_CAPTION_VARIANTS):
        cap = world.caption_for(spec, v)
        assert world.parse_prompt(cap) == spec, cap
        positions.add(tuple(token_indices(tok, cap, "square")))
    assert len(positions) >= 5
    assert len({world.caption_for(spec, v) for v in range(world.NUM_CAPTION_VARIANTS)}) \
        == world.NUM_CAPTION_VARIANTS
    # the longest caption the world writes fits SD's 77 tokens
    longest = SceneSpec(tuple(ObjectSpec(c, "triangle", "large", p, "outlined") for c, p in
                              zip(("orange", "purple", "yellow"),
                                  ("at the bottom", "in the center", "on the right"))),
                        background="light gray")
    caps = [world.caption_for(longest, v) for v in range(world.NUM_CAPTION_VARIANTS)]
    ids = tokenize(tok, caps)
    n_tokens = (ids != 49407).sum(1) + 1
    print(f"longest caption: {n_tokens.max()} tokens")
    assert n_tokens.max() <= 77


def test_parse_prompt():
    """parse_prompt reads free-form prompts in the world's vocabulary and refuses words
    outside it (an eval that silently ignored a word would score the wrong thing)."""
    spec = world.parse_prompt("A photo of a small Red dotted heart in the centre, "
                              "and a black ring at the top against a grey background.")
    assert spec == SceneSpec((ObjectSpec("red", "heart", "small", "in the center", "dotted"),
                              ObjectSpec("black", "ring", position="at the top")), "gray")
    assert world.parse_prompt("blue shape").objects[0] == ObjectSpec(color="blue")
    with pytest.raises(ValueError, match="unknown word 'cat'"):
        world.parse_prompt("a red cat")
    with pytest.raises(ValueError, match="names no shape"):
        world.parse_prompt("a red on the left")
    with pytest.raises(ValueError, match="two colors"):
        world.parse_prompt("a red blue circle")
    with pytest.raises(ValueError, match="same position"):
        world.parse_prompt("a red circle on the left and a blue square on the left")
    with pytest.raises(ValueError, match="1 to 3 objects"):
        world.parse_prompt("a red circle, a blue square, a green star and a white ring")


def test_spec_validation():
    """Specs outside the world raise instead of drawing something else."""
    with pytest.raises(ValueError, match="outlined ring"):
        ObjectSpec("red", "ring", fill="outlined")
    with pytest.raises(ValueError, match="unknown size 'medium'"):
        ObjectSpec("red", "circle", size="medium")
    with pytest.raises(ValueError, match="unknown color"):
        ObjectSpec("pink", "circle")
    with pytest.raises(ValueError, match="unknown background"):
        SceneSpec((ObjectSpec("red", "circle"),), background="white")
    with pytest.raises(ValueError, match="caption variant"):
        world.caption_for(SceneSpec.of("red circle"), world.NUM_CAPTION_VARIANTS)
