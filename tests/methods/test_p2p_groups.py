"""Batched Prompt-to-Prompt: G independent edit groups in one compiled call equal the
same edits run one group at a time (breaks if a group's mapper, alphas, blend words or
latents leak into another group)."""

from __future__ import annotations

import numpy as np
import pytest

import jattn
from jattn.methods.p2p import edit


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.parametrize("mode, targets, kw", [
    ("replace", [["a blue circle"], ["a red star"]], dict(blend_words=["circle", "star"])),
    ("refine", [["a striped red circle"], ["a big green square"]], {}),
])
def test_groups_equal_separate_edits(pipe, mode, targets, kw):
    sources = ["a red circle", "a green square"]
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    together = edit(pipe, sources, targets, mode=mode, num_inference_steps=3, latents=lat, **kw)
    for g in range(2):
        kw_g = dict(kw)
        if "blend_words" in kw:  # alone, each group names only its own word
            kw_g["blend_words"] = [w for w in kw["blend_words"]
                                   if w in (sources[g] + " " + " ".join(targets[g])).split()]
        alone = edit(pipe, sources[g], targets[g], mode=mode, num_inference_steps=3,
                     latents=lat[g:g + 1], **kw_g)
        np.testing.assert_allclose(together.latents[2 * g:2 * g + 2], alone.latents, atol=1e-4)


def test_groups_need_equal_target_counts(pipe):
    with pytest.raises(ValueError, match="same number of targets"):
        edit(pipe, ["a red circle", "a green square"], [["a blue circle"], ["a", "b"]],
             num_inference_steps=2)
