"""Tests of the world evaluation (jattn/world/evaluate.py, scripts/eval_world.py).

The scoring is checked on the world's own rendered images fed as if generated (all
correct) and on images of the wrong colour/shape (all wrong); the attention IoU on
synthetic attention maps built from a known mask; the batching on a fake pipeline; and
the whole evaluation end to end on the tiny random pipeline (runs, documented keys, one
compiled sampler for every batch).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jattn.world import (COLORS, HELD_OUT_PAIRS, IMAGE_SIZE, ObjectSpec, SceneSpec, heldout_specs,
                         parse_prompt, render)
from jattn.world import evaluate as ev


def _block_mean(mask: np.ndarray, f: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // f, f, w // f, f).mean((1, 3))


# ----------------------------------------------------------------------------- prompts

def test_prompt_sets_are_heldout_and_parse_back():
    """Every prompt parses back to its spec, single-object prompts are exactly the held-out
    specs (every pair in the first 8, several wordings per pair), two-object prompts hold
    one held-out and one training pair at distinct positions (breaks if the evaluation
    asked for compositions seen in training, or for something its caption does not say)."""
    single, two = ev.single_object_prompts(40), ev.two_object_prompts(40)
    for p in single + two:
        assert parse_prompt(p.text) == p.spec, p.text
    assert {p.spec for p in single} == set(heldout_specs())
    assert {(p.spec.objects[0].color, p.spec.objects[0].shape) for p in single[:8]} == HELD_OUT_PAIRS
    red_star = {p.text.split("red")[0] for p in single if p.spec.objects[0].color == "red"}
    assert len(red_star) == 5  # 5 prompts of one pair, 5 different openings
    for p in two:
        a, b = p.spec.objects
        assert (a.color, a.shape) in HELD_OUT_PAIRS and (b.color, b.shape) not in HELD_OUT_PAIRS
        assert a.color != b.color and a.shape != b.shape and a.position != b.position
    assert len({p.text for p in single + two}) == 80
    assert ev.single_object_prompts(3) == single[:3]  # deterministic prefix


# ----------------------------------------------------------------------------- scoring

SINGLE = [SceneSpec((ObjectSpec(c, s, position=p),))
          for (c, s), p in zip(sorted(HELD_OUT_PAIRS), ["on the left", "on the right",
                                                         "at the top", "at the bottom",
                                                         "in the center"] * 2)]
TWO = [p.spec for p in ev.two_object_prompts(8)]


def _record(spec, image, category):
    sc = ev.score_generated(image, spec)
    return {"category": category, "objects": sc["objects"], "exact": sc["exact"],
            "count_ok": sc["count_ok"]}


def test_rendered_images_score_perfect():
    """The world's own images, fed as if generated, are 100 % correct on every figure
    (breaks if the scoring or the detector misjudges correct images)."""
    recs = [_record(s, render(s, seed=k).image, "single") for k, s in enumerate(SINGLE)]
    recs += [_record(s, render(s, seed=10 + k).image, "two") for k, s in enumerate(TWO)]
    summ = ev.summarize(recs)
    for fig in ("found_acc", "color_acc", "shape_acc", "color_shape_acc", "position_acc",
                "exact_acc", "count_acc"):
        assert summ["single"][fig] == 1.0, fig
    for fig in ("both_correct", "exact_acc", "count_acc", "color_acc", "shape_acc",
                "position_acc"):
        assert summ["two"][fig] == 1.0, fig
    assert summ["single"]["n_images"] == len(SINGLE) and summ["two"]["n_images"] == len(TWO)
    assert set(summ["single"]["by_pair"].values()) == {1.0}
    assert summ["targets"]["single.color_shape_acc"]["met"]
    assert summ["targets"]["two.both_correct"]["met"]


def _swap_colors(spec: SceneSpec) -> SceneSpec:
    """Every object gets a colour no object of ``spec`` has."""
    free = [c for c in COLORS if c not in {o.color for o in spec.objects}]
    return SceneSpec(tuple(ObjectSpec(free[k], o.shape, position=o.position)
                           for k, o in enumerate(spec.objects)))


def _swap_shape(o: ObjectSpec) -> ObjectSpec:
    others = {"star": "square", "square": "circle", "circle": "triangle",
              "triangle": "heart", "heart": "star", "ring": "square"}
    return ObjectSpec(o.color, others[o.shape], position=o.position)


def test_wrong_colour_or_shape_scores_zero():
    """An image of another colour (or shape) than asked scores 0 on colour (shape), on
    colour-and-shape and on both-correct, while the right position still counts (breaks if
    the scoring accepted any object, or tied the attributes together)."""
    recs = [_record(s, render(_swap_colors(s), seed=k).image, "single")
            for k, s in enumerate(SINGLE)]
    recs += [_record(s, render(_swap_colors(s), seed=k).image, "two") for k, s in enumerate(TWO)]
    summ = ev.summarize(recs)
    assert summ["single"]["color_acc"] == 0.0 and summ["single"]["color_shape_acc"] == 0.0
    assert summ["single"]["shape_acc"] == 1.0 and summ["single"]["position_acc"] == 1.0
    assert summ["two"]["both_correct"] == 0.0 and summ["two"]["color_acc"] == 0.0
    assert summ["two"]["position_acc"] == 1.0
    assert not summ["targets"]["single.color_shape_acc"]["met"]

    recs = [_record(s, render(SceneSpec(tuple(_swap_shape(o) for o in s.objects)),
                              seed=k).image, "single") for k, s in enumerate(SINGLE)]
    summ = ev.summarize(recs)
    assert summ["single"]["shape_acc"] == 0.0 and summ["single"]["color_shape_acc"] == 0.0
    assert summ["single"]["color_acc"] == 1.0


def test_swapped_binding_is_wrong():
    """Two-object prompts drawn with the colours swapped between the objects ("a red star
    and a blue square" → a blue star and a red square): every colour is present but no
    object is right (breaks if attributes were scored independently of their object)."""
    recs = []
    for k, s in enumerate(TWO):
        a, b = s.objects
        swapped = SceneSpec((ObjectSpec(b.color, a.shape, position=a.position),
                             ObjectSpec(a.color, b.shape, position=b.position)))
        recs.append(_record(s, render(swapped, seed=k).image, "two"))
    summ = ev.summarize(recs)["two"]
    assert summ["both_correct"] == 0.0 and summ["exact_acc"] == 0.0
    assert summ["color_acc"] == 1.0


def test_position_confusion_by_phrase():
    """Two-object prompts drawn with the objects' positions swapped ("A on the left and B
    on the right" → A on the right, B on the left): by_position reads every left as right
    and every top as bottom, while correct single-object images score 1 per phrase (breaks
    if the table counted the asked phrase, or pooled the phrases)."""
    flip = {"on the left": "on the right", "on the right": "on the left",
            "at the top": "at the bottom", "at the bottom": "at the top"}
    recs = [_record(s, render(s, seed=k).image, "single") for k, s in enumerate(SINGLE)]
    for k, s in enumerate(TWO):
        drawn = SceneSpec(tuple(dataclasses.replace(o, position=flip[o.position])
                                for o in s.objects))
        recs.append(_record(s, render(drawn, seed=k).image, "two"))
    summ = ev.summarize(recs)
    single, two = summ["single"]["by_position"], summ["two"]["by_position"]
    assert set(single) == {o.position for s in SINGLE for o in s.objects}
    assert all(v["acc"] == 1.0 and v["detected"] == {p: v["n"]} for p, v in single.items())
    asked = [o.position for s in TWO for o in s.objects]
    assert set(two) == set(asked)
    for p, v in two.items():
        assert v["acc"] == 0.0 and v["n"] == asked.count(p)
        assert v["detected"] == {flip[p]: v["n"]}
    assert "position by phrase" in ev.format_table(summ)


def test_missing_object_is_not_found():
    """A blank image: nothing found, every figure 0 and no IoU recorded (breaks if an
    absent object counted as present)."""
    spec = SINGLE[0]
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    sc = ev.score_generated(blank, spec)
    assert sc["objects"][0]["found"] is False and sc["masks"] == [None]
    assert sc["num_detections"] == 0 and not sc["exact"]


# ----------------------------------------------------------------------------- attention

def test_resize_bilinear_matches_jax_image_resize():
    """The numpy upsampling equals jax.image.resize(..., "linear") (breaks if heat maps
    were shifted by half a cell or their edges mishandled)."""
    x = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    got = ev.resize_bilinear(x, (128, 128))
    want = np.asarray(jax.image.resize(x, (3, 128, 128), "linear"))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_otsu_matches_skimage():
    """Otsu's threshold agrees with scikit-image on a bimodal map to within a bin (breaks
    if the "otsu" setting thresholded elsewhere)."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    v = np.clip(np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.08, 1000)]), 0, 1)
    assert abs(ev.otsu_threshold(v) - threshold_otsu(v, nbins=256)) < 2 / 256


