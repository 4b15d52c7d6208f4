"""``jattn.load`` on user mistakes and damaged checkpoints (issue 15, model-loading side).

Every case builds a diffusers-layout folder (a copy of the bundled model), damages one
thing and checks that ``jattn.load`` raises ONE error of jattn's own (a ``raise`` inside
the jattn package, so the CLI prints it as one line), of the ``CheckpointError`` family
or a TypeError/ValueError naming the argument, whose message names the file (or argument)
and the fix — never a SafetensorError, JSONDecodeError, KeyError or a Flax/numpy error,
and never a silent load of NaN weights. Valid checkpoints (bundled, tiny random, the real
SD1.5/SD2.1 configs) must keep loading.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import jattn
import jattn.io.convert
from jattn.io import checkpoint as ck
from jattn.io.checkpoint import (CheckpointConfigError, CheckpointDamagedError,
                                 CheckpointError, CheckpointMismatchError,
                                 CheckpointNotFoundError, CheckpointUnsupportedError,
                                 PickleRefusedError)
from jattn.models.clip_text import CLIPTextConfig
from jattn.models.unet import UNetConfig
from jattn.models.vae import VAEConfig
from jattn.pipeline import bundled_model_path
from jattn.sampling.schedulers import SchedulerConfig

JATTN_DIR = Path(jattn.__file__).resolve().parent
UNET_W = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tmp_path) -> Path:
    """A private copy of the bundled model (diffusers layout) to damage."""
    d = tmp_path / "model"
    shutil.copytree(bundled_model_path(), d)
    return d


def _raise(fn, *args, exc=CheckpointError, **kw) -> str:
    """Call ``fn``; check it raises ``exc`` from a ``raise`` inside the jattn package (what
    the CLI prints as one line) and return the message."""
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    tb = info.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    assert JATTN_DIR in where.parents, f"raised from {where}, not from jattn: {info.value!r}"
    return str(info.value)


def _load_error(d, exc=CheckpointError, **kw) -> str:
    return _raise(jattn.load, d, exc=exc, **kw)


def _edit_json(path: Path, **changes):
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


_DELETE = object()


def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of ``key``'s data in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    a, b = header[key]["data_offsets"]
    return 8 + n + a, 8 + n + b


# ------------------------------------------------------------------ valid checkpoints
SD15 = {
    "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
             "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
             "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
             "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"]},
    "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"_name_or_path": "openai/clip-vit-large-patch14",
                     "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
                     "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                     "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                     "initializer_range": 0.02, "intermediate_size": 3072,
                     "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                     "model_type": "clip_text_model", "num_attention_heads": 12,
                     "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
                     "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
                     "vocab_size": 49408},
    "scheduler": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False},
}
SD21 = {
    "unet": dict(SD15["unet"], _diffusers_version="0.10.0.dev0",
                 attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 dual_cross_attention=False, num_class_embeds=None,
                 only_cross_attention=False, sample_size=96, upcast_attention=True,
                 use_linear_projection=True),
    "vae": dict(SD15["vae"], sample_size=768),
    "text_encoder": dict(SD15["text_encoder"], hidden_act="gelu", hidden_size=1024,
                         intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                         projection_dim=512),
    "scheduler": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
}


def test_real_sd_configs_parse():
    """The config.json files of SD1.5 and SD2.1 (as on the hub: ints per block, ints for
    floats, nulls, legacy token ids) pass the stricter parsers with the right values. If
    this fails, validation would refuse real checkpoints."""
    for cfgs, heads, cad, hidden, pred in ((SD15, (8,) * 4, 768, 768, "epsilon"),
                                           (SD21, (5, 10, 20, 20), 1024, 1024, "v_prediction")):
        u = UNetConfig.from_diffusers(cfgs["unet"])
        assert u.num_heads == heads and u.cross_attention_dim == cad
        assert u.block_out_channels == (320, 640, 1280, 1280) and u.layers_per_block == (2,) * 4
        assert u.mid_block_scale_factor == 1.0 and u.freq_shift == 0
        v = VAEConfig.from_diffusers(cfgs["vae"])
        assert v.scaling_factor == 0.18215 and v.downsample_factor == 8
        t = CLIPTextConfig.from_transformers(cfgs["text_encoder"])
        assert t.hidden_size == hidden and t.eos_token_id == 2
        s = SchedulerConfig.from_diffusers(cfgs["scheduler"])
        assert s.kind == "ddim" and s.prediction_type == pred and s.steps_offset == 1
        # and what the parsers write back reads again unchanged
        assert UNetConfig.from_diffusers(u.to_diffusers()) == u
        assert VAEConfig.from_diffusers(v.to_diffusers()) == v
        assert CLIPTextConfig.from_transformers(t.to_transformers()) == t
        assert SchedulerConfig.from_diffusers(s.to_diffusers()) == s


def test_valid_checkpoints_load_unchanged(tiny_sd_dir):
    """The bundled model and diffusers' own save_pretrained output (full configs with every
    null key) still load, with the weights exactly as stored."""
    from safetensors.numpy import load_file

    for d in (bundled_model_path(), Path(tiny_sd_dir)):
        pipe = jattn.load(d)
        sd = load_file(str(d / UNET_W))
        np.testing.assert_array_equal(
            np.asarray(pipe.params["unet"]["conv_in"]["kernel"]),
            sd["conv_in.weight"].transpose(2, 3, 1, 0))
    assert pipe.unet_config.cross_attention_dim == pipe.text_config.hidden_size == 32


# ------------------------------------------------------------------ 1. NaN / inf weights
def test_nan_weights_are_refused(model):
    """NaN bytes inside a tensor (header intact) used to load and give black images."""
    f = model / UNET_W
    a, _ = _tensor_span(f, "conv_in.weight")
    raw = bytearray(f.read_bytes())
    raw[a:a + 8] = struct.pack("<2f", float("nan"), float("inf"))
    f.write_bytes(bytes(raw))
    msg = _load_error(model, CheckpointDamagedError)
    assert str(f) in msg and "conv_in.weight (2 of" in msg
    assert "NaN/inf" in msg and "re-download" in msg


def test_random_bytes_in_weights_are_refused(model):
    """A block of random bytes in the data region (a bad copy) is caught as NaN/inf."""
    f = model / "vae/diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 65536] = np.random.default_rng(0).bytes(65536)
    f.write_bytes(bytes(raw))
    msg = _load_error(model, CheckpointDamagedError)
    assert str(f) in msg and "NaN/inf" in msg


def test_finite_check_all_float_dtypes():
    """The per-array check sees inf/NaN in float32/16/bfloat16 (bit test for the 16-bit
    types), ignores ints, and does not flag large finite values."""
    import ml_dtypes

    for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        a = np.linspace(-3, 3, 1000).astype(dt)
        assert ck._all_finite(a)
        big = np.full(10, 60000.0).astype(dt)
        assert ck._all_finite(big)
        for bad in (np.inf, -np.inf, np.nan):
            b = a.copy()
            b[517] = bad
            assert not ck._all_finite(b), (dt, bad)
    assert ck._all_finite(np.arange(10, dtype=np.int64))
    with pytest.raises(CheckpointDamagedError, match=r"x\.bin: .*w \(1 of 3 values\)"):
        ck._check_finite(Path("x.bin"), {"ok": np.ones(2, np.float16),
                                         "w": np.array([1, np.nan, 2], ml_dtypes.bfloat16)})


# ------------------------------------------------------------------ 2. truncated / corrupted
@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "text"])
def test_damaged_safetensors(model, damage):
    f = model / UNET_W
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2],
                   "header": raw[:8] + b"\xff" * 32 + raw[40:],
                   "empty": b"",
                   "text": b"version https://git-lfs.github.com/spec/v1\n"}[damage])
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(f)) and "damaged or not a safetensors file" in msg
    assert "re-download" in msg


def test_damaged_shard_and_index(model):
    """Sharded weights: an invalid index JSON and a truncated shard name the file."""
    from safetensors.numpy import load_file, save_file

    f = model / UNET_W
    sd = load_file(str(f))
    keys = sorted(sd)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors",
             "diffusion_pytorch_model-00002-of-00002.safetensors"]
    wm = {}
    for name, ks in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: sd[k] for k in ks}, str(model / "unet" / name))
        wm.update({k: name for k in ks})
    f.unlink()
    index = model / "unet/diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    shard = model / "unet" / names[1]
    shard.write_bytes(shard.read_bytes()[:100])
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(shard)) and "not a safetensors file" in msg
    index.write_text('{"weight_map": {"a": ')
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(index)) and "invalid JSON" in msg
    index.write_text('{"metadata": {}}')
    assert "weight_map" in _load_error(model, CheckpointDamagedError)


def test_damaged_pickle_weights(model):
    """With allow_pickle=True a damaged .bin names the file instead of torch's traceback."""
    (model / "vae/diffusion_pytorch_model.safetensors").unlink()
    f = model / "vae/diffusion_pytorch_model.bin"
    f.write_bytes(b"PK\x03\x04 not really a zip")
    assert "only pickle weights" in _load_error(model, PickleRefusedError)
    msg = _load_error(model, CheckpointDamagedError, allow_pickle=True)
    assert msg.startswith(str(f)) and "not a torch state dict" in msg


