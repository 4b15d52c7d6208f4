"""jattn.policy.analysis: DAAM word heatmaps from captured maps, bicubic resampling vs
torch, self-attention PCA pictures, colormaps, overlays and grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jattn.io.tokenizer import load_tokenizer
from jattn.io.words import word_token_indices
from jattn.policy import analysis as an

S = 77


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _peaked(h, w, quadrant, tokens, rng, rows=2):
    """(rows, h·w, S) maps: the listed tokens put their mass in one quadrant of row 0."""
    m = rng.random((rows, h, w, S)) * 0.1
    qy, qx = quadrant
    ys = slice(0, h // 2) if qy == 0 else slice(h // 2, h)
    xs = slice(0, w // 2) if qx == 0 else slice(w // 2, w)
    for t in tokens:
        m[0, ys, xs, t] += 5.0
    m /= m.sum(-1, keepdims=True)
    return m.reshape(rows, h * w, S).astype(np.float32)


def test_resize_bicubic_matches_torch():
    """The bicubic kernel equals torch's F.interpolate(bicubic, align_corners=False) (DAAM's
    upsampling), up- and downsampling, non-square. Breaks on a wrong kernel constant,
    pixel-centre convention or edge handling."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    for size in [(16, 16), (9, 13), (4, 6), (2, 3)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=size,
                                              mode="bicubic", align_corners=False)[0].numpy()
        got = an.resize_bicubic(x, size)
        assert got.shape == (3,) + size and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_cross_token_maps_daam_aggregation():
    """Per token: bicubic upsampling of each kept resolution, clamp ≥ 0, average; the
    lowest resolution is skipped unless requested; self maps ignored; weights honoured."""
    rng = np.random.default_rng(1)
    maps = {"cross2x2": rng.random((2, 4, S)).astype(np.float32),
            "cross4x4": rng.standard_normal((2, 16, S)).astype(np.float32),
            "cross8x8": rng.random((2, 64, S)).astype(np.float32),
            "self4x4": rng.random((2, 16, 16)).astype(np.float32)}

    def up(key, hw):
        a = maps[key][1].T.reshape(S, *hw)
        return np.maximum(an.resize_bicubic(a, (16, 16)), 0)

    got = an.cross_token_maps(maps, row=1, size=(16, 16))
    want = (up("cross4x4", (4, 4)) + up("cross8x8", (8, 8))) / 2
    assert got.shape == (S, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.min() >= 0
    every = an.cross_token_maps(maps, row=1, size=(16, 16), skip_lowest=False)
    np.testing.assert_allclose(every, (2 * want + up("cross2x2", (2, 2))) / 3, atol=1e-6)
    only = an.cross_token_maps(maps, row=1, size=(16, 16), resolutions=[2])
    np.testing.assert_allclose(only, up("cross2x2", (2, 2)), atol=1e-6)
    weighted = an.cross_token_maps(maps, row=1, size=(16, 16),
                                   weights={"cross4x4": 3.0, "cross8x8": 1.0})
    np.testing.assert_allclose(weighted, (3 * up("cross4x4", (4, 4)) + up("cross8x8", (8, 8)))
                               / 4, atol=1e-6)
    assert an.cross_token_maps(maps).shape == (S, 8, 8)  # default size: largest grid
    with pytest.raises(ValueError, match="not captured"):
        an.cross_token_maps(maps, resolutions=[32])
    with pytest.raises(ValueError, match="no cross-attention"):
        an.cross_token_maps({"self4x4": maps["self4x4"]})
    with pytest.raises(ValueError, match="row"):
        an.cross_token_maps(maps, row=5)


def test_word_heatmap_peaks_in_its_quadrant(tok):
    """A word whose tokens attend to the bottom-right quadrant gives a heatmap whose mass
    and peak lie there, normalised to [0, 1]; another word's map does not. Breaks on a
    transposed reshape (T → h, w), a wrong token offset (BOS) or a wrong word merge."""
    prompt = "a photo of lasagne next to a cat"
    las = word_token_indices(tok, prompt, "lasagne")
    cat = word_token_indices(tok, prompt, "cat")
    assert len(las) == 2  # lasagne is two BPE tokens
    rng = np.random.default_rng(2)
    maps = {"cross4x4": _peaked(4, 4, (1, 1), las, rng),
            "cross8x8": _peaked(8, 8, (1, 1), las, rng),
            "cross16x8": _peaked(16, 8, (1, 1), las, rng)}
    maps["cross8x8"][0, :, cat[0]] = 0
    maps["cross8x8"][0, :8 * 4, cat[0]] = 1.0  # cat: top half
    hm = an.word_heatmaps(maps, tok, prompt, ["lasagne", "cat"], size=(32, 32),
                          resolutions=[(8, 8)])
    las_map, cat_map = hm["lasagne"], hm["cat"]
    assert las_map.shape == (32, 32) and las_map.dtype == np.float32
    assert abs(las_map.min()) < 1e-6 and abs(las_map.max() - 1) < 1e-6
    y, x = np.unravel_index(las_map.argmax(), las_map.shape)
    assert y >= 16 and x >= 16
    assert las_map[16:, 16:].sum() > 0.7 * las_map.sum()
    assert cat_map[:16].sum() > 0.9 * cat_map.sum()
    # the word map is the mean of its sub-token maps
    raw = an.word_heatmaps(maps, tok, prompt, "lasagne", size=(32, 32), normalize=False,
                           skip_lowest=False)["lasagne"]
    per_token = an.cross_token_maps(maps, size=(32, 32), skip_lowest=False)
    np.testing.assert_allclose(raw, per_token[las].mean(0), atol=1e-6)
    # the non-square 16x8 grid is used with the right orientation
    tall = an.word_heatmaps(maps, tok, prompt, "lasagne", size=(32, 32),
                            resolutions=[(16, 8)])["lasagne"]
    assert tall[16:, 16:].sum() > 0.7 * tall.sum()
    with pytest.raises(ValueError, match="not a word"):
        an.word_heatmaps(maps, tok, prompt, "dog")


def test_token_heatmaps_every_token(tok):
    """One normalised map per token of the prompt, labelled with its BPE text, in order."""
    prompt = "a photo of lasagne"
    rng = np.random.default_rng(3)
    maps = {"cross4x4": rng.random((1, 16, S)).astype(np.float32),
            "cross8x8": rng.random((1, 64, S)).astype(np.float32)}
    out = an.token_heatmaps(maps, tok, prompt, size=(8, 8))
    ids = tok(prompt)["input_ids"]
    assert len(out) == len(ids) - 2
    assert [t for t, _ in out][:3] == ["a", "photo", "of"]
    per_token = an.cross_token_maps(maps, size=(8, 8))
    for k, (_, m) in enumerate(out):
        assert m.shape == (8, 8) and abs(m.max() - 1) < 1e-6 and abs(m.min()) < 1e-6
        ref = per_token[k + 1]
        np.testing.assert_allclose(m, (ref - ref.min()) / (ref.max() - ref.min() + 1e-8),
                                   atol=1e-6)
    special = an.token_heatmaps(maps, tok, prompt, size=(8, 8), include_special=True)
    assert len(special) == len(ids) and special[0][0] == "<|startoftext|>"


def test_self_attention_pca_picture():
    """uint8 (H, W, 3); pixels with the same attention pattern get the same colour,
    different clusters different colours; the first component spans 0..255 and a
    component of pure noise stays dark; deterministic signs."""
    h = w = 4
    t = h * w
    labels = np.zeros((h, w), int)
    labels[:, 2:] = 1
    labels[3, 0] = 2
    lab = labels.ravel()
    a = np.stack([(lab == lab[i]).astype(np.float64) for i in range(t)])
    a /= a.sum(1, keepdims=True)
    a += np.random.default_rng(4).random((t, t)) * 1e-3
    pic = an.self_attention_pca(a)
    assert pic.shape == (4, 4, 3) and pic.dtype == np.uint8
    flat = pic.reshape(t, 3).astype(int)
    assert np.abs(flat[lab == 0] - flat[lab == 0][0]).max() <= 3
    assert np.abs(flat[lab == 0][0] - flat[lab == 1][0]).max() > 100
    assert (pic.reshape(-1, 3).min(0) == 0).all() and pic[..., 0].max() == 255
    assert pic[..., 2].max() <= 3  # 3 clusters span 2 components: the third is noise
    big = an.self_attention_pca(a, size=(16, 16))
    assert big.shape == (16, 16, 3)
    np.testing.assert_array_equal(big[::4, ::4], pic)
    np.testing.assert_array_equal(an.self_attention_pca(a), pic)
    wide = an.self_attention_pca(np.eye(8) + 0.1, grid_hw=(2, 4))
    assert wide.shape == (2, 4, 3)
    with pytest.raises(ValueError):
        an.self_attention_pca(a, grid_hw=(3, 5))
    with pytest.raises(ValueError):
        an.self_attention_pca(a[:, :5])


def test_colormap_and_overlay():
    """jet runs blue → red, viridis purple → yellow; overlay = (1 − α)·image + α·colour,
    with the heatmap resized to the image."""
    jet = an.colormap(np.array([0.0, 0.5, 1.0]))
    assert jet.dtype == np.uint8 and jet.shape == (3, 3)
    assert jet[0, 2] > 100 and jet[0, 0] == 0          # dark blue
    assert jet[2, 0] > 100 and jet[2, 2] == 0          # dark red
    assert jet[1, 1] == 255                            # green/cyan middle
    vir = an.colormap(np.array([0.0, 1.0, 2.0, np.nan]), "viridis")
    np.testing.assert_array_equal(vir[0], [68, 1, 84])
    np.testing.assert_array_equal(vir[1], [253, 231, 37])
    np.testing.assert_array_equal(vir[2], vir[1])      # clipped
    np.testing.assert_array_equal(vir[3], vir[0])      # NaN → 0
    with pytest.raises(ValueError):
        an.colormap(np.zeros(2), "plasma-ish")
    img = np.full((8, 8, 3), 100, np.uint8)
    hm = np.zeros((4, 4))
    hm[2:, 2:] = 1.0
    out = an.overlay(img, hm, alpha=0.5)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    blue = an.colormap(np.zeros(1))[0].astype(float)
    np.testing.assert_array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * blue).astype(np.uint8))
    assert out[7, 7, 0] > out[0, 0, 0]                 # hot corner is red-ish
    np.testing.assert_array_equal(an.overlay(img, hm, alpha=0.0), img)
    np.testing.assert_array_equal(an.overlay(Image.fromarray(img), np.zeros((8, 8)), 1.0),
                                  np.broadcast_to(blue.astype(np.uint8), (8, 8, 3)))
    with pytest.raises(ValueError):
        an.overlay(img, hm, alpha=1.5)


