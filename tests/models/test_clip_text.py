"""Parity of jattn's CLIP text encoder with transformers' ``CLIPTextModel`` (tiny, random)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import _randomize_torch_module, _torch_to_numpy_state_dict  # noqa: E402
from jattn.io.convert import CheckpointMismatchError  # noqa: E402
from jattn.models.clip_text import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    clip_text_state_dict,
    convert_clip_text_state_dict,
    init_clip_text_params,
)

ATOL = 1e-5
VOCAB = 64

# SD1-style: quick_gelu, legacy eos_token_id == 2 (pooled token = largest id).
# SD2-style: exact gelu, eos_token_id in the vocabulary and equal to the pad id.
CONFIGS = {
    "sd1_quick_gelu": dict(hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=2,
                           pad_token_id=1),
    "sd2_gelu": dict(hidden_act="gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                     pad_token_id=VOCAB - 1),
}


def _hf_config(style: str):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=12, layer_norm_eps=1e-5,
        projection_dim=16, **CONFIGS[style])


def _hf_model(style: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(_hf_config(style))
    return _randomize_torch_module(model, seed=seed, std=0.2)


_state_dict = _torch_to_numpy_state_dict


def _token_batch(eos: int = VOCAB - 1, pad: int = VOCAB - 1):
    """Two prompts: BOS, random tokens, EOS, then padding (right padded), length 12."""
    rng = np.random.default_rng(0)
    ids = np.full((2, 12), pad, np.int64)
    mask = np.zeros((2, 12), np.int64)
    for row, n in enumerate((5, 9)):
        ids[row, 0] = VOCAB - 2
        ids[row, 1:n] = rng.integers(3, VOCAB - 3, n - 1)
        ids[row, n] = eos
        mask[row, : n + 1] = 1
    return ids, mask


def _run_both(style: str, use_mask: bool):
    hf = _hf_model(style)
    cfg = CLIPTextConfig.from_transformers(hf.config.to_dict())
    params = convert_clip_text_state_dict(_state_dict(hf), cfg)
    ids, mask = _token_batch(pad=CONFIGS[style]["pad_token_id"])
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask) if use_mask else None,
                 output_hidden_states=True)
    out = jax.jit(lambda p, i, m: CLIPTextModel(cfg).apply(
        {"params": p}, i, m, output_hidden_states=True))(
            params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask) if use_mask else None)
    return ref, out


@pytest.mark.parametrize("style", list(CONFIGS))
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "padmask"])
def test_parity_with_transformers(style, use_mask):
    """Same random weights, same tokens -> same last_hidden_state, pooler_output and every
    hidden state (fp32, max-abs <= 1e-5). Fails if the causal/padding mask, an activation
    (quick_gelu vs exact gelu), LayerNorm placement, the pooled-token rule (legacy
    eos_token_id == 2 -> argmax of ids; otherwise first eos) or a weight transpose is wrong."""
    ref, out = _run_both(style, use_mask)
    errs = {
        "last_hidden_state": np.abs(np.asarray(out["last_hidden_state"])
                                    - ref.last_hidden_state.numpy()).max(),
        "pooler_output": np.abs(np.asarray(out["pooler_output"])
                                - ref.pooler_output.numpy()).max(),
    }
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = np.abs(np.asarray(a) - b.numpy()).max()
    print(style, use_mask, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= ATOL, errs


def test_pooled_token_rule():
    """The pooled output is the state at the first EOS (new configs) or at the largest id
    (legacy eos_token_id == 2). Fails if jattn pools the last token or the last EOS, which
    would silently change SD2/pooled-embedding conditioning."""
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=6,
                         eos_token_id=VOCAB - 1)
    ids = jnp.asarray([[VOCAB - 2, 5, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1]], jnp.int32)
    params = init_clip_text_params(cfg, jax.random.key(0))
    out = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, ids)
    np.testing.assert_array_equal(out["pooler_output"], out["last_hidden_state"][:, 2])
    legacy = CLIPTextModel(dataclasses.replace(cfg, eos_token_id=2))
    ids2 = jnp.asarray([[VOCAB - 3, 5, 7, VOCAB - 1, 0, 0]], jnp.int32)
    out2 = jax.jit(legacy.apply)({"params": params}, ids2)
    np.testing.assert_array_equal(out2["pooler_output"], out2["last_hidden_state"][:, 3])


def test_config_round_trip():
    """from_transformers(to_transformers(c)) == c and transformers accepts the dict. Fails if a
    field is dropped or renamed, so that exported checkpoints would load with a different
    architecture (e.g. gelu flavour or eos rule)."""
    cfg = CLIPTextConfig.from_transformers(_hf_config("sd2_gelu").to_dict())
    assert cfg.hidden_act == "gelu" and cfg.eos_token_id == VOCAB - 1
    d = cfg.to_transformers()
    json.dumps(d)
    assert CLIPTextConfig.from_transformers(d) == cfg
    hf_cfg = transformers.CLIPTextConfig(**d)
    assert CLIPTextConfig.from_transformers(hf_cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


def test_export_round_trip(tmp_path):
    """Export loads strictly into transformers (module load_state_dict with prefix "",
    from_pretrained of the prefixed on-disk layout) and reproduces the outputs bit-exactly
    after re-import. Fails if a key name, a transpose, or the text_model prefix handling is
    wrong, i.e. the bundled model could not be used by transformers/diffusers."""
    from safetensors.numpy import save_file

    hf = _hf_model("sd1_quick_gelu", seed=1)
    cfg = CLIPTextConfig.from_transformers(hf.config.to_dict())
    params = convert_clip_text_state_dict(_state_dict(hf), cfg)

    sd = clip_text_state_dict(params, prefix="")
    fresh = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)

    sd_disk = clip_text_state_dict(params)
    assert all(k.startswith("text_model.") for k in sd_disk)
    save_file(sd_disk, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_transformers()))
    loaded, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path),
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)

    # both layouts convert back to the same params
    for layout in (sd, sd_disk):
        back = convert_clip_text_state_dict(layout, cfg)
        jax.tree.map(np.testing.assert_array_equal, back, params)


def test_converter_names_missing_and_unexpected_keys():
    """A checkpoint lacking a weight (or carrying a foreign one) raises an error that names
    it. Fails if conversion silently keeps random/zero weights for a missing layer."""
    hf = _hf_model("sd2_gelu")
    cfg = CLIPTextConfig.from_transformers(hf.config.to_dict())
    sd = _state_dict(hf)
    sd.pop("encoder.layers.1.mlp.fc2.weight")
    sd["text_projection.weight"] = np.zeros((16, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_clip_text_state_dict(sd, cfg)
    msg = str(e.value)
    assert "text_model.encoder.layers.1.mlp.fc2.weight" in msg
    assert "text_projection.weight" in msg
    # the position_ids buffer is not a parameter and is dropped silently
    sd = _state_dict(hf)
    sd["text_model.embeddings.position_ids"] = np.arange(12)[None]
    convert_clip_text_state_dict(sd, cfg)


# ---------------------------------------------------------------------------------------
# CLIPTextModelWithProjection (SDXL's text_encoder_2, issue 16).
# ---------------------------------------------------------------------------------------

from jattn.models.clip_text import CLIPTextModelWithProjection  # noqa: E402


def _hf_proj_model(style: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(_hf_config(style))
    return _randomize_torch_module(model, seed=seed, std=0.2)


@pytest.mark.parametrize("style", list(CONFIGS))
def test_with_projection_parity_with_transformers(style):
    """CLIPTextModelWithProjection: text_embeds (bias-free projection of the pooled EOS
    state; legacy eos_token_id == 2 pools the largest id, new configs the first EOS, as
    transformers 5), last_hidden_state and every hidden state (SDXL uses [-2] and, with
    clip_skip, earlier ones) match transformers on the same weights and tokens (fp32,
    max-abs <= 1e-5). Fails if the projection gets a bias or a transpose, the pooled
    token is wrong, or the converter misplaces the text_model prefix."""
    hf = _hf_proj_model(style)
    cfg = CLIPTextConfig.from_transformers(hf.config.to_dict())
    assert cfg.projection_dim == 16
    params = convert_clip_text_state_dict(_state_dict(hf), cfg, with_projection=True)
    ids, _ = _token_batch(pad=CONFIGS[style]["pad_token_id"])
    if style == "sd1_quick_gelu":
        ids[:, -1] = 0  # SDXL's tokenizer_2 pads with "!" (id 0): argmax still finds EOS
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    out = jax.jit(lambda p, i: CLIPTextModelWithProjection(cfg).apply(
        {"params": p}, i, output_hidden_states=True))(params, jnp.asarray(ids, jnp.int32))
    errs = {
        "text_embeds": np.abs(np.asarray(out["text_embeds"]) - ref.text_embeds.numpy()).max(),
        "last_hidden_state": np.abs(np.asarray(out["last_hidden_state"])
                                    - ref.last_hidden_state.numpy()).max(),
    }
    assert out["text_embeds"].shape == (2, 16)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = np.abs(np.asarray(a) - b.numpy()).max()
    print(style, "with projection", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= ATOL, errs


def test_with_projection_converter_and_export(tmp_path):
    """The converter names a missing text_projection.weight, a misshapen one and a foreign
    key; the export loads strictly with CLIPTextModelWithProjection.from_pretrained and
    converts back bit-exactly. Fails if a checkpoint without the projection loads with a
    random one, or jattn's export is unreadable by transformers/diffusers."""
    from jattn.io.convert import CheckpointMismatchError
    from safetensors.numpy import save_file

    hf = _hf_proj_model("sd2_gelu", seed=1)
    cfg = CLIPTextConfig.from_transformers(hf.config.to_dict())
    sd = _state_dict(hf)
    assert "text_projection.weight" in sd and "text_projection.bias" not in sd
    bad = dict(sd)
    bad.pop("text_projection.weight")
    bad["text_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((7, 32), np.float32)
    bad["logit_scale"] = np.zeros((), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_clip_text_state_dict(bad, cfg, with_projection=True)
    msg = str(e.value)
    for key in ("text_projection.weight", "text_model.encoder.layers.0.mlp.fc1.weight",
                "logit_scale", "text_encoder_2"):
        assert key in msg, (key, msg)
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight"):
        convert_clip_text_state_dict({k: v for k, v in sd.items()
                                      if not k.startswith("text_projection")}, cfg,
                                     with_projection=True)

    params = convert_clip_text_state_dict(sd, cfg, with_projection=True)
    disk = clip_text_state_dict(params)
    assert set(disk) == set(sd) - {"text_model.embeddings.position_ids"}
    save_file(disk, str(tmp_path / "model.safetensors"))
    d = cfg.to_transformers(with_projection=True)
    assert d["architectures"] == ["CLIPTextModelWithProjection"]
    assert CLIPTextConfig.from_transformers(d) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    back = convert_clip_text_state_dict(disk, cfg, with_projection=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)
