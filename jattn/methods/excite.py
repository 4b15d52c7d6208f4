"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023) on jattn's guidance hook.

At each of the first ``max_iter_to_alter`` steps the UNet runs on the conditional batch
with a policy that records the cross-attention maps of one resolution (``attn_res``,
mean over layers and heads of every cross site there: down, mid, up). Per prompt: the
maps of the text tokens are re-normalised by a softmax over tokens ``×100``, each subject
token's map is smoothed (reflect padding, 3×3 Gaussian) and its maximum taken; the loss is
``max_k max(0, 1 − max A_k)`` and the latents move by ``−α_i ∇_z loss`` with
``α_i = scale_factor · sqrt(linspace(1, 0.5, n_steps))[i]``. At the threshold steps
(``{0: 0.05, 10: 0.5, 20: 0.8}``) the iterative refinement repeats the step while the loss
is above ``1 − threshold`` (at most 20 times): the bounded ``lax.while_loop`` of
:mod:`jattn.sampling.guidance`. Everything runs inside the one compiled sampler loop; new
prompts and subject words are arrays (no recompilation).

Sources: Chefer, Alaluf, Vinker, Wolf, Cohen-Or, "Attend-and-Excite: Attention-Based
Semantic Guidance for Text-to-Image Diffusion Models" (SIGGRAPH 2023),
yuval-alaluf/Attend-and-Excite (``pipeline_attend_and_excite.py``, ``run.py`` config);
diffusers ``StableDiffusionAttendAndExcitePipeline`` (the parity reference of the tests).

Token span of the softmax (``token_span``): the reference normalises over the prompt's
tokens ``[1, EOS)`` (``"prompt"``, default); diffusers' port over ``[1, 76)`` of the 77
(padding included, ``"diffusers"``). Smoothing kernel: both compute the Gaussian as
``exp(−((x − μ)/(2σ))²)`` (a factor 2 inside the square where the textbook has it outside),
normalised; jattn reproduces that kernel. ``attn_res`` default: diffusers' rule
``ceil(width/32)`` (16 at 512 px, i.e. latent/4); the bundled model (128 px) then uses its
4² mid-block maps; SDXL at 1024 px 32², latent/4 again (down_blocks.2, mid and up_blocks.0,
SDXL having no 16² attention). On SDXL the context is both encoders' states and the token
indices are those of ``prompt`` (module :mod:`jattn.methods.p2p`'s note).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io.words import prompt_ids
from jattn.methods.subjects import phrase_tokens
from jattn.policy.capture import Capture
from jattn.policy.core import Layout, Select, resolve
from jattn.sampling.guidance import Guidance

Array = jax.Array

__all__ = ["gaussian_kernel", "smooth_maps", "excite_losses", "excite_guidance",
           "attend_and_excite", "step_sizes", "K_MAX", "DEFAULT_THRESHOLDS"]

K_MAX = 16  # padded number of excited tokens per prompt (a static shape)
DEFAULT_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}


def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> np.ndarray:
    """The references' 2-D smoothing kernel (``exp(−((x − μ)/(2σ))²)``, normalised)."""
    x = np.arange(kernel_size, dtype=np.float32)
    mean = (kernel_size - 1) / 2
    g = (1.0 / (sigma * math.sqrt(2 * math.pi))) * np.exp(-(((x - mean) / (2 * sigma)) ** 2))
    k = np.outer(g, g).astype(np.float32)
    return (k / k.sum()).astype(np.float32)


def smooth_maps(maps: Array, kernel: np.ndarray | None = None) -> Array:
    """Reflect-pad by 1 and convolve with the 3×3 kernel: ``(..., H, W) -> (..., H, W)``."""
    k = gaussian_kernel() if kernel is None else kernel
    h, w = maps.shape[-2:]
    pad = [(0, 0)] * (maps.ndim - 2) + [(1, 1), (1, 1)]
    p = jnp.pad(maps, pad, mode="reflect")
    out = jnp.zeros_like(maps)
    for a in range(3):
        for b in range(3):
            out = out + float(k[a, b]) * p[..., a:a + h, b:b + w]
    return out


