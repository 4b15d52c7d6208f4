"""Parity of jattn's CLIP vision encoder and image preprocessing with transformers' torch
``CLIPVisionModelWithProjection`` / ``CLIPImageProcessor`` (tiny random configs)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import _randomize_torch_module, _torch_to_numpy_state_dict  # noqa: E402
from jattn.io.convert import CheckpointMismatchError  # noqa: E402
from jattn.models.clip_vision import (  # noqa: E402
    CLIPImageProcessing,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    clip_vision_state_dict,
    convert_clip_vision_state_dict,
    init_clip_vision_params,
    preprocess_clip_image,
    preprocess_clip_images,
)

ATOL = 1e-5


def _hf_config(act: str):
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=20, patch_size=4, projection_dim=16, hidden_act=act, layer_norm_eps=1e-5)


def _hf_model(act: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(_hf_config(act))
    return _randomize_torch_module(model, seed=seed, std=0.2)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_parity_with_transformers(act):
    """Same random weights, same pixels -> same last_hidden_state, every hidden state (so the
    penultimate one IP-Adapter-Plus uses), pooler_output and image_embeds (fp32, max-abs
    <= 1e-5). Fails if the patch order, the CLS/position embedding, pre_layrnorm, the
    activation, the CLS-only post_layernorm or the projection is wrong."""
    hf = _hf_model(act)
    cfg = CLIPVisionConfig.from_transformers(hf.config.to_dict())
    assert cfg.hidden_act == act and cfg.num_positions == 26
    params = convert_clip_vision_state_dict(_torch_to_numpy_state_dict(hf), cfg)
    x = np.random.default_rng(0).normal(size=(2, 3, 20, 20)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    out = jax.jit(lambda p, v: CLIPVisionModelWithProjection(cfg).apply(
        {"params": p}, v, output_hidden_states=True))(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert out["last_hidden_state"].shape == (2, 26, 32)
    assert out["image_embeds"].shape == (2, 16) and out["pooler_output"].shape == (2, 32)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    errs = {
        "last_hidden_state": np.abs(np.asarray(out["last_hidden_state"])
                                    - ref.last_hidden_state.numpy()).max(),
        "image_embeds": np.abs(np.asarray(out["image_embeds"]) - ref.image_embeds.numpy()).max(),
    }
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = np.abs(np.asarray(a) - b.numpy()).max()
    pooled = hf.vision_model.post_layernorm(ref.last_hidden_state[:, 0]).detach().numpy()
    errs["pooler_output"] = np.abs(np.asarray(out["pooler_output"]) - pooled).max()
    print(act, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= ATOL, errs


def test_config_round_trip_and_errors():
    """from_transformers(to_transformers(c)) == c, transformers accepts the dict, a CLIPConfig's
    vision_config is read, and bad values name the key. Fails if a field is dropped (a model
    exported by jattn would load with another architecture)."""
    cfg = CLIPVisionConfig.from_transformers(_hf_config("gelu").to_dict())
    d = cfg.to_transformers()
    json.dumps(d)
    assert CLIPVisionConfig.from_transformers(d) == cfg
    assert CLIPVisionConfig.from_transformers(
        transformers.CLIPVisionConfig(**d).to_dict()) == cfg
    assert CLIPVisionConfig.from_transformers({"vision_config": d}) == cfg
    h14 = CLIPVisionConfig.vit_h14()
    assert (h14.num_positions, h14.head_dim, h14.hidden_act) == (257, 80, "gelu")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig.from_transformers({k: v for k, v in d.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPVisionConfig(image_size=20, patch_size=6)


def test_export_round_trip_and_input_errors(tmp_path):
    """jattn params export into transformers strictly (load_state_dict and from_pretrained
    with no missing/unexpected key) and reproduce the torch weights exactly; a wrong image
    size raises an error giving the expected shape. Fails if a name or transpose of the
    export is wrong, i.e. a tower trained in jattn could not be used by transformers."""
    from safetensors.numpy import save_file

    cfg = CLIPVisionConfig.from_transformers(_hf_config("quick_gelu").to_dict())
    params = init_clip_vision_params(cfg, jax.random.key(3))
    sd = clip_vision_state_dict(params)
    fresh = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**cfg.to_transformers()))
    fresh.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    missing = set(fresh.state_dict()) - set(sd)
    assert missing <= {"vision_model.embeddings.position_ids"}, missing
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_transformers()))
    loaded, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
        str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded.state_dict()[k].numpy(), v)
    back = convert_clip_vision_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    model = CLIPVisionModelWithProjection(cfg)
    with pytest.raises(ValueError, match=r"\(B, 20, 20, 3\).*preprocess_clip_images"):
        model.apply({"params": params}, jnp.zeros((1, 3, 20, 20)))


def test_converter_names_missing_unexpected_and_misshapen_keys():
    """A checkpoint lacking a weight, carrying a foreign one, or with a weight of the wrong
    shape raises one error naming each. Fails if conversion silently keeps random weights
    (e.g. a CLIPVisionModel checkpoint without visual_projection)."""
    hf = _hf_model("gelu")
    cfg = CLIPVisionConfig.from_transformers(hf.config.to_dict())
    sd = _torch_to_numpy_state_dict(hf)
    sd.pop("visual_projection.weight")
    sd.pop("vision_model.encoder.layers.2.mlp.fc2.bias")
    sd["text_model.final_layer_norm.weight"] = np.ones(32, np.float32)
    sd["vision_model.embeddings.class_embedding"] = np.zeros(31, np.float32)
    sd["vision_model.embeddings.position_ids"] = np.arange(26)[None]  # buffer: dropped
    with pytest.raises(CheckpointMismatchError) as e:
        convert_clip_vision_state_dict(sd, cfg)
    msg = str(e.value)
    for key in ("visual_projection.weight", "vision_model.encoder.layers.2.mlp.fc2.bias",
                "text_model.final_layer_norm.weight",
                "vision_model.embeddings.class_embedding"):
        assert key in msg, key
    assert "position_ids" not in msg


def _test_images():
    rng = np.random.default_rng(1)
    from PIL import Image

    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # landscape, odd sizes
    tall = rng.integers(0, 256, (90, 41, 3), dtype=np.uint8)  # portrait
    grey = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    rgba = rng.integers(0, 256, (25, 61, 4), dtype=np.uint8)
    return [Image.fromarray(rgb), Image.fromarray(tall), Image.fromarray(grey),
            Image.fromarray(rgba, "RGBA")]


@pytest.mark.parametrize("size,crop", [(224, 224), (16, 12), (20, 24)])
def test_preprocessing_matches_clip_image_processor(size, crop):
    """preprocess_clip_image == transformers' CLIPImageProcessor (PIL backend) on landscape,
    portrait, grey and RGBA images, for the CLIP sizes, a crop smaller than the resize and a
    crop larger than it (zero padding): bit-identical (max-abs 0). Fails if the shortest-side
    rule, the bicubic filter, the crop offset, the alpha handling or the normalisation
    differ (CLIP features would then differ from the reference pipeline's)."""
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    hf = Proc(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    pp = CLIPImageProcessing.from_transformers(hf.to_dict())
    assert (pp.shortest_edge, pp.crop_height, pp.resample) == (size, crop, 3)
    images = _test_images()
    ref = hf(images=images, return_tensors="np")["pixel_values"]  # (B, 3, H, W)
    ours = preprocess_clip_images(images, pp)
    assert ours.shape == (4, crop, crop, 3) and ours.dtype == np.float32
    err = np.abs(ours - ref.transpose(0, 2, 3, 1)).max()
    print(size, crop, f"max-abs {err:.2e}")
    assert err <= 1e-6, err


def test_preprocessing_inputs_and_errors(tmp_path):
    """Paths, PIL images and uint8 arrays give the same pixels; an unreadable file or a float
    array raises an error naming the image and the accepted forms."""
    from PIL import Image

    arr = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    pp = CLIPImageProcessing(shortest_edge=16, crop_height=16, crop_width=16)
    a = preprocess_clip_image(tmp_path / "a.png", pp)
    np.testing.assert_array_equal(a, preprocess_clip_image(arr, pp))
    np.testing.assert_array_equal(a, preprocess_clip_image(Image.fromarray(arr), pp))
    assert preprocess_clip_images(arr, pp).shape == (1, 16, 16, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png.*cannot be read"):
        preprocess_clip_image(tmp_path / "bad.png", pp)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_clip_image(arr.astype(np.float32), pp)
    with pytest.raises(ValueError, match="do_center_crop"):
        CLIPImageProcessing.from_transformers({"do_center_crop": False})
