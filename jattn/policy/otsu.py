"""Otsu's threshold in-graph, and subject masks from recorded cross maps by Otsu.

Source: Otsu, "A Threshold Selection Method from Gray-Level Histograms" (IEEE SMC 1979);
as ``skimage.filters.threshold_otsu`` (``nbins=256``, histogram over ``[min, max]`` of the
image, threshold = the bin centre maximising the between-class variance). ConsiStory
(Tewel et al. SIGGRAPH 2024; NVlabs/consistory ``utils/general_utils.py``:
``attn_map_to_binary`` = ``map > threshold_otsu(map)``; ``utils/ptp_utils.py``
``AttentionStore.aggregate_last_steps_attention``: the concept token's cross map, mean over
heads, the 32² cross layers and the last 20 steps, upsampled bilinearly to each resolution
of the shared attention, then Otsu per image).

:class:`OtsuMask` is a mask provider (:class:`jattn.policy.shared.MaskProvider`) for
:class:`jattn.policy.shared.SharedAttention`: bound (``bind``) to the continuous map
``(G, M, h, w)`` an accumulator holds (:class:`jattn.policy.cross_masks.CrossMapMask`'s
``"map"``), it resizes the map bilinearly to each site's resolution and thresholds it by
Otsu per member there, as the reference does at 32² and 64².
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import PolicyError, SiteContext

Array = jax.Array

__all__ = ["otsu_threshold", "otsu_mask", "OtsuMask"]


def otsu_threshold(x: Array, bins: int = 256) -> Array:
    """Otsu's threshold of the values of ``x`` over its last axis (batched over the others).

    Same as ``skimage.filters.threshold_otsu(x_i, nbins=bins)`` per row ``x_i`` of float
    values: a histogram of ``bins`` equal bins over ``[min, max]`` (the last bin closed),
    the threshold is the centre of the bin ``k`` maximising ``w0(k)·w1(k+1)·(μ0(k) −
    μ1(k+1))²``; a constant row gives its value.

    Args:
      x: ``(…, T)`` float (any dtype; computed in float32).
      bins: static number of histogram bins (skimage's default 256).
    Returns:
      float32 ``(…,)``.
    """
    x = jnp.asarray(x, jnp.float32)
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    idx = jnp.clip(jnp.floor((x - lo) / safe * bins), 0, bins - 1).astype(jnp.int32)
    hist = jnp.sum(jax.nn.one_hot(idx, bins, dtype=jnp.float32), axis=-2)     # (…, bins)
    edges = lo + span * (jnp.arange(bins + 1, dtype=jnp.float32) / bins)
    centers = (edges[..., :-1] + edges[..., 1:]) / 2
    w0 = jnp.cumsum(hist, axis=-1)
    w1 = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    m0 = jnp.cumsum(hist * centers, axis=-1) / jnp.maximum(w0, 1e-30)
    m1 = (jnp.cumsum((hist * centers)[..., ::-1], axis=-1)
          / jnp.maximum(w1[..., ::-1], 1e-30))[..., ::-1]
    var = w0[..., :-1] * w1[..., 1:] * (m0[..., :-1] - m1[..., 1:]) ** 2
    k = jnp.argmax(var, axis=-1)
    thr = jnp.take_along_axis(centers, k[..., None], axis=-1)[..., 0]
    return jnp.where(span[..., 0] > 0, thr, lo[..., 0])


def otsu_mask(maps: Array, bins: int = 256) -> Array:
    """``(…, T)`` maps -> float32 {0, 1} masks ``map > otsu_threshold(map)`` (strict, as
    the reference's ``attn_map_to_binary``; a constant map gives an empty mask)."""
    thr = otsu_threshold(maps, bins)
    return (jnp.asarray(maps, jnp.float32) > thr[..., None]).astype(jnp.float32)


@struct.dataclass
class OtsuMask:
    """Masks by Otsu at each site's resolution from a continuous map in an accumulator.

    Attributes:
      op_index: static; the producing op's index in the policy's ``ops``.
      key: static; the accumulator entry with the map ``(G, M, h, w)`` (``"map"`` of
        :class:`jattn.policy.cross_masks.CrossMapMask`).
      bins: static; histogram bins (256).
      map: filled by :meth:`bind` (the sampler's accumulators before each UNet call).
    """

    op_index: int = struct.field(pytree_node=False, default=0)
    key: str = struct.field(pytree_node=False, default="map")
    bins: int = struct.field(pytree_node=False, default=256)
    map: Array | None = None

    def bind(self, acc: Sequence[Any]) -> "OtsuMask":
        return self.replace(map=acc[self.op_index][self.key])

    def site_mask(self, ctx: SiteContext) -> Array:
        """float32 ``(G, M, h·w)`` at the site's resolution."""
        from jattn.policy.shared import _as_gm, resize_mask

        if self.map is None:
            raise PolicyError("OtsuMask has no map: it is filled from the sampler's "
                              "accumulators (run it through jattn's sampler)")
        m = _as_gm(jnp.asarray(self.map), ctx.layout, "OtsuMask")
        r = resize_mask(m, ctx.site.resolution)
        return otsu_mask(r.reshape(r.shape[:2] + (-1,)), self.bins)
