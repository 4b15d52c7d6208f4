"""SDXL prompt embeddings (two CLIP text encoders) vs diffusers'
``StableDiffusionXLPipeline.encode_prompt`` on tiny random encoders and the bundled CLIP
tokenizer files (no hub), saved with ``save_pretrained`` and read back by jattn."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from conftest import _randomize_torch_module  # noqa: E402
from jattn.io.tokenizer import BUNDLED_TOKENIZER_DIR, load_tokenizer  # noqa: E402
from jattn.models.clip_text import CLIPTextConfig, convert_clip_text_state_dict  # noqa: E402
from jattn.models.sdxl_text import encode_prompt_sdxl  # noqa: E402

ATOL = 1e-5
PROMPTS = ["a red circle above a blue square", "two green triangles"]


def _sdxl_text_components(seed: int = 0):
    """SDXL's text side in miniature: text_encoder (CLIP-L style: quick_gelu, legacy
    eos_token_id 2) and text_encoder_2 (bigG style: gelu, projection), tokenizer padding
    with EOS and tokenizer_2 padding with "!" (id 0), as SDXL base's folders."""
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="quick_gelu", projection_dim=32, **common))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=40, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="gelu", projection_dim=24, **common))
    _randomize_torch_module(te, seed, std=0.1)
    _randomize_torch_module(te2, seed + 1, std=0.1)
    tok = transformers.CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR),
                                                     local_files_only=True)
    tok2 = transformers.CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR),
                                                      local_files_only=True, pad_token="!")
    assert tok2.pad_token_id == 0
    return te, te2, tok, tok2


@pytest.fixture(scope="module")
def sdxl_text(tmp_path_factory):
    """(diffusers pipeline with only the text side, jattn's loaded pieces)."""
    d = tmp_path_factory.mktemp("sdxl_text")
    te, te2, tok, tok2 = _sdxl_text_components()
    for name, obj in (("text_encoder", te), ("text_encoder_2", te2), ("tokenizer", tok),
                      ("tokenizer_2", tok2)):
        obj.save_pretrained(d / name)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=None, scheduler=None, add_watermarker=False)

    from safetensors.numpy import load_file

    def load(name, with_projection):
        cfg = CLIPTextConfig.from_transformers(
            json.loads((d / name / "config.json").read_text()))
        sd = load_file(str(d / name / "model.safetensors"))
        return cfg, convert_clip_text_state_dict(sd, cfg, with_projection=with_projection)

    cfg, p1 = load("text_encoder", False)
    cfg2, p2 = load("text_encoder_2", True)
    ours = dict(params={"text_encoder": p1, "text_encoder_2": p2}, config=cfg, config_2=cfg2,
                tokenizer=load_tokenizer(d / "tokenizer"),
                tokenizer_2=load_tokenizer(d / "tokenizer_2"))
    assert ours["tokenizer_2"].pad_token_id == 0
    return pipe, ours