# ------------------------------------------------------------------ 3. invalid JSON
@pytest.mark.parametrize("name", ["model_index.json", "unet/config.json", "vae/config.json",
                                  "text_encoder/config.json",
                                  "scheduler/scheduler_config.json"])
def test_invalid_json(model, name):
    f = model / name
    f.write_text('{\n  "a": 1,\n  "b": [1, 2\n}')
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(f)) and "invalid JSON" in msg and "line 4, column 1" in msg
    f.write_text("[1, 2]")
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(f)) and "expected a JSON object" in msg
    f.write_bytes(b"\xff\xfe\x00\x01")
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(f)) and "UTF-8" in msg


# ------------------------------------------------------------------ 4. wrong config values
BAD_VALUES = [
    ("unet", "block_out_channels", "abc", "a list of integers >= 1"),
    ("unet", "block_out_channels", [32, 0, 64], "a list of integers >= 1"),
    ("unet", "cross_attention_dim", -3, "an integer >= 1"),
    ("unet", "sample_size", "64", "an integer >= 1"),
    ("unet", "layers_per_block", 2.5, "list of 3 integers >= 1"),
    ("unet", "attention_head_dim", [2, 4], "list of 3 integers >= 1"),
    ("unet", "use_linear_projection", "false", "true or false"),
    ("unet", "norm_eps", 0, "a number > 0"),
    ("unet", "down_block_types", "CrossAttnDownBlock2D", "a list of block type names"),
    ("unet", "block_out_channels", None, "a list of integers"),
    ("vae", "latent_channels", 4.5, "an integer >= 1"),
    ("vae", "scaling_factor", "0.18215", "a number > 0"),
    ("vae", "use_quant_conv", 1, "true or false"),
    ("text_encoder", "hidden_size", "96", "an integer >= 1"),
    ("text_encoder", "num_hidden_layers", 0, "an integer >= 1"),
    ("text_encoder", "layer_norm_eps", [1e-5], "a number > 0"),
    ("scheduler", "num_train_timesteps", 0, "an integer >= 1"),
    ("scheduler", "beta_end", 1.5, "a number in [0.0, 0.999]"),
    ("scheduler", "clip_sample", "no", "true or false"),
    ("scheduler", "steps_offset", -1, "an integer >= 0"),
    ("scheduler", "trained_betas", [0.1, "x"], "a list of numbers"),
]


