"""SamplerHooks of the one sampler loop: default hooks change nothing (bit for bit), given
noise replaces the scheduler's draw at the right step, start_step runs timesteps[s:] with
absolute step indices, and bad hooks raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.sampling import schedulers as sch
from jattn.sampling.sampler import SamplerHooks, per_sample_keys, sample


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


def test_empty_hooks_are_bit_identical_to_none(pipe):
    """hooks=SamplerHooks() takes exactly the plain path (DDPM: the noise drawn from the
    per-sample keys), so adding the hooks argument changed no existing result."""
    kw = dict(num_inference_steps=4, guidance_scale=3.0, scheduler="ddpm", seed=[4, 9],
              decode=False)
    a = pipe.generate(["a photo", "a cat"], hooks=None, **kw)
    b = pipe.generate(["a photo", "a cat"], hooks=SamplerHooks(), **kw)
    assert np.array_equal(a.latents, b.latents)


def test_given_noise_replaces_the_draw_step_by_step(pipe):
    """Feeding the very noise the loop would draw (key of sample b, step i folded in)
    reproduces the seeded run (to float32 rounding: the two programs fuse differently);
    the same noise in another step order gives another image."""
    seeds = [4, 9]
    kw = dict(num_inference_steps=4, guidance_scale=3.0, scheduler="ddpm", seed=seeds,
              decode=False)
    ref = pipe.generate(["a photo", "a cat"], **kw)
    keys = per_sample_keys(np.asarray(seeds, np.uint32))
    shape = (8, 8, 4)
    noise = jnp.stack([jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                            shape))(keys) for i in range(4)])
    same = pipe.generate(["a photo", "a cat"], hooks=SamplerHooks(noise=noise), **kw)
    np.testing.assert_allclose(same.latents, ref.latents, rtol=1e-5, atol=1e-5)
    other = pipe.generate(["a photo", "a cat"], hooks=SamplerHooks(noise=noise[::-1]), **kw)
    assert np.abs(other.latents - ref.latents).max() > 1e-3


def _toy_unet(x, t, ctx, policy, step):
    """eps depending on the latents, the timestep and the step index (to catch a loop that
    passes relative step indices after start_step)."""
    return 0.3 * x + 1e-3 * t.astype(jnp.float32)[:, None, None, None] + 0.05 * step, {}


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)])
def test_start_step_runs_the_tail_of_the_schedule(kind, eta):
    """start_step=s from x_s equals steps s..n-1 taken one by one with absolute indices."""
    schedule = sch.make_schedule(sch.SchedulerConfig(kind=kind, eta=eta), 6)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    cond = jnp.zeros((2, 5, 7))
    noise = jax.random.normal(jax.random.key(2), (6, 2, 4, 4, 3)) if eta else None
    s = 2
    state = sch.init_state(schedule, x)
    for i in range(s, 6):
        eps, _ = _toy_unet(x, jnp.broadcast_to(schedule.timesteps[i], (2,)), cond, None, i)
        x_next, state, _ = sch.step(schedule, state, eps, i, x,
                                    noise=None if noise is None else noise[i])
        if i == s:
            x_start = x
        x = x_next
    got, _ = jax.jit(lambda x0: sample(_toy_unet, schedule, x0, cond, None, 1.0, keys,
                                       hooks=SamplerHooks(noise=noise, start_step=s)))(x_start)
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)


def test_bad_hooks_raise():
    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim", eta=1.0), 3)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jnp.zeros((2, 4, 4, 3))
    cond = jnp.zeros((2, 5, 7))
    run = lambda hooks, sched=schedule: sample(_toy_unet, sched, x, cond, None, 1.0, keys,  # noqa: E731
                                               hooks=hooks)
    with pytest.raises(ValueError, match=r"hooks.start_step=3: must be an int in \[0, 3\)"):
        run(SamplerHooks(start_step=3))
    with pytest.raises(ValueError, match=r"hooks.noise: shape \(2, 2, 4, 4, 3\)"):
        run(SamplerHooks(noise=jnp.zeros((2, 2, 4, 4, 3))))
    with pytest.raises(ValueError, match="adds no noise"):
        run(SamplerHooks(noise=jnp.zeros((3, 2, 4, 4, 3))),
            sch.make_schedule(sch.SchedulerConfig(kind="euler"), 3))


def test_ddim_eta_one_on_zero_terminal_snr_has_no_nan():
    """DDIM with eta = 1 on the bundled zero-terminal-SNR schedule: the first step's
    direction term is exactly 0 (rounding made it sqrt(-1e-8) = NaN at 10 and 25 steps)."""
    import jattn

    pipe = jattn.load(None)
    for n in (10, 25, 50):
        coef = pipe.schedule(n, "ddim", 1.0).coef
        assert all(np.isfinite(np.asarray(v)).all() for v in coef.values()), n


# ---------------------------------------------------------------- latent re-imposition


def _mixing_unet(x, t, ctx, policy, step):
    """eps of each row also reads row 0 (as shared attention does), so a wrong re-imposed
    row 0 would show in row 1."""
    return 0.3 * x + 0.2 * x[:1] + 1e-3 * t.astype(jnp.float32)[:, None, None, None], {}


@pytest.mark.parametrize("start", [0, 2])
def test_reimpose_replaces_rows_after_each_step(start):
    """Rows in reimpose_rows take reimpose[i] after step i (absolute index, also after
    start_step); the other rows see them in the next step: equal to a manual loop."""
    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim"), 5)
    keys = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    cond = jnp.zeros((3, 5, 7))
    traj = jax.random.normal(jax.random.key(2), (5, 3, 4, 4, 2))
    rows = jnp.asarray([True, False, False])
    x, state = x0, sch.init_state(schedule, x0)
    for i in range(start, 5):
        eps, _ = _mixing_unet(x, jnp.broadcast_to(schedule.timesteps[i], (3,)), cond, None, i)
        x, state, _ = sch.step(schedule, state, eps, i, x)
        x = jnp.where(rows[:, None, None, None], traj[i], x)
    hooks = SamplerHooks(reimpose=traj, reimpose_rows=rows, start_step=start)
    got, _ = jax.jit(lambda h: sample(_mixing_unet, schedule, x0, cond, None, 1.0, keys,
                                      hooks=h))(hooks)
    np.testing.assert_array_equal(got[0], traj[-1, 0])                # the trajectory itself
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)
    plain, _ = sample(_mixing_unet, schedule, x0, cond, None, 1.0, keys,
                      hooks=SamplerHooks(start_step=start))
    assert np.abs(np.asarray(plain[1]) - np.asarray(got[1])).max() > 1e-3


def test_reimposition_indexes_like_the_reference():
    """StyleAligned's make_inversion_callback(zts, offset): zts = the inversion flipped
    (zts[0] = z*_T); start from zts[offset]; after step i: zts[max(offset + 1, i + 1)]."""
    from jattn.sampling.sampler import reimposition

    n = 6
    lat = np.arange(n + 1, dtype=np.float32)[:, None, None, None, None] * np.ones((1, 2, 1, 1, 1))
    for offset in (0, 1, 5):
        x_t, traj = reimposition(lat, offset)
        zts = lat[::-1]
        np.testing.assert_array_equal(x_t, zts[offset])
        want = np.stack([zts[max(offset + 1, i + 1)] for i in range(n)])
        np.testing.assert_array_equal(traj, want)
    x_t, traj = reimposition(lat)
    np.testing.assert_array_equal(x_t, lat[-1])
    np.testing.assert_array_equal(traj[-1], lat[0])                   # ends at z*_0
    with pytest.raises(ValueError, match="offset"):
        reimposition(lat, n)


def test_bad_reimpose_raises():
    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim"), 3)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jnp.zeros((2, 4, 4, 3))
    run = lambda hooks: sample(_toy_unet, schedule, x, jnp.zeros((2, 5, 7)), None, 1.0, keys,  # noqa: E731
                               hooks=hooks)
    with pytest.raises(ValueError, match=r"hooks.reimpose: shape \(2, 2, 4, 4, 3\)"):
        run(SamplerHooks(reimpose=jnp.zeros((2, 2, 4, 4, 3)), reimpose_rows=jnp.ones(2, bool)))
    with pytest.raises(ValueError, match="reimpose_rows: shape None"):
        run(SamplerHooks(reimpose=jnp.zeros((3, 2, 4, 4, 3))))
    with pytest.raises(ValueError, match="without hooks.reimpose"):
        run(SamplerHooks(reimpose_rows=jnp.ones(2, bool)))


def test_reimpose_through_the_pipeline_never_recompiles(pipe):
    """pipe.generate with a re-imposed row 0: its final latents are the trajectory's last
    row, row 1 (no policy: rows independent) does not depend on it; a new trajectory
    compiles nothing."""
    kw = dict(num_inference_steps=3, guidance_scale=3.0, seed=[1, 2], decode=False)
    rng = np.random.default_rng(0)
    rows = np.asarray([True, False])
    traj = rng.standard_normal((3, 2, 8, 8, 4)).astype(np.float32)
    a = pipe.generate(["a photo", "a cat"], hooks=SamplerHooks(reimpose=jnp.asarray(traj),
                                                               reimpose_rows=rows), **kw)
    np.testing.assert_array_equal(a.latents[0], traj[-1, 0].transpose(2, 0, 1))
    n = pipe.trace_counts["sample"]
    b = pipe.generate(["a photo", "a cat"], hooks=SamplerHooks(reimpose=jnp.asarray(-traj),
                                                               reimpose_rows=rows), **kw)
    assert pipe.trace_counts["sample"] == n
    np.testing.assert_array_equal(b.latents[0], -traj[-1, 0].transpose(2, 0, 1))
    np.testing.assert_array_equal(a.latents[1], b.latents[1])
