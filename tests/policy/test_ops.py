"""Generic ops of jattn/policy/ops.py against NumPy restatements, and through the UNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.attention import AttentionSite
from jattn.policy.core import Layout, PolicyError, SiteContext, resolve, Select
from jattn.policy.ops import MemberSource, member_table

SITE = AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", (4, 4), 2,
                     3, "up")


def _np_take(x, layout, row, halves):
    """NumPy restatement: rows are (half, group, member) group-major."""
    h, g, m = layout.halves, layout.groups, layout.members
    parts = np.asarray(x).reshape((h, g, m) + x.shape[1:]).copy()
    src = parts[:, :, row]
    sel = range(h) if halves == "both" or not layout.cfg else [1 if halves == "cond" else 0]
    for i in sel:
        parts[i] = src[i]
    return parts.reshape(x.shape)


@pytest.mark.parametrize("halves", ["both", "cond", "uncond"])
@pytest.mark.parametrize("cfg", [True, False])
def test_member_source_matches_numpy(halves, cfg):
    layout = Layout(groups=2, members=3, cfg=cfg)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((layout.rows, 16 if i == 0 else 7, 2, 3)).astype(np.float32)
               for i in range(3))
    table = member_table(10, 3, {0: 0, 1: 2, 2: 1}, window=(2, 5))
    op = MemberSource(k_from=jnp.asarray(table), v_from=jnp.asarray([0, 0, 0], jnp.int32),
                      halves=halves)
    for step in (0, 2, 4, 5, 20):                      # 20: past the table, last row
        ctx = SiteContext(SITE, jnp.int32(step), layout)
        q2, k2, v2 = op.qkv(ctx, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        np.testing.assert_array_equal(q2, q)           # q_from None: own
        row = table[min(step, 9)]
        np.testing.assert_array_equal(k2, _np_take(k, layout, row, halves))
        np.testing.assert_array_equal(v2, _np_take(v, layout, np.zeros(3, int), halves))


def test_member_table():
    t = member_table(10, 3, {1: 0, 2: 0}, window=(0.2, 0.5))
    assert t.dtype == np.int32 and t.shape == (10, 3)
    np.testing.assert_array_equal(t[:2], [[0, 1, 2]] * 2)
    np.testing.assert_array_equal(t[2:5], [[0, 0, 0]] * 3)
    np.testing.assert_array_equal(t[5:], [[0, 1, 2]] * 5)
    every5 = np.arange(10) % 5 == 0
    t = member_table(10, 3, {0: 2}, window=(0, 8), steps=every5)
    assert [i for i in range(10) if t[i, 0] == 2] == [0, 5]
    for bad in (dict(sources={3: 0}), dict(sources={0: -1}), dict(window=(0.5, 0.2)),
                dict(window=(0, 11))):
        kw = dict(sources={1: 0}) | bad
        with pytest.raises(ValueError):
            member_table(10, 3, **kw)


def test_member_source_errors():
    with pytest.raises(PolicyError, match="halves"):
        MemberSource(halves="both_halves")
    op = MemberSource(k_from=jnp.zeros(4, jnp.int32))
    ctx = SiteContext(SITE, jnp.int32(0), Layout(1, 3, True))
    x = jnp.zeros((6, 16, 2, 3))
    with pytest.raises(PolicyError, match="3 members"):
        op.qkv(ctx, x, x, x)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    import jattn

    return jattn.load(tiny_sd_dir)


def test_member_source_through_the_unet(tiny_pipe):
    """Identity tables are bit-identical to no policy; taking member 0's K, V at every self
    site (MasaCtrl-style) leaves member 0 bit-identical and changes member 1; the values of
    the tables never recompile."""
    sites = tiny_pipe.sites()
    layout = Layout(groups=1, members=2, cfg=True)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, seed=0)
    prompts = ["a red circle", "a blue square"]
    plain = tiny_pipe.generate(prompts, **kw)

    def run(table):
        op = MemberSource(k_from=jnp.asarray(table), v_from=jnp.asarray(table))
        pol = resolve([(Select(kind="self"), op)], sites, layout=layout)
        return tiny_pipe.generate(prompts, policy=pol, **kw)

    ident = run(member_table(3, 2, {}))
    np.testing.assert_array_equal(ident.latents, plain.latents)
    n = tiny_pipe.trace_counts["sample"]
    shared = run(member_table(3, 2, {1: 0}))
    assert tiny_pipe.trace_counts["sample"] == n                 # values only: no recompile
    np.testing.assert_array_equal(shared.latents[0], plain.latents[0])
    assert np.abs(shared.latents[1] - plain.latents[1]).max() > 1e-3
