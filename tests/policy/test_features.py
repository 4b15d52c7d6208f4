"""Feature-seam ops (jattn.policy.features) against NumPy restatements of the references:
StyleAligned's shared GroupNorm, feature injection / recording, FreeU's Fourier filter and
backbone scaling; resolve over both seams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.attention import AttentionSite
from jattn.models.features import FeatureSite, group_norm_stats, group_normalize
from jattn.policy.core import Layout, Op, PolicyError, Select, compose, resolve
from jattn.policy.features import (FREEU_FACTORS, FeatureInject, FeatureRecord, FreeU,
                                   SharedGroupNorm, fourier_filter, freeu_backbone,
                                   freeu_factors, freeu_policy, recorded_features)
from jattn.policy.ops import MemberSource, member_table

GN = FeatureSite("up_blocks.1.resnets.1.norm1", "group_norm", (4, 6), 8, "up", 2, 1e-5)
RES = FeatureSite("up_blocks.1.resnets.1", "resnet", (4, 6), 8, "up")
BACK = FeatureSite("up_blocks.0.resnets.0.backbone", "backbone", (4, 6), 8, "up")
SKIP = FeatureSite("up_blocks.0.resnets.0.skip", "skip", (4, 6), 8, "up")
BACK1 = FeatureSite("up_blocks.1.resnets.0.backbone", "backbone", (8, 8), 6, "up")
ATT = AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", (4, 6), 2, 4,
                    "up")
FEATS = [GN, RES, BACK, SKIP, BACK1]


def _x(rows, site=GN, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    h, w = site.resolution
    x = rng.standard_normal((rows, h, w, site.channels)).astype(np.float32) * scale
    return x + rng.standard_normal((rows, 1, 1, site.channels)).astype(np.float32)


# ----------------------------------------------------------------------- shared GroupNorm


def _np_group_norm_nchw(x, groups, eps):
    """torch.nn.GroupNorm without affine, NCHW."""
    b, c = x.shape[:2]
    xg = x.astype(np.float64).reshape(b, groups, -1)
    mean = xg.mean(-1, keepdims=True)
    var = xg.var(-1, keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)


def _np_shared_norm_reference(x_nhwc, groups, eps):
    """sa_handler.register_shared_norm on a batch [uncond members; cond members] of ONE
    group: concat_first along H (dim -2 of NCHW) with member 0 of each half, GroupNorm,
    keep the first H rows."""
    x = np.transpose(x_nhwc, (0, 3, 1, 2))
    b = x.shape[0]
    style = np.stack([x[0], x[b // 2]])[:, None]                         # expand_first
    style = np.broadcast_to(style, (2, b // 2) + x.shape[1:]).reshape(x.shape)
    cat = np.concatenate([x, style], axis=-2)
    out = _np_group_norm_nchw(cat, groups, eps)[..., :x.shape[2], :]
    return np.transpose(out, (0, 2, 3, 1))


def test_shared_group_norm_matches_reference():
    """One group of 3 members with CFG: statistics over own + member 0's tokens of the same
    half equal the reference's concat-along-H GroupNorm; member 0 itself is bit-identical to
    the plain GroupNorm (its own statistics)."""
    layout = Layout(groups=1, members=3, cfg=True)
    pol = resolve([(Select(kind="group_norm"), SharedGroupNorm())], FEATS, layout=layout)
    x = _x(6)
    out, aux = pol.feature(GN, jnp.asarray(x), jnp.int32(0))
    assert aux == {}
    ref = _np_shared_norm_reference(x, GN.groups, GN.eps)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
    mean, var = group_norm_stats(jnp.asarray(x), GN.groups)
    plain = np.asarray(group_normalize(jnp.asarray(x), mean, var, GN.groups, GN.eps))
    np.testing.assert_array_equal(np.asarray(out)[[0, 3]], plain[[0, 3]])
    assert np.abs(np.asarray(out)[1] - plain[1]).max() > 1e-2
    # other sites untouched
    assert pol.feature(RES, jnp.asarray(_x(6, RES)), jnp.int32(0)) is None


def test_shared_group_norm_groups_and_step_table():
    """Two groups: each member shares with member 0 of ITS group; a per-step table turns the
    sharing off outside its window (own statistics exactly)."""
    layout = Layout(groups=2, members=2, cfg=False)
    table = jnp.asarray(member_table(4, 2, {1: 0}, window=(1, 3)))
    pol = resolve([("norm1$", SharedGroupNorm(source=table))], FEATS, layout=layout)
    x = _x(4)
    mean, var = group_norm_stats(jnp.asarray(x), GN.groups)
    plain = np.asarray(group_normalize(jnp.asarray(x), mean, var, GN.groups, GN.eps))
    off, _ = pol.feature(GN, jnp.asarray(x), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(off), plain)
    on, _ = pol.feature(GN, jnp.asarray(x), jnp.int32(2))
    for g in range(2):
        pair = np.concatenate([x[2 * g + 1], x[2 * g]], axis=0)[None]    # own rows, member 0's
        ref = _np_group_norm_nchw(np.transpose(pair, (0, 3, 1, 2)), GN.groups, GN.eps)
        ref = np.transpose(ref, (0, 2, 3, 1))[0, :GN.resolution[0]]
        np.testing.assert_allclose(np.asarray(on)[2 * g + 1], ref, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(on)[2 * g], plain[2 * g])


def test_shared_group_norm_errors():
    layout = Layout(groups=1, members=2, cfg=False)
    pol = resolve([(Select(kind="resnet"), SharedGroupNorm())], FEATS, layout=layout)
    with pytest.raises(PolicyError, match="kind='group_norm'"):
        pol.feature(RES, jnp.asarray(_x(2, RES)), jnp.int32(0))
    pol = resolve([(Select(kind="group_norm"), SharedGroupNorm(jnp.zeros(3, jnp.int32)))],
                  FEATS, layout=layout)
    with pytest.raises(PolicyError, match="2 members"):
        pol.feature(GN, jnp.asarray(_x(2)), jnp.int32(0))


# ----------------------------------------------------------------- injection and recording


def test_feature_inject_per_step_and_halves():
    """member m takes member table[step, m]'s rows of the same group and half; 'cond' edits
    only the conditional half; source_half='cond' copies the source's conditional row into
    both halves (pnp-diffusers)."""
    layout = Layout(groups=2, members=3, cfg=True)
    table = member_table(3, 3, {1: 0, 2: 1}, window=(0, 2))
    x = _x(12, RES)
    xs = x.reshape(2, 2, 3, *x.shape[1:])

    def run(step, **kw):
        pol = resolve([(Select(kind="resnet"), FeatureInject(jnp.asarray(table), **kw))], FEATS,
                      layout=layout)
        out, _ = pol.feature(RES, jnp.asarray(x), jnp.int32(step))
        return np.asarray(out).reshape(xs.shape)

    np.testing.assert_array_equal(run(0), xs[:, :, table[0]])
    np.testing.assert_array_equal(run(2), xs)                          # outside the window
    cond = run(1, halves="cond")
    np.testing.assert_array_equal(cond[0], xs[0])
    np.testing.assert_array_equal(cond[1], xs[1][:, table[1]])
    src = run(0, source_half="cond")
    for h in range(2):
        np.testing.assert_array_equal(src[h, :, 0], xs[h, :, 0])       # member 0 keeps its own
        np.testing.assert_array_equal(src[h, :, 1], xs[1, :, 0])       # the source's cond row
        np.testing.assert_array_equal(src[h, :, 2], xs[1, :, 1])
    with pytest.raises(PolicyError, match="source_half"):
        FeatureInject(jnp.asarray(table), source_half="first")


def test_feature_record_window_mean():
    """FeatureRecord sums the conditional rows over its step window; recorded_features gives
    the mean; aux flows through Policy.aux_update."""
    layout = Layout(groups=1, members=2, cfg=True)
    pol = resolve([(Select(kind="resnet"), FeatureRecord(window=jnp.asarray([1, 3], jnp.int32)))],
                  FEATS, layout=layout)
    acc = pol.aux_init()
    assert acc[0][RES.path]["sum"].shape == (2, 4, 6, 8)
    xs = [_x(4, RES, seed=s) for s in range(4)]
    for step, x in enumerate(xs):
        out, aux = pol.feature(RES, jnp.asarray(x), jnp.int32(step))
        np.testing.assert_array_equal(np.asarray(out), x)              # recording edits nothing
        acc = pol.aux_update(acc, {RES.path: aux}, jnp.int32(step))
    mean = recorded_features(acc[0])[RES.path]
    np.testing.assert_allclose(np.asarray(mean), (xs[1][2:] + xs[2][2:]) / 2, atol=1e-6)


# ------------------------------------------------------------------------------- FreeU


def _np_fourier_filter_nchw(x, threshold, scale):
    """ChenyangSi/FreeU Fourier_filter (= diffusers fourier_filter), NumPy."""
    f = np.fft.fftshift(np.fft.fftn(x, axes=(-2, -1)), axes=(-2, -1))
    mask = np.ones(x.shape)
    h, w = x.shape[-2:]
    crow, ccol = h // 2, w // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    return np.fft.ifftn(np.fft.ifftshift(f * mask, axes=(-2, -1)), axes=(-2, -1)).real


def test_fourier_filter_matches_reference():
    """Even/odd/tiny grids (the reference's slice semantics at h = 1) and thresholds 1, 2;
    scale 1 returns the input."""
    for hw, threshold in [((4, 6), 1), ((8, 8), 2), ((5, 3), 1), ((1, 2), 1)]:
        site = FeatureSite("s", "skip", hw, 4, "up")
        x = _x(2, site)
        ref = _np_fourier_filter_nchw(np.transpose(x, (0, 3, 1, 2)).astype(np.float64),
                                      threshold, 0.2)
        fn = jax.jit(fourier_filter, static_argnums=1)
        out = fn(jnp.asarray(x), threshold, jnp.float32(0.2))
        np.testing.assert_allclose(np.asarray(out), np.transpose(ref, (0, 2, 3, 1)), atol=2e-5)
        same = fn(jnp.asarray(x), threshold, jnp.float32(1.0))
        np.testing.assert_allclose(np.asarray(same), x, atol=2e-5)


def test_freeu_backbone_plain_and_mean_scaling():
    """Plain: the first C/2 channels ×b (diffusers' apply_freeu). Mean scaling: the README's
    ((b − 1)·minmax(mean over channels) + 1) factor."""
    x = _x(2, BACK)
    out = np.asarray(freeu_backbone(jnp.asarray(x), jnp.float32(1.2)))
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    np.testing.assert_allclose(out[..., :4], x[..., :4] * np.float32(1.2), rtol=1e-6)
    xc = np.transpose(x, (0, 3, 1, 2))
    hm = xc.mean(1, keepdims=True)
    lo = hm.reshape(2, -1).min(-1)[:, None, None, None]
    hi = hm.reshape(2, -1).max(-1)[:, None, None, None]
    ref = xc.copy()
    ref[:, :4] = ref[:, :4] * ((1.4 - 1) * (hm - lo) / (hi - lo) + 1)
    out = np.asarray(freeu_backbone(jnp.asarray(x), 1.4, mean_scaling=True))
    np.testing.assert_allclose(out, np.transpose(ref, (0, 2, 3, 1)), rtol=1e-5, atol=1e-6)


def test_freeu_rules_sites_and_factors():
    """freeu_rules: stage 1 at up_blocks.0's backbone/skip inputs (b1, s1), stage 2 at
    up_blocks.1's (b2, s2); nothing else; presets as published; bad input is named."""
    pol = freeu_policy(FEATS + [ATT], "sd1-v1")
    touched = dict(pol.table)
    assert set(touched) == {BACK.path, SKIP.path, BACK1.path}
    assert pol.sites == (ATT,) and len(pol.feature_sites) == len(FEATS)
    op0, op1 = pol.ops
    assert float(op0.b) == pytest.approx(1.2) and float(op0.s) == pytest.approx(0.9)
    assert float(op1.b) == pytest.approx(1.4) and float(op1.s) == pytest.approx(0.2)
    x = _x(2, BACK)
    out, _ = pol.feature(BACK, jnp.asarray(x), jnp.int32(0))
    np.testing.assert_allclose(np.asarray(out)[..., :4], x[..., :4] * np.float32(1.2), rtol=1e-6)
    assert pol.feature(GN, jnp.asarray(_x(2)), jnp.int32(0)) is None
    assert FREEU_FACTORS["sdxl"] == (1.3, 1.4, 0.9, 0.2)
    assert freeu_factors("sd1.5", b1=1.1) == (1.1, 1.6, 0.9, 0.2)
    with pytest.raises(ValueError, match="preset='sd3'"):
        freeu_factors("sd3")
    with pytest.raises(ValueError, match="s2 missing"):
        freeu_factors(b1=1.0, b2=1.0, s1=1.0)
    with pytest.raises(PolicyError, match="no feature sites were given"):
        freeu_policy([ATT], "sd1.4")
    bad = resolve([(Select(kind="resnet"), FreeU())], FEATS)
    with pytest.raises(PolicyError, match="backbone"):
        bad.feature(RES, jnp.asarray(_x(1, RES)), None)


# ------------------------------------------------------------------------ resolve / compose


class _AttNoop(Op):
    pass


def test_resolve_and_compose_over_both_seams():
    """A catch-all attention rule never touches feature sites (and vice versa); compose keeps
    the feature sites of every policy; Select validates feature kinds."""
    pol = resolve([("", _AttNoop())], [ATT] + FEATS)
    assert dict(pol.table) == {ATT.path: (0,)}
    assert pol.feature(GN, jnp.asarray(_x(1)), None) is None
    att_only = resolve([("", MemberSource())], [ATT])
    both = compose(att_only, freeu_policy(FEATS, "sd1.4"))
    assert dict(both.table)[BACK.path] == (1,) and dict(both.table)[ATT.path] == (0,)
    assert both.feature_sites == tuple(FEATS)
    assert both.sites_of(1) == (BACK, SKIP)
    with pytest.raises(PolicyError, match="Select.kind"):
        Select(kind="norm")
    assert Select(kind=["backbone", "skip"]).kind == ("backbone", "skip")
    with pytest.raises(PolicyError, match="matches no feature site"):
        resolve([(Select(kind="skip", blocks=("down",)), FreeU())], FEATS)
