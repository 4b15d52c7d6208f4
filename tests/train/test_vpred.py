"""Zero-terminal-SNR v-prediction training option: training and sampling share alpha_bar,
the loss stays finite at t = T-1, and the exported scheduler config says what was trained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jattn.sampling import schedulers as sch
from jattn.train import stages
from jattn.train import steps as steps_lib
from jattn.train.config import load_config
from jattn.train.export import ddim_scheduler_config

ROOT = Path(__file__).resolve().parents[2]


def _stage(**kw):
    cfg = load_config(ROOT / "configs" / "bundled_model.py:tiny")
    return cfg, dataclasses.replace(cfg.diffusion, **kw)


def test_training_alphas_match_the_exported_scheduler():
    for rescale in (False, True):
        _, st = _stage(prediction_type="v_prediction", rescale_betas_zero_snr=rescale)
        ab = steps_lib.alphas_cumprod(st)
        conf = ddim_scheduler_config(prediction_type="v_prediction",
                                     rescale_betas_zero_snr=rescale)
        sc = sch.SchedulerConfig.from_diffusers(conf)
        assert sc.prediction_type == "v_prediction" and sc.rescale_betas_zero_snr == rescale
        assert sc.timestep_spacing == ("trailing" if rescale else "leading")
        np.testing.assert_allclose(ab, sch._alphas_cumprod(sc), rtol=0, atol=2e-6)
        assert (ab[-1] == 0.0) == rescale
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(ddim_scheduler_config(prediction_type="v_prediction",
                                                          rescale_betas_zero_snr=True))
    np.testing.assert_allclose(steps_lib.alphas_cumprod(st), ref.alphas_cumprod.numpy(),
                               rtol=0, atol=2e-6)


def test_v_prediction_step_is_finite_at_zero_terminal_snr():
    cfg, st = _stage(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                     num_train_timesteps=4)  # 4 timesteps: t = T-1 (SNR 0) is drawn often
    fn, tx = steps_lib.make_diffusion_step(st, 0, stages._empty_ids(cfg))
    state = steps_lib.init_state(stages.init_diffusion_params(cfg.replace(diffusion=st)), tx)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
    ids = np.tile(np.asarray(stages._empty_ids(cfg), np.int32), (4, 1))
    losses = []
    for _ in range(6):
        state, met = fn(state, latents, ids)
        losses.append(float(met["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
