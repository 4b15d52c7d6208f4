"""The UNet's feature seam: sites named as diffusers' modules, identity policies bit-identical
to none (same jaxpr), FreeU parity with diffusers' enable_freeu, shared GroupNorm leaving
the source member unchanged, new factors/tables never recompiling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jattn.models.unet import (UNet2DConditionModel, UNetConfig,  # noqa: E402
                               convert_unet_state_dict, init_params, list_feature_sites,
                               list_sites)
from jattn.policy.core import Layout, Select, compose, resolve  # noqa: E402
from jattn.policy.features import (FeatureInject, FeatureRecord, SharedGroupNorm,  # noqa: E402
                                   freeu_policy, recorded_features)
from jattn.policy.ops import MemberSource, member_table  # noqa: E402

CTX = 32
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=CTX, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
            attention_head_dim=2)
# SD2-style: 3 blocks, linear projections, non-square latents (FFT on 3x5 / 6x10 grids)
TINY2 = dict(TINY, block_out_channels=(32, 64, 64), attention_head_dim=[2, 4, 8],
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             use_linear_projection=True, sample_size=(6, 10))


def _inputs(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ss = cfg.sample_size
    h, w = (ss, ss) if isinstance(ss, int) else ss
    x = rng.standard_normal((batch, h, w, cfg.in_channels)).astype(np.float32)
    t = np.array([10.0, 731.0, 400.0, 77.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, 5, CTX)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)


@pytest.fixture(scope="module")
def tiny():
    """(cfg, sites, apply, run, plain): ``run(policy, x, t, c) -> (out, aux)`` is ``apply``
    jitted with the policy as an argument (``run.traces`` counts its traces); ``plain()``:
    the no-policy output for ``_inputs(cfg, 4)`` (compiled once)."""
    cfg = UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**TINY).config))
    params = init_params(cfg, jax.random.key(1))
    model = UNet2DConditionModel(cfg)
    sites = list_sites(cfg) + list_feature_sites(cfg)
    traces = []

    def apply(policy, x, t, c):
        traces.append(1)
        return model.apply({"params": params}, x, t, c, policy=policy, step=jnp.int32(0))

    run = jax.jit(apply)
    run.traces = traces
    cache = {}

    def plain():
        if "plain" not in cache:
            out, aux = jax.jit(lambda *a: apply(None, *a))(*_inputs(cfg, 4))
            assert aux == {}
            cache["plain"] = np.asarray(out)
        return cache["plain"]
    return cfg, sites, apply, run, plain


def test_identity_policies_bit_identical(tiny):
    """A rule-less policy traces to the same jaxpr as no policy; an attention-only policy
    (identity member tables) composed with a record-only feature policy (every feature site,
    GroupNorms included) gives a bit-identical output, with the recorded features as aux."""
    cfg, sites, apply, run, plain = tiny
    x, t, c = _inputs(cfg, 4)
    layout = Layout(groups=2, members=2, cfg=False)
    empty = resolve([], sites, layout=layout)
    jp = lambda pol: str(jax.make_jaxpr(lambda *a: apply(pol, *a))(x, t, c))  # noqa: E731
    assert jp(None) == jp(empty)
    ident = jnp.asarray(member_table(1, 2, {}))
    att = resolve([(Select(kind="self"), MemberSource(q_from=ident, k_from=ident))], sites,
                  layout=layout)
    both = compose(att, resolve([("", FeatureRecord())], sites, layout=layout))
    out, aux = run(both, x, t, c)
    np.testing.assert_array_equal(np.asarray(out), plain())
    assert set(aux) == {s.path for s in sites if hasattr(s, "channels")}
    acc = both.aux_update(both.aux_init(), aux, jnp.int32(0))
    got = recorded_features(acc[1])["up_blocks.1.resnets.1"]
    assert got.shape == (4, 8, 8, 32) and np.abs(np.asarray(got)).max() > 0


@pytest.mark.slow
def test_shared_group_norm_keeps_source_member(tiny):
    """SharedGroupNorm at every GroupNorm composed with FeatureInject of
    up_blocks.1.resnets.1 from member 0: the sources (member 0 of each group) bit-identical
    to the plain UNet, members 1 changed; new source tables / injection windows are values
    (one trace)."""
    cfg, sites, apply, run, plain = tiny
    x, t, c = _inputs(cfg, 4)
    layout = Layout(groups=2, members=2, cfg=False)

    def pol(sources, window):
        norm = resolve([(Select(kind="group_norm"),
                         SharedGroupNorm(jnp.asarray(member_table(3, 2, sources))))],
                       sites, layout=layout)
        inj = resolve([(Select(path=r"^up_blocks\.1\.resnets\.1$"),
                        FeatureInject(jnp.asarray(member_table(3, 2, {1: 0}, window=window))))],
                      sites, layout=layout)
        return compose(norm, inj)

    # The sources' statistics and normalised values are their own bit for bit (see
    # tests/policy/test_features.py); the UNet output can still move by ~1 ulp of its
    # O(1) values, as XLA fuses the downstream ops of the (different) graph differently
    # at the tests' -O0 (at the default level it is bit-identical).
    ulp = dict(rtol=0, atol=4e-6)
    plain = plain()
    n = len(run.traces)
    out = np.asarray(run(pol({1: 0}, (0, 3)), x, t, c)[0])
    np.testing.assert_allclose(out[[0, 2]], plain[[0, 2]], **ulp)
    assert np.abs(out[[1, 3]] - plain[[1, 3]]).max() > 1e-3
    out = np.asarray(run(pol({}, (1, 3)), x, t, c)[0])       # step 0: outside both windows
    np.testing.assert_allclose(out, plain, **ulp)
    assert len(run.traces) == n + 1


@pytest.mark.parametrize("config", [
    TINY, pytest.param(TINY2, marks=pytest.mark.slow)], ids=["sd1", "sd2_nonsquare"])
def test_freeu_parity_with_diffusers(config, randomize_torch_module, torch_to_numpy_state_dict):
    """freeu_policy (b1 1.2, b2 1.4, s1 0.9, s2 0.2; then other factors) equals diffusers'
    unet.enable_freeu on the same random weights to float32 rounding, far below FreeU's own
    effect; new factors are values (one trace)."""
    torch.manual_seed(0)
    tm = randomize_torch_module(diffusers.UNet2DConditionModel(**config), seed=0)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = convert_unet_state_dict(torch_to_numpy_state_dict(tm), cfg)
    x, t, c = _inputs(cfg)
    targs = [torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy()),
             torch.from_numpy(np.array(t)), torch.from_numpy(np.array(c))]

    def torch_run():
        with torch.no_grad():
            return np.transpose(tm(*targs).sample.numpy(), (0, 2, 3, 1))

    plain = torch_run()
    tm.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    ref = torch_run()
    tm.enable_freeu(s1=0.8, s2=0.3, b1=1.1, b2=1.3)
    ref2 = torch_run()
    model = UNet2DConditionModel(cfg)
    traces = []

    def apply(p, pol):
        traces.append(1)
        return model.apply({"params": p}, x, t, c, policy=pol)[0]

    run = jax.jit(apply)
    sites = list_feature_sites(cfg)
    layout = Layout(groups=2, members=1, cfg=False)
    out = np.asarray(run(params, freeu_policy(sites, b1=1.2, b2=1.4, s1=0.9, s2=0.2,
                                              layout=layout)))
    out2 = np.asarray(run(params, freeu_policy(sites, b1=1.1, b2=1.3, s1=0.8, s2=0.3,
                                               layout=layout)))
    assert len(traces) == 1
    err = max(np.abs(out - ref).max(), np.abs(out2 - ref2).max())
    print(f"FreeU parity max |jattn - diffusers| = {err:.2e} (output max "
          f"{np.abs(ref).max():.2f}, FreeU effect {np.abs(plain - ref).max():.2e})")
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out2, ref2, atol=1e-4, rtol=1e-4)
    assert np.abs(plain - ref).max() > 100 * max(err, 1e-6)


def test_feature_sites_are_diffusers_modules():
    """Every resnet / GroupNorm site is a diffusers module of that type (all of the UNet's
    GroupNorms are sites, in call order); backbone/skip sit before every up-block resnet."""
    tm = diffusers.UNet2DConditionModel(**TINY2)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    sites = list_feature_sites(cfg)
    mods = dict(tm.named_modules())
    norms = [n for n, m in mods.items() if isinstance(m, torch.nn.GroupNorm)]
    assert sorted(s.path for s in sites if s.kind == "group_norm") == sorted(norms)
    for s in sites:
        if s.kind == "group_norm":
            assert mods[s.path].num_groups == s.groups and mods[s.path].num_channels == s.channels
            assert s.eps == pytest.approx(mods[s.path].eps)
        elif s.kind == "resnet":
            assert type(mods[s.path]).__name__ == "ResnetBlock2D"
            assert mods[s.path].out_channels == s.channels
        elif s.kind == "resnet_residual":
            assert isinstance(mods[s.path], torch.nn.Conv2d) and s.path.endswith(".conv2")
        else:
            resnet, _, tail = s.path.rpartition(".")
            assert tail == s.kind and resnet.startswith("up_blocks.") and resnet in mods
    up_resnets = [n for n in mods if n.startswith("up_blocks.") and n.count(".") == 3
                  and ".resnets." in n]
    assert sorted(s.path for s in sites if s.kind == "backbone") == \
        sorted(f"{n}.backbone" for n in up_resnets)
    assert {s.resolution for s in sites if s.path.startswith("up_blocks.1.")} == {(3, 5)}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    import jattn

    return jattn.load(tiny_sd_dir)


@pytest.mark.slow
def test_feature_values_never_recompile(tiny_pipe):
    """New FreeU factors, shared-norm source tables and injection windows are array values:
    the sampler compiles once; FreeU composed with an attention policy changes the image."""
    sites = tiny_pipe.sites(features=True)
    layout = Layout(groups=1, members=2, cfg=True)
    kw = dict(num_inference_steps=2, guidance_scale=7.5, seed=0)
    prompts = ["a red circle", "a blue square"]

    def run(b1, table, window):
        att = resolve([(Select(kind="self"), MemberSource())], sites, layout=layout)
        feat = resolve([(Select(kind="group_norm"), SharedGroupNorm(jnp.asarray(table))),
                        (Select(kind="resnet", path=r"up_blocks\.1\.resnets\.1$"),
                         FeatureInject(jnp.asarray(member_table(2, 2, {1: 0}, window=window))))],
                       sites, layout=layout)
        pol = compose(att, feat, freeu_policy(sites, "sd1-v1", b1=b1, layout=layout))
        return tiny_pipe.generate(prompts, policy=pol, **kw).latents

    a = run(1.2, member_table(2, 2, {1: 0}), (0, 1))
    n = tiny_pipe.trace_counts["sample"]
    b = run(1.5, member_table(2, 2, {}), (1, 2))
    assert tiny_pipe.trace_counts["sample"] == n
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
