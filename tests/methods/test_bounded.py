"""Bounded Attention on the tiny random pipeline: sites on SD1/SD2 configs, the loss vs a
NumPy restatement of the reference's ``_save_loss_values``/``_compute_loss``, the guidance
lowers it, no boxes = plain generation, masks refined in-graph, no recompilation for new
prompts/boxes, composition with Prompt-to-Prompt (slow)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.bounded import (bounded_generate, bounded_guidance, bounded_inputs,
                                   bounded_loss, loss_sites, record_sites, refine_schedule,
                                   step_sizes)
from jattn.policy.masks import box_regions

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def jpipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.parametrize("sd2", [False, True])
def test_sites_and_policy_resolve_on_sd1_sd2_configs(sd2):
    """Loss sites = mid + first up block with attention (both kinds), record sites = that
    up block, on the SD1- and SD2-style tiny UNet configs; the masking op resolves at
    every site."""
    from jattn.methods.bounded import SubjectMask
    from jattn.models.unet import UNetConfig, list_sites
    from jattn.policy.core import Layout, resolve

    cfg = UNetConfig.from_diffusers(dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2, upcast_attention=sd2))
    sites = list_sites(cfg)
    ls, rs = loss_sites(sites), record_sites(sites)
    assert {s.block for s in ls} == {"mid", "up"} and {s.kind for s in ls} == {"self", "cross"}
    assert all(s.path.startswith("up_blocks.1.") for s in rs) and len(rs) == 4  # 2 blocks × 2
    op = SubjectMask(token_subject=jnp.zeros((1, 1, 77), bool),
                     boxes=jnp.asarray([[[0, 0, .5, .5]]], jnp.float32))
    pol = resolve([("", op)], sites, layout=Layout(groups=1, members=1, cfg=True))
    assert len(pol.table) == len(sites)


def test_schedules_follow_reference():
    s = step_sizes(50)
    np.testing.assert_allclose(s[:15], 8 + (2 - 8) / 15 * np.arange(15), rtol=1e-6)
    assert (s[15:] == 0).all()
    r = refine_schedule(50)  # masks of steps 15, 20, …, 45 are refined ones
    assert [i + 1 for i in np.flatnonzero(r)] == [15, 20, 25, 30, 35, 40, 45]


def np_loss(cross, selfm, boxes, tokens, eos, cs=1.5, ss=0.5):
    """The reference's _save_loss_values + _compute_loss for one sample (maps (H, T, S))."""
    def masks(r):
        out = np.zeros((len(boxes), r, r), bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            out[i, round(y0 * r):round(y1 * r), round(x0 * r):round(x1 * r)] = True
        return out.reshape(len(boxes), -1)

    def values(a, is_cross):
        r = int(round(np.sqrt(a.shape[1])))
        bx = masks(r)
        bg = bx.sum(0) == 0
        ctxs = [list(t) + [eos] for t in tokens] if is_cross else bx
        fg_, bg_ = [], []
        for box, ctx in zip(bx, ctxs):
            c = a[:, :, ctx]
            fg_.append(c[:, box].sum())
            bg_.append(c[:, bg].sum())
        return np.array(fg_), np.array(bg_)

    def term(vals):
        f = np.mean([v[0] for v in vals], 0)
        b = np.mean([v[1] for v in vals], 0)
        return (1 - f / (f + len(boxes) * b)) ** 2

    cl = term([values(a, True) for a in cross])
    sl = term([values(a, False) for a in selfm])
    return cs * cl.sum() + ss * sl.sum()


def test_loss_matches_numpy_restatement():
    rng = np.random.default_rng(0)

    def probs(shape):
        p = rng.random(shape).astype(np.float32)
        return p / p.sum(-1, keepdims=True)

    cross = [probs((1, 2, 16, 77)), probs((1, 2, 64, 77))]
    selfm = [probs((1, 2, 16, 16)), probs((1, 2, 64, 64))]
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.25, 0.5, 1.0, 1.0)]
    tokens, eos = [[2, 3], [6]], 8
    w = np.zeros((1, 2, 77), np.float32)
    w[0, 0, [2, 3, eos]] = 1
    w[0, 1, [6, eos]] = 1
    bx = jnp.asarray(np.asarray(boxes, np.float32)[None])
    got = bounded_loss([jnp.asarray(a) for a in cross], [jnp.asarray(a) for a in selfm],
                       [box_regions(bx, 4, 4), box_regions(bx, 8, 8)],
                       [box_regions(bx, 4, 4), box_regions(bx, 8, 8)], jnp.asarray(w),
                       jnp.ones((1, 2), bool))
    want = np_loss([a[0].astype(np.float64) for a in cross],
                   [a[0].astype(np.float64) for a in selfm], boxes, tokens, eos)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)