def _maps_from_masks(masks: dict[int, np.ndarray], res: int, noise: float = 0.0, seed: int = 0):
    """Synthetic (T, S) map at ``res``²: token k's column = the block mean of masks[k]."""
    rng = np.random.default_rng(seed)
    p = rng.random((res * res, 77)).astype(np.float32) * noise + 0.01
    for k, m in masks.items():
        p[:, k] += _block_mean(m.astype(np.float32), IMAGE_SIZE // res).ravel()
    return p / p.sum(-1, keepdims=True)


def test_attention_iou_on_synthetic_maps():
    """A token whose attention is the object's mask (pooled to 16² latents) gets IoU
    > 0.8 with the mask (threshold 0.5; > 0.5 with Otsu), a token attending to the mirrored object gets 0, thresholds
    and modes as documented (breaks if heat maps were transposed, flipped, taken from the
    wrong token or normalised wrong)."""
    spec = SceneSpec.of("red circle on the left")
    scene = render(spec, seed=0)
    mask = scene.objects[0].mask
    maps = {"cross16x16": _maps_from_masks({5: mask, 6: mask[:, ::-1]}, 16, noise=0.002),
            "cross8x8": _maps_from_masks({5: mask, 6: mask[:, ::-1]}, 8, noise=0.002, seed=1)}
    heat = ev.token_heatmap(maps, [5])
    assert heat.shape == (IMAGE_SIZE, IMAGE_SIZE) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    ious = ev.attention_ious(maps, {"color": [5], "shape": [6]}, mask)
    assert set(ious) == {"highest@0.5", "highest@otsu", "all@0.5", "all@otsu"}
    for k, v in ious.items():  # a perfect 16² map of a medium circle: IoU ≈ 0.89 at 0.5;
        assert v["color"] > (0.8 if k.endswith("0.5") else 0.5), (k, v)  # Otsu cuts lower
        assert v["shape"] == 0.0, (k, v)
    # transposed map (x/y swapped) must not localise: the object is on the left, not the top
    wrong = {"cross16x16": _maps_from_masks({5: mask.T}, 16)}
    assert ev.attention_ious(wrong, {"color": [5]}, mask, modes=("highest",))[
        "highest@0.5"]["color"] < 0.1
    # several tokens are averaged: half on the object, half elsewhere still overlaps
    assert ev.mask_iou(ev.threshold_heatmap(ev.token_heatmap(maps, [5, 6]), 0.4), mask) > 0.3
    # "highest" ignores the 8² map entirely
    only_low = {"cross16x16": maps["cross16x16"], "cross8x8": np.zeros_like(maps["cross8x8"])}
    np.testing.assert_array_equal(ev.token_heatmap(only_low, [5]), heat)


def test_heatmap_and_iou_errors():
    """Bad arguments raise (breaks if an empty word or a typo in the mode passed silently)."""
    maps = {"cross4x4": np.ones((16, 77), np.float32)}
    with pytest.raises(ValueError, match="positions"):
        ev.token_heatmap(maps, [])
    with pytest.raises(ValueError, match="mode"):
        ev.token_heatmap(maps, [1], mode="max")
    with pytest.raises(ValueError, match="cross"):
        ev.token_heatmap({"self4x4": np.ones((16, 16))}, [1])
    with pytest.raises(ValueError, match="otsu"):
        ev.threshold_heatmap(np.zeros((4, 4)), "median")
    with pytest.raises(ValueError, match="shapes"):
        ev.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    assert not ev.token_heatmap(maps, [1]).any()  # constant map → all zeros
    assert ev.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 0.0


def test_summarize_attention_figures():
    """The headline IoU is the mean over detected single-object images of the chosen
    setting, undetected objects are left out, two-object IoUs are reported apart (breaks
    if the figures mixed settings or categories)."""
    def rec(cat, iou):
        o = {"found": iou is not None, "color_ok": True, "shape_ok": True, "position_ok": True,
             "color_shape_ok": True, "all_ok": True, "color": "red", "shape": "star",
             "iou": iou}
        return {"category": cat, "objects": [o], "exact": True}

    recs = [rec("single", {"highest@0.5": {"color": 0.6, "shape": 0.2},
                           "all@0.5": {"color": 1.0, "shape": 1.0}}),
            rec("single", {"highest@0.5": {"color": 0.4, "shape": 0.4},
                           "all@0.5": {"color": 1.0, "shape": 1.0}}),
            rec("single", None),
            rec("two", {"highest@0.5": {"color": 0.0, "shape": 0.0}})]
    a = ev.summarize(recs)["attention"]
    assert a["n"] == 2 and a["setting"] == "highest@0.5"
    assert a["iou_color"] == pytest.approx(0.5) and a["iou_shape"] == pytest.approx(0.3)
    assert a["iou_mean"] == pytest.approx(0.4)
    assert a["settings"]["all@0.5"]["iou_mean"] == 1.0
    assert ev.summarize(recs, setting="all@0.5")["targets"]["attention.iou_mean"]["met"]
    assert ev.summarize(recs)["attention_two"]["iou_mean"] == 0.0
    assert "colour token" in ev.format_table(ev.summarize(recs))


# ----------------------------------------------------------------------------- generation

class _FakePipe:
    """Stands in for Pipeline.generate: image pixel (0, 0, 0) = seed, maps filled with the
    row's seed, records every call's batch size."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, seed, policy, height, width, **kw):
        self.calls.append(len(prompts))
        b = len(prompts)
        images = np.zeros((b, height, width, 3), np.uint8)
        images[:, 0, 0, 0] = seed
        acc = {"cross4x4": np.asarray(seed, np.float32)[:, None, None] * np.ones((b, 16, 77)),
               "steps": np.asarray(1)}

        class Out:
            pass

        out = Out()
        out.images, out.aux = images, (acc,)
        return out


def test_generate_with_capture_fixed_batches(monkeypatch):
    """Every call has the same batch size (one compiled program), padded rows are dropped,
    each job comes out once with its own image and maps (breaks if the last partial batch
    recompiled, or images/maps were attributed to the wrong prompt)."""
    monkeypatch.setattr(ev, "capture_policy", lambda *a, **k: None)
    pipe = _FakePipe()
    seeds = [10, 11, 12, 13, 14, 15, 16]
    got = list(ev.generate_with_capture(pipe, ["p"] * 7, seeds, batch_size=3, progress=False))
    assert pipe.calls == [3, 3, 3]
    assert [j for j, _, _ in got] == list(range(7))
    for j, image, maps in got:
        assert image[0, 0, 0] == seeds[j]
        assert maps["cross4x4"].shape == (16, 77) and np.all(maps["cross4x4"] == seeds[j])
    with pytest.raises(ValueError, match="seeds"):
        list(ev.generate_with_capture(pipe, ["p"], [0, 1], progress=False))


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_evaluate_smoke_on_tiny_pipeline(tiny_sd_dir, tmp_path):
    """End to end on the tiny random pipeline (2 prompts, 1 seed, 2 steps, batch 1): runs,
    returns the documented keys, captures every cross resolution, compiles the sampler
    once for both calls, and is JSON-serialisable (breaks if the capture policy, the token
    positions or the scoring do not fit a real pipeline)."""
    import jattn

    pipe = jattn.load(tiny_sd_dir)
    res = ev.evaluate(pipe, n_single=1, n_two=1, seeds=[0], num_inference_steps=2,
                      batch_size=1, progress=False)
    assert set(res) == {"summary", "table", "settings", "prompts", "records"}
    assert set(res["summary"]) == {"single", "two", "attention", "attention_two", "targets"}
    assert set(res["summary"]["targets"]) == set(ev.TARGETS)
    assert res["settings"]["cross_resolutions"] == ["cross64x64", "cross32x32"]
    assert res["settings"]["seeds"] == [0] and res["settings"]["num_inference_steps"] == 2
    assert [p["category"] for p in res["prompts"]] == ["single", "two"]
    assert len(res["records"]) == 2 and pipe.trace_counts["sample"] == 1
    r = res["records"][0]
    assert {"prompt", "seed", "category", "objects", "count_ok", "exact"} <= set(r)
    o = r["objects"][0]
    assert o["token_positions"]["color"] and o["token_positions"]["shape"]
    assert o["iou"] is None or set(o["iou"]) == {"highest@0.5", "highest@otsu", "all@0.5",
                                                 "all@otsu"}
    json.dumps(res)  # JSON-serialisable as is


def test_diag_positions_script_on_tiny_pipeline(tiny_sd_dir, tmp_path, capsys):
    """scripts/diag_positions.py on the tiny random pipeline (1 object, 1 seed): prints a
    5×5 distance table with a zero diagonal and a row per position phrase, and writes one
    row of 5 one-step images (breaks if the position word is not found in the tokens, or
    the script drifts from the pipeline's API)."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    from jattn.world.spec import POSITIONS

    path = Path(__file__).resolve().parents[2] / "scripts" / "diag_positions.py"
    spec = importlib.util.spec_from_file_location("diag_positions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "grid.png"
    mod.main(["--model", str(tiny_sd_dir), "--objects", "a red circle", "--seeds", "0",
              "--out", str(out)])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()]
    rows = [r for r in rows if " ".join(r[:3]) in POSITIONS]
    dist = [r for r in rows if len(r) == 8]  # phrase (3 words) + 5 distances
    assert [" ".join(r[:3]) for r in dist] == list(POSITIONS)
    d = np.array([[float(x) for x in r[3:]] for r in dist])
    assert np.allclose(np.diag(d), 0.0) and np.allclose(d, d.T, atol=0.02) and (d > 0).sum() == 20
    onestep = [r for r in rows if len(r) == 5]
    assert [" ".join(r[:3]) for r in onestep] == list(POSITIONS)
    w, h = Image.open(out).size
    assert w == 5 * h