@pytest.mark.parametrize("comp,key,value,expected", BAD_VALUES)
def test_bad_config_value(model, comp, key, value, expected):
    """The error names the file, the key, the value and what is expected — not a TypeError
    from int("abc"), a silent int(2.5) == 2, or a Flax error at init."""
    f = model / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")
    _edit_json(f, **{key: value})
    msg = _load_error(model, CheckpointConfigError)
    assert msg.startswith(str(f)), msg
    assert f"{key}={value!r}" in msg and expected in msg and "Fix:" in msg, msg


@pytest.mark.parametrize("comp,key,value,match", [
    ("scheduler", "beta_schedule", "unknown", "beta_schedule='unknown' not supported"),
    ("scheduler", "prediction_type", "foo", "prediction_type='foo' not supported"),
    ("unet", "down_block_types", ["CrossAttnDownBlock2D", "Foo", "DownBlock2D"],
     "down block type 'Foo' is not supported"),
    ("text_encoder", "hidden_act", "relu", "hidden_act='relu' is not supported"),
])
def test_bad_config_choice(model, comp, key, value, match):
    f = model / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")
    _edit_json(f, **{key: value})
    msg = _load_error(model, (CheckpointConfigError, CheckpointUnsupportedError))
    assert msg.startswith(str(f)) and match in msg, msg


