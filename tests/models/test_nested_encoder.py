"""Nested Attention's subject encoder (jattn.models.nested): shapes, parity of the whole
encoder with transformers' CLIPVisionModelWithProjection + diffusers'
IPAdapterPlusImageProjection on the exported weights, nested projections initialised from
to_k/to_v, the safetensors layout round trip and size, the IP-Adapter processor numbering
against diffusers, the release converter, and weight-file errors (tiny random configs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models import nested as N
from jattn.models.attention import AttentionSite
from jattn.models.clip_vision import CLIPVisionConfig
from jattn.models.resampler import ResamplerConfig, resampler_state_dict

CTX = 12  # context width of the fake UNet
TINY = N.NestedEncoderConfig(
    vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8,
                            num_hidden_layers=3, num_attention_heads=2, image_size=16,
                            patch_size=8, hidden_act="gelu"),
    resampler=ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=3,
                              embedding_dim=16, output_dim=CTX, ff_mult=2))


def _site(path, kind, heads, hd, block):
    return AttentionSite(path=path, kind=kind, resolution=(2, 2), num_heads=heads, head_dim=hd,
                         block=block)


SITES = [_site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", 2, 4, "down"),
         _site("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "cross", 2, 4, "down"),
         _site("mid_block.attentions.0.transformer_blocks.0.attn1", "self", 2, 8, "mid"),
         _site("mid_block.attentions.0.transformer_blocks.0.attn2", "cross", 2, 8, "mid"),
         _site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", 2, 4, "up"),
         _site("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", 2, 4, "up")]


def _unet_params(seed=0):
    """A fake UNet params tree holding to_k/to_v at the cross sites (Flax names)."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for s in SITES:
        node = tree
        for k in N.site_params_path(s.path):
            node = node.setdefault(k, {})
        d_in = CTX if s.kind == "cross" else s.num_heads * s.head_dim
        for name in ("to_k", "to_v"):
            node[name] = {"kernel": jnp.asarray(rng.standard_normal((d_in, s.num_heads
                                                                      * s.head_dim)),
                                                jnp.float32)}
    return tree


_CACHE: dict = {}


def _params(seed=0):
    """Fresh-initialised params (cached: the init compiles once per process)."""
    if seed not in _CACHE:
        _CACHE[seed] = N.init_nested_params(TINY, _unet_params(seed), SITES,
                                            jax.random.key(seed))
    return jax.tree_util.tree_map(lambda a: a, _CACHE[seed])


_encode = jax.jit(lambda params, px: N.encode_subjects(params, TINY, px))


def _pixels(u=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((u, 16, 16, 3)), jnp.float32)


def test_shapes_and_init_from_to_k_to_v():
    """Encoder -> (U, R, D_ctx); nested_kv -> {cross site: (U, R, N, H)} only; at
    initialisation K̃/Ṽ equal the site's own to_k/to_v applied to the subject tokens (a
    subject token is read like a text token). Breaks if the init copied the wrong layer or
    the heads were split differently from the UNet's (B, S, N, H) reshape."""
    unet = _unet_params()
    params = _params(0)
    tokens = _encode(params, _pixels())
    assert tokens.shape == (2, TINY.num_tokens, CTX)
    keys, values = N.nested_kv(params, tokens, SITES)
    cross = [s for s in SITES if s.kind == "cross"]
    assert set(keys) == set(values) == {s.path for s in cross}
    for s in cross:
        assert keys[s.path].shape == (2, 3, s.num_heads, s.head_dim)
        node = unet
        for k in N.site_params_path(s.path):
            node = node[k]
        want_k = (tokens @ node["to_k"]["kernel"]).reshape(2, 3, s.num_heads, s.head_dim)
        want_v = (tokens @ node["to_v"]["kernel"]).reshape(2, 3, s.num_heads, s.head_dim)
        np.testing.assert_allclose(keys[s.path], want_k, atol=1e-5)
        np.testing.assert_allclose(values[s.path], want_v, atol=1e-5)
    with pytest.raises(ValueError, match="cross-attention width"):
        N.init_nested_params(N.NestedEncoderConfig.bundled(context_dim=7), unet, SITES,
                             jax.random.key(0))


