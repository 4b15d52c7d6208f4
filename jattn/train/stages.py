"""The stages of the bundled model's recipe, each resumable and skipped when done.

=======  =====================================  ==========================================
stage    output (under ``workdir``)              done when
=======  =====================================  ==========================================
vae      ``vae/final/`` config + weights + eval   ``vae/final/config.json`` exists
cache    ``cache/latents.npy``, ``ids.npy`` …    ``cache/meta.json`` matches the config
unet     ``diffusion_pretrain[_2…]/ckpt/<step>/``  (only with ``diffusion_pretrain``) the
         then ``diffusion/ckpt/<step>/``          newest checkpoint of each phase is its
                                                  last step; each later phase starts from
                                                  the previous one's EMA weights
export   ``export_dir`` (diffusers layout)        ``export.json`` names the same step
=======  =====================================  ==========================================

Interrupted stages (``--max-minutes``, SIGTERM) continue from their newest checkpoint (or
the next missing cache chunk) when called again; a resumed run is bit-identical to an
uninterrupted one (see :mod:`jattn.train.data` and :mod:`jattn.train.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checkpoint as ckpt_io
from jattn.io.tokenizer import BUNDLED_TOKENIZER_DIR, load_tokenizer, tokenize
from jattn.models import clip_text as clip_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.train import data as data_lib
from jattn.train import steps as steps_lib
from jattn.train.checkpointing import StageCheckpoints
from jattn.train.config import DiffusionStageConfig, TrainConfig
from jattn.train.export import ddim_scheduler_config, write_diffusers_folder
from jattn.train.loop import StopFlag, run_steps

__all__ = ["train_vae", "build_cache", "train_diffusion", "export", "load_vae",
           "init_diffusion_params", "diffusion_state_like", "psnr", "stage_dirs"]


def _log(msg: str) -> None:
    print(f"[jattn.train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stage_dirs(cfg: TrainConfig) -> dict[str, Path]:
    w = Path(cfg.workdir)
    return {"vae": w / "vae", "cache": w / "cache",
            **{name: w / name for name, _ in cfg.diffusion_phases},
            "export_record": w / "export.json"}


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def psnr(a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images ``(B, H, W, 3)`` (peak 255)."""
    err = (a_u8.astype(np.float64) - b_u8.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def _render_batches(cfg: TrainConfig, start: int, count: int, split: str, chunk: int = 256):
    for s in range(start, start + count, chunk):
        yield data_lib.render(cfg.source, cfg.seed, s, min(chunk, start + count - s),
                              image_size=cfg.image_size, split=split)


# ----------------------------------------------------------------------------- stage A
def _encode_fn(config: vae_lib.VAEConfig):
    model = vae_lib.AutoencoderKL(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))


