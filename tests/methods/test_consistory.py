"""ConsiStory (jattn.methods.consistory) on the tiny random pipeline: the policy on SD1 and
SD2 configs (anchor mapping as ``create_anchor_mapping``, SDSA at decoder self-attention,
query blending toward the vanilla pre-pass, DIFT recording and the injection at the finest
self-attention grid, FreeU), query strengths / windows as ``QueryStore`` and
``run_batch_generation``, the query blending exact (all masks dropped -> the run equals
plain generation with FreeU), injection off = the first pass unchanged (and α 0 = no
change), the injection changing the images, batch invariance across groups, no
recompilation for new prompts/subjects, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jattn
from jattn.methods import consistory as cs
from jattn.policy.correspondence import CorrespondenceInject
from jattn.policy.cross_masks import CrossMapMask
from jattn.policy.features import FeatureRecord, FreeU
from jattn.policy.prepass import PrePassBlend
from jattn.policy.shared import SharedAttention

P = ["a red heart on the left", "a heart at the top", "a heart on the right"]
N = 10  # steps: query blending at step 1 (n//10), SDSA at 1..9, injection at 1..3


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


class _Runs(dict):
    """Runs shared by the tests, made on first use (the slow tests add programs)."""

    def __init__(self, pipe):
        super().__init__()
        kw = dict(num_inference_steps=N, seed=3, decode=False)
        self.make = {"cs": lambda: cs.consistory(pipe, "heart", P, **kw),
                     "first": lambda: cs.consistory(pipe, "heart", P, feature_injection=False,
                                                    **kw),
                     "plain": lambda: cs.consistory(pipe, "heart", P, sdsa=False,
                                                    share_queries=False,
                                                    feature_injection=False, **kw)}

    def __missing__(self, key):
        self[key] = self.make[key]()
        return self[key]


@pytest.fixture(scope="module")
def runs(pipe):
    return _Runs(pipe)


def _anchor_mapping(bsz, anchors):
    """NumPy restatement of consistory_run.py ``create_anchor_mapping``."""
    m = np.eye(bsz, dtype=bool)
    m[:, anchors] = True
    return m


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_policy_resolves_on_sd1_and_sd2(tmp_path, sd2, pipe):
    if sd2:
        from conftest import _tiny_diffusers_pipeline

        _tiny_diffusers_pipeline(seed=1, sd2=True).save_pretrained(tmp_path,
                                                                    safe_serialization=True)
        p = jattn.load(tmp_path)
    else:
        p = pipe
    m, n = 4, 12
    w = cs.subject_token_weights(p, ["a heart", "a big heart", "a heart here", "heart"], "heart")
    pol = cs.consistory_policy(p, w, n, groups=2, n_anchors=2, feature_injection=True)
    assert pol.layout.members == m and pol.layout.groups == 2
    sites = p.sites(features=True)
    touched = {path: [type(pol.ops[i]) for i in idx] for path, idx in pol.table}
    ups = [s for s in sites if getattr(s, "kind", "") == "self" and s.block == "up"]
    assert ups
    fine = cs.injection_resolution(sites)
    assert fine == max((tuple(s.resolution) for s in sites if getattr(s, "kind", "") == "self"),
                       key=lambda r: r[0])
    for s in sites:
        kind = getattr(s, "kind", "")
        if kind == "self":
            want = [PrePassBlend, SharedAttention] if s.block == "up" else []
            if tuple(s.resolution) == fine and s.block in ("down", "up"):
                want = want + [CorrespondenceInject]
            assert touched.get(s.path, []) == want, s.path
        if kind == "cross" and tuple(s.resolution) == pol.ops[0].resolution:
            assert touched[s.path] == [CrossMapMask]
    assert touched["up_blocks.1.resnets.0.backbone"][0] == FeatureRecord
    assert any(t == [FreeU] for t in touched.values())
    share = next(o for o in pol.ops if isinstance(o, SharedAttention))
    src = np.asarray(share.sources)                                  # (n, M, A)
    assert (src[0] == np.arange(m)[:, None]).all()                   # step 0: no SDSA
    mapping = _anchor_mapping(m, [0, 1])
    for i in range(m):
        got = set(src[1, i].tolist()) - {i}
        assert got == {j for j in range(m) if mapping[i, j] and j != i}
    hooks = cs.consistory_hooks(p, n, pol.layout)
    np.testing.assert_array_equal(np.asarray(hooks.pre_window), [1, 2])   # steps 1 … n//10
    pre_sites = {path for path, _ in hooks.pre_policy.table}
    assert {s.path for s in ups} <= pre_sites


def test_query_strengths_as_query_store():
    w = cs.query_strengths(50)
    s = np.linspace(0.9, 0.81836735, 6)       # QueryStore.strengthes, t_range [0, 5]
    np.testing.assert_allclose(w[1:6], s[1:6], rtol=1e-6)
    assert w[0] == 0 and (w[6:] == 0).all()   # step 0: no extended attention, no injection
    assert cs.query_window(50) == (1, 6) and cs.query_window(50, sdsa=False) == (0, 0)


def test_injection_window_and_dift_step_as_the_reference():
    """inject_range_alpha (n//10, n//3) inclusive: steps 5 … 16 of 50; DIFT at timestep 261
    = step 36 of SDXL's 50 DDIM steps (leading spacing, steps_offset 1)."""
    assert cs.injection_window(50) == (5, 17)
    t = np.arange(0, 1000, 20)[::-1] + 1                       # 981, 961, … 1
    assert cs.dift_step(t) == 36 and t[36] == 261


@pytest.mark.slow
def test_all_masks_dropped_equals_plain_with_freeu(pipe, runs):
    """mask_dropout 1: SDSA sees own tokens only, and the vanilla pre-pass's queries equal
    the main pass's (same input, plain attention): the first pass is plain generation (+
    FreeU) up to float rounding — the pre-pass and the query blend are exact."""
    a = cs.consistory(pipe, "heart", P, num_inference_steps=N, seed=3, mask_dropout=1.0,
                      feature_injection=False, decode=False)
    np.testing.assert_allclose(a.latents, runs["plain"].latents, atol=2e-4, rtol=1e-4)
    assert not np.allclose(runs["first"].latents, runs["plain"].latents, atol=1e-3)
    assert a.masks.shape[0] == 3 and set(np.unique(a.masks)) <= {0.0, 1.0}


@pytest.mark.slow
def test_injection_off_is_the_first_pass(pipe, runs):
    """feature_injection=False is the first pass of the injection run, bit for bit; the
    second pass changes the images where the correspondence injects (and only from the
    injection window on); α 0 leaves the second pass equal to the first, bit for bit."""
    full, first = runs["cs"], runs["first"]
    assert np.array_equal(first.latents, full.first_latents)
    assert np.abs(full.latents - full.first_latents).max() > 1e-3
    assert full.injected.shape == (3, 8, 8) and full.injected.any()
    assert full.settings["feature_injection"]["steps"] == [1, 3]
    zero = cs.consistory(pipe, "heart", P, num_inference_steps=N, seed=3, alpha=0.0,
                         decode=False)
    assert np.array_equal(zero.latents, zero.first_latents)
    assert np.array_equal(zero.first_latents, full.first_latents)


OTHER = ["a circle", "a blue circle", "a circle below"]


def test_no_recompile_for_new_prompts_and_subjects(pipe, runs):
    """New prompts, subject, seeds and dropout compile nothing (both passes, and the
    correspondence between them); the masks are binary."""
    first = runs["cs"]
    before = dict(pipe.trace_counts), dict(cs.TRACES)
    other = cs.consistory(pipe, "circle", OTHER, num_inference_steps=N, seed=11,
                          mask_dropout=0.3, decode=False)
    assert (dict(pipe.trace_counts), dict(cs.TRACES)) == before
    assert np.isfinite(other.latents).all() and np.isfinite(first.latents).all()
    assert first.masks.shape[0] == 3 and set(np.unique(first.masks)) <= {0.0, 1.0}


@pytest.mark.slow
def test_dropout_is_batch_invariant(pipe, runs):
    """Group 0's images do not depend on a second group in the batch (mask dropout drawn per
    group from the group's seed)."""
    other = cs.consistory(pipe, "circle", OTHER, num_inference_steps=N, seed=11, decode=False)
    two = cs.consistory(pipe, ["heart", "circle"], [P, OTHER],
                        num_inference_steps=N, seed=[3, 4, 5, 11, 12, 13], decode=False)
    np.testing.assert_allclose(two.latents[:3], runs["cs"].latents, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(two.latents[3:], other.latents, atol=2e-4, rtol=1e-4)


def test_api_errors(pipe):
    with pytest.raises(ValueError, match="subject: 'dog' is not a word"):
        cs.consistory(pipe, "dog", P, num_inference_steps=2)
    with pytest.raises(ValueError, match="single prompt"):
        cs.consistory(pipe, "heart", ["a heart"], num_inference_steps=2)
    with pytest.raises(ValueError, match="mask_dropout"):
        cs.consistory(pipe, "heart", P, num_inference_steps=2, mask_dropout=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        cs.consistory(pipe, "heart", P, num_inference_steps=2, alpha=1.5)


@pytest.mark.slow
def test_cli_writes_the_files(tmp_path, tiny_sd_dir):
    from jattn.cli import main

    out = tmp_path / "o"
    rc = main(["consistory", "--model", str(tiny_sd_dir), "--subject", "heart", "--steps", "2",
               "--prompt", P[0], "--prompt", P[1], "--prompt", P[2], "--seed", "1",
               "--out-dir", str(out)])
    assert rc == 0
    for f in ("000.png", "001.png", "002.png", "grid.png", "result.json"):
        assert (out / f).exists(), f
    res = json.loads((out / "result.json").read_text())
    assert res["command"] == "consistory" and res["settings"]["n_anchors"] == 2