def test_inputs_tokens_function_words_eos(jpipe):
    inp = bounded_inputs(jpipe.tokenizer, [PROMPT], [["red circle", "square"]],
                         [[(0, 0, 8, 16), (8, 0, 16, 16)]], 16, 16)
    # "a red circle and a blue square": BOS a red circle and a blue square EOS
    assert inp["tokens"][0, 0, :2].tolist() == [2, 3] and inp["tokens"][0, 1, 0] == 7
    assert inp["leading"][0].tolist() == [3, 7]
    assert np.flatnonzero(inp["blocked"][0]).tolist() == [1, 4, 5]
    assert np.flatnonzero(inp["eos"][0]).tolist() == [8]
    np.testing.assert_allclose(inp["boxes"][0], [[0, 0, .5, 1], [.5, 0, 1, 1]])
    assert np.flatnonzero(inp["background"][0]).tolist() == [8]     # reference: EOS only
    args = ([PROMPT], [["red circle", "square"]], [[(0, 0, 8, 16), (8, 0, 16, 16)]], 16, 16)
    eos = bounded_inputs(jpipe.tokenizer, *args, padding="eos")
    assert np.flatnonzero(eos["background"][0]).tolist() == list(range(8, 77))
    blk = bounded_inputs(jpipe.tokenizer, *args, padding="blocked")
    assert np.flatnonzero(blk["blocked"][0]).tolist() == [1, 4, 5] + list(range(8, 77))
    with pytest.raises(ValueError, match="padding"):
        bounded_inputs(jpipe.tokenizer, *args, padding="all")


def test_bad_inputs(jpipe):
    p = [PROMPT]
    for phrases, boxes, match in [
            (["red circle", "square"], [(0, 0, 8, 8), (8, 8, 17, 16)], "outside"),
            (["red circle", "square"], [(4, 0, 2, 8), (8, 8, 16, 16)], "x1 > x0"),
            (["dog", "square"], [(0, 0, 8, 8), (8, 8, 16, 16)], "not in the prompt"),
            (["square", "square"], [(0, 0, 8, 8), (8, 8, 16, 16)], "more boxes than"),
            (["red circle"], [(0, 0, 8, 8), (8, 8, 16, 16)], "boxes")]:
        with pytest.raises(ValueError, match=match):
            bounded_inputs(jpipe.tokenizer, p, [phrases], [boxes], 16, 16)
    # overlapping boxes are accepted (a pixel in both boxes belongs to both subjects)
    bounded_inputs(jpipe.tokenizer, p, [["red circle", "square"]],
                   [[(0, 0, 10, 10), (6, 6, 16, 16)]], 16, 16)


def test_no_boxes_or_zero_steps_add_nothing(jpipe):
    """No box: no policy and no guidance (generate runs the plain program); zero step sizes:
    no guidance program."""
    from jattn.methods.bounded import bounded_policy

    assert bounded_policy(jpipe, [PROMPT], [[]], [[]]) is None
    assert bounded_guidance(jpipe, [PROMPT], [[]], [[]]) is None
    assert bounded_guidance(jpipe, [PROMPT], [["square"]], [[(0, 0, 8, 8)]],
                            init_step_size=0.0, final_step_size=0.0) is None
    assert bounded_guidance(jpipe, [PROMPT], [["square"]], [[(0, 0, 8, 8)]],
                            num_guidance_steps=0) is None


@pytest.mark.slow
def test_no_boxes_is_plain_generation(jpipe):
    plain = jpipe.generate([PROMPT], num_inference_steps=2, seed=3)
    out = bounded_generate(jpipe, PROMPT, [], [], num_inference_steps=2, seed=3,
                           init_step_size=0.0, final_step_size=0.0, decode=False)
    np.testing.assert_array_equal(out.latents, plain.latents)


def test_guidance_lowers_loss_no_recompile(jpipe):
    """One guided step (the refinement while_loop) lowers the per-sample loss; new
    prompts/boxes reuse the compiled guidance."""
    from jattn.sampling.guidance import apply_guidance

    traces = []
    unet_fn = jpipe.unet_fn(jpipe.params["unet"])
    t = jpipe.schedule(4).timesteps[0]

    @jax.jit
    def run(g, x, cond):  # one gradient step; returns the loss before it
        traces.append(1)
        return apply_guidance(g, unet_fn, lambda y: y, x, t, cond, jnp.int32(0))

    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    for prompt, phrases, boxes in [(PROMPT, ["red circle", "square"],
                                    [(0, 0, 8, 8), (8, 8, 16, 16)]),
                                   ("a green star and a red star", ["green star", "red star"],
                                    [(0, .5, .5, 1), (.5, 0, 1, .5)])]:
        g = bounded_guidance(jpipe, [prompt], [phrases], [boxes], num_inference_steps=4,
                             init_step_size=20.0, final_step_size=20.0,
                             num_gd_iterations=1, loss_threshold=0.0)
        cond = jpipe.encode_prompts([prompt])
        x1, before = run(g, x, cond)
        x2, after = run(g, x1, cond)
        assert float(before[0]) > 0.0
        assert float(after[0]) < float(before[0]), (prompt, before, after)
    assert len(traces) == 1