def _compare(ref, got, what):
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    errs = {}
    for name, r in zip(names, ref):
        g = getattr(got, name)
        assert g is not None and tuple(g.shape) == tuple(r.shape), (what, name)
        errs[name] = float(np.abs(np.asarray(g) - r.numpy()).max())
    print(what, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= ATOL, (what, errs)
    return errs


CASES = {
    "zeros-for-empty": dict(),
    "prompt_2-negatives": dict(prompt_2=["a yellow star", "a purple ring on the left"],
                               negative_prompt="blurry", negative_prompt_2=["noise", "grey"]),
    "empty-negative-encoded": dict(force_zeros_for_empty_prompt=False),
    "clip_skip-quirks": dict(clip_skip=1, negative_prompt="blurry", reference_quirks=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_prompt_matches_diffusers(sdxl_text, case):
    """prompt_embeds (penultimate hidden states of both encoders concatenated on channels),
    pooled text_embeds of text_encoder_2, and the negatives (zeros without a negative
    prompt under force_zeros_for_empty_prompt, else the encoded negative prompt, ""
    by default), with prompt_2/negative_prompt_2 and clip_skip, match diffusers'
    StableDiffusionXLPipeline.encode_prompt (fp32, max-abs <= 1e-5). Fails if the hidden
    layer, the concatenation order, the pooled encoder, the "!" padding of tokenizer_2 or
    a default of the prompt arguments differs from diffusers. Also: batch-vs-single
    identity, and new prompts of the same batch size do not retrace the encoders."""
    pipe, ours = sdxl_text
    kw = dict(CASES[case])
    force = kw.pop("force_zeros_for_empty_prompt", True)
    quirks = kw.pop("reference_quirks", False)
    pipe.register_to_config(force_zeros_for_empty_prompt=force)
    with torch.no_grad():
        ref = pipe.encode_prompt(PROMPTS, device="cpu", **kw)
    got = encode_prompt_sdxl(**ours, prompt=PROMPTS, force_zeros_for_empty_prompt=force,
                             reference_quirks=quirks, **kw)
    assert got.prompt_embeds.shape == (2, 77, 32 + 40) and got.pooled_prompt_embeds.shape == (2, 24)
    _compare(ref, got, case)
    if case == "zeros-for-empty":
        assert not np.any(np.asarray(got.negative_prompt_embeds))
        # new prompts and negative prompts of the same batch size never recompile
        from jattn.models import sdxl_text

        before = sdxl_text.trace_count
        encode_prompt_sdxl(**ours, prompt=["a cat", "a dog"], prompt_2="an owl",
                           negative_prompt=["ugly", "bad"])
        assert sdxl_text.trace_count == before
        # batch-vs-single: prompt 1 alone encodes as inside the batch
        one = encode_prompt_sdxl(**ours, prompt=PROMPTS[1])
        np.testing.assert_allclose(np.asarray(one.prompt_embeds)[0],
                                   np.asarray(got.prompt_embeds)[1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(one.pooled_prompt_embeds)[0],
                                   np.asarray(got.pooled_prompt_embeds)[1], rtol=0, atol=1e-6)


def test_clip_skip_on_negative_and_negative_prompt_2_alone(sdxl_text):
    """Without reference_quirks, clip_skip applies to the negative prompt too (diffusers
    always takes hidden_states[-2] there), and negative_prompt_2 without negative_prompt
    is encoded (with "" for text_encoder) instead of being dropped for zeros. Both are
    checked against diffusers' encoding of the same texts as positive prompts. Fails if
    the documented deviations from diffusers' quirks are not what jattn does."""
    pipe, ours = sdxl_text
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    got = encode_prompt_sdxl(**ours, prompt=PROMPTS, negative_prompt="blurry", clip_skip=1)
    with torch.no_grad():
        neg = pipe.encode_prompt(["blurry"] * 2, device="cpu", clip_skip=1,
                                 do_classifier_free_guidance=False)
    assert np.abs(np.asarray(got.negative_prompt_embeds) - neg[0].numpy()).max() <= ATOL
    got = encode_prompt_sdxl(**ours, prompt=PROMPTS, negative_prompt_2="grey")
    with torch.no_grad():
        neg = pipe.encode_prompt(["", ""], prompt_2=["grey"] * 2, device="cpu",
                                 do_classifier_free_guidance=False)
    assert np.abs(np.asarray(got.negative_prompt_embeds) - neg[0].numpy()).max() <= ATOL
    assert np.abs(np.asarray(got.negative_pooled_prompt_embeds) - neg[2].numpy()).max() <= ATOL


def test_refiner_style_text_encoder_2_only(sdxl_text):
    """A model without text_encoder (SDXL refiner) conditions on text_encoder_2 alone, as
    diffusers' encode_prompt with text_encoder=None. Fails if jattn requires both encoders
    or concatenates a missing one."""
    pipe, ours = sdxl_text
    refiner = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=pipe.text_encoder_2, tokenizer=None,
        tokenizer_2=pipe.tokenizer_2, unet=None, scheduler=None, add_watermarker=False,
        force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        ref = refiner.encode_prompt(PROMPTS, device="cpu")
    got = encode_prompt_sdxl(dict(ours["params"], text_encoder=None), None, ours["config_2"],
                             None, ours["tokenizer_2"], PROMPTS,
                             force_zeros_for_empty_prompt=False)
    assert got.prompt_embeds.shape == (2, 77, 40)
    _compare(ref, got, "refiner")


def test_bad_input(sdxl_text):
    """prompt_2 / negative_prompt count mismatches, clip_skip out of range, an over-long
    prompt_2 and a tokenizer without its encoder raise ValueError naming the argument."""
    _, ours = sdxl_text
    with pytest.raises(ValueError, match="prompt_2: 3 prompts for 2"):
        encode_prompt_sdxl(**ours, prompt=PROMPTS, prompt_2=["a", "b", "c"])
    with pytest.raises(ValueError, match="negative_prompt: 1 prompts for 2"):
        encode_prompt_sdxl(**ours, prompt=PROMPTS, negative_prompt=["x"])
    with pytest.raises(ValueError, match="clip_skip=3"):
        encode_prompt_sdxl(**ours, prompt=PROMPTS, clip_skip=3)
    with pytest.raises(ValueError, match="prompt_2 0 has"):
        encode_prompt_sdxl(**ours, prompt="a", prompt_2="word " * 80)
    with pytest.raises(ValueError, match="together"):
        encode_prompt_sdxl(ours["params"], None, ours["config_2"], ours["tokenizer"],
                           ours["tokenizer_2"], "a")
    no_cfg = encode_prompt_sdxl(**ours, prompt="a", do_classifier_free_guidance=False,
                                dtype=jnp.float32)
    assert no_cfg.negative_prompt_embeds is None