def excite_losses(maps: Array, tokens: Array, valid: Array, span: Array) -> tuple[Array, Array]:
    """Per-sample A&E loss and per-token maxima.

    Args:
      maps: ``(B, T, S)`` cross-attention (layer/head mean) at one resolution, T = r².
      tokens: int32 ``(B, K)`` token positions to excite; valid: bool ``(B, K)``.
      span: bool ``(B, S)`` tokens of the softmax (``[1, EOS)`` or ``[1, S−1)``).
    Returns:
      ``(loss (B,), max attention (B, K))``: ``loss = max_k max(0, 1 − max A_k)`` over valid k.
    """
    b, t, s = maps.shape
    r = int(round(math.sqrt(t)))
    logits = jnp.where(span[:, None, :], maps * 100.0, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)                               # (B, T, S)
    sel = jnp.take_along_axis(p, tokens[:, None, :], axis=-1)         # (B, T, K)
    sel = jnp.moveaxis(sel, -1, 1).reshape(b, tokens.shape[1], r, r)  # (B, K, r, r)
    mx = _max_last(smooth_maps(sel).reshape(b, tokens.shape[1], -1))  # (B, K)
    per = jnp.where(valid, jnp.maximum(0.0, 1.0 - mx), 0.0)
    return _max_last(per), mx


def _max_last(x: Array) -> Array:
    """Max over the last axis whose gradient goes to the argmax. (``jnp.max``'s gradient
    goes to the entries equal to the max; inside ``lax.cond``/``while_loop`` XLA may
    recompute the operand with other rounding than the max, then no entry matches and
    the gradient is silently zero.)"""
    idx = jnp.argmax(x, axis=-1)
    return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _excite_loss_fn(acc, step, args):
    key = args["key"] if isinstance(args, dict) and "key" in args else None
    cap = acc[0]
    maps = cap[key] if key else next(v for k, v in cap.items() if k != "steps")
    loss, _ = excite_losses(maps, args["tokens"], args["valid"], args["span"])
    return loss


def step_sizes(n_steps: int, scale_factor: float = 20.0, max_iter_to_alter: int = 25
               ) -> np.ndarray:
    """``scale_factor · sqrt(linspace(1, 0.5, n))`` for steps < ``max_iter_to_alter``, else 0."""
    a = (scale_factor * np.sqrt(np.linspace(1.0, 0.5, n_steps))).astype(np.float32)
    a[max_iter_to_alter:] = 0.0
    return a


def thresholds_array(n_steps: int, thresholds: dict[int, float] | None) -> np.ndarray:
    """Loss targets per step: ``1 − threshold`` at the refinement steps, +inf elsewhere."""
    th = np.full((n_steps,), np.inf, np.float32)
    for k, v in (DEFAULT_THRESHOLDS if thresholds is None else thresholds).items():
        if 0 <= int(k) < n_steps:
            th[int(k)] = max(0.0, 1.0 - float(v))
    return th


def default_attn_res(pipe, width: int) -> int:
    """diffusers' rule ``ceil(width / 32)``, checked against the model's cross sites."""
    return int(math.ceil(width / 32))


def _token_rows(pipe, prompts, excite, token_indices, token_span):
    b = len(prompts)
    tokens = np.zeros((b, K_MAX), np.int32)
    valid = np.zeros((b, K_MAX), bool)
    span = np.zeros((b, 77), bool)
    for i, pr in enumerate(prompts):
        if token_indices is not None:
            toks = np.asarray(token_indices[i], np.int32).reshape(-1)
            n_ids = len(prompt_ids(pipe.tokenizer, pr))
            if toks.size == 0 or toks.min() < 1 or toks.max() >= n_ids - 1:
                raise ValueError(f"token_indices[{i}]: {toks.tolist()} must be positions of "
                                 f"prompt {i}'s words, 1..{n_ids - 2}")
        else:
            words = excite[i]
            if isinstance(words, str):
                words = [words]
            if not words:
                raise ValueError(f"excite[{i}]: give at least one word of prompt {i} to excite")
            toks = np.unique(np.concatenate([phrase_tokens(pipe.tokenizer, pr, w, "excite")
                                             for w in words]))
        if toks.size > K_MAX:
            raise ValueError(f"excite: {toks.size} tokens for prompt {i}, at most {K_MAX}")
        tokens[i, :toks.size] = toks
        valid[i, :toks.size] = True
        if token_span == "diffusers":
            span[i, 1:76] = True
        else:
            span[i, 1:len(prompt_ids(pipe.tokenizer, pr)) - 1] = True
    return tokens, valid, span


