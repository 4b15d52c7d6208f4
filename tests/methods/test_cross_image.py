"""Cross-Image Attention (jattn.methods.cross_image) on the tiny random pipeline: the step
tables against the reference's rules, the second UNet pass of the sampler, the label rule
against a NumPy restatement of ``Segmentor.cluster2noun``, composition with P2P, no
recompilation for new inputs, the CLI's files and its errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jattn
from jattn.methods import cross_image as ci
from jattn.policy.ops import Contrast, MemberSource
from jattn.sampling import schedulers as sch
from jattn.sampling.sampler import SamplerHooks, sample


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


def _img(seed, size=32):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------- the second pass
def _lin_unet(x, t, ctx, policy, step):
    """eps = c·x with c the 'policy' (a float array): the combination is checkable."""
    return policy * x, {}


def test_second_pass_combines_and_ones_are_bit_identical():
    """eps = eps_2 + s (eps - eps_2); s == 1 everywhere (or no second_scale) leaves the loop
    exactly as it was (the second pass is skipped). Breaks if the swap guidance mixes the
    passes the wrong way round or changes runs that do not use it."""
    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim", eta=0.0), 5)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    keys = jax.random.split(jax.random.key(1), 2)
    ctx = jnp.zeros((2, 3, 8))
    run = lambda pol, hooks=None: sample(_lin_unet, schedule, x, ctx, None, 1.0, keys,  # noqa
                                         policy=jnp.float32(pol), hooks=hooks)[0]
    plain = run(0.2)
    ones = run(0.2, SamplerHooks(second_scale=jnp.ones(5), second_policy=jnp.float32(0.7)))
    assert np.array_equal(plain, ones)
    s = 2.5
    two = run(0.2, SamplerHooks(second_scale=jnp.full(5, s), second_policy=jnp.float32(0.7)))
    np.testing.assert_allclose(two, run(0.7 + s * (0.2 - 0.7)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="second_scale"):
        run(0.2, SamplerHooks(second_scale=jnp.ones(4)))


# ------------------------------------------------------------------- step tables
def _reference_tables(n=100, skip=32, quirk=False):
    """The reference's decisions per run step: (uses APP, uses STRUCT) per resolution,
    from ``should_mix_keys_and_values`` and the ``step % 5 == 0 and step < 40`` rule,
    with model.step = the previous step's index when quirk."""
    out = {}
    for name, (a, b) in (("high", (10, 90)), ("low", (10, 70))):
        rows = []
        for i in range(n - skip):
            step = max(i - 1, 0) if quirk else i
            mix = a <= step < b
            rows.append((mix and not (step % 5 == 0 and step < 40),
                         mix and step % 5 == 0 and step < 40))
        out[name] = np.array(rows)
    return out


@pytest.mark.parametrize("quirk", [False, True])
def test_step_tables_match_the_reference_at_100_steps(pipe, quirk):
    """At 100 steps the member tables give OUT exactly the reference's APP/STRUCT steps at
    the highest and second-highest decoder self-attention resolutions, and Contrast is on
    exactly where OUT is swapped."""
    pol = ci.cross_image_policy(pipe, num_inference_steps=100, reference_quirks=quirk,
                                adain=False)
    high, low = ci.swap_sites(pipe.sites())
    ref = _reference_tables(quirk=quirk)
    found = set()
    for path, idx in pol.table:
        site = next(s for s in pol.sites if s.path == path)
        name = "high" if site.resolution == high else "low"
        ops = [pol.ops[i] for i in idx]
        src = next(o for o in ops if isinstance(o, MemberSource))
        con = next(o for o in ops if isinstance(o, Contrast))
        kv = np.asarray(src.k_from)[32:, ci.OUT]
        np.testing.assert_array_equal(kv == ci.APP, ref[name][:, 0])
        np.testing.assert_array_equal(kv == ci.STRUCT, ref[name][:, 1])
        np.testing.assert_array_equal(np.asarray(src.v_from), np.asarray(src.k_from))
        np.testing.assert_array_equal(np.asarray(con.members)[32:, ci.OUT],
                                      ref[name].any(axis=1))
        assert not np.asarray(con.members)[:, 1:].any()
        assert site.kind == "self" and site.block == "up"
        found.add(name)
    assert found == {"high"} | ({"low"} if low is not None else set())


def test_swap_guidance_scales_match_the_reference():
    """linspace(3.5, 1.75, 68)[r] for r in [10, 90] (quirk: inclusive), 1 elsewhere."""
    s = ci.swap_guidance_scales(100, 32, 3.5, (10, 90), reference_quirks=True)
    ramp = np.linspace(3.5, 1.75, 68)
    np.testing.assert_allclose(s[32 + 10:], ramp[10:], rtol=1e-6)
    assert (s[:42] == 1).all()
    assert (ci.swap_guidance_scales(100, 32, 1.0) == 1).all()


