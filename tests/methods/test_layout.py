"""Layout guidance: loss vs a NumPy restatement of the reference's compute_ca_loss, runs in
the compiled loop, lowers the loss, no boxes-change recompiles, bad boxes."""

from __future__ import annotations

import numpy as np
import pytest

import jattn
from jattn.methods.layout import box_mask_ref, layout_generate, layout_loss


def np_ca_loss(maps, boxes, positions):
    """Restatement for one sample: maps = list of (H, T, S) per-head maps."""
    loss = 0.0
    for a in maps:
        h, t, _ = a.shape
        r = int(round(np.sqrt(t)))
        for box, pos in zip(boxes, positions):
            m = np.zeros((r, r))
            m[int(box[1] * r):int(box[3] * r), int(box[0] * r):int(box[2] * r)] = 1
            obj = 0.0
            for p in pos:
                c = a[:, :, p].reshape(h, r, r)
                act = (c * m).reshape(h, -1).sum(-1) / c.reshape(h, -1).sum(-1)
                obj += np.mean((1 - act) ** 2)
            loss += obj / len(pos)
    return loss / (len(boxes) * len(maps))


def test_loss_matches_numpy_restatement():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    maps = [rng.random((1, 2, 16, 77)).astype(np.float32),
            rng.random((1, 2, 64, 77)).astype(np.float32)]
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.25, 0.5, 1.0, 1.0)]
    pos = [[2, 3], [6]]
    masks = [jnp.asarray(np.stack([box_mask_ref(b, r, r).reshape(-1) for b in boxes])[None])
             for r in (4, 8)]
    tokens = np.array([[[2, 3], [6, 0]]], np.int32)
    valid = np.array([[[True, True], [True, False]]])
    got = layout_loss([jnp.asarray(m) for m in maps], masks, jnp.asarray(tokens),
                      jnp.asarray(valid), jnp.asarray([[True, True]]))
    want = np_ca_loss([m[0].astype(np.float64) for m in maps], boxes, pos)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)


@pytest.fixture(scope="module")
def jpipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.slow
def test_runs_changes_and_no_recompile(jpipe):
    plain = jpipe.generate(["a red circle and a blue square"], num_inference_steps=3, seed=1)
    out = layout_generate(jpipe, "a red circle and a blue square", ["red circle", "square"],
                          [(0, 0, 8, 8), (8, 8, 16, 16)], num_inference_steps=3, seed=1,
                          max_index_step=2)
    assert np.abs(out.latents - plain.latents).max() > 1e-4
    before = dict(jpipe.trace_counts)
    layout_generate(jpipe, "a green star and a red star", ["green star", "red star"],
                    [(0, 0, .5, 1), (.5, 0, 1, 1)], num_inference_steps=3, seed=2,
                    max_index_step=2)
    assert jpipe.trace_counts == before
    off = layout_generate(jpipe, "a red circle and a blue square", ["red circle", "square"],
                          [(0, 0, 8, 8), (8, 8, 16, 16)], num_inference_steps=3, seed=1,
                          max_index_step=0)
    np.testing.assert_array_equal(off.latents, plain.latents)


def test_bad_boxes(jpipe):
    from jattn.methods.layout import layout_guidance

    p, ph = ["a red circle and a blue square"], [["red circle", "square"]]
    with pytest.raises(ValueError, match="outside"):
        layout_guidance(jpipe, p, ph, [[(0, 0, 8, 8), (8, 8, 17, 16)]])
    with pytest.raises(ValueError, match="x1 > x0"):
        layout_guidance(jpipe, p, ph, [[(4, 0, 2, 8), (8, 8, 16, 16)]])
    with pytest.raises(ValueError, match="not in the prompt"):
        layout_guidance(jpipe, p, [["dog", "square"]], [[(0, 0, 8, 8), (8, 8, 16, 16)]])
    with pytest.raises(ValueError, match="boxes"):
        layout_guidance(jpipe, p, [["red circle"]], [[(0, 0, 8, 8), (8, 8, 16, 16)]])


@pytest.mark.slow  # ~45-80 s; the default suite keeps to 15 min
def test_cli_excite_and_layout_write_their_files(tiny_sd_dir, tmp_path):
    """`jattn excite` and `jattn layout` end to end on the tiny pipeline: 000.png … in
    prompt order, grid.png, result.json listing them."""
    import json

    from jattn.cli import main

    common = ["--model", str(tiny_sd_dir), "--steps", "2", "--prompt",
              "a red circle and a blue square", "--prompt", "a blue circle and a red square"]
    rc = main(["excite", *common, "--attn-res", "8", "--excite", "circle", "--excite",
               "square", "--out-dir", str(tmp_path / "e")])
    assert rc == 0
    rc = main(["layout", *common, "--box", "circle=0,0,0.5,0.5", "--box", "square=0.5,0.5,1,1",
               "--out-dir", str(tmp_path / "l")])
    assert rc == 0
    for d in ("e", "l"):
        files = json.loads((tmp_path / d / "result.json").read_text())["files"]
        assert files == ["000.png", "001.png", "grid.png", "result.json"], (d, files)