def excite_guidance(pipe, prompts: Sequence[str], excite=None, *, token_indices=None,
                    num_inference_steps: int = 50, scale_factor: float = 20.0,
                    max_iter_to_alter: int = 25, thresholds: dict[int, float] | None = None,
                    max_refinement_steps: int = 20, attn_res: int | None = None,
                    height: int | None = None, width: int | None = None,
                    token_span: str = "prompt") -> Guidance:
    """The :class:`Guidance` of Attend-and-Excite for ``prompts`` (see module docstring).

    Args:
      excite: per prompt, a phrase or list of phrases of the prompt (stop words dropped).
      token_indices: per prompt, token positions (diffusers' ``token_indices``) instead.
    """
    if token_span not in ("prompt", "diffusers"):
        raise ValueError(f"token_span={token_span!r}: 'prompt' (reference) or 'diffusers'")
    if (excite is None) == (token_indices is None):
        raise ValueError("excite: give the words to excite (or token_indices), not both")
    b = len(prompts)
    if excite is not None and len(excite) != b:
        raise ValueError(f"excite: {len(excite)} entries for {b} prompts")
    if token_indices is not None and len(token_indices) != b:
        raise ValueError(f"token_indices: {len(token_indices)} entries for {b} prompts")
    height, width = pipe.check_size(height, width, b)
    res = default_attn_res(pipe, width) if attn_res is None else int(attn_res)
    f = pipe.vae_scale_factor
    cross_res = sorted({s.resolution[0] for s in pipe.sites(height, width)
                        if s.kind == "cross"})
    if res not in cross_res:
        raise ValueError(f"attn_res={res}: the model has cross-attention at {cross_res} "
                         f"(latent {height // f}x{width // f}); pick one of them")
    tokens, valid, span = _token_rows(pipe, prompts, excite, token_indices, token_span)
    pol = resolve([(Select(kind="cross", resolutions=(res,)), Capture())],
                  pipe.sites(height, width), layout=Layout(groups=b, members=1, cfg=False))
    n = int(num_inference_steps)
    return Guidance(
        policy=pol, step_size=jnp.asarray(step_sizes(n, scale_factor, max_iter_to_alter)),
        loss_fn=_excite_loss_fn, iterations=1,
        threshold=jnp.asarray(thresholds_array(n, thresholds)),
        max_refine=int(max_refinement_steps), refine_from="current",
        loss_args={"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid),
                   "span": jnp.asarray(span)})


def attend_and_excite(pipe, prompts: str | Sequence[str], excite=None, *, token_indices=None,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      seed=0, latents=None, scheduler: str | None = None,
                      height: int | None = None, width: int | None = None,
                      scale_factor: float = 20.0, max_iter_to_alter: int = 25,
                      thresholds: dict[int, float] | None = None,
                      max_refinement_steps: int = 20, attn_res: int | None = None,
                      token_span: str = "prompt", decode: bool = True):
    """Generate with Attend-and-Excite: one image per prompt (``pipe.generate`` output).

    ``excite``: per prompt the phrases to excite (a single prompt may take a list of
    phrases directly). Defaults are the reference's (SD 1.4: 50 steps, CFG 7.5, scale 20,
    25 altered steps, thresholds {0: .05, 10: .5, 20: .8}, 20 refinement iterations).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
        if excite is not None and (isinstance(excite, str) or all(isinstance(e, str)
                                                                  for e in excite)):
            excite = [excite]
        if token_indices is not None and np.ndim(token_indices) == 1:
            token_indices = [token_indices]
    g = excite_guidance(pipe, list(prompts), excite, token_indices=token_indices,
                        num_inference_steps=num_inference_steps, scale_factor=scale_factor,
                        max_iter_to_alter=max_iter_to_alter, thresholds=thresholds,
                        max_refinement_steps=max_refinement_steps, attn_res=attn_res,
                        height=height, width=width, token_span=token_span)
    return pipe.generate(list(prompts), num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, seed=seed, latents=latents,
                         scheduler=scheduler, height=height, width=width, guidance=g,
                         decode=decode)
