"""Self-segmentation front-end (jattn.methods.segment, jattn segment) on the tiny random
pipeline: words, the aggregation of self maps over heads/layers/steps, the API for
generated and inverted images, labels against a NumPy restatement of the reference's
scoring, compile counts, the command's files, errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from PIL import Image

from jattn.methods import segment as sm
from jattn.policy.core import Layout, Op, Select, compose, resolve

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    import jattn

    return jattn.load(tiny_sd_dir)


@pytest.fixture(scope="module")
def first(pipe):
    """One segmentation of two prompts (compiles the sampler and the clustering)."""
    return sm.segment(pipe, ["a red circle on the left", "a blue square and a green star"],
                      num_inference_steps=STEPS, seed=[3, 4])


# ---------------------------------------------------------------------- words
def test_content_words_drop_stop_words_and_repeats():
    assert sm.content_words("a red circle on the left") == ["red", "circle"]
    assert sm.content_words("A photo of a Cat, and a cat on a gray background") == [
        "Cat,", "cat", "gray"]


def test_resolve_words_weights_and_errors(pipe):
    tok = pipe.tokenizer
    per, w = sm.resolve_words(tok, ["a red circle", "a lasagne"], [["circle"], ["lasagne"]])
    assert per == [["circle"], ["lasagne"]] and w.shape == (2, 77, 77)
    assert w[0, 0].nonzero()[0].tolist() == [3] and w[0, 0, 3] == 1.0
    assert w[1, 0].nonzero()[0].tolist() == [2, 3]       # "las" "agne": the mean of both
    np.testing.assert_allclose(w[1, 0, [2, 3]], 0.5)
    with pytest.raises(ValueError, match="words: 'dog' is not a word of prompt"):
        sm.resolve_words(tok, ["a red circle"], ["dog"])
    with pytest.raises(ValueError, match="given twice"):
        sm.resolve_words(tok, ["a red circle"], ["red", "red"])
    with pytest.raises(ValueError, match="no words"):
        sm.resolve_words(tok, ["a photo of the left"], None)
    with pytest.raises(ValueError, match="lists for 2 prompts"):
        sm.resolve_words(tok, ["a", "b"], [["a"]])


# ---------------------------------------------------------------------- grids + policy
def test_grids_follow_the_rule(pipe):
    """Tiny pipeline (8² latents): self grid 8² (largest ≤ 32² tokens); half of it (4²)
    exists only in the mid block, so the cross grid is 8² too."""
    self_hw, cross_hw, ssel, csel = sm.grids(pipe)
    assert self_hw == (8, 8) and cross_hw == (8, 8)
    assert ssel.blocks == ("down", "up")
    with pytest.raises(ValueError, match="self_resolution=3"):
        sm.grids(pipe, self_resolution=3)


@struct.dataclass
class RecordHeads(Op):
    """Test op: every step's per-head self-attention probabilities of the conditional
    half, stored at the step index (no aggregation)."""

    needs_probs = True

    def record(self, ctx, p_pre, p_post):
        p = p_pre.astype(jnp.float32)
        return {"p": p[p.shape[0] // 2:]}                    # (B, N, T, S)

    def aux_init(self, sites, layout, context_tokens):
        s = sites[0]
        return jnp.zeros((STEPS, layout.groups, s.num_heads, s.query_tokens, s.query_tokens))

    def aux_update(self, acc, per_site, step, sites):
        (rec,) = per_site.values()
        return acc.at[step].set(rec["p"])


def test_self_maps_are_the_mean_over_heads_layers_and_window(pipe):
    """The captured self map = mean over heads, over the down/up layers of the grid and
    over the window's steps (steps [1, 3) of 4), computed here from raw per-head maps
    recorded at each layer and step (breaks on a sum instead of a mean, the wrong steps,
    the unconditional half, or the mid block counted)."""
    sites = pipe.sites()
    layers = [s for s in sites if s.kind == "self" and s.resolution == (8, 8)
              and s.block in ("down", "up")]
    assert len(layers) >= 2
    layout = Layout(groups=1, members=1, cfg=True)
    raw = resolve([(Select(path="^" + s.path.replace(".", r"\.") + "$"), RecordHeads())
                   for s in layers], sites, layout=layout)
    seg_pol = sm.segment_policy(pipe, 1, num_steps=STEPS, step_window=(0.25, 0.75))
    out = pipe.generate(["a red circle"], num_inference_steps=STEPS, seed=0,
                        policy=compose(raw, seg_pol))
    per_layer = np.stack([np.asarray(a) for a in out.aux[:len(layers)]])  # (L, steps, 1, N, T, T)
    want = per_layer[:, 1:3].mean(axis=(0, 1, 3))                         # layers, steps, heads
    acc = out.aux[len(layers)]
    assert int(acc["steps"]) == 2
    got = np.asarray(acc["self8x8"]) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- API
def test_api_shapes_and_labels(pipe, first):
    r = first
    assert r.images.shape == (2, 16, 16, 3) and r.images.dtype == np.uint8
    assert r.labels.shape == (2, 16, 16) and r.labels.dtype == np.uint8
    assert r.words == [["red", "circle"], ["blue", "square", "green", "star"]]
    assert r.scores.shape == (2, 5, 4) and np.isnan(r.scores[0, :, 2:]).all()
    assert r.clusters.shape == (2, 8, 8) and r.cluster_words.shape == (2, 5)
    for i in range(2):
        assert r.labels[i].max() <= len(r.words[i])
        # labels = cluster labels upsampled (nearest, 8² → 16²)
        np.testing.assert_array_equal(
            r.labels[i], r.cluster_words[i][r.clusters[i]].repeat(2, 0).repeat(2, 1))
    assert set(r.maps) == {"self8x8", "cross8x8"}
    segs = r.segments(1)
    assert len(segs) == 5 and set(segs[0]["scores"]) == {"blue", "square", "green", "star"}


def test_labels_match_numpy_restatement_of_reference(pipe, first):
    """cluster_words from the captured maps and the clusters, scored as the reference does
    (normalise (m − |min m|)/max m, mean over the cluster, argmax above 0.35)."""
    r = first
    for i, prompt in enumerate(r.prompts):
        cross = r.maps["cross8x8"][i]                                        # (T, S)
        want = []
        norm = []
        for w in r.words[i]:
            from jattn.io.words import word_token_indices

            m = cross[:, word_token_indices(pipe.tokenizer, prompt, w)].mean(1)
            norm.append((m - abs(m.min())) / m.max())
        norm = np.stack(norm)                                                 # (W, T)
        cl = r.clusters[i].reshape(-1)
        for c in range(5):
            sc = norm[:, cl == c].mean(1)
            want.append(int(sc.argmax()) + 1 if sc.max() > sm.THRESHOLD else 0)
            np.testing.assert_allclose(r.scores[i, c, :len(sc)], sc, rtol=1e-5, atol=1e-6)
        assert r.cluster_words[i].tolist() == want


def test_batch_equals_single_on_the_same_maps(pipe, first):
    r = first
    one = sm.segment_from_maps(pipe, {k: v[1:] for k, v in r.maps.items()}, r.prompts[1:])
    np.testing.assert_array_equal(one.labels[0], r.labels[1])
    np.testing.assert_array_equal(one.clusters[0], r.clusters[1])


def test_new_prompts_words_and_settings_do_not_compile(pipe, first):
    before = dict(pipe.trace_counts)
    sm.segment(pipe, ["a green heart at the top", "two yellow rings"],
               words=[["heart"], ["yellow", "rings"]], num_inference_steps=STEPS, seed=9,
               threshold=0.2, step_window=(0.5, 1.0))
    assert pipe.trace_counts == before


def test_real_images_through_inversion(pipe):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    r = sm.segment(pipe, "a red circle", images=imgs, inversion="ddim",
                   num_inference_steps=STEPS)
    assert r.inversion is not None and r.inversion.uncond_per_step is None
    assert r.images.shape == (2, 16, 16, 3) and r.labels.shape == (2, 16, 16)
    # regenerating from the inversion without CFG gives the same images
    again = pipe.generate(["a red circle"] * 2, num_inference_steps=STEPS, scheduler="ddim",
                          guidance_scale=1.0, latents=r.inversion.x_t)
    np.testing.assert_array_equal(again.images, r.images)
    before = dict(pipe.trace_counts)                          # new images: no compilation
    sm.segment(pipe, ["a blue square", "a cat"], images=imgs[::-1], inversion="ddim",
               num_inference_steps=STEPS, words=[["square"], ["cat"]])
    assert pipe.trace_counts == before


@pytest.mark.parametrize("kwargs, exc, fragment", [
    (dict(clusters=1), ValueError, "clusters=1"),
    (dict(clusters=65), ValueError, "clusters=65"),
    (dict(clusters=2.5), ValueError, "clusters"),
    (dict(words=["dog"]), ValueError, "words: 'dog'"),
    (dict(words=[3]), TypeError, "words"),
    (dict(threshold=float("nan")), ValueError, "threshold"),
    (dict(step_window=(0.5, 0.5)), ValueError, "step_window"),
    (dict(step_window=(0.0, 0.1)), ValueError, "covers no step"),
    (dict(inversion="sdedit"), ValueError, "inversion"),
    (dict(upsample="cubic"), ValueError, "upsample"),
    (dict(cross_resolution=5), ValueError, "cross_resolution=5"),
    (dict(images=np.zeros((2, 16, 16, 3), np.uint8), prompt=["a", "b", "c"]), ValueError,
     "3 prompts for 2 images"),
    (dict(images=np.zeros((16, 16), np.uint8)), ValueError, "images"),
])
def test_api_errors_name_the_argument(pipe, kwargs, exc, fragment):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a red circle")
    before = dict(pipe.trace_counts)
    with pytest.raises(exc) as info:
        sm.segment(pipe, prompt, num_inference_steps=STEPS, **kwargs)
    assert fragment in str(info.value)
    assert pipe.trace_counts == before                        # raised before any compute


# ---------------------------------------------------------------------- CLI
def test_cli_writes_image_labels_overlay_and_result(tiny_sd_dir, tmp_path, capsys):
    from jattn.cli import main

    out = tmp_path / "seg"
    rc = main(["segment", "--model", str(tiny_sd_dir), "--prompt", "a red circle on the left",
               "--words", "circle", "red", "--steps", "2", "--clusters", "3",
               "--out-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "labels.png", "overlay.png",
                                                     "result.json"]
    labels = np.asarray(Image.open(out / "labels.png"))
    assert labels.dtype == np.uint8 and labels.shape == (16, 16) and labels.max() <= 2
    res = json.loads((out / "result.json").read_text())
    assert res["words"] == ["circle", "red"]
    assert res["labels"] == {"0": "background", "1": "circle", "2": "red"}
    assert len(res["segments"]) == 3 and set(res["segments"][0]["scores"]) == {"circle", "red"}
    assert sum(res["pixels_per_label"].values()) == 256
    assert "labels.png" in capsys.readouterr().out


def test_cli_real_image(tiny_sd_dir, tmp_path):
    from jattn.cli import main

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8)).save(
        tmp_path / "photo.png")
    out = tmp_path / "seg"
    rc = main(["segment", "--model", str(tiny_sd_dir), "--image", str(tmp_path / "photo.png"),
               "--prompt", "a photo of a cat", "--inversion", "ddim", "--steps", "2",
               "--out-dir", str(out)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["words"] == ["cat"] and "reconstruction_psnr_db" in res["figures"]
    assert np.asarray(Image.open(out / "000.png")).shape == (16, 16, 3)