def _roundtrip_fn(config: vae_lib.VAEConfig):
    model = vae_lib.AutoencoderKL(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _batched(fn, params, x: np.ndarray, batch: int):
    """Apply a jitted fn over ``x`` in fixed-size batches (the last one padded), so it
    compiles once."""
    outs = []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
        out = jax.device_get(fn(params, jnp.asarray(xb)))
        outs.append(jax.tree_util.tree_map(lambda a: a[:n], out))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def train_vae(cfg: TrainConfig, stop: StopFlag | None = None, progress: bool = True) -> bool:
    """Stage A: train the autoencoder on random crops, then set ``scaling_factor`` and
    measure the reconstruction PSNR on full-size images.

    Writes ``vae/final/{config.json, diffusion_pytorch_model.safetensors, eval.json}``
    (EMA weights). Returns True when the stage is done, False when stopped early.
    """
    d = stage_dirs(cfg)["vae"]
    final = d / "final"
    if (final / "config.json").is_file():
        _log(f"vae: done ({final}); skipping")
        return True
    st = cfg.vae
    vcfg = steps_lib.vae_config_of(st)
    step_fn, tx = steps_lib.make_vae_step(st, cfg.seed)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 101)
    params = jax.jit(vae_lib.init_vae_params, static_argnums=0)(vcfg, key)
    state = steps_lib.init_state(params, tx)
    ckpts = StageCheckpoints(d / "ckpt", cfg.keep_checkpoints)
    if ckpts.latest_step() is not None:
        state = ckpts.restore(state)
        _log(f"vae: resumed from step {int(state['step'])}")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    _log(f"vae: {n_params / 1e6:.2f}M params, {st.steps} steps of {st.batch_size} "
         f"{st.crop}px crops")
    state, finished = run_steps(
        name="vae", state=state, step_fn=step_fn,
        batch_fn=lambda s: (data_lib.vae_crop_batch(
            cfg.source, cfg.seed, s, st.batch_size, st.crop, image_size=cfg.image_size,
            object_prob=st.object_crop_prob),),
        total_steps=st.steps, checkpoints=ckpts, metrics_path=d / "metrics.jsonl",
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, stop=stop,
        progress=progress)
    ckpts.close()
    if not finished:
        return False
    params = jax.device_get(state["ema"])

    # scaling factor: 1 / std of the posterior means of held-apart images (as SD's 0.18215)
    encode = _encode_fn(vcfg)
    means = [_batched(encode, params, data_lib.to_model_range(im), 64)[0]
             for im, _ in _render_batches(cfg, data_lib.SCALE_OFFSET, st.scale_images, "all")]
    means = np.concatenate(means)
    std, mean = float(means.std()), float(means.mean())
    vcfg = dataclasses.replace(vcfg, scaling_factor=1.0 / std)
    _log(f"vae: latent mean {mean:.4f} std {std:.4f} -> scaling_factor {1 / std:.5f}")

    # reconstruction PSNR on full-size images never trained on
    roundtrip = _roundtrip_fn(vcfg)
    scores = []
    for im, _ in _render_batches(cfg, data_lib.EVAL_OFFSET, st.eval_images, "all"):
        rec = _batched(roundtrip, params, data_lib.to_model_range(im), 32)
        scores.append(psnr(im, _to_u8(rec)))
    scores = np.concatenate(scores)
    report = {"psnr_mean_db": float(scores.mean()), "psnr_min_db": float(scores.min()),
              "psnr_median_db": float(np.median(scores)), "images": int(len(scores)),
              "image_size": cfg.image_size, "latent_mean": mean, "latent_std": std,
              "scaling_factor": 1.0 / std, "steps": st.steps, "params": int(n_params)}
    _log(f"vae: reconstruction PSNR mean {report['psnr_mean_db']:.2f} dB, "
         f"min {report['psnr_min_db']:.2f} dB on {len(scores)} {cfg.image_size}px images")
    tmp = d / "final.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_state_dict(vae_lib.vae_state_dict(params, dtype=np.float32),
                            tmp / "diffusion_pytorch_model.safetensors")
    (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(vcfg.to_diffusers(), indent=2) + "\n")
    tmp.replace(final)
    return True


def load_vae(cfg: TrainConfig) -> tuple[vae_lib.VAEConfig, dict]:
    """The trained VAE of stage A (config with its scaling factor, float32 params).

    Raises:
      FileNotFoundError: stage A is not done.
    """
    final = stage_dirs(cfg)["vae"] / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{final}: stage A (vae) has not finished; run it first")
    vcfg = vae_lib.VAEConfig.from_diffusers(json.loads((final / "config.json").read_text()))
    from safetensors.numpy import load_file

    sd = load_file(str(final / "diffusion_pytorch_model.safetensors"))
    return vcfg, vae_lib.convert_vae_state_dict(sd, vcfg)


# ----------------------------------------------------------------------------- stage B
def _cache_meta(cfg: TrainConfig, vcfg: vae_lib.VAEConfig) -> dict:
    return {"num_samples": cfg.cache.num_samples, "split": cfg.cache.split,
            "source": cfg.source, "seed": cfg.seed, "image_size": cfg.image_size,
            "scaling_factor": vcfg.scaling_factor}


