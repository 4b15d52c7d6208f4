"""Zero-terminal-SNR v-prediction training option: training and sampling share alpha_bar,
the loss stays finite at t = T-1, and the exported scheduler config says what was trained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jattn.sampling import schedulers as sch
from jattn.train import stages
from jattn.train import steps as steps_lib
from jattn.train.config import load_config
from jattn.train.export import ddim_scheduler_config

ROOT = Path(__file__).resolve().parents[2]


def _stage(**kw):
    cfg = load_config(ROOT / "configs" / "bundled_model.py:tiny")
    return cfg, dataclasses.replace(cfg.diffusion, **kw)


def _v_loss(st, params, latents, ids, *, alphas_bar, snr_gamma, key=0):
    """``diffusion_loss`` of phase ``st`` with a fixed key and no caption dropout."""
    import jax
    import jax.numpy as jnp

    return steps_lib.diffusion_loss(
        params, steps_lib.unet_config_of(st), steps_lib.text_config_of(st),
        jnp.asarray(latents), jnp.asarray(ids), jax.random.key(key),
        alphas_bar=jnp.asarray(alphas_bar, jnp.float32), empty_ids=jnp.asarray(ids[0]),
        caption_dropout=0.0, snr_gamma=snr_gamma, prediction_type="v_prediction")


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


@pytest.mark.slow  # ~45-80 s; the default suite keeps to 15 min
def test_v_prediction_step_is_finite_at_zero_terminal_snr():
    cfg, st = _stage(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                     num_train_timesteps=4)  # 4 timesteps: t = T-1 (SNR 0) is drawn often
    fn, tx = steps_lib.make_diffusion_step(st, 0, stages._empty_ids(cfg))
    state = steps_lib.init_state(stages.init_diffusion_params(cfg.replace(diffusion=st)), tx)
    rng = np.random.default_rng(0)
    # one image four times: x_0 is predictable from the (empty) prompt, even at SNR 0
    latents = np.repeat(rng.standard_normal((1, 16, 16, 4)), 4, axis=0).astype(np.float32)
    ids = np.tile(np.asarray(stages._empty_ids(cfg), np.int32), (4, 1))
    import jax

    def fixed_loss(params):  # same timesteps, noise and dropout before and after
        loss, _ = _v_loss(st, params, latents, ids, alphas_bar=steps_lib.alphas_cumprod(st),
                          snr_gamma=st.snr_gamma, key=7)
        return float(loss)

    before = fixed_loss(jax.device_get(state["params"]))
    losses = []
    for _ in range(6):
        state, met = fn(state, latents, ids)
        losses.append(float(met["loss"]))
    after = fixed_loss(state["params"])
    assert np.all(np.isfinite(losses)) and np.isfinite(after), losses
    assert after < before, (before, after)


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_v_prediction_weight_is_one_at_zero_snr():
    """Min-SNR for v-prediction is ``min(SNR + 1, gamma) / (SNR + 1)``: the terminal
    timestep (SNR 0), where the layout must come from the text, keeps weight 1.

    Would break with ``min(SNR, gamma) / (SNR + 1)``, which gives that timestep weight 0.
    """
    cfg, st = _stage(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    params = stages.init_diffusion_params(cfg.replace(diffusion=st))
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ids = np.tile(np.asarray(stages._empty_ids(cfg), np.int32), (2, 1))
    for gamma in (5.0, 0.0):
        loss, met = _v_loss(st, params, latents, ids, alphas_bar=np.zeros(1), snr_gamma=gamma)
        assert float(met["mse"]) > 0.1
        np.testing.assert_allclose(float(loss), float(met["mse"]), rtol=1e-6)


def _tiny_cfg(tmp_path):
    return load_config(ROOT / "configs" / "bundled_model.py:tiny").replace(workdir=str(tmp_path))


def _train_and_restore(cfg, tmp_path):
    """Train stage C of ``cfg`` on 8 random latents with empty captions; returns
    ``restore(folder, phase) -> state`` (host arrays) of each phase's newest checkpoint."""
    import jax

    from jattn.train.checkpointing import StageCheckpoints

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((8, 16, 16, 4)).astype(np.float32)
    ids = np.tile(np.asarray(stages._empty_ids(cfg), np.int32), (8, 1))
    assert stages.train_diffusion(cfg, progress=False, latents=latents, ids=ids)

    def restore(sub, st):
        ck = StageCheckpoints(tmp_path / sub / "ckpt")
        state = jax.device_get(ck.restore(stages.diffusion_state_like(cfg, st)))
        ck.close()
        return state

    return restore, latents, ids


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_v_prediction_phase_starts_from_the_pretrained_ema(tmp_path):
    """With ``diffusion_pretrain`` stage C trains the pretraining phase, then the main
    phase from its final EMA weights (here with lr 0, so they must come out unchanged);
    phases with different models are refused.

    Would break if the main phase started from fresh weights or from the raw (non-EMA)
    params, or if the phases shared a checkpoint folder.
    """
    import jax

    cfg = _tiny_cfg(tmp_path)
    pre = dataclasses.replace(cfg.diffusion, steps=3)
    main = dataclasses.replace(cfg.diffusion, steps=3, lr=0.0, weight_decay=0.0,
                               prediction_type="v_prediction", rescale_betas_zero_snr=True)
    cfg = cfg.replace(diffusion=main, diffusion_pretrain=pre)
    restore, latents, ids = _train_and_restore(cfg, tmp_path)
    s_pre, s_main = restore("diffusion_pretrain", pre), restore("diffusion", main)
    assert int(s_pre["step"]) == 3 and int(s_main["step"]) == 3
    flat = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    moved = [not np.array_equal(a, b) for a, b in zip(flat(s_pre["ema"]), flat(s_pre["params"]))]
    assert any(moved)  # EMA and raw params differ, so the check below tells them apart
    for a, b in zip(flat(s_main["params"]), flat(s_pre["ema"])):
        np.testing.assert_array_equal(a, b)

    bad = cfg.replace(diffusion_pretrain=dataclasses.replace(pre, unet=pre.unet[:-1]))
    import pytest

    with pytest.raises(ValueError, match="diffusion_pretrain"):
        stages.train_diffusion(bad, progress=False, latents=latents, ids=ids)


