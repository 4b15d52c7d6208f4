"""Dense correspondence between the members of a group, and injection of attention outputs
along it.

Source: ConsiStory (Tewel, Kaduri, Gal, Kasten, Wolf, Chechik, Atzmon, "Training-Free
Consistent Text-to-Image Generation", SIGGRAPH 2024); NVlabs/consistory
``utils/general_utils.py`` (``gaussian_smooth``, ``cos_dist``, ``gen_nn_map``,
``cyclic_nn_map``), ``consistory_utils.py`` (``FeatureInjector.inject_outputs``,
``swap_strategy='min'``, ``dist_thr='dynamic'``), ``consistory_run.py``
(``run_batch_generation``: DIFT features of the first pass, the injection in a second pass).

Legend: G groups, M members, h/w a grid, T = h·w target tokens, S source tokens, C
feature channels, A source slots per member, N heads, H head dim; B = halves × G × M rows
of a UNet call (:class:`jattn.policy.core.Layout`).

* :func:`gaussian_smooth` — per-channel 3×3 Gaussian (σ 1), zero padding (the reference's
  ``F.conv2d(…, padding=k//2)`` per channel);
* :func:`resize_bilinear` — bilinear resize without antialiasing, half-pixel centres
  (``F.interpolate(mode='bilinear', align_corners=False)``);
* :func:`nearest_neighbours` — for each target token the nearest source token by cosine
  distance ``1 − cos`` of L2-normalised features, source tokens outside the source mask at
  distance 2 (``gen_nn_map``);
* :func:`member_correspondence` — for member ``m`` of every group, the nearest neighbour
  over its source members ``sources[m, a]`` (``swap_strategy='min'``: per target token the
  slot of least distance; a slot equal to ``m`` is off); the reference's
  ``extended_mapping`` (anchors) and ``nn_distances[i][i] = inf``;
* :func:`injection_mask` — where a member's token is injected: its own subject mask and
  distance below Otsu's threshold of its distances (``dist_thr='dynamic'``:
  ``threshold_otsu`` of the per-token minimum distances), members with at least one
  source only;
* :class:`CorrespondenceInject` (``edit_output``) — at its self-attention sites, in a step
  window and the chosen CFG halves: ``out[m, t] := α·out[src_m(t), src_t(t)] + (1 −
  α)·out[m, t]`` where the mask is set. The reference blends the self-attention output
  after ``to_out``; ``to_out`` is affine, so blending the per-head output before it is the
  same map (``α(Wa + b) + (1 − α)(Wc + b) = W(αa + (1 − α)c) + b``), up to rounding.

The correspondence is computed once between two generation passes (arrays → arrays, no
model); its results are dynamic leaves of the injection op: new prompts, masks or features
never recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.policy.core import Op, PolicyError, SiteContext, in_window
from jattn.policy.ops import HALVES
from jattn.policy.otsu import otsu_threshold

Array = jax.Array

__all__ = ["gaussian_kernel", "gaussian_smooth", "resize_bilinear", "cosine_distance",
           "nearest_neighbours", "member_correspondence", "injection_mask",
           "CorrespondenceInject"]

FAR = 2.0   # distance of a source token outside the source mask (gen_nn_map: distances[~m] = 2)


def gaussian_kernel(size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """float32 ``(size, size)`` normalised Gaussian (``gaussian_smooth``'s ``np.fromfunction``
    kernel divided by its sum)."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    k = np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * sigma ** 2)) / (2 * np.pi * sigma ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_smooth(x: Array, size: int = 3, sigma: float = 1.0) -> Array:
    """Per-channel Gaussian smoothing with zero padding.

    Args:
      x: ``(…, h, w, C)``.
      size, sigma: static kernel size (odd) and σ (the reference: 3, 1).
    Returns:
      float32 ``(…, h, w, C)``.
    """
    x = jnp.asarray(x, jnp.float32)
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    xb = x.reshape((-1, h, w, c))
    k = jnp.asarray(gaussian_kernel(size, sigma))
    p = size // 2
    xp = jnp.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))
    out = sum(k[i, j] * xp[:, i:i + h, j:j + w, :] for i in range(size) for j in range(size))
    return out.reshape(lead + (h, w, c))