def build_cache(cfg: TrainConfig, stop: StopFlag | None = None, progress: bool = True) -> bool:
    """Stage B: render ``num_samples`` samples, encode them to scaled latents (posterior
    means), tokenize their captions (77 ids, padded with 49407).

    Writes ``cache/latents.npy`` float32 ``(N, h, w, C)``, ``cache/ids.npy`` int32
    ``(N, 77)``, ``cache/captions.txt`` and, last, ``cache/meta.json``. Chunks are saved as
    they are made, so an interrupted build resumes. Returns True when done.
    """
    d = stage_dirs(cfg)["cache"]
    vcfg, vparams = load_vae(cfg)
    meta = _cache_meta(cfg, vcfg)
    if (d / "meta.json").is_file() and json.loads((d / "meta.json").read_text()) == meta:
        _log(f"cache: done ({d}); skipping")
        return True
    st = cfg.cache
    chunks = d / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    encode = _encode_fn(vcfg)
    n_chunks = math.ceil(st.num_samples / st.chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunks, desc="cache", file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
    t0 = time.time()
    for c in range(n_chunks):
        f = chunks / f"{c:05d}.npz"
        if not f.is_file():
            if stop is not None and stop.stop:
                if bar is not None:
                    bar.close()
                _log(f"cache: stopped at chunk {c}/{n_chunks}; run again to resume")
                return False
            start = c * st.chunk
            count = min(st.chunk, st.num_samples - start)
            images, captions = data_lib.render(cfg.source, cfg.seed, start, count,
                                               image_size=cfg.image_size, split=st.split)
            mean = _batched(encode, vparams, data_lib.to_model_range(images), 50)[0]
            latents = ((mean - (vcfg.shift_factor or 0.0)) * vcfg.scaling_factor).astype(np.float32)
            ids = tokenize(tok, captions)
            tmp = chunks / f"{c:05d}.tmp.npz"
            np.savez(tmp, latents=latents, ids=ids, captions=np.asarray(captions))
            tmp.replace(f)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    parts = [np.load(chunks / f"{c:05d}.npz") for c in range(n_chunks)]
    latents = np.concatenate([p["latents"] for p in parts])
    ids = np.concatenate([p["ids"] for p in parts]).astype(np.int32)
    captions = [str(s) for p in parts for s in p["captions"]]
    _atomic_save_npy(d / "latents.npy", latents)
    _atomic_save_npy(d / "ids.npy", ids)
    (d / "captions.txt").write_text("".join(c + "\n" for c in captions))
    meta.update(latent_shape=list(latents.shape[1:]), latent_std=float(latents.std()),
                latent_mean=float(latents.mean()), seconds=time.time() - t0)
    (d / "meta.json").write_text(json.dumps(_cache_meta(cfg, vcfg)) + "\n")
    (d / "stats.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"cache: {len(latents)} latents {latents.shape[1:]}, std {latents.std():.3f}, "
         f"mean {latents.mean():.3f}")
    return True


# ----------------------------------------------------------------------------- stage C
def _zero_output_layers(unet_params: dict) -> dict:
    """Zero the last layer of every residual branch (resnet ``conv2``, transformer
    ``proj_out``) and the UNet's ``conv_out``, as latent diffusion's ``zero_module`` does:
    every block starts as the identity, which makes early training stable."""
    def f(path, x):
        names = [getattr(p, "key", "") for p in path]
        if names[0] == "conv_out" or (len(names) >= 2 and names[-2] in ("conv2", "proj_out")):
            return jnp.zeros_like(x)
        return x
    return jax.tree_util.tree_map_with_path(f, unet_params)


def init_diffusion_params(cfg: TrainConfig) -> dict:
    """Initial ``{"unet", "text_encoder"}`` params of stage C (float32).

    UNet: Flax default initialisers with zeroed residual outputs; text encoder: Flax
    defaults, token/position embeddings ``N(0, 0.02)`` / ``N(0, 0.01)`` as CLIP.
    Raises:
      ValueError: the UNet's ``cross_attention_dim`` is not the text width.
    """
    st = cfg.diffusion
    ucfg, tcfg = steps_lib.unet_config_of(st), steps_lib.text_config_of(st)
    if ucfg.cross_attention_dim != tcfg.hidden_size:
        raise ValueError(f"unet cross_attention_dim {ucfg.cross_attention_dim} != text "
                         f"encoder hidden_size {tcfg.hidden_size}")
    unet = _zero_output_layers(unet_lib.init_params(ucfg, _init_keys(cfg)[0]))
    return {"unet": unet, "text_encoder": _fresh_text_params(cfg)}


def _init_keys(cfg: TrainConfig) -> list:
    """The PRNG keys (unet, text, token embedding, position embedding) of stage C's init."""
    return jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 303), 4)