@pytest.mark.parametrize("comp,key", [("unet", "block_out_channels"), ("vae", "up_block_types"),
                                      ("text_encoder", "hidden_size")])
def test_missing_required_key(model, comp, key):
    f = model / comp / "config.json"
    _edit_json(f, **{key: _DELETE})
    msg = _load_error(model, CheckpointConfigError)
    assert msg.startswith(str(f)) and f"required key(s) missing: {key}" in msg


def test_config_not_an_object_in_code():
    """Calling a parser with a non-dict names the config, not a TypeError from dict()."""
    for fn in (UNetConfig.from_diffusers, VAEConfig.from_diffusers,
               CLIPTextConfig.from_transformers, SchedulerConfig.from_diffusers):
        assert "expected a dict" in _raise(fn, [1, 2], exc=CheckpointConfigError)


# ------------------------------------------------------------------ 5. weights vs config
def test_misshapen_and_mistyped_weights(model):
    """Arrays of the wrong shape or an integer dtype are listed by key with both shapes."""
    from safetensors.numpy import load_file, save_file

    f = model / UNET_W
    sd = load_file(str(f))
    sd["conv_in.weight"] = np.zeros((7, 4, 3, 3), np.float32)
    sd["conv_out.bias"] = np.zeros(sd["conv_out.bias"].shape, np.int32)
    save_file(sd, str(f))
    msg = _load_error(model, CheckpointMismatchError)
    assert "conv_in.weight: checkpoint (7, 4, 3, 3)" in msg and "model expects" in msg
    assert "conv_out.bias: checkpoint dtype int32" in msg


def test_config_that_does_not_fit_the_weights(model):
    """A valid but foreign config (other channel widths) gives the key-by-key mismatch
    list, not a Flax/numpy traceback."""
    _edit_json(model / "vae/config.json", block_out_channels=[32, 32, 64, 64])
    msg = _load_error(model, CheckpointMismatchError)
    assert msg.startswith("vae: checkpoint does not match") and "shape/dtype mismatches" in msg


@pytest.mark.parametrize("comp,key,value,match", [
    ("unet", "cross_attention_dim", 128, "cross_attention_dim=128 but text_encoder"),
    ("vae", "latent_channels", 8, "latent_channels=8"),
])
def test_components_that_do_not_belong_together(model, comp, key, value, match):
    """UNet/text encoder widths or UNet/VAE channels that disagree are caught at load (a
    shape error inside jit, or silently wrong latents, otherwise)."""
    _edit_json(model / comp / "config.json", **{key: value})
    msg = _load_error(model, CheckpointMismatchError)
    assert "do not belong together" in msg and match in msg


def test_tokenizer_larger_than_text_vocab(model):
    _edit_json(model / "text_encoder/config.json", vocab_size=1000)
    msg = _load_error(model, CheckpointMismatchError)
    assert "tokenizer/ has 49408 tokens" in msg and "vocab_size=1000" in msg