def test_encoder_parity_with_transformers_and_diffusers():
    """The exported image_encoder.* weights load strictly into transformers'
    CLIPVisionModelWithProjection and image_proj.* (diffusers layout) into diffusers'
    IPAdapterPlusImageProjection; hidden_states[-2] through the resampler equals jattn's
    subject tokens (fp32 max-abs ≤ 1e-5). Breaks if the feature layer, a key name or the
    composition differ from the release's architecture."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    params = _params(0)
    sd = N.nested_state_dict(params)
    enc_sd = {k[len("image_encoder."):]: torch.from_numpy(v.copy()) for k, v in sd.items()
              if k.startswith("image_encoder.")}
    hf = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**{k: v for k, v in TINY.vision.to_transformers().items()
                                         if k not in ("architectures", "model_type")}))
    missing, unexpected = hf.load_state_dict(enc_sd, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing)
    r = TINY.resampler
    proj = embeddings.IPAdapterPlusImageProjection(
        embed_dims=r.embedding_dim, output_dims=r.output_dim, hidden_dims=r.dim, depth=r.depth,
        dim_head=r.dim_head, heads=r.heads, num_queries=r.num_queries, ffn_ratio=r.ff_mult)
    proj.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                          resampler_state_dict(params["resampler"], layout="diffusers").items()},
                         strict=True)
    px = np.asarray(_pixels(2, seed=4))
    with torch.no_grad():
        feats = hf(torch.from_numpy(px.transpose(0, 3, 1, 2)),
                   output_hidden_states=True).hidden_states[-2]
        ref = proj(feats).numpy()
    out = np.asarray(_encode(params, jnp.asarray(px)))
    err = float(np.abs(out - ref).max())
    print(f"subject encoder vs transformers+diffusers max-abs {err:.2e}")
    assert err <= 1e-5


def test_safetensors_round_trip_layout_and_size(tmp_path):
    """save -> load gives bit-identical params and config; the keys follow the documented
    layout (image_encoder.*, image_proj.* fused to_kv, nested.<site>.to_{k,v}_nest.weight as
    torch (out, in), placeholder.text_encoder); the bundled-size encoder with the bundled
    UNet's 7 cross sites fits in 10 MB. Breaks if a key or a transpose changes."""
    params = _params(0)
    params["placeholder"] = {"text_encoder": jnp.arange(5, dtype=jnp.float32)}
    path = N.save_nested_weights(tmp_path / "w.safetensors", params, TINY)
    w = N.load_nested_weights(path)
    assert w.config == TINY
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, w.params)
    assert all(jax.tree_util.tree_leaves(same))
    sd = N.nested_state_dict(params)
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    np.testing.assert_array_equal(sd[f"nested.{p}.to_k_nest.weight"],
                                  np.asarray(params["nested"][p]["to_k"]).T)
    assert "image_proj.layers.0.0.to_kv.weight" in sd
    assert "image_encoder.vision_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert sd["placeholder.text_encoder"].shape == (5,)
    # the bundled size: encoder + 7 cross sites of 96 -> 32/64 wide
    big = N.NestedEncoderConfig.bundled()
    enc = jax.eval_shape(lambda: N.SubjectEncoder(big).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    n_enc = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(enc))
    n_nested = 2 * 96 * (32 * 2 + 64 * 5)
    assert 4 * (n_enc + n_nested + 96) < 10 * 2**20


def test_processor_order_matches_diffusers(tiny_sd_dir):
    """diffusers_processor_order lists the sites in unet.attn_processors order (down, up,
    mid), the numbering of IP-Adapter-style files. Breaks if the mid block were put between
    down and up (the jattn call order), which would scramble converted nested layers."""
    diffusers = pytest.importorskip("diffusers")
    import jattn

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    want = [k[: -len(".processor")] for k in unet.attn_processors]
    assert N.diffusers_processor_order(jattn.load(tiny_sd_dir).sites()) == want


