"""Per-member masks from the current cross-attention maps of chosen tokens.

:class:`CrossMapMask` records, at the cross-attention sites it is resolved to, the
head-averaged probabilities of the conditional half, weighted by per-member token weights
(``(G, M, S)``: the tokens of each member's subject word), and after each UNet call folds
them in-graph into masks ``(G, M, h, w)``: the mean over the sites (layers) of this call,
min-max normalised over the positions of each member, ``>= threshold``. A mask provider
that reads the accumulator (:class:`jattn.policy.shared.AuxMask` with ``key="mask"``) then
limits shared attention to it at the next UNet call.

Source: MasaCtrl (Cao et al. ICCV 2023), TencentARC/MasaCtrl ``masactrl/masactrl.py``
(``MutualSelfAttentionControlMaskAuto``: cross maps at 16² of the current step, mean over
heads and layers, ``aggregate_cross_attn_map`` (sum over the token indices, min-max per
image), threshold 0.1). The reference builds the mask inside the same UNet call from the
maps of the layers that already ran; here the masks of step ``i`` come from the maps of
step ``i − 1`` (the sampler binds accumulators before each call); before the first update
the mask is all ones (no restriction, as the reference without maps).

Otsu mode (``mode="otsu"``, ConsiStory, Tewel et al. SIGGRAPH 2024; NVlabs/consistory
``utils/ptp_utils.py`` ``AttentionStore``): the map is the mean over the sites and over the
last ``history`` UNet calls (the reference: 20 steps), kept as ``"map"`` in the
accumulator, and the mask is ``map > otsu_threshold(map)`` per member
(:mod:`jattn.policy.otsu`; :class:`jattn.policy.otsu.OtsuMask` thresholds the map again at
each shared site's resolution, as the reference does at 32² and 64²).

Shapes: probabilities ``(B, N, T, S)`` (B = halves × G × M rows, N heads, T query tokens
``h·w``, S text tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Layout, Op, PolicyError, SiteContext

Array = jax.Array

__all__ = ["CrossMapMask", "threshold_maps"]


def threshold_maps(maps: Array, threshold: Array | float) -> Array:
    """``(…, T)`` maps -> float32 {0, 1} masks: min-max normalised over T, ``>= threshold``.

    A constant map (max = min) gives an all-ones mask (nothing to separate; the reference
    would divide by zero).
    """
    m = maps.astype(jnp.float32)
    lo = jnp.min(m, axis=-1, keepdims=True)
    hi = jnp.max(m, axis=-1, keepdims=True)
    span = hi - lo
    norm = jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return (norm >= jnp.asarray(threshold, jnp.float32)).astype(jnp.float32)


@struct.dataclass
class CrossMapMask(Op):
    """Masks from the token cross-attention maps of each member (module docstring).

    Attributes:
      weights: float32 ``(G, M, S)`` or ``(M, S)`` token weights per member (1 at the
        subject word's tokens: the reference sums the maps of its token indices).
      threshold: float32 ``()`` (the reference: 0.1), dynamic.
      resolution: static ``(h, w)`` of the recorded sites (all selected sites must have it).
      mode: static; ``"minmax"`` (MasaCtrl: min-max, ``>= threshold``) or ``"otsu"``
        (ConsiStory: ``> otsu_threshold``; ``threshold`` unused).
      history: static; the map is the mean of the last ``history`` calls' maps (1: this
        call's; ConsiStory: 20).
    Accumulator: ``{"mask": (G, M, h, w) float32}``; with ``mode="otsu"`` or ``history >
    1`` also ``"map"`` (G, M, h, w), ``"hist"`` (history, G, M, h·w), ``"count"`` int32.
    Raises:
      PolicyError: at a self-attention site or at a site of another resolution.
    """

    weights: Array
    threshold: Array = struct.field(default_factory=lambda: jnp.float32(0.1))
    resolution: tuple = struct.field(pytree_node=False, default=(0, 0))
    mode: str = struct.field(pytree_node=False, default="minmax")
    history: int = struct.field(pytree_node=False, default=1)

    needs_probs = True

    def __post_init__(self):
        if self.mode not in ("minmax", "otsu"):
            raise PolicyError(f"CrossMapMask.mode={self.mode!r}: use 'minmax' or 'otsu'")
        if int(self.history) < 1:
            raise PolicyError(f"CrossMapMask.history={self.history!r}: must be >= 1")

    @property
    def _keeps_map(self) -> bool:
        return self.mode == "otsu" or int(self.history) > 1

    def _weights(self, layout: Layout) -> Array:
        w = jnp.asarray(self.weights, jnp.float32)
        if w.ndim == 2:
            w = w[None]
        if w.ndim != 3 or w.shape[1] != layout.members or w.shape[0] not in (1, layout.groups):
            raise PolicyError(f"CrossMapMask.weights of shape {tuple(w.shape)}: use (G, M, S) "
                              f"or (M, S) with G = {layout.groups}, M = {layout.members}")
        return jnp.broadcast_to(w, (layout.groups,) + w.shape[1:])

    def record(self, ctx: SiteContext, p_pre, p_post):
        if ctx.site.kind != "cross" or tuple(ctx.site.resolution) != tuple(self.resolution):
            raise PolicyError(f"CrossMapMask records cross-attention at {self.resolution}; its "
                              f"rule selected {ctx.site.path} ({ctx.site.kind}, "
                              f"{ctx.site.resolution}). Fix: select kind='cross' at that "
                              "resolution only.")
        lay = ctx.layout
        p = p_pre.astype(jnp.float32).mean(axis=1)                   # (B, T, S)
        p = lay.split(p)[-1]                                          # (G, M, T, S) cond half
        w = self._weights(lay)
        return {"map": jnp.einsum("gmts,gms->gmt", p, w[..., :p.shape[-1]])}

    def aux_init(self, sites: Sequence, layout: Layout, context_tokens: int):
        h, w = self.resolution
        g, m = layout.groups, layout.members
        acc = {"mask": jnp.ones((g, m, h, w), jnp.float32)}
        if self._keeps_map:
            acc.update(map=jnp.zeros((g, m, h, w), jnp.float32),
                       hist=jnp.zeros((int(self.history), g, m, h * w), jnp.float32),
                       count=jnp.int32(0))
        return acc

    def aux_update(self, acc, per_site, step, sites):
        maps = [rec["map"] for rec in per_site.values()]
        if not maps:
            return acc
        mean = sum(maps) / len(maps)                                  # (G, M, T)
        if not self._keeps_map:
            mask = threshold_maps(mean, self.threshold)
            return {"mask": mask.reshape(acc["mask"].shape)}
        k = int(self.history)
        hist = acc["hist"].at[acc["count"] % k].set(mean)
        count = acc["count"] + 1
        mean = jnp.sum(hist, axis=0) / jnp.minimum(count, k).astype(jnp.float32)
        if self.mode == "otsu":
            from jattn.policy.otsu import otsu_mask

            mask = otsu_mask(mean)
        else:
            mask = threshold_maps(mean, self.threshold)
        shape = acc["mask"].shape
        return {"mask": mask.reshape(shape), "map": mean.reshape(shape), "hist": hist,
                "count": count}
