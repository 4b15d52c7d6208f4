"""Prompt-to-Prompt as policy ops: cross-attention replacement/refinement/reweighting,
self-attention replacement, and local blending.

Source: Hertz, Mokady, Tenenbaum, Aberman, Pritch, Cohen-Or, "Prompt-to-Prompt Image
Editing with Cross Attention Control" (ICLR 2023); reference google/prompt-to-prompt@9c472e4
``prompt-to-prompt_stable.ipynb`` (``AttentionReplace``, ``AttentionRefine``,
``AttentionReweight``, ``LocalBlend``) and ``null_text_w_ptp.ipynb`` (``LocalBlend`` with
``substruct_words`` and ``start_blend``).

Batch layout: each group is ``[source, target_1, …, target_{M-1}]``; edits touch only the
conditional half of the CFG batch (as the reference). Shapes: probabilities
``(B, N, T, S)``; mappers ``(M-1, S, S)`` (replace) or ``(M-1, S)`` int (refine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Op, SiteContext, in_window
from jattn.policy.ops import take_members

Array = jax.Array

__all__ = ["CrossEdit", "SelfReplace", "LocalBlend", "local_blend_mask", "apply_local_blend"]


def _cond_split(ctx: SiteContext, p: Array):
    """``(B, N, T, S) -> (halves, G, M, N, T, S)``."""
    return ctx.layout.split(p)


def _per_group(arr: Array, shared_ndim: int, groups: int) -> Array:
    """Arrays are either shared by every group (``shared_ndim`` dims) or per group (a
    leading G axis): return them with the G axis."""
    if arr.ndim == shared_ndim:
        return jnp.broadcast_to(arr[None], (groups,) + arr.shape)
    if arr.ndim == shared_ndim + 1 and arr.shape[0] == groups:
        return arr
    raise ValueError(f"array of shape {arr.shape}: expected {shared_ndim} dims (shared by the "
                     f"groups) or a leading axis of {groups} groups")


@struct.dataclass
class CrossEdit(Op):
    """P2P cross-attention edit of the targets (members 1…M-1) from the source (member 0).

    Every array may carry a leading G axis (one edit per group, e.g. ``(G, steps+1, M-1, S)``)
    or be shared by all groups.

    Attributes:
      alphas: float32 ``(steps + 1, M-1, S)``: per step and token, how much of the edited
        map replaces the target's own (``cross_replace_steps`` windows; reference
        ``get_time_words_attention_alpha``).
      mapper: replace: float32 ``(M-1, S, S)`` token mapper (``einsum('hpw,bwn->bhpn')``);
        refine: int32 ``(M-1, S)`` source token index per target token; reweight only:
        None.
      refine_alphas: float32 ``(M-1, S)``, refine only: 1 where a target token has a source
        counterpart, 0 for new tokens.
      equalizer: float32 ``(M-1, S)`` column weights (reweighting) or None.
      mode: static, ``"replace"``, ``"refine"`` or ``"reweight"`` (reweight of the source's
        maps alone). An equalizer with replace/refine chains the reweighting after them
        (reference ``AttentionReweight(prev_controller=…)``).
    """

    alphas: Array
    mapper: Array | None = None
    refine_alphas: Array | None = None
    equalizer: Array | None = None
    mode: str = struct.field(pytree_node=False, default="replace")

    needs_probs = True

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        x = _cond_split(ctx, p)
        cond = x[-1]                      # (G, M, N, T, S)
        base, tgt = cond[:, 0], cond[:, 1:]
        g = base.shape[0]
        if self.mode == "replace":
            mapper = _per_group(self.mapper, 3, g).astype(base.dtype)    # (G, M-1, S, S)
            new = jnp.einsum("GNTs,GMsS->GMNTS", base, mapper)
        elif self.mode == "refine":
            mapper = _per_group(self.mapper, 2, g)                       # (G, M-1, S)
            # the mapper holds -1 for new tokens (alpha 0): wrap like torch indexing
            gathered = jax.vmap(lambda b, mp: jnp.take(b, mp, axis=-1, mode="wrap"))(
                base, mapper)                                            # (G, N, T, M-1, S)
            gathered = jnp.moveaxis(gathered, -2, 1)                     # (G, M-1, N, T, S)
            ra = _per_group(self.refine_alphas, 2, g)[:, :, None, None, :].astype(base.dtype)
            new = gathered * ra + tgt * (1 - ra)
        elif self.mode == "reweight":
            new = jnp.broadcast_to(base[:, None], tgt.shape)
        else:
            raise ValueError(f"CrossEdit.mode={self.mode!r}")
        if self.equalizer is not None:
            eq = _per_group(self.equalizer, 2, g)
            new = new * eq[:, :, None, None, :].astype(new.dtype)
        step = 0 if ctx.step is None else ctx.step
        alphas = _per_group(self.alphas, 3, g)                           # (G, steps+1, M-1, S)
        a = alphas[:, step][:, :, None, None, :].astype(new.dtype)       # (G, M-1, 1, 1, S)
        new = new * a + (1 - a) * tgt
        cond = jnp.concatenate([base[:, None], new.astype(cond.dtype)], axis=1)
        x = x.at[-1].set(cond)
        return ctx.layout.merge(x)


@struct.dataclass
class SelfReplace(Op):
    """P2P self-attention replacement: targets use the source's self-attention maps during
    the step window ``[start, end)`` (reference ``replace_self_attention``; restrict the
    sites to small query resolutions when resolving, as the reference's 16² limit).

    Attributes:
      window: int32 ``(2,)`` steps.
      via_qkv: static; give the targets the source's queries and keys instead of editing
        materialised probabilities: ``softmax(q_src k_src^T) v_target`` is the same
        product, and the site keeps the fused attention path (no ``T × T`` map). Then
        maps recorded at the same site show the targets' edited maps, so leave it False
        when self-attention is also captured there.
    """

    window: Array
    via_qkv: bool = struct.field(pytree_node=False, default=False)

    @property
    def needs_probs(self) -> bool:
        return not self.via_qkv

    def _to_source(self, ctx: SiteContext, x: Array) -> Array:
        m = ctx.layout.members  # in the window every member takes member 0's rows
        row = jnp.where(in_window(ctx.step, self.window), jnp.zeros(m, jnp.int32),
                        jnp.arange(m, dtype=jnp.int32))
        return take_members(ctx, x, row, "cond")

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        if not self.via_qkv:
            return q, k, v
        return self._to_source(ctx, q), self._to_source(ctx, k), v

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        return p if self.via_qkv else self._to_source(ctx, p)


def _map_grid(t: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid ``(h', w')`` of ``t`` query tokens of a map of latents ``(h, w)``: the UNet
    downsamples both sides by the same factor, so ``h'/w' = h/w`` (rounded as its
    stride-2 convolutions do: ceil)."""
    h, w = latent_hw
    f = 1
    while True:
        hh, ww = -(-h // f), -(-w // f)
        if hh * ww == t:
            return hh, ww
        if hh * ww < t or (hh == 1 and ww == 1):
            raise ValueError(f"local blend: {t} query tokens are not a downsampled grid of "
                             f"the {h}x{w} latents; pass maps shaped (G, M, h', w', S)")
        f *= 2


def local_blend_mask(maps: Array, words: Array, latent_hw: tuple[int, int], threshold: float,
                     pool: bool = True) -> Array:
    """P2P LocalBlend mask from aggregated cross maps.

    Args:
      maps: float ``(G, M, h', w', S)`` cross-attention (layer/head mean) at one
        resolution, or ``(G, M, T, S)`` with ``T = h'·w'`` and the grid following the
        latents' aspect ratio (a power-of-two downsampling of ``latent_hw``).
      words: float ``(M, S)`` (or ``(G, M, S)``) 1 at the tokens of each member's blend
        words.
      latent_hw: ``(h, w)`` of the latents.
      threshold: mask threshold after dividing by the max (reference 0.3).
      pool: 3×3 max-pool before upsampling (the reference pools for the blend words, not
        for ``substruct_words``).
    Returns:
      bool ``(G, M, h, w, 1)`` (not OR-ed with the source; :class:`LocalBlend` does that).
    Raises:
      ValueError: flat maps whose T is no downsampled grid of ``latent_hw``.
    """
    if maps.ndim == 4:
        g, m, t, s = maps.shape
        maps = maps.reshape((g, m) + _map_grid(t, latent_hw) + (s,))
    g, m, mh, mw, _ = maps.shape
    words = _per_group(words, 2, maps.shape[0])
    wmap = jnp.einsum("GMhwS,GMS->GMhw", maps, words)
    if pool:
        wmap = jax.lax.reduce_window(wmap, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 1, 1),
                                     ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = latent_hw
    # nearest upsampling as torch's F.interpolate(mode="nearest"): src = floor(dst * in / out)
    iy = (jnp.arange(h) * mh) // h
    ix = (jnp.arange(w) * mw) // w
    up = wmap[:, :, iy][:, :, :, ix]
    up = up / jnp.max(up, axis=(2, 3), keepdims=True)
    return (up > threshold)[..., None]


def apply_local_blend(latents: Array, mask: Array, groups: int, members: int) -> Array:
    """``x_t = x_src + mask·(x_t − x_src)`` per group, source unchanged.

    latents ``(G·M, h, w, C)``; mask bool ``(G, M, h, w, 1)`` (already OR-ed with the source).
    """
    x = latents.reshape((groups, members) + latents.shape[1:])
    src = x[:, :1]
    out = src + mask.astype(x.dtype) * (x - src)
    return out.reshape(latents.shape)


@struct.dataclass
class LocalBlend(Op):
    """P2P LocalBlend: keep the source's latents outside the edited words' attention.

    Runs at cross-attention sites of ONE query resolution (the reference: the five 16²
    layers of SD at 64² latents, i.e. latent/4). It records the head-averaged cross maps
    (conditional half), sums them over its sites and over the steps so far in-graph, and
    after each scheduler step from ``start_step`` on sets, per target,
    ``x_t = x_src + mask·(x_t − x_src)`` with ``mask = (src_mask OR tgt_mask)
    AND NOT subtract_mask`` (``null_text_w_ptp.ipynb`` semantics).

    Attributes:
      words: float32 ``(M, S)`` or per group ``(G, M, S)``: 1 at each member's blend-word
        tokens (``subtract`` likewise).
      subtract: float32 ``(M, S)`` substruct-word tokens, or None.
      threshold: float32 ``(2,)``: (blend, substract) thresholds (reference 0.3, 0.3).
      start_step: int32 scalar: first step index that blends (reference
        ``int(start_blend·T)``; 0 for the stable notebook).
    """

    words: Array
    threshold: Array
    start_step: Array
    subtract: Array | None = None

    needs_probs = True

    @classmethod
    def build(cls, words, threshold: float, start_step: int, subtract=None, **static):
        """The op from host values: ``threshold`` used for both the blend and the subtract
        mask, ``start_step`` a step index; ``static`` the subclass's static fields."""
        return cls(words=jnp.asarray(words, jnp.float32),
                   threshold=jnp.asarray([threshold, threshold], jnp.float32),
                   start_step=jnp.asarray(int(start_step), jnp.int32),
                   subtract=None if subtract is None else jnp.asarray(subtract, jnp.float32),
                   **static)

    def record(self, ctx, p_pre, p_post):
        p = p_pre.astype(jnp.float32).mean(axis=1)
        if ctx.layout.cfg:
            p = p[p.shape[0] // 2:]
        return {"maps": p}

    def aux_init(self, sites, layout, context_tokens):
        res = {s.resolution for s in sites}
        if len(res) != 1 or any(s.kind != "cross" for s in sites):
            raise ValueError(f"LocalBlend must run at cross-attention sites of one resolution; "
                             f"got {sorted(res)} / kinds {sorted({s.kind for s in sites})}")
        (h, w), = res
        return jnp.zeros((layout.groups, layout.members, h, w, context_tokens), jnp.float32)

    def aux_update(self, acc, per_site, step, sites):
        total = sum(rec["maps"] for rec in per_site.values()) / len(sites)
        return acc + total.reshape(acc.shape)

    def on_step(self, latents, acc, step, layout):
        hw = latents.shape[1:3]
        mask = local_blend_mask(acc, self.words, hw, self.threshold[0], pool=True)
        mask = mask | mask[:, :1]
        if self.subtract is not None:
            sub = local_blend_mask(acc, self.subtract, hw, self.threshold[1], pool=False)
            sub = sub | sub[:, :1]
            mask = mask & ~sub
        blended = apply_local_blend(latents, mask, layout.groups, layout.members)
        return jnp.where(step >= self.start_step, blended, latents)