def _fresh_text_params(cfg: TrainConfig) -> dict:
    """The text encoder's initial params (those of :func:`init_diffusion_params`)."""
    _, k_t, k_e, k_p = _init_keys(cfg)
    return _init_text_jit(steps_lib.text_config_of(cfg.diffusion), k_t, k_e, k_p)


@functools.partial(jax.jit, static_argnums=0)
def _init_text_jit(tcfg, k_t, k_e, k_p) -> dict:
    text = clip_lib.init_clip_text_params(tcfg, k_t)
    emb = text["text_model"]["embeddings"]
    emb["token_embedding"]["embedding"] = 0.02 * jax.random.normal(
        k_e, emb["token_embedding"]["embedding"].shape)
    emb["position_embedding"]["embedding"] = 0.01 * jax.random.normal(
        k_p, emb["position_embedding"]["embedding"].shape)
    return text


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return load_tokenizer()


def _empty_ids(cfg: TrainConfig) -> tuple[int, ...]:
    tcfg = steps_lib.text_config_of(cfg.diffusion)
    return tuple(int(i) for i in tokenize(_tokenizer(), [""],
                                          max_length=tcfg.max_position_embeddings)[0])


def diffusion_state_like(cfg: TrainConfig, st: DiffusionStageConfig | None = None):
    """The abstract (shape/dtype) train state of stage C (phase ``st``, default
    ``cfg.diffusion``), for restoring checkpoints."""
    st = st or cfg.diffusion
    _, tx = steps_lib.make_diffusion_step(st, cfg.seed, _empty_ids(cfg))
    tcfg = steps_lib.text_config_of(st)
    params = {"unet": unet_lib.param_shapes(steps_lib.unet_config_of(st)),
              "text_encoder": jax.eval_shape(
                  lambda k: clip_lib.init_clip_text_params(tcfg, k), jax.random.key(0))}
    return jax.eval_shape(lambda p: steps_lib.init_state(p, tx), params)


