"""scripts/eval_personalize.py: the evaluation cases are held out and deterministic, the
scoring reads a right image as right and a wrong one as wrong, and (slow) the script runs
end to end on a tiny random pipeline with tiny random Nested Attention weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    name = "_jattn_script_eval_personalize"
    if name not in sys.modules:  # registered first: the script's dataclasses need it
        spec = importlib.util.spec_from_file_location(name,
                                                      ROOT / "scripts" / "eval_personalize.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_cases_are_heldout_and_deterministic():
    """Every subject is a held-out (colour, shape) pair of jattn.world.pairs (never a
    training subject nor another object), every other object a training pair; the prompt
    writes one s* per subject and states the position(s) and background; the plain prompt
    parses back to the scored spec; the subject image shows exactly the subject (detector)
    on another background than the prompt's; the same call gives the same cases. Breaks if
    the generator drifts into training pairs, leaves a position/background unstated, or
    depends on anything but (seed, kind, index)."""
    from jattn.world.captions import parse_prompt
    from jattn.world.detector import detect
    from jattn.world.pairs import HELDOUT_SUBJECT_PAIRS, other_pairs, subject_pairs

    ev = _script()
    cases = ev.make_cases(24, 4, 4)
    assert [c.kind for c in cases] == ["single"] * 24 + ["two"] * 4 + ["patterned"] * 4
    train = set(subject_pairs("train")) | set(other_pairs())
    seen = set()
    for c in cases:
        assert c.prompt.count("s*") == len(c.subjects) == (2 if c.kind == "two" else 1)
        assert c.spec.background is not None
        assert all(o.position is not None for o in c.spec.objects)
        for s in c.subjects:
            assert (s.color, s.shape) in HELDOUT_SUBJECT_PAIRS
            assert (s.color, s.shape) not in train
            assert s.image_background != c.spec.background
            (d,) = detect(s.image)
            assert (d.color, d.shape, d.fill, d.position) == (s.color, s.shape, s.fill,
                                                              "in the center")
            seen.add((s.color, s.shape))
        assert s.fill in (("striped", "dotted") if c.kind == "patterned" else
                          ("solid", "outlined"))
        if c.other is not None:
            o = c.spec.objects[c.other]
            assert (o.color, o.shape) in set(other_pairs())
        parsed = parse_prompt(c.plain_prompt)
        key = lambda o: (o.color, o.shape, o.position, o.fill)  # noqa: E731 (size unscored)
        assert sorted(map(key, parsed.objects)) == sorted(map(key, c.spec.objects))
        assert parsed.background == c.spec.background
    assert seen == set(HELDOUT_SUBJECT_PAIRS)  # every held-out subject appears
    again = ev.make_cases(24, 4, 4)
    assert [c.to_json() for c in again] == [c.to_json() for c in cases]
    assert all(np.array_equal(a.image, b.image) for x, y in zip(cases, again)
               for a, b in zip(x.subjects, y.subjects))
    # a case depends on its index only, not on how many cases are asked for
    assert [c.to_json() for c in ev.make_cases(3, 0, 0)] == [c.to_json() for c in cases[:3]]
    assert ev.make_cases(0, 1, 0)[0].to_json() == cases[24].to_json()
    with pytest.raises(ValueError, match="--cases"):
        ev.make_cases(-1, 0, 0)


def test_score_case_reads_right_and_wrong_renders():
    """A render of exactly the case's scene scores identity and alignment 1; the same scene
    with the subject in another colour loses identity but keeps alignment; with another
    background it keeps identity but loses alignment. Breaks if the subject is matched to
    the wrong detection or alignment ignores the background."""
    from jattn.world.scene import render
    from jattn.world.spec import BACKGROUNDS, SceneSpec

    ev = _script()
    case = next(c for c in ev.make_cases(16, 0, 0) if c.other is not None
                and c.subjects[0].fill == "solid")
    good = render(case.spec, 0).image
    r = ev.score_case(good, case)
    assert r["identity"] == [True] and r["alignment"] and r["other_ok"] is True
    subj = case.spec.objects[0]
    wrong_colour = next(c for c in ("red", "blue", "yellow") if c != subj.color
                        and c != case.spec.objects[case.other].color)
    spec = SceneSpec((dataclasses.replace(subj, color=wrong_colour),)
                     + case.spec.objects[1:], case.spec.background)
    r = ev.score_case(render(spec, 0).image, case)
    assert r["identity"] == [False] and r["alignment"]
    other_bg = next(b for b in BACKGROUNDS if b != case.spec.background)
    r = ev.score_case(render(dataclasses.replace(case.spec, background=other_bg), 0).image, case)
    assert r["identity"] == [True] and not r["alignment"]
    recs = [ev.score_case(good, case), ev.score_case(render(spec, 0).image, case)]
    s = ev.summarize(recs, [case, case])["single"]
    assert s["identity"] == 0.5 and s["alignment"] == 1.0 and s["cases"] == 2


def test_untrained_row_is_reported_with_its_step(tmp_path):
    """A baseline whose training folder has not reached its steps is "not trained yet" with
    its step count (never evaluated from half-trained weights by default); a finished one
    uses its exported weights; an explicit missing file is one clear error."""
    ev = _script()
    d = tmp_path / "personalize_token"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"steps": 5000}))
    (d / "metrics.jsonl").write_text('{"step": 10}\n{"step": 1200}\n')
    (d / "weights.safetensors").write_bytes(b"x")
    r = ev.resolve_row("token", None, tmp_path)
    assert r["status"] == "not trained yet" and "1200/5000" in r["note"]
    (d / "metrics.jsonl").write_text('{"step": 5000}\n')
    r = ev.resolve_row("token", None, tmp_path)
    assert r["status"] == "ok" and r["weights"] == str(d / "weights.safetensors")
    assert ev.resolve_row("ip_adapter", None, tmp_path)["note"] == "not trained yet (no run)"
    with pytest.raises(SystemExit, match="--weights-ip-adapter .*no such file"):
        ev.resolve_row("ip_adapter", str(tmp_path / "nope.safetensors"), tmp_path)


@pytest.mark.slow  # tiny pipeline + two compiled samplers: ~30–60 s on the shared CPU
def test_smoke_on_tiny_pipeline(tiny_sd_dir, tmp_path, capsys):
    """End to end on the tiny random pipeline with tiny random Nested Attention weights
    (exported by jattn.train.personalize.export_weights): nested and plain rows, single and
    two-subject cases, result.json with the table and one record per case. Breaks if the
    script drifts from the pipeline, the weights format or the policy API."""
    import jattn
    from jattn.models.clip_vision import CLIPVisionConfig
    from jattn.models.nested import NestedEncoderConfig
    from jattn.models.resampler import ResamplerConfig
    from jattn.train import personalize as P

    pipe = jattn.load(tiny_sd_dir)
    base = P.base_from_pipeline(pipe)
    d = pipe.unet_config.cross_attention_dim
    enc = NestedEncoderConfig(
        vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8,
                                num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                patch_size=8, hidden_act="gelu"),
        resampler=ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=2,
                                  embedding_dim=16, output_dim=d, ff_mult=2))
    cfg = P.PersonalizeConfig(variant="nested", encoder=enc)
    params = P.init_params(cfg, base)
    w = P.export_weights(tmp_path / "w.safetensors", cfg, base, params)
    ev = _script()
    out = tmp_path / "ev"
    ev.main(["--rows", "nested", "token", "plain", "--weights-nested", str(w),
             "--ckpt-root", str(tmp_path), "--model", str(tiny_sd_dir), "--cases", "2",
             "--two-subject", "1", "--patterned", "0", "--steps", "2", "--batch", "2",
             "--out", str(out)])
    text = capsys.readouterr().out
    assert "not trained yet" in text and "identity" in text
    res = json.loads((out / "result.json").read_text())
    assert res["rows"]["token"]["status"] == "not trained yet"
    for row in ("nested", "plain"):
        r = res["rows"][row]
        assert r["status"] == "ok"
        assert r["summary"]["single"]["cases"] == 2 and r["summary"]["two"]["cases"] == 1
        assert len(res["records"][row]) == 3
        assert 0.0 <= r["summary"]["single"]["identity"] <= 1.0
    assert len(res["cases"]) == 3 and res["table"] in text
