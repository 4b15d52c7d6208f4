"""Every jattn method on SDXL (issue 16 §7): each method's policy resolves on SDXL's sites
(SDXL base's 140 at 1024 px by diffusers path, and conftest's ``tiny_sdxl_dir``), the SDXL
defaults of the references apply, each method runs on the tiny random SDXL pipeline
(``@pytest.mark.slow``: one UNet compilation each), StyleAligned + Prompt-to-Prompt compose
on it, and the bad inputs: an SD1 site name that SDXL has not, Nested Attention's refusal,
the CLI of one method (``jattn excite``) with ``--prompt-2``.

SDXL's blocks (base, 128² latents): down_blocks.0 128² without attention, down_blocks.1 64²
(depth 2), down_blocks.2 32² (depth 10), mid 32² (depth 10), up_blocks.0 32² (3 × depth 10),
up_blocks.1 64² (3 × depth 2), up_blocks.2 128² without attention. The tiny pipeline has the
same layout at 8² latents (attention at 4² and 2², depth 1/2, one resnet per block + 1 up).
"""

from __future__ import annotations

import numpy as np
import pytest

import jattn
from jattn.methods import bounded, consistory, cross_image, masactrl, p2p, pnp
from jattn.methods import style_aligned as sa
from jattn.models.unet import UNetConfig, list_feature_sites, list_sites
from jattn.policy.core import compose
from test_style_aligned import _switch_off  # one helper (SharedGroupNorm is off on SDXL)

N = 2  # denoising steps of the runs

# diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the layout only)
SDXL_BASE = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=32, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return jattn.load(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def base_sites():
    return list_sites(UNetConfig.from_diffusers(SDXL_BASE))


def _paths(policy):
    return [p for p, _ in policy.table]


def _ops_at(policy, path):
    return {type(policy.ops[i]).__name__ for p, idx in policy.table if p == path for i in idx}


# ----------------------------------------------------------- SDXL base: the site rules
@pytest.mark.slow  # tracing SDXL base's sites shape-only: ~10-20 s on a loaded CPU
def test_sdxl_base_site_rules(base_sites):
    """The SDXL translations of the SD1 site choices, on SDXL base's 140 sites at 1024 px:
    Bounded Attention's loss/mask layers are the reference's attention calls 70–81
    (run_xl.py), MasaCtrl's start layer 44 of 70 blocks, P2P's self replacement at
    (latent/4)² = 32², Cross-Image Attention's windows at 64²/32², ConsiStory's injection
    at 64² and masks at 32² (its SDXL reference), PnP's feature resnet at 32² (latent/4,
    SD's 16² of 64²). Breaks if a rule falls back to SD1 paths or resolutions."""
    assert len(base_sites) == 140
    got = bounded.loss_sites(base_sites, sdxl=True)
    assert got == base_sites[70:82] == bounded.record_sites(base_sites, sdxl=True)
    assert {s.path.rsplit(".", 1)[0] for s in got} == {
        f"up_blocks.0.attentions.0.transformer_blocks.{i}" for i in range(1, 7)}
    chosen = masactrl.masactrl_sites(base_sites, masactrl.SDXL_START_LAYER)
    selfs = [s for s in base_sites if s.kind == "self"]
    assert chosen == selfs[44:] and len(chosen) == 26 and all(s.block == "up" for s in chosen)
    assert masactrl.auto_mask_resolution(base_sites) == (32, 32)
    assert cross_image.swap_sites(base_sites) == ((64, 64), (32, 32))
    assert consistory.injection_resolution(base_sites) == (64, 64)
    att, feat = pnp.pnp_sites(base_sites, pnp.FEATURE_SITE_SDXL)
    assert len(att) == 35 and feat == "up_blocks.0.resnets.1.conv2"
    feats = {s.path: s for s in list_feature_sites(UNetConfig.from_diffusers(SDXL_BASE))}
    assert feats[feat].resolution == (32, 32) and feats[feat].kind == "resnet_residual"


# ------------------------------------------------- tiny SDXL: every policy resolves
def _policy(name, pipe):
    """Each method's policy (or guidance) built for the tiny SDXL pipeline at 16 px."""
    if name == "p2p":
        return p2p.p2p_policy(pipe, "a cat on a mat", ["a dog on a mat"], num_steps=N,
                              blend_words=["cat", "dog"], capture=True)
    if name == "maps":
        from jattn.methods.maps import capture_policy

        return capture_policy(pipe, 1)
    if name == "segment":
        from jattn.methods.segment import segment_policy

        return segment_policy(pipe, 1, num_steps=N)
    if name == "style_aligned":
        return sa.style_aligned_policy(pipe, 2, N)
    if name == "masactrl":
        return masactrl.masactrl_policy(pipe, members=2, num_inference_steps=N)
    if name == "pnp":
        return pnp.pnp_policy(pipe, members=2, num_inference_steps=N)
    if name == "bounded":
        return bounded.bounded_policy(pipe, ["a cat and a dog"], [["cat", "dog"]],
                                      [[(0, 0, .5, .5), (.5, .5, 1, 1)]], num_inference_steps=N,
                                      num_clusters_per_subject=1)
    if name == "bounded_guidance":
        return bounded.bounded_guidance(pipe, ["a cat and a dog"], [["cat", "dog"]],
                                        [[(0, 0, .5, .5), (.5, .5, 1, 1)]],
                                        num_inference_steps=N).policy
    if name == "layout":
        from jattn.methods.layout import layout_guidance

        return layout_guidance(pipe, ["a cat and a dog"], [["cat", "dog"]],
                               [[(0, 0, .5, .5), (.5, .5, 1, 1)]], num_inference_steps=N).policy
    if name == "excite":
        from jattn.methods.excite import excite_guidance

        return excite_guidance(pipe, ["a cat and a dog"], [["cat", "dog"]],
                               num_inference_steps=N, attn_res=4).policy
    raise AssertionError(name)


POLICIES = ["p2p", "maps", "segment", "style_aligned", "masactrl", "pnp", "bounded",
            "bounded_guidance", "layout", "excite"]


@pytest.mark.parametrize("name", POLICIES)
def test_policy_resolves_on_sdxl_sites(pipe, name):
    """Each method's policy resolves on the tiny SDXL UNet's sites (paths that exist there,
    none in down_blocks.0 or up_blocks.2, which have no attention), with the SDXL defaults:
    StyleAligned without GroupNorm sharing (the SDXL notebooks), MasaCtrl from layer 44/70,
    PnP's feature at up_blocks.0.resnets.1, Bounded Attention's loss on transformer block 1
    of up_blocks.0.attentions.0 with step sizes 18 → 5, P2P's self replacement at
    (latent/4)². Breaks if a method hard-codes SD1 paths or defaults on SDXL."""
    pol = _policy(name, pipe)
    known = {s.path for s in pipe.sites(features=True)}
    paths = _paths(pol)
    assert paths and set(paths) <= known, (name, sorted(set(paths) - known))
    attn = [p for p in paths if p in {s.path for s in pipe.sites()}]
    assert all(not p.startswith(("down_blocks.0.", "up_blocks.2.")) for p in attn)
    if name == "style_aligned":
        assert all(".norm" not in p for p in paths)                       # share_group_norm off
        assert "SharedGroupNorm" in _ops_at(sa.style_aligned_policy(pipe, 2, N,
                                                                    share_group_norm=True),
                                            "up_blocks.1.resnets.0.norm1")
    if name == "masactrl":
        assert paths == [s.path for s in pipe.sites() if s.kind == "self"][7:]
    if name == "pnp":
        assert "up_blocks.0.resnets.1.conv2" in paths
    if name == "bounded_guidance":
        g = bounded.bounded_guidance(pipe, ["a cat and a dog"], [["cat", "dog"]],
                                     [[(0, 0, .5, .5), (.5, .5, 1, 1)]], num_inference_steps=20)
        assert np.asarray(g.step_size)[0] == 18.0
        assert np.isclose(np.asarray(g.step_size)[14], 18.0 + (5.0 - 18.0) / 15 * 14)
        rec = [p for p in paths if "RecordHeads" in _ops_at(pol, p)]
        assert rec == ["up_blocks.0.attentions.0.transformer_blocks.1.attn1",
                       "up_blocks.0.attentions.0.transformer_blocks.1.attn2"]
    if name == "p2p":
        replaced = [p for p in paths if "SelfReplace" in _ops_at(pol, p)]
        assert replaced and all(s.resolution == (2, 2) for s in pipe.sites()
                                if s.path in replaced)


# ------------------------------------------------------------------------ bad input
def test_sd1_site_name_has_no_sdxl_meaning(pipe):
    """PnP's SD1 feature site of the last up block, ``up_blocks.3.resnets.1`` (SD1 has
    four up blocks, SDXL three): one ValueError naming feature_site, the model's up blocks
    and its default. Breaks if the site were silently skipped (no feature injection)."""
    with pytest.raises(ValueError) as e:
        pnp.pnp_policy(pipe, members=2, num_inference_steps=N,
                       feature_site="up_blocks.3.resnets.1")
    msg = str(e.value)
    assert "feature_site='up_blocks.3.resnets.1'" in msg
    assert "up_blocks.0, up_blocks.1, up_blocks.2" in msg and "up_blocks.0.resnets.1" in msg


def test_personalize_refuses_sdxl(pipe):
    """Nested Attention has no SDXL weights (its encoder and placeholder embedding are
    trained for one text encoder): a ValueError that says so before any work."""
    from jattn.methods.personalize import personalize

    with pytest.raises(ValueError, match="SDXL model; Nested Attention"):
        personalize(pipe, np.zeros((16, 16, 3), np.uint8), "a photo of s*")


# --------------------------------------------------------------------- composition
def test_style_aligned_composes_with_p2p_on_sdxl(pipe):
    """StyleAligned + Prompt-to-Prompt word swap in one compiled program on SDXL, members
    [R, R', R'']: switching either method off by array values (0 recompilations) changes
    the targets — both act — while the reference (member 0, the P2P source) stays the run
    with both off up to rounding. Breaks if the SDXL conditioning pytree or its CFG halves
    were not laid out as the policies' members, or either policy resolved to nothing."""
    prompts = ["a red circle", "a blue circle", "a green circle"]
    both = compose(sa.style_aligned_policy(pipe, 3, N),
                   p2p.p2p_policy(pipe, prompts[0], prompts[1:], num_steps=N))
    gen = lambda pol: pipe.generate(prompts, num_inference_steps=N, seed=4,  # noqa: E731
                                    scheduler="ddim", policy=pol, decode=False).latents
    out = gen(both)
    before = dict(pipe.trace_counts)
    p2p_only, sa_only = gen(_switch_off(both, "sa")), gen(_switch_off(both, "p2p"))
    neither = gen(_switch_off(_switch_off(both, "sa"), "p2p"))
    assert pipe.trace_counts == before
    for x in (out, p2p_only, sa_only):
        np.testing.assert_allclose(x[0], neither[0], atol=1e-4, rtol=1e-4)
    assert np.abs(out[1:] - p2p_only[1:]).max() > 1e-4                  # style sharing on
    assert np.abs(out[1:] - sa_only[1:]).max() > 1e-4                   # P2P on


# ------------------------------------------------------------------- every method runs
IMG = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
BOXES = [[(0, 0, .5, .5), (.5, .5, 1, 1)]]


def _run(name, pipe):
    from jattn.methods import excite, layout, maps, mix, segment

    if name == "p2p":
        return p2p.edit(pipe, "a cat riding a bike", ["a dog riding a bike"],
                        num_inference_steps=N, blend_words=["cat", "dog"]).images
    if name == "maps":
        return maps.generate_with_maps(pipe, ["a cat"], num_inference_steps=N)[0].images
    if name == "segment":
        return segment.segment(pipe, "a cat and a dog", num_inference_steps=N,
                               clusters=2).labels.astype(np.int32)  # may be one segment
    if name == "mix":
        return mix.mix(pipe, "a cat on a sofa", "cat", ["dog"], num_inference_steps=4).images
    if name == "excite":
        return excite.attend_and_excite(pipe, "a cat and a dog", ["cat", "dog"],
                                        num_inference_steps=N, max_iter_to_alter=1,
                                        attn_res=4).images
    if name == "layout":
        return layout.layout_generate(pipe, ["a cat and a dog"], [["cat", "dog"]], BOXES,
                                      num_inference_steps=N).images
    if name == "bounded":
        return bounded.bounded_generate(pipe, ["a cat and a dog"], [["cat", "dog"]], BOXES,
                                        num_inference_steps=N, num_clusters_per_subject=1,
                                        first_refinement_step=1).images
    if name == "style_aligned":
        return sa.style_aligned(pipe, ["a cat, watercolor", "a dog, watercolor"],
                                num_inference_steps=N).images
    if name == "style_aligned_image":
        return sa.style_aligned(pipe, ["a dog"], reference_image=IMG[0],
                                reference_prompt="a cat", num_inference_steps=N,
                                offset=0).images
    if name == "masactrl":
        return masactrl.masactrl(pipe, "a cat", "a running cat", num_inference_steps=N).images
    if name == "pnp":
        return pnp.pnp(pipe, image=IMG[0], target_prompts="a dog", num_inference_steps=N).images
    if name == "consistory":
        return consistory.consistory(pipe, "cat", ["a cat on a beach", "a cat in a city"],
                                     num_inference_steps=N).images
    if name == "cross_image":
        return cross_image.cross_image(pipe, IMG[0], IMG[0], "a cat",
                                       num_inference_steps=N).images
    raise AssertionError(name)


RUNS = ["p2p", "maps", "segment", "mix", "excite", "layout", "bounded", "style_aligned",
        "style_aligned_image", "masactrl", "pnp", "consistory", "cross_image"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_method_runs_on_tiny_sdxl(pipe, name):
    """The method's front-end runs end to end on the tiny SDXL pipeline (its policy, the
    SDXL conditioning pytree through the one sampler loop, inversions with time ids) and
    gives finite, non-constant output."""
    out = np.asarray(_run(name, pipe))
    assert out.size and np.isfinite(out.astype(np.float64)).all()
    if out.dtype == np.uint8:
        assert out.std() > 0


@pytest.mark.slow
def test_null_text_inversion_then_p2p_on_sdxl(pipe, tmp_path):
    """Null-text inversion on SDXL optimises the empty prompt's context only (the pooled
    text_embeds stay those of "" at every step; the pytree round-trips through
    save/load_inversion) and reconstructs the image's z*_0 through generate's
    uncond_per_step better than plain DDIM inversion; P2P edits from it. Breaks if
    time_ids were missing, the pooled embedding were optimised, or the pytree lost."""
    from jattn.sampling.inversion import invert, load_inversion, save_inversion

    inv = invert(pipe, IMG, "a cat", num_inference_steps=N, inner_steps=3, guidance_scale=5.0)
    u = inv.uncond_per_step
    assert set(u) == {"context", "text_embeds"}
    assert u["context"].shape == (N, 1, 77, 64) and u["text_embeds"].shape == (N, 1, 16)
    empty = pipe.encode_prompts([""])
    np.testing.assert_array_equal(u["text_embeds"][0], np.asarray(empty["text_embeds"]))
    assert np.abs(u["context"][0] - np.asarray(empty["context"])).max() > 0   # optimised
    save_inversion(inv, tmp_path / "inv.npz")
    back = load_inversion(tmp_path / "inv.npz")
    np.testing.assert_array_equal(back.uncond_per_step["context"], u["context"])
    z0 = inv.latents[0]

    def recon(uncond_per_step):
        return pipe.generate(["a cat"], num_inference_steps=N, guidance_scale=5.0,
                             scheduler="ddim", latents=inv.x_t, decode=False,
                             uncond_per_step=uncond_per_step).latents[0].transpose(1, 2, 0)

    plain = pipe.generate(["a cat"], num_inference_steps=N, guidance_scale=5.0,
                          scheduler="ddim", latents=inv.x_t, decode=False,
                          uncond_embeds=empty).latents[0].transpose(1, 2, 0)
    err_nt = np.abs(recon(back.uncond_per_step) - z0[0]).mean()
    assert err_nt < np.abs(plain - z0[0]).mean()
    out = p2p.edit(pipe, "a cat", ["a dog"], num_inference_steps=N, guidance_scale=5.0,
                   latents=inv.x_t, uncond_per_step=back.uncond_per_step)
    assert out.images.shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_excite_cli_with_prompt_2(pipe, tiny_sdxl_dir, tmp_path):
    """`jattn excite --prompt-2` on SDXL gives the API's image with prompt_2 (the flag
    reaches the conditioning: it differs from the run without it)."""
    from PIL import Image

    from jattn.cli import main
    from jattn.commands import common
    from jattn.methods.excite import excite_guidance

    common._PIPES[(str(tiny_sdxl_dir), "float32", False)] = pipe
    args = ["excite", "--model", str(tiny_sdxl_dir), "--prompt", "a cat and a dog",
            "--excite", "cat", "--attn-res", "4", "--steps", str(N)]
    assert main(args + ["--prompt-2", "a yellow star", "--out-dir", str(tmp_path / "a")]) == 0
    g = excite_guidance(pipe, ["a cat and a dog"], [["cat"]], num_inference_steps=N, attn_res=4)
    api = pipe.generate(["a cat and a dog"], num_inference_steps=N, guidance=g,
                        prompt_2="a yellow star")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "000.png")),
                                  api.images[0])
    without = pipe.generate(["a cat and a dog"], num_inference_steps=N, guidance=g)
    assert np.abs(api.images.astype(int) - without.images.astype(int)).max() > 0