def grounding_arrays(cfg: TrainConfig, ids: np.ndarray, progress: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Object masks float16 ``(N, K, 16, 16)`` and word positions int32 ``(N, K, R)`` of the
    cached samples (:func:`jattn.train.grounding.grounding_targets`), rendered once and
    kept in ``cache/grounding.npz`` (keyed by the cache's meta)."""
    from jattn.train.grounding import ROLES, grounding_targets

    d = stage_dirs(cfg)["cache"]
    f = d / "grounding.npz"
    n = len(ids)
    key = json.dumps({"n": n, "seed": cfg.seed, "split": cfg.cache.split,
                      "source": cfg.source, "roles": list(ROLES)}, sort_keys=True)
    if f.is_file():
        z = np.load(f)
        if str(z["key"]) == key:
            return z["masks"], z["positions"]
    tok = _tokenizer()
    chunk = 2000
    masks, positions = [], []
    rng = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="grounding targets", file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for start in rng:
        count = min(chunk, n - start)
        m, p = grounding_targets(cfg.source, cfg.seed, start, count, ids[start:start + count],
                                 tok, split=cfg.cache.split)
        masks.append(m)
        positions.append(p)
    masks, positions = np.concatenate(masks), np.concatenate(positions)
    tmp = d / "grounding.tmp.npz"
    np.savez(tmp, masks=masks, positions=positions, key=np.asarray(key))
    tmp.replace(f)
    _log(f"grounding: masks {masks.shape}, {int((positions >= 0).sum())} grounded words")
    return masks, positions


def train_diffusion(cfg: TrainConfig, stop: StopFlag | None = None, progress: bool = True,
                    latents: np.ndarray | None = None, ids: np.ndarray | None = None) -> bool:
    """Stage C: UNet and text encoder jointly on the latent cache (or on given arrays:
    ``latents`` float32 ``(N, h, w, C)``, ``ids`` int32 ``(N, 77)``).

    With ``cfg.diffusion_pretrain`` the stage has several phases (``cfg.diffusion_phases``:
    ``workdir/diffusion_pretrain``, ``…_2``, …, then ``cfg.diffusion`` in
    ``workdir/diffusion``), each starting from the previous phase's final EMA weights
    (fresh optimizer, step 0), as when a model is fine-tuned to another parametrisation
    (Lin et al. 2024, sec. 3.2); a phase with ``reinit_text_layers`` re-initialises the
    text encoder's transformer layers at its start.
    Returns True when the last step of the last phase is checkpointed, False when stopped
    early.
    Raises:
      ValueError: a pretraining phase's models differ from ``cfg.diffusion``'s.
    """
    dirs = stage_dirs(cfg)
    phases = cfg.diffusion_phases
    for _, st in phases[:-1]:
        if (st.unet, st.text_encoder) != (cfg.diffusion.unet, cfg.diffusion.text_encoder):
            raise ValueError("diffusion_pretrain must train the same unet and text_encoder "
                             "as diffusion; change one to match the other")
    if _diffusion_done(cfg, cfg.diffusion, dirs["diffusion"]):
        return True
    if latents is None:
        c = dirs["cache"]
        latents = np.load(c / "latents.npy")
        ids = np.load(c / "ids.npy")
    latents = np.ascontiguousarray(latents, np.float32)
    ids = np.ascontiguousarray(ids, np.int32)
    init = functools.partial(init_diffusion_params, cfg)
    for i, (name, st) in enumerate(phases):
        if i and st.reinit_text_layers:
            init = functools.partial(_with_fresh_text_layers, cfg, init)
        if name == "diffusion" or not _diffusion_done(cfg, st, dirs[name]):
            if not _diffusion_phase(cfg, st, dirs[name], init, stop, progress, latents, ids):
                return False
        init = functools.partial(_final_ema, cfg, st, dirs[name])
    return True


def _with_fresh_text_layers(cfg: TrainConfig, init) -> dict:
    """``init()`` with the text encoder's transformer layers and final layer norm replaced
    by a fresh initialisation (token and position embeddings kept)."""
    params = init()
    fresh = jax.device_get(_fresh_text_params(cfg)["text_model"])
    text = dict(params["text_encoder"]["text_model"])
    for k in text:
        if k != "embeddings":
            text[k] = fresh[k]
    _log("diffusion: text encoder layers re-initialised (embeddings kept)")
    return {**params, "text_encoder": {**params["text_encoder"], "text_model": text}}


def _diffusion_done(cfg: TrainConfig, st: DiffusionStageConfig, d: Path) -> bool:
    ckpts = StageCheckpoints(d / "ckpt", cfg.keep_checkpoints)
    step = ckpts.latest_step() or 0
    ckpts.close()
    if step >= st.steps:
        _log(f"{d.name}: done (step {step}); skipping")
        return True
    return False


def _final_ema(cfg: TrainConfig, st: DiffusionStageConfig, d: Path) -> dict:
    ckpts = StageCheckpoints(d / "ckpt", cfg.keep_checkpoints)
    step = ckpts.latest_step()
    state = ckpts.restore(diffusion_state_like(cfg, st), step)
    ckpts.close()
    _log(f"diffusion: starting from the EMA weights of {d.name} step {step}")
    return jax.device_get(state["ema"])


def _diffusion_phase(cfg: TrainConfig, st: DiffusionStageConfig, d: Path, init_params,
                     stop, progress: bool, latents: np.ndarray, ids: np.ndarray) -> bool:
    ckpts = StageCheckpoints(d / "ckpt", cfg.keep_checkpoints)
    step_fn, tx = steps_lib.make_diffusion_step(st, cfg.seed, _empty_ids(cfg))
    if ckpts.latest_step() is not None:
        state = ckpts.restore(diffusion_state_like(cfg, st))
        _log(f"{d.name}: resumed from step {int(state['step'])}")
    else:
        state = steps_lib.init_state(init_params(), tx)
    n_u = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]["unet"]))
    n_t = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]["text_encoder"]))
    _log(f"{d.name}: UNet {n_u / 1e6:.2f}M + text encoder {n_t / 1e6:.2f}M params, "
         f"{len(latents)} samples, {st.steps} steps of batch {st.batch_size}, "
         f"{st.prediction_type}{', zero terminal SNR' if st.rescale_betas_zero_snr else ''}")
    n = len(latents)
    extra: tuple = ()
    if st.grounding:
        masks, positions = grounding_arrays(cfg, ids, progress=progress)
        extra = (masks.astype(np.float32), positions)

    def batch_fn(step):
        idx = np.sort(data_lib.epoch_batch_indices(n, st.batch_size, step, cfg.seed))
        return (latents[idx], ids[idx]) + tuple(e[idx] for e in extra)

    _, finished = run_steps(
        name="unet", state=state, step_fn=step_fn, batch_fn=batch_fn, total_steps=st.steps,
        checkpoints=ckpts, metrics_path=d / "metrics.jsonl", log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, stop=stop, progress=progress)
    ckpts.close()
    return finished


