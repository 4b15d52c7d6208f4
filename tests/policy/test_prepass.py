"""The sampler's pre-pass hook (SamplerHooks.pre_policy / pre_window) with RecordQKV and
PrePassBlend (jattn.policy.prepass): outside its window the loop is bit-identical to no
hook, a pre-pass that nothing reads changes nothing, inside the window its queries reach
the main pass (they undo a query edit of the main pass), a new window never recompiles, and
bad hooks raise."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.policy.core import Layout, PolicyError, Select, resolve
from jattn.policy.ops import MemberSource
from jattn.policy.prepass import PrePassBlend, RecordQKV
from jattn.sampling.sampler import SamplerHooks

P = ["a red heart", "a blue star"]
N = 4
KW = dict(num_inference_steps=N, guidance_scale=3.0, scheduler="ddim", seed=[4, 9],
          decode=False)
UP_SELF = Select(kind="self", blocks=("up",))


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


def _pre(pipe):
    return resolve([(UP_SELF, RecordQKV())], pipe.sites(),
                   layout=Layout(groups=1, members=2, cfg=True))


def _main(pipe, weight):
    """Member 1 takes member 0's queries, then the queries are blended toward the
    pre-pass's (weight 1: replaced)."""
    ops = (MemberSource(q_from=jnp.asarray([0, 0], jnp.int32)),
           PrePassBlend(weight=jnp.full((N,), weight, jnp.float32)))
    return resolve([(UP_SELF, ops)], pipe.sites(), layout=Layout(groups=1, members=2, cfg=True))


def _hooks(pipe, window):
    return SamplerHooks(pre_policy=_pre(pipe), pre_window=jnp.asarray(window, jnp.int32))


def test_pre_pass_that_nothing_reads_is_bit_identical(pipe):
    """No main op reads the pre-pass: with an empty window and with a window over every
    step the latents are those of the run without hooks, bit for bit (its eps is
    discarded, its records go nowhere)."""
    plain = pipe.generate(P, **KW)
    for window in ([0, 0], [0, N]):
        got = pipe.generate(P, hooks=_hooks(pipe, window), **KW)
        assert np.array_equal(got.latents, plain.latents), window


@pytest.mark.slow
def test_pre_pass_queries_reach_the_main_pass(pipe):
    """Outside the window the blend is off (bit-identical to the main policy without it);
    inside, weight 1 gives the main pass the pre-pass's plain queries, undoing the query
    edit: the run is plain generation (to rounding)."""
    plain = pipe.generate(P, **KW)
    edited = pipe.generate(P, policy=resolve(
        [(UP_SELF, MemberSource(q_from=jnp.asarray([0, 0], jnp.int32)))], pipe.sites(),
        layout=Layout(groups=1, members=2, cfg=True)), **KW)
    assert np.abs(edited.latents - plain.latents).max() > 1e-3
    off = pipe.generate(P, policy=_main(pipe, 1.0), hooks=_hooks(pipe, [0, 0]), **KW)
    assert np.array_equal(off.latents, edited.latents)
    on = pipe.generate(P, policy=_main(pipe, 1.0), hooks=_hooks(pipe, [0, N]), **KW)
    np.testing.assert_allclose(on.latents, plain.latents, atol=1e-5, rtol=1e-5)
    half = pipe.generate(P, policy=_main(pipe, 0.5), hooks=_hooks(pipe, [0, N]), **KW)
    assert np.abs(half.latents - plain.latents).max() > 1e-4
    assert np.abs(half.latents - edited.latents).max() > 1e-4


def test_new_window_and_weights_never_recompile(pipe):
    pipe.generate(P, policy=_main(pipe, 1.0), hooks=_hooks(pipe, [1, 3]), **KW)
    before = dict(pipe.trace_counts)
    pipe.generate(P, policy=_main(pipe, 0.3), hooks=_hooks(pipe, [0, 2]), **KW)
    assert pipe.trace_counts == before


def test_unbound_blend_and_bad_hooks_raise(pipe):
    with pytest.raises(PolicyError, match="not bound"):
        pipe.generate(P, policy=_main(pipe, 1.0), **KW)
    with pytest.raises(ValueError, match="pre_policy and hooks.pre_window"):
        pipe.generate(P, hooks=SamplerHooks(pre_policy=_pre(pipe)), **KW)
    with pytest.raises(ValueError, match="pre_window: shape"):
        pipe.generate(P, hooks=SamplerHooks(pre_policy=_pre(pipe),
                                            pre_window=jnp.zeros((3,), jnp.int32)), **KW)