def test_grid_with_labels():
    """rows × cols cells with padding; labels add a text band (ink present); mixed input
    types (uint8 RGB, float gray, PIL); errors on too many images or label mismatch."""
    a = np.zeros((10, 12, 3), np.uint8)
    b = np.ones((10, 12))  # float gray → white
    c = Image.fromarray(np.full((10, 12, 3), 128, np.uint8))
    g = an.grid([a, b, c], rows=2, cols=2, pad=2)
    assert isinstance(g, Image.Image) and g.mode == "RGB"
    assert g.size == (2 * 12 + 3 * 2, 2 * 10 + 3 * 2)
    arr = np.asarray(g)
    np.testing.assert_array_equal(arr[2:12, 2:14], a)
    np.testing.assert_array_equal(arr[2:12, 16:28], 255)
    np.testing.assert_array_equal(arr[14:24, 2:14], 128)
    lab = an.grid([a, c], rows=1, cols=2, labels=["cat", "dog"])
    assert lab.size[1] > 10 + 4
    band = np.asarray(lab)[12 + 2:, :]
    assert (band < 128).any()  # some text was drawn
    with pytest.raises(ValueError, match="fit"):
        an.grid([a, a, a], rows=1, cols=2)
    with pytest.raises(ValueError, match="labels"):
        an.grid([a, a], rows=1, cols=2, labels=["x"])