# ----------------------------------------------------------------------------- export
def export(cfg: TrainConfig, out: str | Path | None = None, *, force: bool = False,
           allow_unfinished: bool = False) -> Path:
    """Write the EMA weights of stages A and C in diffusers layout to ``out`` (default
    ``cfg.export_dir``), keeping its ``tokenizer/``.

    Skipped when ``workdir/export.json`` records the same step and folder (unless
    ``force``). Returns the folder.
    Raises:
      FileNotFoundError: stage A or C has no output yet.
      RuntimeError: stage C is not finished and ``allow_unfinished`` is False.
    """
    out = Path(out or cfg.export_dir)
    dirs = stage_dirs(cfg)
    st = cfg.diffusion
    ckpts = StageCheckpoints(dirs["diffusion"] / "ckpt", cfg.keep_checkpoints)
    step = ckpts.latest_step()
    if step is None:
        raise FileNotFoundError(f"{dirs['diffusion']}/ckpt: no checkpoint of stage C yet")
    if step < st.steps and not allow_unfinished:
        raise RuntimeError(f"stage C is at step {step}/{st.steps}; finish it or pass "
                           "allow_unfinished=True (CLI: export --partial)")
    record = {"step": int(step), "folder": str(out.resolve())}
    rec_path = dirs["export_record"]
    if (not force and rec_path.is_file() and json.loads(rec_path.read_text()) == record
            and (out / "unet" / "config.json").is_file()):
        _log(f"export: {out} already holds step {step}; skipping")
        ckpts.close()
        return out
    vcfg, vparams = load_vae(cfg)
    state = ckpts.restore(diffusion_state_like(cfg), step)
    ckpts.close()
    ema = jax.device_get(state["ema"])
    sizes = write_diffusers_folder(
        out, unet_config=steps_lib.unet_config_of(st), unet_params=ema["unet"],
        vae_config=vcfg, vae_params=vparams, text_config=steps_lib.text_config_of(st),
        text_params=ema["text_encoder"],
        scheduler_config=ddim_scheduler_config(
            num_train_timesteps=st.num_train_timesteps, beta_start=st.beta_start,
            beta_end=st.beta_end, beta_schedule=st.beta_schedule,
            prediction_type=st.prediction_type, rescale_betas_zero_snr=st.rescale_betas_zero_snr),
        tokenizer_src=BUNDLED_TOKENIZER_DIR)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    _log(f"export: step {step} -> {out} ({total / 2**20:.1f} MiB; "
         + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()) + ")")
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    rec_path.write_text(json.dumps(record) + "\n")
    return out