def test_masks_refined_in_graph_no_recompile(jpipe):
    """Few steps, refinement from step 2 on: the final masks differ from the boxes, the
    refined masks change the denoising; new prompts/boxes/schedules never recompile."""
    kw = dict(num_inference_steps=4, num_guidance_steps=0, refine_every=1, kmeans_n_init=2,
              decode=False, return_masks=True)
    boxes = [(0, 0, 10, 10), (8, 6, 16, 16)]
    out, masks = bounded_generate(jpipe, PROMPT, ["red circle", "square"], boxes, seed=1,
                                  first_refinement_step=2, **kw)
    before = dict(jpipe.trace_counts)
    assert masks.shape == (1, 2, 8, 8) and set(np.unique(masks)) <= {0.0, 1.0}
    bx = np.asarray(box_regions(jnp.asarray([[b_ / 16 for b_ in bb] for bb in boxes],
                                            jnp.float32)[None], 8, 8)).reshape(1, 2, 8, 8)
    assert (masks != bx).any()
    assert (masks.sum(1) <= 1).all()       # refined: every pixel belongs to one subject
    off, masks_off = bounded_generate(jpipe, PROMPT, ["red circle", "square"], boxes, seed=1,
                                      first_refinement_step=99, **kw)
    np.testing.assert_array_equal(masks_off, bx)
    assert np.abs(out.latents - off.latents).max() > 1e-6
    bounded_generate(jpipe, "a green star and a red star", ["green star", "red star"],
                     [(0, 0, .5, 1), (.5, 0, 1, 1)], seed=2, first_refinement_step=3, **kw)
    assert jpipe.trace_counts == before


@pytest.mark.slow
def test_composes_with_prompt_to_prompt(jpipe):
    """Bounded Attention + Prompt-to-Prompt word swap in one compiled run: the source row
    is Bounded Attention's alone (P2P leaves member 0 untouched) and differs from plain
    generation; the target row differs from Bounded Attention's target alone (P2P's cross
    maps injected)."""
    from jattn.methods.p2p import p2p_policy

    src, tgt = "a red circle and a blue square", "a red circle and a blue star"
    phrases = [["red circle", "square"], ["red circle", "star"]]
    boxes = [[(0, 0, 8, 16), (8, 0, 16, 16)]] * 2
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    lat2 = np.repeat(lat, 2, 0)
    kw = dict(num_inference_steps=3, num_guidance_steps=2, first_refinement_step=2,
              kmeans_n_init=2, decode=False, latents=lat2)
    pol = p2p_policy(jpipe, src, [tgt], num_steps=3, cross_replace_steps=1.0,
                     self_replace_steps=0.0)
    both = bounded_generate(jpipe, [src, tgt], phrases, boxes, policy=pol, **kw)
    alone = bounded_generate(jpipe, [src, tgt], phrases, boxes, **kw)
    plain = jpipe.generate([src, tgt], num_inference_steps=3, latents=lat2)
    np.testing.assert_allclose(both.latents[0], alone.latents[0], atol=1e-5)
    assert np.abs(both.latents[0] - plain.latents[0]).max() > 1e-4
    assert np.abs(both.latents[1] - alone.latents[1]).max() > 1e-4


@pytest.mark.slow
def test_cli_bounded_writes_masks(tiny_sd_dir, tmp_path):
    """`jattn layout --method bounded`: images, result.json with the boxes and the final
    masks (lists per prompt and phrase, and masks.npy)."""
    import json

    from jattn.cli import main

    rc = main(["layout", "--method", "bounded", "--model", str(tiny_sd_dir), "--steps", "2",
               "--prompt", PROMPT, "--box", "red circle=0,0,0.5,0.5",
               "--box", "square=0.5,0.5,1,1", "--out-dir", str(tmp_path / "b")])
    assert rc == 0
    res = json.loads((tmp_path / "b" / "result.json").read_text())
    assert res["files"] == ["000.png", "masks.npy", "result.json"]
    assert res["boxes"] == {"red circle": [0, 0, 0.5, 0.5], "square": [0.5, 0.5, 1, 1]}
    m = np.load(tmp_path / "b" / "masks.npy")
    assert m.shape == (1, 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(res["masks"][0]["square"]), m[0, 1])
    assert m[0, 0, :4, :4].all() and not m[0, 0, 4:].any()