@pytest.mark.slow
def test_cli_edit_p2p_null_text_on_sdxl(pipe, tiny_sdxl_dir, tiny_sd_dir, tmp_path, capsys):
    """`jattn edit p2p --image` on SDXL: null-text inversion (the pytree saved in
    inversion.npz) and the edit from it; the same file with an SD1 model: exit 2 and one
    line naming --inversion-file and the model family."""
    from PIL import Image

    from jattn.cli import main
    from jattn.commands import common

    common._PIPES[(str(tiny_sdxl_dir), "float32", False)] = pipe
    Image.fromarray(IMG[0]).save(tmp_path / "photo.png")
    base = ["edit", "p2p", "--prompt", "a cat", "--target", "a dog", "--steps", str(N)]
    rc = main(base + ["--model", str(tiny_sdxl_dir), "--image", str(tmp_path / "photo.png"),
                      "--out-dir", str(tmp_path / "e")])
    assert rc == 0 and (tmp_path / "e" / "001.png").is_file()
    capsys.readouterr()
    rc = main(base + ["--model", str(tiny_sd_dir), "--inversion-file",
                      str(tmp_path / "e" / "inversion.npz"), "--out-dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "--inversion-file was made with an SDXL model" in err, err


# every method command with --prompt-2 (issue 16 §6). ``compare``: the run without the flag
# too, one command per plumbing path: the command's own pipe.generate (layout), a method
# API's ``sdxl=`` (masactrl), maps' ``**generate_kwargs``, cross-image's generated inputs
SDXL_CLI = {
    "layout": (["layout", "--prompt", "a cat and a dog", "--box", "cat=0,0,0.5,0.5"], True),
    "layout-bounded": (["layout", "--method", "bounded", "--prompt", "a cat and a dog",
                        "--box", "cat=0,0,0.5,0.5"], False),
    "style-aligned": (["style-aligned", "--prompt", "a cat, watercolor", "--prompt",
                       "a dog, watercolor"], False),
    "edit-p2p": (["edit", "p2p", "--prompt", "a cat riding a bike", "--target",
                  "a dog riding a bike"], False),
    "edit-masactrl": (["edit", "masactrl", "--prompt", "a cat", "--target", "a running cat"],
                      True),
    "edit-pnp": (["edit", "pnp", "--prompt", "a cat", "--target", "a dog",
                  "--negative-prompt-2", "blurry"], False),
    "consistory": (["consistory", "--subject", "cat", "--prompt", "a cat on a beach",
                    "--prompt", "a cat in a city"], False),
    "cross-image": (["cross-image", "--structure", "a cat", "--appearance", "a dog",
                     "--prompt", "a cat"], True),
    "maps": (["maps", "--prompt", "a cat"], True),
    "segment": (["segment", "--prompt", "a cat and a dog", "--clusters", "2"], False),
    "edit-mix": (["edit", "mix", "--prompt", "a cat on a sofa", "--word", "cat", "--proxy",
                  "dog"], False),
}


def test_every_method_command_parses_sdxl_flags():
    """Every method command's parser takes --prompt-2 and the micro-conditioning flags
    (argparse only; breaks when a command lacks ``add_sdxl_args``)."""
    from jattn.cli import build_parser

    parser = build_parser()
    for name, (argv, _) in SDXL_CLI.items():
        ns = parser.parse_args(argv + ["--prompt-2", "a yellow star", "--original-size", "64",
                                       "64", "--target-size", "32", "32",
                                       "--crops-coords-top-left", "0", "4", "--out-dir", "x"])
        assert ns.prompt_2 == ["a yellow star"], name
        assert list(ns.original_size) == [64, 64] and list(ns.crops_coords_top_left) == [0, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SDXL_CLI) + ["refuse-pnp-image", "refuse-p2p-image"])
def test_method_cli_with_prompt_2_on_sdxl(pipe, tiny_sdxl_dir, tmp_path, capsys, name):
    """Each method command runs on the tiny SDXL model with --prompt-2; for one command per
    plumbing path the image differs from the run without it (breaks when the flag is parsed
    but not forwarded to Pipeline.generate). With a real image (PnP, P2P) the flag is
    refused in one line naming it: the inversion fixes the source's conditioning."""
    from PIL import Image

    from jattn.cli import main
    from jattn.commands import common

    common._PIPES[(str(tiny_sdxl_dir), "float32", False)] = pipe
    model = ["--model", str(tiny_sdxl_dir), "--steps", str(N)]
    if name.startswith("refuse"):
        Image.fromarray(IMG[0]).save(tmp_path / "photo.png")
        argv = (["edit", "pnp", "--target", "a dog"] if name == "refuse-pnp-image" else
                ["edit", "p2p", "--prompt", "a cat", "--target", "a dog"])
        capsys.readouterr()
        rc = main(argv + model + ["--image", str(tmp_path / "photo.png"), "--prompt-2", "x",
                                  "--out-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "--prompt-2:" in err, err
        return
    argv, compare = SDXL_CLI[name]
    assert main(argv + model + ["--prompt-2", "a yellow star", "--out-dir",
                                str(tmp_path / "a")]) == 0
    with_2 = np.asarray(Image.open(tmp_path / "a" / "000.png"))
    assert with_2.std() > 0
    if compare:
        assert main(argv + model + ["--out-dir", str(tmp_path / "b")]) == 0
        without = np.asarray(Image.open(tmp_path / "b" / "000.png"))
        assert np.abs(with_2.astype(int) - without.astype(int)).max() > 0, name