def test_heatmaps_from_a_real_capture(tiny_sd_dir):
    """End to end on the tiny pipeline: capture cross maps during a 2-step generation
    (Capture op), then word heatmaps, overlay and grid work on the real shapes."""
    import jax.numpy as jnp

    import jattn
    from jattn.policy.capture import Capture, captured_maps
    from jattn.policy.core import Layout, Select, resolve

    pipe = jattn.load(tiny_sd_dir)
    prompt = "a red circle"
    pol = resolve([(Select(kind="cross"), Capture(window=jnp.asarray([0, 2], jnp.int32)))],
                  pipe.sites(), layout=Layout(1, 1, cfg=True))
    out = pipe.generate([prompt], num_inference_steps=2, seed=0, policy=pol)
    maps = captured_maps(out.aux[0])
    assert set(maps) == {"cross8x8", "cross4x4"}
    np.testing.assert_allclose(maps["cross8x8"].sum(-1), 1.0, atol=1e-5)
    hms = an.word_heatmaps(maps, pipe.tokenizer, prompt, ["red", "circle"],
                           size=out.images.shape[1:3])
    assert hms["circle"].shape == (16, 16)
    tiles = [out.images[0]] + [an.overlay(out.images[0], m) for m in hms.values()]
    g = an.grid(tiles, 1, 3, labels=["image", *hms])
    assert g.size[0] == 3 * 16 + 4 * 2
