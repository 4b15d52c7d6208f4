"""Parity of jattn.sampling.schedulers with diffusers' torch schedulers.

Tolerance. Both sides run in float32. jattn builds the per-step constants with torch's
float32 operation order (torch's float32 ``linspace`` and double-accumulated ``cumprod``
are emulated bit for bit, so timesteps and ``alphas_cumprod`` are *equal*), but torch's
CPU ``sqrt``/``log``/``exp`` go through MKL/Sleef (up to ~0.75 ulp, not correctly
rounded) and XLA fuses multiply-adds and turns division by a scalar into multiplication
by its reciprocal. The two therefore differ by a few float32 ulps of the step's operands.
With random model outputs the x0 prediction reaches |x0| ~ 100 at high noise, where one
ulp is 7.6e-6, so a flat 1e-6 is below float32 resolution; the criterion is
``max|jattn - diffusers| <= 1e-6 * max(1, max|diffusers|, max|sample in|)`` on every
step (absolute 1e-6 for O(1) values, relative 1e-6 of the largest operand beyond; with
clipping, the unclipped x0 counts as an operand). Computing the constants in float64
instead was measured to be 2-5x *further* from diffusers, so jattn keeps the float32
emulation.

Step parity feeds both implementations the same sample at every step (diffusers' output
is fed back into jattn), so each step is checked on its own; the ``lax.scan`` test runs
the whole loop without resynchronising.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jattn.sampling import schedulers as S  # noqa: E402

# diffusers' Euler/DPM-Solver call np.array(torch_tensor), which numpy 2 flags; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SD = S.SchedulerConfig()  # SD 1.x betas: scaled_linear 0.00085-0.012, 1000 train steps
SHAPE = (2, 4, 8, 8)
TOL = 1e-6

# SD 1.x's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5).
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _torch_scheduler(cfg: S.SchedulerConfig, n: int):
    d = cfg.to_diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, d["_class_name"]).from_config(d)
    sched.set_timesteps(n)
    return sched


def _assert_close(ref, got, what: str, scale: float = 1.0) -> float:
    """max|ref - got| <= TOL * max(1, max|ref|, scale); returns the relative error."""
    ref = np.asarray(ref, np.float32)
    got = np.asarray(got, np.float32)
    assert ref.shape == got.shape, (what, ref.shape, got.shape)
    err = float(np.abs(ref - got).max())
    scale = max(1.0, float(np.abs(ref).max()), scale)
    assert err <= TOL * scale, f"{what}: max-abs {err:.3g} > {TOL:g} x {scale:.3g}"
    return err / scale


_step_jit = jax.jit(S.step)

# The diffusers modules whose step() draws its noise with randn_tensor: the tests replace
# it by the noise jattn gets through ``noise=`` (how randomness is matched).
_RANDN_MODULE = {
    "ddpm": diffusers.schedulers.scheduling_ddpm,
    "euler-ancestral": diffusers.schedulers.scheduling_euler_ancestral_discrete,
}


def _step_parity(cfg: S.SchedulerConfig, n: int, monkeypatch, seed: int = 0) -> float:
    """Runs diffusers and jattn side by side on random samples/model outputs (and the same
    variance noise), asserting equal timesteps and close outputs at every step. Returns
    the worst relative error seen."""
    ref = _torch_scheduler(cfg, n)
    sch = S.make_schedule(cfg, n)
    # With clipping, x0 is clipped to a small range after a computation at the scale of
    # the unclipped x0, whose rounding errors survive; measure them at that scale.
    unclipped = _torch_scheduler(cfg.replace(clip_sample=False), n) if cfg.clip_sample else None
    if cfg.kind == "euler" and cfg.use_karras_sigmas:
        # fractional timesteps from log-sigma interpolation of torch's (MKL sqrt) sigmas
        np.testing.assert_allclose(np.asarray(sch.timesteps), ref.timesteps.numpy(), rtol=1e-6)
    else:
        np.testing.assert_array_equal(ref.timesteps.numpy(), np.asarray(sch.timesteps))
    assert sch.num_inference_steps == len(ref.timesteps)
    _assert_close(np.float32(ref.init_noise_sigma), sch.init_noise_sigma, "init_noise_sigma")

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32) * float(ref.init_noise_sigma)
    x_t = torch.from_numpy(x)
    state = S.init_state(sch, jnp.asarray(x))
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        tag = f"{cfg.kind} {cfg.prediction_type} {cfg.timestep_spacing} n={n} step {i} t={t}"
        m = rng.standard_normal(SHAPE).astype(np.float32)
        z = rng.standard_normal(SHAPE).astype(np.float32)
        x_j = jnp.asarray(x_t.numpy())  # same input sample on both sides
        inp = ref.scale_model_input(x_t, t)
        worst = max(worst, _assert_close(inp, S.scale_model_input(sch, x_j, i), tag + " input"))

        kwargs = {}
        if cfg.kind == "ddim":
            kwargs["eta"] = cfg.eta
            if cfg.eta > 0:
                kwargs["variance_noise"] = torch.from_numpy(z)
        if cfg.kind in _RANDN_MODULE:  # these steps draw their noise with randn_tensor
            monkeypatch.setattr(_RANDN_MODULE[cfg.kind], "randn_tensor",
                                lambda *a, **k: torch.from_numpy(z))
        out = ref.step(torch.from_numpy(m), t, x_t, **kwargs)
        noise = jnp.asarray(z) if sch.stochastic else None
        prev, state, x0 = _step_jit(sch, state, jnp.asarray(m), i, x_j, noise=noise)
        scale = float(x_t.abs().max())  # the step's operands (Euler: x + d * dt)
        if unclipped is not None:
            x0_unclipped = unclipped.step(torch.from_numpy(m), t, x_t, **kwargs)
            scale = max(scale, float(x0_unclipped.pred_original_sample.abs().max()))

        worst = max(worst, _assert_close(out.prev_sample, prev, tag + " prev_sample", scale))
        ref_x0 = (ref.model_outputs[-1] if cfg.kind == "dpm++2m"
                  else out.pred_original_sample)
        worst = max(worst, _assert_close(ref_x0, x0, tag + " pred_original_sample", scale))
        worst = max(worst, _assert_close(ref_x0, S.pred_x0(sch, jnp.asarray(m), i, x_j),
                                         tag + " pred_x0", scale))
        x_t = out.prev_sample
    return worst


# ---------------------------------------------------------------------------------------
# Schedule constants.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("betas", [
    dict(),
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True),
    dict(trained_betas=tuple(np.linspace(1e-4, 0.03, 1000).tolist())),
])
def test_alphas_cumprod_equal_diffusers(kind, betas):
    """alpha_bar is bit-identical to diffusers' for every beta schedule (within 1e-6
    relative after the zero-SNR rescale, whose torch ``sqrt`` is MKL's, not correctly
    rounded). If this fails, jattn's emulation of torch's float32 linspace/cumprod (or
    the rescale) drifted, and every scheduler and the noise of img2img shift with it."""
    cfg = SD.replace(kind=kind, **betas)
    ref = _torch_scheduler(cfg, 10)
    sch = S.make_schedule(cfg, 10)
    if cfg.rescale_betas_zero_snr:
        want = ref.alphas_cumprod.numpy()
        np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), want, rtol=1e-6,  # cancellation
                                   atol=1e-9)
    else:
        np.testing.assert_array_equal(ref.alphas_cumprod.numpy(),
                                      np.asarray(sch.alphas_cumprod))
    if kind == "ddim":
        assert float(ref.final_alpha_cumprod) == float(sch.final_alpha_cumprod)


@pytest.mark.parametrize("kind", S.KINDS)
def test_timesteps_and_sigmas_equal_diffusers(kind):
    """Timesteps equal diffusers' for every spacing, offset and step count (including
    61 trailing steps, where diffusers makes 62), and the noise levels agree. If this
    fails the UNet is called at other timesteps than in diffusers."""
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            for n in (1, 7, 10, 25, 50, 61, 999):
                cfg = SD.replace(kind=kind, timestep_spacing=spacing, steps_offset=offset)
                ref = _torch_scheduler(cfg, n)
                sch = S.make_schedule(cfg, n)
                np.testing.assert_array_equal(ref.timesteps.numpy(),
                                              np.asarray(sch.timesteps),
                                              err_msg=f"{spacing} offset={offset} n={n}")
                assert sch.timesteps.dtype == (jnp.float32 if kind.startswith("euler")
                                               else jnp.int32)
                if kind in ("euler", "euler-ancestral", "dpm++2m"):
                    _assert_close(ref.sigmas.numpy(), sch.sigmas, f"{spacing} n={n} sigmas")


def test_schedule_rejects_bad_step_counts():
    """make_schedule raises for 0 or more steps than training timesteps (diffusers raises
    too); if not, a silent empty/garbage schedule would reach the sampler."""
    with pytest.raises(ValueError):
        S.make_schedule(SD, 0)
    with pytest.raises(ValueError):
        S.make_schedule(SD, 1001)


# ---------------------------------------------------------------------------------------
# Step-for-step parity.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", S.KINDS)
def test_step_parity_sd_config(kind, prediction_type, monkeypatch):
    """Every step of DDIM / DDPM / Euler / DPM-Solver++(2M) matches diffusers on the SD
    betas, for all spacings, steps_offset 0/1, set_alpha_to_one True/False (DDIM) and
    10/50 steps: prev_sample, pred_original_sample, pred_x0 and the Euler model input.
    If this fails, images generated with jattn differ from diffusers' for the same
    latents and model."""
    worst = 0.0
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1) if spacing == "leading" else (0,):
            for alpha_one in (True, False) if kind == "ddim" else (False,):
                for n in (10, 50):
                    cfg = SD.replace(kind=kind, prediction_type=prediction_type,
                                     timestep_spacing=spacing, steps_offset=offset,
                                     set_alpha_to_one=alpha_one)
                    worst = max(worst, _step_parity(cfg, n, monkeypatch))
    print(f"{kind} {prediction_type}: worst relative error {worst:.3g}")


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_parity_ddim_eta(eta, prediction_type, monkeypatch):
    """DDIM with eta > 0 matches diffusers when both get the same variance noise
    (diffusers' ``variance_noise=``). If this fails, stochastic DDIM (Cross-Image
    Attention, edit-friendly inversion) diverges from the reference."""
    for spacing in ("leading", "trailing"):
        cfg = SD.replace(eta=eta, prediction_type=prediction_type, timestep_spacing=spacing)
        _step_parity(cfg, 20, monkeypatch)


@pytest.mark.parametrize("changes", [
    dict(kind="ddpm", variance_type="fixed_small_log"),
    dict(kind="ddpm", variance_type="fixed_large"),
    dict(kind="ddpm", clip_sample=True, prediction_type="sample"),
    dict(kind="ddim", clip_sample=True, clip_sample_range=2.0),
    dict(kind="ddim", prediction_type="sample"),
    dict(kind="ddim", beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
         set_alpha_to_one=True, timestep_spacing="linspace"),
    dict(kind="ddim", rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
    dict(kind="ddpm", rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
    dict(kind="euler", use_karras_sigmas=True),
    dict(kind="euler", final_sigmas_type="sigma_min", timestep_spacing="leading"),
    dict(kind="euler", rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
    dict(kind="euler", prediction_type="sample"),
    dict(kind="dpm++2m", use_karras_sigmas=True),
    dict(kind="dpm++2m", solver_order=1),
    dict(kind="dpm++2m", solver_type="heun"),
    dict(kind="dpm++2m", final_sigmas_type="sigma_min"),
    dict(kind="dpm++2m", final_sigmas_type="sigma_min", lower_order_final=False),
    dict(kind="dpm++2m", final_sigmas_type="sigma_min", euler_at_final=True),
    dict(kind="dpm++2m", prediction_type="sample"),
    dict(kind="dpm++2m", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
         prediction_type="v_prediction"),
    dict(kind="dpm++2m", rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
])
def test_step_parity_variants(changes, monkeypatch):
    """Options beyond the SD default (DDPM variance types, clipping, x0 prediction,
    zero-terminal-SNR, Karras sigmas, DPM-Solver++ order 1 / Heun / final-step rules at
    fewer and more than 15 steps, log-SNR clipping) match diffusers step for step. If
    this fails, a config read from a checkpoint silently samples differently."""
    cfg = SD.replace(**changes)
    for n in (10, 20):
        _step_parity(cfg, n, monkeypatch)


# ---------------------------------------------------------------------------------------
# The whole loop under jit + lax.scan.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    SD.replace(kind="ddim"),
    SD.replace(kind="ddim", eta=1.0, timestep_spacing="trailing"),
    SD.replace(kind="ddpm"),
    SD.replace(kind="euler", prediction_type="v_prediction"),
    SD.replace(kind="dpm++2m"),
    SD.replace(kind="euler-ancestral", timestep_spacing="leading"),
], ids=["ddim", "ddim-eta1", "ddpm", "euler-v", "dpm++2m", "euler-ancestral"])
def test_scan_loop_matches_diffusers(cfg, monkeypatch):
    """The full sampling loop as one ``jax.lax.scan`` under ``jit`` (traced step index,
    DPM-Solver++'s state in the carry) ends where diffusers' Python loop ends, with the
    same per-step model outputs and noise. If this fails, something in the schedulers
    depends on a Python-level step index and breaks inside the compiled sampler."""
    n = 25
    ref = _torch_scheduler(cfg, n)
    sch = S.make_schedule(cfg, n)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(np.float32) * float(ref.init_noise_sigma)
    outs = rng.standard_normal((sch.num_inference_steps,) + SHAPE).astype(np.float32)
    noises = rng.standard_normal((sch.num_inference_steps,) + SHAPE).astype(np.float32)

    x_t = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        ref.scale_model_input(x_t, t)
        if cfg.kind in _RANDN_MODULE:
            monkeypatch.setattr(_RANDN_MODULE[cfg.kind], "randn_tensor",
                                lambda *a, z=noises[i], **k: torch.from_numpy(z))
        kwargs = {}
        if cfg.kind == "ddim":
            kwargs = dict(eta=cfg.eta, variance_noise=torch.from_numpy(noises[i]))
        x_t = ref.step(torch.from_numpy(outs[i]), t, x_t, **kwargs).prev_sample

    @jax.jit
    def loop(schedule, x, outs, noises):
        def body(carry, xs):
            x, state = carry
            i, m, z = xs
            S.scale_model_input(schedule, x, i)
            x, state, x0 = S.step(schedule, state, m, i, x,
                                  noise=z if schedule.stochastic else None)
            return (x, state), x0
        steps = jnp.arange(schedule.num_inference_steps)
        (x, _), x0s = jax.lax.scan(body, (x, S.init_state(schedule, x)),
                                   (steps, outs, noises))
        return x, x0s

    got, x0s = loop(sch, jnp.asarray(x), jnp.asarray(outs), jnp.asarray(noises))
    assert x0s.shape == (sch.num_inference_steps,) + SHAPE
    # Errors accumulate over 25 steps of a chain driven by random model outputs.
    ref_x = x_t.numpy()
    err = float(np.abs(ref_x - np.asarray(got)).max())
    scale = max(1.0, float(np.abs(ref_x).max()))
    assert err <= 5e-6 * scale, f"max-abs {err:.3g} at scale {scale:.3g}"


def test_changing_arrays_does_not_retrace():
    """Two DDIM schedules that differ only in array values (betas, eta > 0) and a traced
    step index reuse one compiled step. If this fails, a sweep over eta or a new step
    index recompiles the sampler."""
    traces = []

    @jax.jit
    def f(schedule, state, m, i, x, z):
        traces.append(1)
        return S.step(schedule, state, m, i, x, noise=z)

    x = jnp.ones(SHAPE)
    for cfg in (SD.replace(eta=0.3), SD.replace(eta=0.9, beta_end=0.02)):
        sch = S.make_schedule(cfg, 10)
        for i in (0, 3):
            f(sch, S.init_state(sch, x), x, jnp.int32(i), x, x)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------
# Randomness.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,typed", [(SD.replace(kind="ddpm"), True),
                                       (SD.replace(eta=1.0), False)],
                         ids=["ddpm-typed-keys", "ddim-eta1-raw-keys"])
def test_noise_per_sample_independent_of_batch(cfg, typed):
    """Sample b's noise comes from key[b] only: stepping sample 1 alone gives the same
    result as stepping it inside a batch of 3, with typed (B,) or raw (B, 2) keys. If
    this fails, an image changes with the batch it is generated in."""
    sch = S.make_schedule(cfg, 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 8, 8)), jnp.float32)
    m = jnp.asarray(rng.standard_normal((3, 4, 8, 8)), jnp.float32)
    keys = jax.random.split(jax.random.key(7) if typed else jax.random.PRNGKey(7), 3)
    step = jax.jit(lambda x, m, key, noise: S.step(sch, S.init_state(sch, x), m, 2, x,
                                                    key=key, noise=noise)[0])
    full = np.asarray(step(x, m, keys, None))
    one = np.asarray(step(x[1:2], m[1:2], keys[1:2], None))
    np.testing.assert_array_equal(full[1:2], one)
    added = full - np.asarray(step(x, m, None, jnp.zeros_like(x)))  # std * noise
    assert np.abs(added).min(axis=(1, 2, 3)).max() > 0  # noise was added ...
    assert not np.allclose(added[0], added[1])  # ... and differs between samples


def test_stochastic_step_needs_key_and_checks_shapes():
    """A stochastic step without key/noise, a single key for a batch, or badly shaped
    noise raise ValueError; deterministic schedulers ignore keys. If this fails, a
    missing key would silently produce deterministic (wrong) DDPM samples."""
    x = jnp.ones(SHAPE)
    ddpm = S.make_schedule(SD.replace(kind="ddpm"), 10)
    st = S.init_state(ddpm, x)
    with pytest.raises(ValueError, match="key"):
        S.step(ddpm, st, x, 0, x)
    with pytest.raises(ValueError, match="one typed PRNG key per sample"):
        S.step(ddpm, st, x, 0, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="one raw PRNG key per sample"):
        S.step(ddpm, st, x, 0, x, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="noise shape"):
        S.step(ddpm, st, x, 0, x, noise=jnp.ones((1, 4, 8, 8)))
    ddim = S.make_schedule(SD, 10)
    a = S.step(ddim, S.init_state(ddim, x), x, 0, x)[0]
    b = S.step(ddim, S.init_state(ddim, x), x, 0, x, key=jax.random.split(jax.random.key(0), 2))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# add_noise, inversion.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", S.KINDS)
def test_add_noise_matches_diffusers(kind):
    """add_noise (forward diffusion for img2img / inversion targets / training) matches
    diffusers' for per-sample timesteps taken from the schedule. If this fails, img2img
    starts from a differently noised latent than diffusers."""
    cfg = SD.replace(kind=kind)
    ref = _torch_scheduler(cfg, 20)
    sch = S.make_schedule(cfg, 20)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    ts = ref.timesteps[[3, 11]]
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(z), ts).numpy()
    got = S.add_noise(sch, jnp.asarray(x0), jnp.asarray(z), jnp.asarray(ts.numpy()))
    _assert_close(want, got, f"{kind} add_noise")
    if kind in ("ddim", "ddpm"):
        _assert_close(want, S.add_noise(cfg, x0, z, ts.numpy()), "add_noise(config)")


def _null_text_next_step(sched, model_output, timestep, sample):
    """``next_step`` of null-text inversion (google/prompt-to-prompt,
    null_text_w_ptp.ipynb), on a diffusers DDIMScheduler, transcribed as the reference."""
    timestep, next_timestep = min(
        timestep - sched.config.num_train_timesteps // sched.num_inference_steps, 999
    ), timestep
    alpha_prod_t = (sched.alphas_cumprod[timestep] if timestep >= 0
                    else sched.final_alpha_cumprod)
    alpha_prod_t_next = sched.alphas_cumprod[next_timestep]
    beta_prod_t = 1 - alpha_prod_t
    next_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * model_output
    return alpha_prod_t_next ** 0.5 * next_original_sample + next_sample_direction


@pytest.mark.parametrize("alpha_one", [False, True])
def test_ddim_inversion_matches_null_text_next_step(alpha_one):
    """ddim_inversion_step reproduces null-text inversion's ``next_step`` over a full
    50-step inversion loop (i = n-1 ... 0, model called at timesteps[i]), and stepping
    back with the same eps returns the input. If this fails, DDIM/null-text inversion
    reconstructions drift from the reference implementation."""
    cfg = SD.replace(steps_offset=0, set_alpha_to_one=alpha_one)  # as the notebook
    n = 50
    ref = _torch_scheduler(cfg, n)
    sch = S.make_schedule(cfg, n)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x_t, x_j = torch.from_numpy(x), jnp.asarray(x)
    inv = jax.jit(S.ddim_inversion_step)
    for k in range(n):
        i = n - 1 - k
        t = int(ref.timesteps[i])
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        x_t = _null_text_next_step(ref, torch.from_numpy(eps), t, x_t)
        up = inv(sch, jnp.asarray(eps), i, jnp.asarray(x_j))
        _assert_close(x_t.numpy(), up, f"inversion step {k} t={t}")
        down, _, _ = S.step(sch, S.init_state(sch, up), jnp.asarray(eps), i, up)
        _assert_close(np.asarray(x_j), down, f"step(inversion) k={k}")
        x_j = jnp.asarray(x_t.numpy())
    with pytest.raises(ValueError, match="ddim"):
        S.ddim_inversion_step(S.make_schedule(SD.replace(kind="euler"), 10), x_j, 0, x_j)


# ---------------------------------------------------------------------------------------
# Config I/O.
# ---------------------------------------------------------------------------------------


def test_sd15_pndm_config_reads_as_ddim_defaults():
    """SD 1.5's PNDM scheduler_config.json reads as DDIM with the same betas, offset and
    spacing (jattn's defaults), like ``DDIMScheduler.from_config``; ``kind=`` picks another
    scheduler with that class's defaults for missing keys. If this fails, checkpoints load
    with the wrong noise schedule."""
    cfg = S.SchedulerConfig.from_diffusers(SD15_JSON)
    assert cfg == S.SchedulerConfig()
    ref = diffusers.DDIMScheduler.from_config(SD15_JSON)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ref.timesteps.numpy(),
                                  np.asarray(S.make_schedule(cfg, 50).timesteps))
    euler = S.SchedulerConfig.from_diffusers(SD15_JSON, kind="euler")
    assert euler.kind == "euler" and euler.timestep_spacing == "linspace"
    ref = diffusers.EulerDiscreteScheduler.from_config(SD15_JSON)
    ref.set_timesteps(30)
    np.testing.assert_array_equal(ref.timesteps.numpy(),
                                  np.asarray(S.make_schedule(euler, 30).timesteps))
    switched = cfg.replace(kind="dpm++2m")
    assert (switched.beta_start, switched.beta_schedule) == (cfg.beta_start, cfg.beta_schedule)


@pytest.mark.parametrize("kind", S.KINDS)
def test_diffusers_config_round_trip(kind):
    """to_diffusers builds the equivalent diffusers scheduler and its full config (every
    key diffusers writes) reads back to the same SchedulerConfig. If this fails, exported
    checkpoints would load with another schedule in diffusers or in jattn."""
    cfg = SD.replace(kind=kind, prediction_type="v_prediction", timestep_spacing="trailing")
    d = cfg.to_diffusers()
    ref = getattr(diffusers, d["_class_name"]).from_config(d)
    back = S.SchedulerConfig.from_diffusers(dict(ref.config, _class_name=d["_class_name"]))
    assert back == cfg


def test_from_diffusers_rejects_unknown_and_unsupported():
    """Unknown keys of a native class raise (strict), unsupported features raise
    NotImplementedError, and a config without a class needs ``kind=``. If this fails, a
    config jattn cannot honour would be sampled with silently different maths."""
    base = diffusers.DDIMScheduler().config
    d = dict(base, _class_name="DDIMScheduler", brand_new_option=3)
    with pytest.raises(ValueError, match="brand_new_option"):
        S.SchedulerConfig.from_diffusers(d)
    assert S.SchedulerConfig.from_diffusers(d, strict=False).kind == "ddim"
    with pytest.raises(NotImplementedError, match="thresholding"):
        S.SchedulerConfig.from_diffusers(dict(base, _class_name="DDIMScheduler",
                                              thresholding=True))
    with pytest.raises(NotImplementedError):
        S.SchedulerConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler",
                                          "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(NotImplementedError):
        S.SchedulerConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler",
                                          "solver_order": 3})
    with pytest.raises(ValueError, match="kind"):
        S.SchedulerConfig.from_diffusers({"beta_start": 0.001})
    assert S.SchedulerConfig.from_diffusers({"beta_start": 0.001}, kind="ddpm").kind == "ddpm"
    with pytest.raises(ValueError, match="eta"):
        SD.replace(kind="euler", eta=0.5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        SD.replace(timestep_spacing="uniform")
    # a hashable config (static jit argument / dict key)
    assert hash(SD.replace(trained_betas=[0.1] * 1000)) == hash(
        SD.replace(trained_betas=tuple([0.1] * 1000)))
    assert dataclasses.fields(S.SchedulerConfig)  # frozen dataclass
    assert math.isinf(S.SchedulerConfig.from_diffusers(
        {"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": None}
    ).lambda_min_clipped)


# ---------------------------------------------------------------------------------------
# SDXL's schedulers: Euler ancestral, Karras sigmas, scheduler names (issue 16).
# ---------------------------------------------------------------------------------------

# SDXL base 1.0's scheduler/scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_JSON = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


@pytest.mark.parametrize("changes", [
    dict(timestep_spacing="leading", steps_offset=1),       # SDXL base's spacing
    dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
         timestep_spacing="trailing"),
], ids=["sdxl-leading", "trailing-v", "zero-snr-v"])
def test_step_parity_euler_ancestral(changes, monkeypatch):
    """Euler ancestral matches diffusers' EulerAncestralDiscreteScheduler step for step
    (prev_sample, pred_original_sample, model input) when both get the same noise: the
    test replaces diffusers' ``randn_tensor`` by the array jattn receives as ``noise=``.
    (The SD-config spacings/offsets/10-50 steps run in test_step_parity_sd_config.) If
    this fails, sigma_up/sigma_down or the noise scale differ from the reference."""
    cfg = SD.replace(kind="euler-ancestral", **changes)
    worst = max(_step_parity(cfg, n, monkeypatch) for n in (10, 30))
    print(f"euler-ancestral {changes}: worst relative error {worst:.3g}")


def test_euler_ancestral_keys_per_sample_and_noise_scale():
    """With per-sample keys, sample 1's step is the same alone or in a batch of 3; the
    added noise is exactly sigma_up * N(0, 1) drawn from key[b]; the last step (sigma
    -> 0) adds none. If this fails, Euler ancestral images change with the batch or get
    the wrong amount of fresh noise."""
    sch = S.make_schedule(SD.replace(kind="euler-ancestral"), 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 8, 8)) * 5, jnp.float32)
    m = jnp.asarray(rng.standard_normal((3, 4, 8, 8)), jnp.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    step = jax.jit(lambda x, m, key, noise, i: S.step(sch, S.init_state(sch, x), m, i, x,
                                                       key=key, noise=noise)[0])
    full = np.asarray(step(x, m, keys, None, 2))
    np.testing.assert_array_equal(full[1:2], np.asarray(step(x[1:2], m[1:2], keys[1:2],
                                                             None, 2)))
    z = jax.vmap(lambda k: jax.random.normal(k, (4, 8, 8)))(keys)
    np.testing.assert_allclose(full, np.asarray(step(x, m, None, z, 2)), rtol=1e-6, atol=1e-6)
    added = full - np.asarray(step(x, m, None, jnp.zeros_like(x), 2))
    np.testing.assert_allclose(added, float(sch.coef["sigma_up"][2]) * np.asarray(z),
                               rtol=1e-5, atol=1e-6)
    last = sch.num_inference_steps - 1
    assert float(sch.coef["sigma_up"][last]) == 0.0
    with pytest.raises(ValueError, match="Euler ancestral"):
        S.step(sch, S.init_state(sch, x), m, 0, x)


@pytest.mark.parametrize("name", ["euler-karras", "dpm++2m-karras"])
def test_karras_sdxl_config_parity(name, monkeypatch):
    """The "-karras" names switch SDXL base's Euler config to Karras sigmas (Euler / DPM-
    Solver++ 2M), which then match diffusers' class with ``use_karras_sigmas=True`` built
    from the same config, step for step (SDXL's leading spacing, offset 1, 10 and 30
    steps). If this fails, "DPM++ 2M Karras" / "Euler Karras" on SDXL sample differently
    from diffusers."""
    cfg = S.SchedulerConfig.from_diffusers(SDXL_JSON).replace(kind=name)
    assert cfg.use_karras_sigmas and cfg.kind == name.split("-karras")[0]
    cls = getattr(diffusers, cfg.to_diffusers()["_class_name"])
    ref = cls.from_config(dict(SDXL_JSON), use_karras_sigmas=True)
    ref.set_timesteps(30)
    np.testing.assert_allclose(np.asarray(S.make_schedule(cfg, 30).sigmas),
                               ref.sigmas.numpy(), rtol=1e-6)
    worst = max(_step_parity(cfg, n, monkeypatch) for n in (10, 30))
    print(f"{name} (SDXL config): worst relative error {worst:.3g}")


def test_scheduler_names():
    """Every name of SCHEDULER_NAMES is accepted by ``replace(kind=name)`` and by the
    pipeline and CLI tables; presets set their options, plain kinds keep the config's,
    explicit changes win, unknown names raise naming the choices. If this fails,
    ``--scheduler euler-ancestral`` / ``dpm++2m-karras`` is refused or picks another
    scheduler."""
    from jattn import pipeline

    assert set(S.SCHEDULER_NAMES) >= set(S.KINDS)
    from jattn.commands import common

    assert tuple(pipeline.SCHEDULERS) == tuple(S.SCHEDULER_NAMES)
    assert tuple(common.SCHEDULERS) == tuple(S.SCHEDULER_NAMES)  # the CLI's --scheduler
    for name, changes in S.SCHEDULER_NAMES.items():
        cfg = SD.replace(kind=name)
        assert all(getattr(cfg, k) == v for k, v in changes.items()), name
        S.make_schedule(cfg, 5)
    karras = SD.replace(kind="dpm++2m-karras")
    assert karras.replace(kind="euler").use_karras_sigmas  # the checkpoint's option kept
    assert not SD.replace(kind="euler-karras", use_karras_sigmas=False).use_karras_sigmas
    assert SD.replace(kind="euler-ancestral").to_diffusers()["_class_name"] == \
        "EulerAncestralDiscreteScheduler"
    with pytest.raises(ValueError, match="kind"):
        SD.replace(kind="heun")
    back = S.SchedulerConfig.from_diffusers(
        dict(diffusers.EulerAncestralDiscreteScheduler.from_config(SDXL_JSON).config,
             _class_name="EulerAncestralDiscreteScheduler"))
    assert back.kind == "euler-ancestral" and back.timestep_spacing == "leading"


@pytest.mark.slow  # ~15 s: compiles the tiny pipeline's sampler
def test_pipeline_euler_ancestral_matches_diffusers(tiny_sd_dir, monkeypatch):
    """End to end on the tiny SD pipeline: ``generate(scheduler="euler-ancestral")`` with
    the per-step noise given through ``SamplerHooks.noise`` ends on diffusers' latents
    when diffusers' ``randn_tensor`` returns the same noise (that is how the randomness is
    matched; with keys, jattn draws sample b's noise from its own key, per-sample and
    batch-independent, see test_euler_ancestral_keys_per_sample_and_noise_scale). The
    "-karras" names reach the pipeline's schedule. If this fails, Euler ancestral breaks
    inside the compiled sampler (noise layout, init_noise_sigma, model-input scaling)."""
    import jattn
    from jattn.sampling.sampler import SamplerHooks

    steps, prompts = 4, ["a red circle on the left", "a blue square"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((steps, 2, 8, 8, 4)).astype(np.float32)  # (n, B, h, w, C)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    drawn = iter(np.transpose(noise, (0, 1, 4, 2, 3)))  # diffusers' (B, C, h, w) per step
    monkeypatch.setattr(_RANDN_MODULE["euler-ancestral"], "randn_tensor",
                        lambda *a, **k: torch.from_numpy(np.ascontiguousarray(next(drawn))))
    with torch.no_grad():
        ref = pipe(prompts, negative_prompt=["blurry", ""], latents=torch.from_numpy(latents),
                   num_inference_steps=steps, guidance_scale=7.5,
                   output_type="latent").images.numpy()

    jp = jattn.load(tiny_sd_dir)
    out = jp.generate(prompts, negative_prompt=["blurry", ""], num_inference_steps=steps,
                      guidance_scale=7.5, scheduler="euler-ancestral", latents=latents,
                      hooks=SamplerHooks(noise=jnp.asarray(noise)), decode=False)
    err = float(np.abs(out.latents - ref).max())
    print(f"pipeline euler-ancestral: max-abs {err:.2e} (max |latents| {np.abs(ref).max():.2f})")
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), err
    for name in ("euler-karras", "dpm++2m-karras"):
        sched = jp.schedule(10, name)
        ref_s = getattr(diffusers, S._KIND_TO_CLASS[sched.kind]).from_config(
            pipe.scheduler.config, use_karras_sigmas=True)
        ref_s.set_timesteps(10)
        np.testing.assert_allclose(np.asarray(sched.sigmas), ref_s.sigmas.numpy(), rtol=1e-6)
