"""The bundled model's training recipe on tiny configs: learning, exact resume, export.

All tests share one compiled train step (``make_diffusion_step`` is cached per config),
so the file runs in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.io.tokenizer import load_tokenizer, tokenize
from jattn.train import data as data_lib
from jattn.train import stages
from jattn.train import steps as steps_lib
from jattn.train.checkpointing import StageCheckpoints
from jattn.train.config import load_config
from jattn.train.loop import StopFlag

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 12


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "bundled_model.py:tiny")
    return cfg.replace(workdir=str(tmp_path_factory.mktemp("tiny_run")))


@pytest.fixture(scope="module")
def toy_data(tiny_cfg):
    """Random latents and the token ids of toy captions: (N, 16, 16, 4), (N, 77)."""
    _, captions = data_lib.render("toy", 0, 0, N_SAMPLES, image_size=tiny_cfg.image_size)
    ids = tokenize(load_tokenizer(), captions)
    latents = np.random.default_rng(0).standard_normal((N_SAMPLES, 16, 16, 4)).astype(np.float32)
    return latents, ids


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


@pytest.mark.slow  # 15-30 s; the default suite keeps to 15 min
def test_diffusion_loss_decreases(tiny_cfg, toy_data):
    """Training lowers the loss of a fixed batch at fixed noise/timesteps/dropout.

    Would break if gradients did not reach the UNet or the text encoder, if the optimizer
    update had the wrong sign, or if the loss did not compare the prediction to the noise.
    """
    st = tiny_cfg.diffusion
    step_fn, tx = steps_lib.make_diffusion_step(st, tiny_cfg.seed, stages._empty_ids(tiny_cfg))
    latents, ids = toy_data[0][:4], toy_data[1][:4]
    state = steps_lib.init_state(stages.init_diffusion_params(tiny_cfg), tx)
    first = None
    losses = []
    for i in range(20):
        state, m = step_fn(state, latents, ids)
        losses.append(float(m["loss"]))
    # the step's randomness is a function of state["step"]: rewind it to re-measure step 0
    probe = dict(state, step=jnp.zeros((), jnp.int32))
    _, m_end = step_fn(probe, latents, ids)
    first = losses[0]
    assert float(m_end["loss"]) < 0.8 * first, (first, float(m_end["loss"]), losses)
    assert all(np.isfinite(losses))


def test_resume_is_bit_identical(tiny_cfg, toy_data):
    """Stopping at step k and restarting reaches step 2k with exactly the params, EMA and
    optimizer state of an uninterrupted 2k-step run, and the same metrics log.

    Would break if the data order or the step's randomness depended on anything but
    (seed, step), if a checkpoint missed part of the state (EMA, Adam moments, step
    count), or if the restore changed dtypes or values.
    """
    latents, ids = toy_data
    total = tiny_cfg.diffusion.steps
    k = total // 2
    straight = tiny_cfg.replace(workdir=str(Path(tiny_cfg.workdir) / "straight"))
    resumed = tiny_cfg.replace(workdir=str(Path(tiny_cfg.workdir) / "resumed"))

    assert stages.train_diffusion(straight, progress=False, latents=latents, ids=ids)
    assert not stages.train_diffusion(resumed, StopFlag(at_step=k), progress=False,
                                      latents=latents, ids=ids)
    ck = StageCheckpoints(Path(resumed.workdir) / "diffusion" / "ckpt")
    assert ck.latest_step() == k
    ck.close()
    assert stages.train_diffusion(resumed, progress=False, latents=latents, ids=ids)

    like = stages.diffusion_state_like(tiny_cfg)
    states = []
    for cfg in (straight, resumed):
        ck = StageCheckpoints(Path(cfg.workdir) / "diffusion" / "ckpt")
        assert ck.latest_step() == total
        states.append(_flat(ck.restore(like)))
        ck.close()
    a, b = states
    assert a.keys() == b.keys()
    assert any("opt_state" in key for key in a) and any("ema" in key for key in a)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # EMA differs from the raw params (the EMA update ran) and training moved the params
    assert not np.array_equal(a["['ema']['unet']['conv_in']['kernel']"],
                              a["['params']['unet']['conv_in']['kernel']"])
    logs = [[json.loads(x) for x in (Path(c.workdir) / "diffusion" / "metrics.jsonl")
             .read_text().splitlines()] for c in (straight, resumed)]
    assert [r["step"] for r in logs[0]] == list(range(1, total + 1))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]

    # running again is a no-op (the stage is done)
    assert stages.train_diffusion(resumed, progress=False, latents=latents, ids=ids)


def _write_tiny_vae(cfg) -> None:
    """Stage A's output folder with random tiny weights (the VAE's training is not under
    test here, only the files the later stages read)."""
    from jattn.io.checkpoint import save_state_dict
    from jattn.models import vae as vae_lib

    vcfg = steps_lib.vae_config_of(cfg.vae)
    vcfg = vcfg.__class__(**{**vcfg.__dict__, "scaling_factor": 0.5})
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(  # host-side random weights: no compile
        lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
        vae_lib._abstract_params(vcfg))
    final = Path(cfg.workdir) / "vae" / "final"
    save_state_dict(vae_lib.vae_state_dict(params), final / "diffusion_pytorch_model.safetensors")
    (final / "config.json").write_text(json.dumps(vcfg.to_diffusers()))


def test_export_roundtrip(tiny_cfg, toy_data):
    """The export writes a diffusers-layout folder holding the EMA weights, which
    ``jattn.load`` and diffusers' ``StableDiffusionPipeline.from_pretrained`` both read.

    Would break if a config field or weight name did not survive the export (the
    converters raise on any missing/unexpected key), if the raw params were exported
    instead of the EMA, or if the folder layout/model_index were not diffusers'.
    """
    cfg = tiny_cfg.replace(workdir=str(Path(tiny_cfg.workdir) / "straight"))
    if StageCheckpoints(Path(cfg.workdir) / "diffusion" / "ckpt").latest_step() is None:
        stages.train_diffusion(cfg, progress=False, latents=toy_data[0], ids=toy_data[1])
    _write_tiny_vae(cfg)
    out = Path(cfg.workdir) / "export"
    stages.export(cfg, out)
    for f in ("model_index.json", "unet/config.json", "vae/config.json",
              "text_encoder/config.json", "scheduler/scheduler_config.json",
              "tokenizer/vocab.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (out / f).is_file(), f
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["steps_offset"] == 1
    assert not sched["set_alpha_to_one"] and not sched["clip_sample"]

    ck = StageCheckpoints(Path(cfg.workdir) / "diffusion" / "ckpt")
    ema = jax.device_get(ck.restore(stages.diffusion_state_like(cfg))["ema"])
    ck.close()

    import jattn

    pipe = jattn.load(out)
    got_u, want_u = _flat(pipe.params["unet"]), _flat(ema["unet"])
    assert got_u.keys() == want_u.keys()
    for key in want_u:
        np.testing.assert_array_equal(got_u[key], want_u[key], err_msg=key)
    got_t, want_t = _flat(pipe.params["text_encoder"]), _flat(ema["text_encoder"])
    for key in want_t:
        want = want_t[key]
        if "token_embedding" in key:  # stored as float16
            want = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got_t[key], want, err_msg=key)
    assert pipe.vae_config.scaling_factor == 0.5

    diffusers = pytest.importorskip("diffusers")
    import torch

    sd = diffusers.StableDiffusionPipeline.from_pretrained(
        str(out), safety_checker=None, requires_safety_checker=False)
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    assert sd.vae.config.scaling_factor == 0.5
    assert sd.text_encoder.dtype == torch.float32
    from jattn.models.unet import unet_state_dict

    ref = unet_state_dict(ema["unet"])
    theirs = {k: v.detach().numpy() for k, v in sd.unet.state_dict().items()}
    assert ref.keys() == theirs.keys()
    for key in ref:
        np.testing.assert_array_equal(theirs[key], ref[key], err_msg=key)


def test_batches_depend_only_on_seed_and_step():
    """VAE crops and diffusion batch indices are pure functions of (seed, step); epochs
    are permutations; object-centred crops contain the object.

    Would break if the data order depended on how a run was split into sessions (a resumed
    run would then see other batches than an uninterrupted one), or if epochs repeated or
    skipped samples.
    """
    a = data_lib.vae_crop_batch("toy", 0, 5, 4, 16, image_size=32, object_prob=1.0)
    b = data_lib.vae_crop_batch("toy", 0, 5, 4, 16, image_size=32, object_prob=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data_lib.vae_crop_batch("toy", 0, 6, 4, 16, image_size=32))
    # every toy image has one saturated square; a crop centred on it shows part of it
    saturation = a.max(axis=-1) - a.min(axis=-1)  # (B, crop, crop), gray background = 0
    assert (saturation.reshape(4, -1).max(axis=1) > 0.5).all()

    n, batch = 10, 4
    idx = np.concatenate([data_lib.epoch_batch_indices(n, batch, s, seed=3) for s in range(5)])
    np.testing.assert_array_equal(np.sort(idx[:n]), np.arange(n))  # epoch 0: a permutation
    np.testing.assert_array_equal(np.sort(idx[n:2 * n]), np.arange(n))  # epoch 1 as well
    np.testing.assert_array_equal(data_lib.epoch_batch_indices(n, batch, 3, seed=3), idx[12:16])


def test_running_clock_skips_pauses():
    """``--max-minutes`` counts running time: a stretch in which the process does not run
    (here simulated by blocking the clock's ticker, as SIGSTOP would) is not counted.

    Would break if a training run paused by someone else's benchmark (SIGSTOP) lost that
    time from its budget and stopped early.
    """
    import time

    from jattn.train.loop import RunningClock

    clock = RunningClock(tick=0.02, gap=0.2)
    t0 = time.monotonic()
    with clock._lock:  # the ticker cannot run: as if the process were stopped
        time.sleep(0.6)
    time.sleep(0.1)
    total = time.monotonic() - t0
    assert clock.paused > 0.4
    assert clock.elapsed() < total - 0.4