def resize_bilinear(x: Array, hw: tuple[int, int]) -> Array:
    """``(…, h, w, C)`` -> float32 ``(…, h', w', C)``: bilinear, half-pixel centres, no
    antialiasing (torch's ``F.interpolate(mode='bilinear', align_corners=False)``);
    unchanged when the size matches."""
    x = jnp.asarray(x, jnp.float32)
    if tuple(x.shape[-3:-1]) == tuple(hw):
        return x
    shape = x.shape[:-3] + tuple(hw) + x.shape[-1:]
    return jax.image.resize(x, shape, "linear", antialias=False)


def cosine_distance(a: Array, b: Array, eps: float = 1e-12) -> Array:
    """``1 − cos`` between ``a`` ``(…, T, C)`` and ``b`` ``(…, S, C)`` -> ``(…, T, S)``
    float32 (``F.normalize``: ``x / max(‖x‖, eps)``)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    an = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    bn = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return 1.0 - jnp.einsum("...tc,...sc->...ts", an, bn,
                            precision=jax.lax.Precision.HIGHEST)


def nearest_neighbours(target: Array, source: Array, source_mask: Array
                       ) -> tuple[Array, Array]:
    """Nearest source token of each target token (cosine), inside the source mask.

    Args:
      target: ``(…, T, C)``; source: ``(…, S, C)``; source_mask: ``(…, S)`` bool / {0, 1}.
    Returns:
      ``(index (…, T) int32, distance (…, T) float32)``; sources outside the mask are at
      distance :data:`FAR` (2), so an empty mask gives distance 2 and index 0 (the first
      minimum, as ``torch.min``).
    """
    d = cosine_distance(target, source)                                   # (…, T, S)
    m = jnp.asarray(source_mask, bool)[..., None, :]
    d = jnp.where(m, d, FAR)
    return jnp.argmin(d, axis=-1).astype(jnp.int32), jnp.min(d, axis=-1)


def member_correspondence(features: Array, masks: Array, sources: Array
                          ) -> tuple[Array, Array, Array]:
    """Per member, the nearest token among its source members' subject tokens.

    Args:
      features: float ``(G, M, h, w, C)`` already at the masks' grid (see
        :func:`resize_bilinear`, :func:`gaussian_smooth`).
      masks: bool / {0, 1} ``(G, M, h, w)`` subject masks (the sources' tokens allowed).
      sources: int32 ``(M, A)``: slot ``a`` of member ``m`` reads member ``sources[m, a]``;
        ``m`` itself = off (the reference's ``extended_mapping`` row without the diagonal).
    Returns:
      ``(member, token, distance)``, each ``(G, M, T)``: the source member and its token
      of least distance per target token (slots in order, the first on ties: ``argmin``
      over ``nn_distances[i][mapping]``) and that distance (``inf`` for a member without
      any source).
    """
    f = jnp.asarray(features, jnp.float32)
    g, m, h, w, c = f.shape
    t = h * w
    src = jnp.asarray(sources, jnp.int32)
    if src.ndim == 1:
        src = src[:, None]
    if src.shape[0] != m:
        raise PolicyError(f"sources of shape {tuple(src.shape)}: expected (M, A) with M = {m}")
    ft = f.reshape(g, m, t, c)
    mk = jnp.asarray(masks).reshape(g, m, t) != 0
    idx, dist = [], []
    for a in range(src.shape[1]):
        s = src[:, a]                                                     # (M,)
        i, d = nearest_neighbours(ft, jnp.take(ft, s, axis=1), jnp.take(mk, s, axis=1))
        off = (s == jnp.arange(m))[None, :, None]
        idx.append(i)
        dist.append(jnp.where(off, jnp.inf, d))
    dist_a = jnp.stack(dist, axis=-1)                                     # (G, M, T, A)
    best = jnp.argmin(dist_a, axis=-1)                                    # (G, M, T)
    token = jnp.take_along_axis(jnp.stack(idx, -1), best[..., None], -1)[..., 0]
    member = src[jnp.arange(m)[None, :, None], best]
    distance = jnp.take_along_axis(dist_a, best[..., None], -1)[..., 0]
    return member.astype(jnp.int32), token.astype(jnp.int32), distance


def injection_mask(masks: Array, distance: Array, bins: int = 256) -> Array:
    """Where to inject: own subject mask ∧ distance < Otsu's threshold of the member's
    distances (``dist_thr='dynamic'``), members with a finite distance (some source) only.

    Args:
      masks: ``(G, M, T)`` (or ``(G, M, h, w)``) bool / {0, 1} own subject masks.
      distance: ``(G, M, T)`` from :func:`member_correspondence`.
    Returns:
      bool ``(G, M, T)``.
    """
    d = jnp.asarray(distance, jnp.float32)
    mk = jnp.asarray(masks).reshape(d.shape) != 0
    has = jnp.all(jnp.isfinite(d), axis=-1, keepdims=True)
    thr = otsu_threshold(jnp.where(has, d, 0.0), bins)
    return mk & has & (d < thr[..., None])


@struct.dataclass
class CorrespondenceInject(Op):
    """Blend each member's attention output toward its corresponding source tokens'.

    ``out[m, t] := α·out[member[m, t], token[m, t]] + (1 − α)·out[m, t]`` where
    ``mask[m, t]``, in the step window, in the chosen CFG halves (each half from its own
    half), per group; elsewhere the output is unchanged (bit for bit).

    Attributes:
      member, token: int32 ``(G, M, T)`` (:func:`member_correspondence`; T = h·w of the
        sites, which must all have the arrays' grid).
      mask: bool / {0, 1} ``(G, M, T)`` (:func:`injection_mask`).
      alpha: float32 ``()`` (the reference: 0.8).
      window: int32 ``(2,)`` steps ``start <= i < end``.
      halves: static; ``"cond"`` (the reference: ``hidden_states[batch_size//2:]``),
        ``"uncond"`` or ``"both"``.
      sequential: static; members injected one after another in order, each reading the
        outputs as already injected for the earlier members (the reference's in-place loop
        over the batch, ``old_output = output`` without a clone). False: all from the
        outputs before injection.
    Sites: self-attention (queries and the correspondence on one grid).
    Raises:
      PolicyError: a site whose token count is not T; arrays not ``(G, M, T)``.
    """

    member: Array
    token: Array
    mask: Array
    alpha: Array = struct.field(default_factory=lambda: jnp.float32(0.8))
    window: Array = struct.field(default_factory=lambda: jnp.asarray([0, 2 ** 30], jnp.int32))
    halves: str = struct.field(pytree_node=False, default="cond")
    sequential: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"CorrespondenceInject.halves={self.halves!r}: use one of "
                              f"{HALVES}")

    def edit_output(self, ctx: SiteContext, out: Array, p, q, k, v) -> Array:
        lay = ctx.layout
        g, m = lay.groups, lay.members
        t = out.shape[1]
        member = jnp.asarray(self.member, jnp.int32)
        if member.shape != (g, m, t):
            raise PolicyError(f"CorrespondenceInject at {ctx.site.path} ({t} tokens): member/"
                              f"token/mask of shape {tuple(member.shape)}, expected (G, M, T) "
                              f"= {(g, m, t)}; select sites of the correspondence's grid")
        flat = member * t + jnp.asarray(self.token, jnp.int32)               # (G, M, T)
        on = jnp.asarray(self.mask).astype(bool) & in_window(ctx.step,
                                                             jnp.asarray(self.window, jnp.int32))
        a = jnp.asarray(self.alpha, jnp.float32)
        parts = lay.split(out)                                             # (halves, G, M, T, N, H)
        halves = range(lay.halves) if (self.halves == "both" or not lay.cfg) else \
            [1 if self.halves == "cond" else 0]
        for hf in halves:
            x = parts[hf]
            if self.sequential:
                for mi in range(m):
                    xs = x.reshape((g, m * t) + x.shape[3:])
                    src = jax.vmap(lambda xx, ii: jnp.take(xx, ii, axis=0))(xs, flat[:, mi])
                    mixed = (a * src.astype(jnp.float32)
                             + (1 - a) * x[:, mi].astype(jnp.float32)).astype(x.dtype)
                    x = x.at[:, mi].set(jnp.where(on[:, mi, :, None, None], mixed, x[:, mi]))
            else:
                xs = x.reshape((g, m * t) + x.shape[3:])
                src = jax.vmap(lambda xx, ii: jnp.take(xx, ii.reshape(-1), axis=0))(xs, flat)
                src = src.reshape(x.shape)
                mixed = (a * src.astype(jnp.float32)
                         + (1 - a) * x.astype(jnp.float32)).astype(x.dtype)
                x = jnp.where(on[..., None, None], mixed, x)
            parts = parts.at[hf].set(x)
        return lay.merge(parts)