@pytest.mark.slow  # ~40 s of three tiny training phases; run with -m slow
def test_three_phases_and_text_layer_reinit(tmp_path):
    """A tuple of pretraining phases trains in ``diffusion_pretrain``,
    ``diffusion_pretrain_2``, then ``diffusion``; a phase with ``reinit_text_layers``
    (here lr 0) starts from the previous phase's EMA UNet and text embeddings, with the
    text encoder's transformer layers and final norm of a fresh initialisation.

    Would break if the phases shared a folder or skipped one, if the reinit touched the
    UNet or the embeddings, or kept the trained layers.
    """
    import jax

    cfg = _tiny_cfg(tmp_path)
    p1 = dataclasses.replace(cfg.diffusion, steps=2)
    p2 = dataclasses.replace(cfg.diffusion, steps=2, lr=2e-3)
    p3 = dataclasses.replace(cfg.diffusion, steps=1, lr=0.0, weight_decay=0.0,
                             reinit_text_layers=True)
    cfg = cfg.replace(diffusion=p3, diffusion_pretrain=(p1, p2))
    assert [n for n, _ in cfg.diffusion_phases] == ["diffusion_pretrain", "diffusion_pretrain_2",
                                                    "diffusion"]
    restore, _, _ = _train_and_restore(cfg, tmp_path)
    s2, s3 = restore("diffusion_pretrain_2", p2), restore("diffusion", p3)
    assert int(restore("diffusion_pretrain", p1)["step"]) == 2 and int(s2["step"]) == 2
    fresh = jax.device_get(stages.init_diffusion_params(cfg)["text_encoder"]["text_model"])
    eq = lambda a, b: all(np.array_equal(x, y) for x, y in zip(  # noqa: E731
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    t2, t3 = s2["ema"]["text_encoder"]["text_model"], s3["params"]["text_encoder"]["text_model"]
    assert eq(s3["params"]["unet"], s2["ema"]["unet"])
    assert eq(t3["embeddings"], t2["embeddings"])
    assert not eq(t2["encoder"], fresh["encoder"])  # phase 2 moved its layers …
    assert eq(t3["encoder"], fresh["encoder"]) and eq(t3["final_layer_norm"],
                                                      fresh["final_layer_norm"])