# ------------------------------------------------------------------- labels
def _np_cluster2noun(clusters, noun_maps, object_nouns, k):
    """Restatement of ``Segmentor.cluster2noun`` + ``create_mask``'s object test."""
    maps = noun_maps.copy()
    for i in range(maps.shape[-1]):
        m = maps[:, i]
        maps[:, i] = (m - np.abs(m.min())) / m.max()
    all_scores, per = [], []
    for c in range(k):
        cm = (clusters == c).astype(np.float32)
        scores = [(cm * maps[:, i]).sum() / cm.sum() for i in range(maps.shape[-1])]
        per.append(scores)
        all_scores.append(max(scores))
    top = max(all_scores)
    all_scores.remove(top)
    mean = sum(all_scores) / len(all_scores)
    return np.array([max(sc) > 1.4 * mean and object_nouns[int(np.argmax(sc))] for sc in per])


@pytest.mark.parametrize("seed", range(4))
def test_cluster_labels_match_reference(seed):
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, 5, 64)
    clusters[:5] = np.arange(5)
    maps = rng.random((64, 2)).astype(np.float32) ** 3
    maps[clusters == 2, 0] += 2.0          # one cluster clearly the object
    obj = np.array([True, False])
    got = ci.cluster_labels(jnp.asarray(clusters), jnp.asarray(maps), jnp.asarray(obj), 5)
    np.testing.assert_array_equal(np.asarray(got), _np_cluster2noun(clusters, maps, obj, 5))


# ------------------------------------------------------------------- the method
@pytest.mark.slow  # ~45-80 s; the default suite keeps to 15 min
def test_runs_composes_with_p2p_and_never_recompiles(pipe):
    """Two image pairs in a row compile nothing new; the output differs from plain
    regeneration; the policy composes with a P2P policy (same layout with CFG)."""
    kw = dict(prompt="a red circle", num_inference_steps=6, decode=False)
    first = ci.cross_image(pipe, _img(0), _img(1), **kw)
    before = dict(pipe.trace_counts)
    second = ci.cross_image(pipe, _img(2), _img(3), **kw)
    assert pipe.trace_counts == before
    assert np.isfinite(second.latents).all() and first.latents.shape[0] == 3
    base = ci.cross_image(pipe, _img(2), _img(3), swap=False, **kw)
    assert np.abs(base.latents[0] - second.latents[0]).max() > 1e-4
    np.testing.assert_allclose(base.latents[0], base.latents[2], atol=1e-5)  # OUT = STRUCT

    from jattn.methods.p2p import p2p_policy
    from jattn.policy.core import compose

    both = compose(ci.cross_image_policy(pipe, num_inference_steps=4, cfg=True,
                                         prompt="a red circle", object_word="circle"),
                   p2p_policy(pipe, "a red circle", ["a blue circle", "a green circle"],
                              num_steps=4))
    out = pipe.generate(["a red circle", "a blue circle", "a green circle"],
                        num_inference_steps=4, guidance_scale=5.0, scheduler="ddim",
                        policy=both, decode=False)
    p2p_only = pipe.generate(["a red circle", "a blue circle", "a green circle"],
                             num_inference_steps=4, guidance_scale=5.0, scheduler="ddim",
                             policy=p2p_policy(pipe, "a red circle",
                                               ["a blue circle", "a green circle"],
                                               num_steps=4), decode=False)
    assert np.isfinite(out.latents).all()
    assert np.abs(out.latents - p2p_only.latents).max() > 0


def test_api_errors(pipe):
    with pytest.raises(ValueError, match="appearance"):
        ci.cross_image(pipe, _img(0, 32), _img(1, 64), num_inference_steps=4)
    with pytest.raises(ValueError, match="structure"):
        ci.cross_image(pipe, "", _img(1), num_inference_steps=4)
    with pytest.raises(ValueError, match="object_word"):
        ci.cross_image(pipe, _img(0), _img(1), prompt="a red circle", object_word="dog",
                       num_inference_steps=4)


# ------------------------------------------------------------------- the CLI
@pytest.mark.slow  # ~30 s; the default suite keeps to 15 min
def test_cli_writes_the_files(tmp_path, tiny_sd_dir):
    from jattn.cli import main

    Image.fromarray(_img(0)).save(tmp_path / "s.png")
    Image.fromarray(_img(1, 48)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    rc = main(["cross-image", "--model", str(tiny_sd_dir), "--structure", str(tmp_path / "s.png"),
               "--appearance", str(tmp_path / "a.png"), "--prompt", "a red circle",
               "--steps", "4", "--out-dir", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"000.png", "001.png", "002.png", "grid.png", "masks.png", "result.json"} <= names
    res = json.loads((out / "result.json").read_text())
    assert res["command"] == "cross-image" and res["settings"]["object_word"] == "circle"
