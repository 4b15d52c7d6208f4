"""CLI of the methods on the tiny random pipeline: edit p2p, invert, maps, and their
bad-input errors (one clear message, exit code 2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jattn.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo (scikit-image's astronaut), written as PNG."""
    from skimage import data

    p = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(p)
    return p


def test_edit_p2p_writes_source_targets_and_grid(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "p2p"
    rc = main(["edit", "p2p", "--model", str(tiny_sd_dir), "--prompt", "a red circle",
               "--target", "a blue circle", "--target", "a green circle", "--steps", "2",
               "--blend-words", "circle", "--out-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png", "grid.png",
                                                     "result.json"]
    imgs = [np.asarray(Image.open(out / f"00{i}.png")) for i in range(3)]
    assert imgs[0].shape == (16, 16, 3)
    assert "grid.png" in capsys.readouterr().out


def test_invert_then_edit_from_inversion_file(tiny_sd_dir, photo, tmp_path, capsys):
    inv_dir = tmp_path / "inv"
    rc = main(["invert", "--model", str(tiny_sd_dir), "--image", str(photo), "--prompt",
               "a photo of a person", "--method", "ddim", "--steps", "3", "--out-dir",
               str(inv_dir)])
    assert rc == 0
    assert (inv_dir / "000.png").is_file() and (inv_dir / "inversion.npz").is_file()
    assert "PSNR" in capsys.readouterr().out
    out = tmp_path / "edit"
    rc = main(["edit", "p2p", "--model", str(tiny_sd_dir), "--prompt", "a photo of a person",
               "--target", "a photo of a robot", "--steps", "3", "--inversion-file",
               str(inv_dir / "inversion.npz"), "--out-dir", str(out)])
    assert rc == 0 and (out / "001.png").is_file()
    rc = main(["edit", "p2p", "--model", str(tiny_sd_dir), "--prompt", "a photo of a person",
               "--target", "a photo of a robot", "--steps", "4", "--inversion-file",
               str(inv_dir / "inversion.npz"), "--out-dir", str(out), "--overwrite"])
    assert rc == 2 and "--steps 3" in capsys.readouterr().err


def test_maps_writes_overlays_and_pca(tiny_sd_dir, tmp_path):
    out = tmp_path / "maps"
    rc = main(["maps", "--model", str(tiny_sd_dir), "--prompt", "a red circle on the left",
               "--steps", "2", "--out-dir", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"000.png", "maps.png", "self_attention_pca.png", "token_02_red.png"} <= names


@pytest.mark.parametrize("argv, message", [
    (["--target", "a big blue circle"], "different"),            # word swap, word counts
    (["--target", "a blue circle", "--equalize", "red"], "WORD=VALUE"),
    (["--target", "a blue circle", "--mode", "refine", "--equalize", "dog=2"], "dog"),
    (["--target", "a blue circle", "--cross-steps", "1.5"], "cross_replace_steps"),
    (["--target", "a blue circle", "--blend-words", "dog"], "blend_words"),
])
def test_edit_bad_input_is_one_clear_error(tiny_sd_dir, tmp_path, capsys, argv, message):
    rc = main(["edit", "p2p", "--model", str(tiny_sd_dir), "--prompt", "a red circle",
               "--steps", "2", "--out-dir", str(tmp_path / "x")] + argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not (tmp_path / "x").exists()  # nothing written on bad input


@pytest.mark.slow
def test_demo_runs_on_tiny_pipeline(tiny_sd_dir, tmp_path):
    rc = main(["demo", "--model", str(tiny_sd_dir), "--steps", "2", "--out-dir",
               str(tmp_path / "demo")])
    assert rc == 0
    html = (tmp_path / "demo" / "index.html").read_text()
    assert "a red circle on the left" in html and "edit_00.png" in html


def test_run_config(tiny_sd_dir, tmp_path, monkeypatch):
    """`jattn run` executes a configs/ file (here a 2-step copy of the colour swap)."""
    from pathlib import Path

    src = (Path(__file__).parent.parent / "configs" / "p2p_colour_swap.py").read_text()
    cfg = tmp_path / "cfg.py"
    cfg.write_text(src.replace("steps=50", "steps=2"))
    rc = main(["run", "--model", str(tiny_sd_dir), str(cfg), "--out-dir", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "grid.png").is_file()
    assert (tmp_path / "o" / "002.png").is_file()