# ------------------------------------------------------------------ 6. bad arguments
@pytest.mark.parametrize("kw,exc,match", [
    (dict(model=123), TypeError, "model=123 \\(int\\): expected a folder path"),
    (dict(model=["x"]), TypeError, "model=\\['x'\\] \\(list\\)"),
    (dict(model=""), ValueError, "model='' is empty"),
    (dict(model=None, dtype="float64"), ValueError, "dtype='float64': choose one of"),
    (dict(model=None, dtype=5), TypeError, "dtype=5: expected 'float32'"),
    (dict(model=None, dtype=np.float64), TypeError, "dtype=<class 'numpy.float64'>"),
    (dict(model=None, allow_pickle="no"), TypeError, "allow_pickle='no'"),
    (dict(model=None, variant=16), TypeError, "variant=16"),
])
def test_bad_arguments(kw, exc, match):
    msg = _raise(jattn.load, exc=exc, **kw)
    import re

    assert re.search(match, msg), msg


def test_dtype_objects_accepted():
    import jax.numpy as jnp

    pipe = jattn.load(None, dtype=jnp.bfloat16)
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------ 7. missing / damaged parts
@pytest.mark.parametrize("comp", ["unet", "vae", "text_encoder", "scheduler", "tokenizer"])
def test_missing_component_folder(model, comp):
    shutil.rmtree(model / comp)
    msg = _load_error(model, CheckpointNotFoundError)
    assert str(model / comp) in msg and "missing" in msg and "Fix:" in msg


def test_missing_weight_file(model):
    (model / "text_encoder/model.safetensors").unlink()
    msg = _load_error(model, CheckpointNotFoundError)
    assert "text_encoder: no weights" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("name,content,match", [
    ("vocab.json", '{"a": 1, ', "vocab.json: invalid JSON"),
    ("vocab.json", "[1, 2]", "vocab.json: expected a JSON object"),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json: invalid JSON"),
    ("merges.txt", "garbage", "transformers could not load it"),
    ("merges.txt", b"\xff\xfe\x00", "merges.txt: damaged"),
])
def test_damaged_tokenizer(model, name, content, match):
    f = model / "tokenizer" / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    msg = _load_error(model, CheckpointDamagedError)
    assert match in msg and "Fix:" in msg, msg


def test_missing_tokenizer_file(model):
    (model / "tokenizer/merges.txt").unlink()
    msg = _load_error(model, CheckpointNotFoundError)
    assert "lacks merges.txt" in msg and "re-download the checkpoint's tokenizer/" in msg
    assert isinstance(_raise(jattn.load, model, exc=FileNotFoundError), str)


# ------------------------------------------------------------------ 8. not a file / unreadable
@pytest.mark.parametrize("name", [UNET_W, "vae/config.json", "model_index.json",
                                  "tokenizer/vocab.json"])
def test_directory_in_place_of_a_file(model, name):
    f = model / name
    f.unlink()
    f.mkdir()
    msg = _load_error(model, CheckpointDamagedError)
    assert msg.startswith(str(f)) and "is a directory" in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_unreadable_weight_file(model):
    f = model / UNET_W
    f.chmod(0)
    try:
        msg = _load_error(model, CheckpointDamagedError)
    finally:
        f.chmod(0o644)
    assert msg.startswith(str(f)) and "permission denied" in msg


# ------------------------------------------------------------------ error classes
def test_error_hierarchy():
    """One base for every checkpoint problem; the old names and bases still work."""
    assert jattn.io.convert.CheckpointMismatchError is CheckpointMismatchError
    for cls, base in ((CheckpointNotFoundError, FileNotFoundError),
                      (CheckpointDamagedError, ValueError),
                      (CheckpointConfigError, ValueError),
                      (CheckpointUnsupportedError, NotImplementedError),
                      (CheckpointMismatchError, ValueError),
                      (PickleRefusedError, RuntimeError)):
        assert issubclass(cls, CheckpointError) and issubclass(cls, base)
        assert str(cls("a message")) == "a message"
    assert issubclass(CheckpointError, ValueError)