def test_convert_release_layout():
    """An IP-Adapter-style release (transformers image encoder, image_proj.* resampler,
    ip_adapter.{i}.to_k_nest.weight numbered over every attention layer in diffusers order)
    converts to the same params; a release missing a site's projections is refused by
    name."""
    params = _params(0)
    sd = N.nested_state_dict(params)
    image_sd = {k[len("image_encoder."):]: v for k, v in sd.items()
                if k.startswith("image_encoder.")}
    order = N.diffusers_processor_order(SITES)
    adapter = {k: v for k, v in sd.items() if k.startswith("image_proj.")}
    for path, w in params["nested"].items():
        i = order.index(path)
        adapter[f"ip_adapter.{i}.to_k_nest.weight"] = np.asarray(w["to_k"]).T
        adapter[f"ip_adapter.{i}.to_v_nest.weight"] = np.asarray(w["to_v"]).T
    got = N.convert_authors_release(image_sd, TINY.vision.to_transformers(), adapter, SITES,
                                    dim_head=TINY.resampler.dim_head)
    assert got.config.resampler == TINY.resampler
    for part in ("image_encoder", "resampler", "nested"):
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params[part],
                                      got.params[part])
        assert all(jax.tree_util.tree_leaves(same)), part
    gone = f"ip_adapter.{order.index(SITES[1].path)}."
    drop = {k: v for k, v in adapter.items() if not k.startswith(gone)}
    with pytest.raises(N.NestedWeightsError, match="no nested projections"):
        N.convert_authors_release(image_sd, TINY.vision.to_transformers(), drop, SITES,
                                  dim_head=TINY.resampler.dim_head)


def test_weight_file_errors(tmp_path):
    """Missing file -> FileNotFoundError that says how to train or pass --weights; a damaged
    file, a safetensors file without the jattn_nested metadata, and weights for another
    model (nested_kv) -> NestedWeightsError naming the problem."""
    with pytest.raises(FileNotFoundError, match="train_personalize.py.*--weights"):
        N.load_nested_weights(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(N.NestedWeightsError, match="not a readable safetensors"):
        N.load_nested_weights(bad)
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(N.NestedWeightsError, match="metadata"):
        N.load_nested_weights(other)
    params = {"nested": {SITES[1].path: {"to_k": jnp.zeros((CTX, 8)), "to_v": jnp.zeros((CTX, 8))}}}
    tokens = jnp.zeros((1, 3, CTX + 1))
    with pytest.raises(N.NestedWeightsError, match="does not exist in this model"):
        N.nested_kv(params, tokens, SITES)


def test_achromatic_view_and_resize_edge():
    """``achromatic`` keeps a grey image as it is and gives equal channels of the luminance;
    with ``achromatic_view`` the resampler reads the tower's tokens of both views (restated
    by hand), the params are the one-view encoder's, and the config's JSON round-trips
    (with ``resize_edge``: the preprocessing crops the centre). Breaks if the second view is
    not the luminance, or is dropped, or the flags are lost in the weights file."""
    import dataclasses

    from jattn.models.clip_vision import CLIPVisionModelWithProjection
    from jattn.models.resampler import Resampler

    proc = TINY.processing
    mean, std = np.asarray(proc.image_mean), np.asarray(proc.image_std)
    grey = (np.full((1, 16, 16, 1), 0.3) - mean) / std
    np.testing.assert_allclose(np.asarray(N.achromatic(jnp.asarray(grey, jnp.float32), proc)),
                               grey, atol=1e-5)
    px = _pixels()
    lum = np.asarray(N.achromatic(px, proc)) * std + mean
    np.testing.assert_allclose(lum[..., 0], lum[..., 2], atol=1e-5)
    two = dataclasses.replace(TINY, achromatic_view=True, resize_edge=32)
    assert N.NestedEncoderConfig.from_json(two.to_json()) == two
    assert N.NestedEncoderConfig.from_json(TINY.to_json()) == TINY
    assert two.processing.shortest_edge == 32 and two.processing.crop_height == 16
    p = _params()
    got = N.encode_subjects(p, two, px)
    tower = CLIPVisionModelWithProjection(TINY.vision)
    feats = [tower.apply({"params": p["image_encoder"]}, x, output_hidden_states=True)[
        "hidden_states"][TINY.feature_layer] for x in (px, N.achromatic(px, proc))]
    want = Resampler(TINY.resampler).apply({"params": p["resampler"]},
                                           jnp.concatenate(feats, axis=1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(N.encode_subjects(p, TINY, px)),
                           atol=1e-3)
    with pytest.raises(ValueError, match="resize_edge"):
        dataclasses.replace(TINY, resize_edge=8)
