"""Ops at the feature seam (:mod:`jattn.models.features`): shared GroupNorm, feature
injection and recording, FreeU.

Legend: B batch (= halves × G groups × M members rows, group-major, CFG halves
``[uncond; cond]``, see :class:`jattn.policy.core.Layout`), h/w feature height/width in
latent cells, C channels, G GroupNorm groups (in shapes like ``(B, 1, G, 1)``).

* :class:`SharedGroupNorm` — GroupNorm statistics over own + a source member's tokens
  (StyleAligned's ``share_group_norm``).
* :class:`FeatureInject` — member ``m`` takes member ``table[m]``'s feature per step
  (Plug-and-Play's resnet injection; ConsiStory's feature injection).
* :class:`FeatureRecord` — record a site's feature over a step window into an in-graph
  accumulator (e.g. DIFT features for ConsiStory), read with :func:`recorded_features`.
* :class:`FreeU` — backbone channel scaling and Fourier low-pass scaling of skip features
  (FreeU); :func:`freeu_rules` / :func:`freeu_policy` build it for any UNet and compose
  with any method (:func:`jattn.policy.core.compose`).

Array fields (factors, tables, windows) are dynamic leaves: new values never recompile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.models.features import group_norm_stats
from jattn.policy.core import (Layout, Op, Policy, PolicyError, Select, SiteContext, in_window,
                               resolve)
from jattn.policy.ops import HALVES, take_members

Array = jax.Array

__all__ = ["SharedGroupNorm", "shared_group_norm_stats", "FeatureInject", "FeatureRecord",
           "recorded_features", "FreeU", "fourier_filter", "freeu_backbone", "FREEU_FACTORS",
           "freeu_factors", "freeu_rules", "freeu_policy"]


def _step_row(table: Array, step: Array | None) -> Array:
    """Row of a per-step table ``(n_steps, M)`` (a step past the end uses the last row), or
    the table itself when it is ``(M,)``."""
    table = jnp.asarray(table)
    if table.ndim == 1:
        return table
    i = 0 if step is None else jnp.clip(step, 0, table.shape[0] - 1)
    return table[i]


def _check_members(name: str, table: Array, layout: Layout) -> None:
    if table.shape[-1] != layout.members:
        raise PolicyError(f"{name} of shape {table.shape}: its last axis must be the "
                          f"{layout.members} members of the layout (build it with "
                          "jattn.policy.ops.member_table)")


def _need_kind(op: str, ctx: SiteContext, kinds: tuple[str, ...]) -> None:
    if ctx.site.kind not in kinds:
        raise PolicyError(f"{op} acts at feature sites of kind {kinds}, but its rule selected "
                          f"{ctx.site.path} (kind {ctx.site.kind!r}). Fix: add "
                          f"kind={kinds if len(kinds) > 1 else kinds[0]!r} to the selector.")


# ------------------------------------------------------------------------- shared GroupNorm


def shared_group_norm_stats(mean: Array, var: Array, src_mean: Array, src_var: Array
                            ) -> tuple[Array, Array]:
    """GroupNorm statistics over the tokens of two equal-sized parts, from each part's own.

    Equal to the statistics of the concatenation ``[x; src]`` along the positions (the
    reference concatenates along H): the mean is the average of the parts' means, the
    (biased) variance the average of the parts' variances about that shared mean, each
    ``var + (mean − shared)²`` (parallel-axis theorem; no cancellation: both terms ≥ 0).
    Working from the statistics keeps the feature itself out of the computation (no gather
    of ``(B, h, w, C)`` rows, no extra reductions).

    Args:
      mean, var, src_mean, src_var: float32 ``(B, 1, G, 1)`` from
        :func:`jattn.models.features.group_norm_stats`.
    Returns:
      ``(mean, var)`` float32 ``(B, 1, G, 1)``.
    """
    shared = (mean + src_mean) * 0.5
    pooled = ((var + jnp.square(mean - shared)) + (src_var + jnp.square(src_mean - shared))) * 0.5
    return shared, pooled


@struct.dataclass
class SharedGroupNorm(Op):
    """GroupNorm whose statistics are taken over own + a source member's tokens.

    Source: Hertz, Voynov et al., "Style Aligned Image Generation via Shared Attention"
    (CVPR 2024); google/style-aligned ``sa_handler.py`` (``register_shared_norm``: the
    GroupNorm input ``(B, C, H, W)`` is concatenated along H with ``expand_first`` of it —
    member 0 of each CFG half — normalised, and the first H rows kept). Here per group of
    the layout, each CFG half from its own half; the source member itself is unchanged
    (bit-identical to no policy: ``keep`` of :meth:`jattn.policy.core.Op.norm_stats`).

    Attributes:
      source: int32 ``(M,)`` or ``(n_steps, M)`` (per step, :func:`jattn.policy.ops.member_table`)
        source member per member (``source[m] = m``: own statistics); None = member 0 for
        every member (the reference).
    Sites: ``group_norm`` feature sites (``Select(kind="group_norm")``).
    Raises:
      PolicyError: at a non-GroupNorm site; a table whose last axis is not M.
    """

    source: Array | None = None

    seams = ("feature",)

    def norm_stats(self, ctx: SiteContext, x: Array) -> tuple[Array, Array, Array]:
        _need_kind("SharedGroupNorm", ctx, ("group_norm",))
        m = ctx.layout.members
        if self.source is None:
            row = jnp.zeros((m,), jnp.int32)
        else:
            table = jnp.asarray(self.source, jnp.int32)
            _check_members("SharedGroupNorm.source", table, ctx.layout)
            row = _step_row(table, ctx.step)
        own_mean, own_var = group_norm_stats(x, ctx.site.groups)
        src_mean = take_members(ctx, own_mean, row, "both")
        src_var = take_members(ctx, own_var, row, "both")
        mean, var = shared_group_norm_stats(own_mean, own_var, src_mean, src_var)
        # members that are their own source (the source member; every member outside the
        # window) are normalised by the seam as with no policy: bit for bit (``keep``)
        lay = ctx.layout
        keep = jnp.broadcast_to(row == jnp.arange(m), (lay.halves, lay.groups, m))
        return mean, var, keep.reshape(-1)

    def feature(self, ctx: SiteContext, x: Array) -> Array:
        _need_kind("SharedGroupNorm", ctx, ("group_norm",))
        return x


# ------------------------------------------------------------------- injection / recording


@struct.dataclass
class FeatureInject(Op):
    """Replace member ``m``'s feature by member ``table[m]``'s at the selected sites.

    Source: Tumanyan et al., "Plug-and-Play Diffusion Features for Text-Driven
    Image-to-Image Translation" (CVPR 2023); MichalGeyer/pnp-diffusers ``pnp_utils.py``
    (``register_conv_control_efficient``: ``up_blocks[1].resnets[1]``'s output of the
    source copied into the target's unconditional and conditional rows at the injection
    timesteps). Also ConsiStory's feature injection (NVlabs/consistory).

    Attributes:
      table: int32 ``(M,)`` or ``(n_steps, M)`` source member per member and step
        (``table[m] = m``: own feature); :func:`jattn.policy.ops.member_table` builds it
        from a step window.
      halves: static; CFG halves edited (``"both"``, ``"cond"``, ``"uncond"``).
      source_half: static; ``"same"`` (each half takes from its own half) or
        ``"cond"``/``"uncond"`` (every edited half takes the source's conditional /
        unconditional row — pnp-diffusers runs the source once, with its own prompt, and
        copies that into both halves of the target).
    Sites: any feature site except GroupNorms (whose value is normalised: allowed too, then
      the normalised value is injected).
    """

    table: Array
    halves: str = struct.field(pytree_node=False, default="both")
    source_half: str = struct.field(pytree_node=False, default="same")

    seams = ("feature",)

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"FeatureInject.halves={self.halves!r}: use one of {HALVES}")
        if self.source_half not in ("same", "cond", "uncond"):
            raise PolicyError(f"FeatureInject.source_half={self.source_half!r}: use 'same', "
                              "'cond' or 'uncond'")

    def feature(self, ctx: SiteContext, x: Array) -> Array:
        table = jnp.asarray(self.table, jnp.int32)
        _check_members("FeatureInject.table", table, ctx.layout)
        row = _step_row(table, ctx.step)
        lay = ctx.layout
        if self.source_half == "same" or not lay.cfg:
            return take_members(ctx, x, row, self.halves)
        parts = lay.split(x)                                        # (halves, G, M, …)
        src = jnp.take(parts[1 if self.source_half == "cond" else 0], row, axis=1)
        src = jnp.broadcast_to(src[None], parts.shape)
        if self.halves != "both":
            keep = jnp.arange(lay.halves) == (1 if self.halves == "cond" else 0)
            src = jnp.where(keep.reshape((-1,) + (1,) * (parts.ndim - 1)), src, parts)
        # members that take themselves keep their own rows (in their own half)
        own = (row == jnp.arange(lay.members)).reshape((1, 1, -1) + (1,) * (parts.ndim - 3))
        return lay.merge(jnp.where(own, parts, src))


@struct.dataclass
class FeatureRecord(Op):
    """Record a feature site's value over a step window (in-graph sum and count).

    Attributes:
      window: int32 ``(2,)`` steps ``start <= step < end`` recorded (dynamic).
      halves: static; rows recorded: ``"cond"`` (default; the conditional half, ``G·M``
        rows), ``"uncond"`` or ``"both"`` (all rows).
      post: static; record the value after the site's edits (default: before).
    Accumulator: ``{site_path: {"sum": (R, h, w, C) float32, "count": () float32}}``;
    :func:`recorded_features` gives the means.
    """

    window: Array = struct.field(default_factory=lambda: jnp.asarray([0, 2 ** 30], jnp.int32))
    halves: str = struct.field(pytree_node=False, default="cond")
    post: bool = struct.field(pytree_node=False, default=False)

    seams = ("feature",)

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"FeatureRecord.halves={self.halves!r}: use one of {HALVES}")

    def _rows(self, layout: Layout) -> int:
        one = layout.groups * layout.members
        return layout.rows if (self.halves == "both" or not layout.cfg) else one

    def record_feature(self, ctx: SiteContext, x_pre: Array, x_post: Array) -> dict:
        x = (x_post if self.post else x_pre).astype(jnp.float32)
        lay = ctx.layout
        if lay.cfg and self.halves != "both":
            x = lay.split(x)[1 if self.halves == "cond" else 0]
            x = x.reshape((-1,) + x.shape[2:])
        return {"x": x}

    def aux_init(self, sites, layout: Layout, context_tokens: int):
        r = self._rows(layout)
        return {s.path: {"sum": jnp.zeros((r,) + tuple(s.resolution) + (s.channels,),
                                          jnp.float32),
                         "count": jnp.zeros((), jnp.float32)} for s in sites}

    def aux_update(self, acc, per_site, step, sites):
        on = in_window(step, jnp.asarray(self.window, jnp.int32))
        out = dict(acc)
        for path, rec in per_site.items():
            a = acc[path]
            out[path] = {"sum": a["sum"] + jnp.where(on, rec["x"], 0.0),
                         "count": a["count"] + on.astype(jnp.float32)}
        return out


def recorded_features(acc: Mapping) -> dict:
    """``{site_path: mean feature (R, h, w, C)}`` from a :class:`FeatureRecord` accumulator
    (zeros where no step was recorded)."""
    return {p: a["sum"] / jnp.maximum(a["count"], 1.0) for p, a in acc.items()}


# --------------------------------------------------------------------------------- FreeU


def fourier_filter(x: Array, threshold: int, scale: Array | float) -> Array:
    """Scale the centred low-frequency square of each channel's 2-D spectrum.

    ``ifft2(ifftshift(fftshift(fft2(x)) · mask)).real`` with ``mask = scale`` on
    ``[H//2 − t, H//2 + t) × [W//2 − t, W//2 + t)`` (Python slice semantics, as the
    reference's tensor slicing), 1 elsewhere.

    Source: Si et al., "FreeU: Free Lunch in Diffusion U-Net" (CVPR 2024), ChenyangSi/FreeU
    ``Fourier_filter``; diffusers ``utils/torch_utils.py`` ``fourier_filter``.

    Args:
      x: ``(B, h, w, C)`` (NHWC; the FFT runs over h, w in float32).
      threshold: t, static int (the reference: 1).
      scale: the low-frequency factor (s1/s2), dynamic.
    Returns:
      ``(B, h, w, C)`` in x's dtype.
    """
    _, h, w, _ = x.shape
    mask = np.zeros((h, w), bool)
    crow, ccol = h // 2, w // 2
    mask[crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = True
    f = jnp.fft.fftshift(jnp.fft.fftn(x.astype(jnp.float32), axes=(1, 2)), axes=(1, 2))
    m = jnp.where(jnp.asarray(mask), jnp.asarray(scale, jnp.float32), jnp.float32(1.0))
    f = f * m[None, :, :, None]
    out = jnp.fft.ifftn(jnp.fft.ifftshift(f, axes=(1, 2)), axes=(1, 2)).real
    return out.astype(x.dtype)


def freeu_backbone(x: Array, b: Array | float, *, mean_scaling: bool = False) -> Array:
    """Scale the first half of the channels of backbone features by ``b``.

    ``mean_scaling=False``: ``x[..., :C//2] · b`` (the first release and diffusers'
    ``apply_freeu``). ``True``: the README's later structure-related scaling,
    ``x[..., :C//2] · ((b − 1)·m̂ + 1)`` with ``m̂`` the channel mean of x min-max normalised
    over the positions of each sample.

    Args:
      x: ``(B, h, w, C)``; b: the backbone factor (dynamic).
    Returns:
      ``(B, h, w, C)`` in x's dtype.
    """
    half = x.shape[-1] // 2
    b = jnp.asarray(b, jnp.float32)
    if mean_scaling:
        hm = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)        # (B, h, w, 1)
        lo = jnp.min(hm, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(hm, axis=(1, 2, 3), keepdims=True)
        factor = (b - 1.0) * ((hm - lo) / (hi - lo)) + 1.0
    else:
        factor = b
    scaled = (x[..., :half].astype(jnp.float32) * factor).astype(x.dtype)
    return jnp.concatenate([scaled, x[..., half:]], axis=-1)


@struct.dataclass
class FreeU(Op):
    """FreeU at one decoder stage: backbone features ×``b`` on the first half of the
    channels, skip features' low frequencies ×``s``.

    Source: Si, Huang, Jiang, Liu, "FreeU: Free Lunch in Diffusion U-Net" (CVPR 2024);
    ChenyangSi/FreeU README code; diffusers ``apply_freeu`` (``utils/torch_utils.py``), called
    in ``UpBlock2D``/``CrossAttnUpBlock2D.forward`` before each resnet's concat with
    ``resolution_idx`` = the up block's index (stage 1 = ``up_blocks.0``, stage 2 =
    ``up_blocks.1``).

    Attributes:
      b: backbone factor (float32 scalar, dynamic).
      s: skip factor (float32 scalar, dynamic).
      threshold: static; half side of the low-frequency square (the reference: 1).
      mean_scaling: static; the README's later mean-based backbone scaling
        (:func:`freeu_backbone`); default the diffusers / first-release form.
    Sites: ``backbone`` and ``skip`` feature sites
      (``Select(kind=("backbone", "skip"))``).
    Differences: diffusers applies FreeU only when all four factors are truthy (a 0 factor
      disables it silently); here the factors apply as given. The original code keys the
      stages on channel counts (see :func:`freeu_rules`).
    Raises:
      PolicyError: at any other kind of site.
    """

    b: Array = struct.field(default_factory=lambda: jnp.float32(1.0))
    s: Array = struct.field(default_factory=lambda: jnp.float32(1.0))
    threshold: int = struct.field(pytree_node=False, default=1)
    mean_scaling: bool = struct.field(pytree_node=False, default=False)

    seams = ("feature",)

    def feature(self, ctx: SiteContext, x: Array) -> Array:
        _need_kind("FreeU", ctx, ("backbone", "skip"))
        if ctx.site.kind == "backbone":
            return freeu_backbone(x, self.b, mean_scaling=self.mean_scaling)
        return fourier_filter(x, self.threshold, self.s)


# (b1, b2, s1, s2) published in ChenyangSi/FreeU's README. The current README (with the
# mean-based backbone scaling in its code): sd1.4, sd1.5, sd2.1, sdxl. The first release
# (README of 2023-09-22 to 2023-10-18, plain scaling as diffusers' apply_freeu): sd1-v1
# (its "SD1.4" entry), sd2.1-v1 (struck through in the current README).
FREEU_FACTORS: dict[str, tuple[float, float, float, float]] = {
    "sd1.4": (1.3, 1.4, 0.9, 0.2),
    "sd1.5": (1.5, 1.6, 0.9, 0.2),
    "sd2.1": (1.4, 1.6, 0.9, 0.2),
    "sdxl": (1.3, 1.4, 0.9, 0.2),
    "sd1-v1": (1.2, 1.4, 0.9, 0.2),
    "sd2.1-v1": (1.1, 1.2, 0.9, 0.2),
}


def freeu_factors(preset: str | None = None, *, b1: float | None = None,
                  b2: float | None = None, s1: float | None = None, s2: float | None = None
                  ) -> tuple[float, float, float, float]:
    """``(b1, b2, s1, s2)`` from a preset of :data:`FREEU_FACTORS`, overridden by the given
    factors; without a preset all four must be given.

    Raises:
      ValueError: an unknown preset (lists them); a factor missing without a preset; a
        factor that is not a finite number.
    """
    given = dict(b1=b1, b2=b2, s1=s1, s2=s2)
    if preset is not None:
        if preset not in FREEU_FACTORS:
            raise ValueError(f"FreeU preset={preset!r}: choose one of "
                             f"{', '.join(FREEU_FACTORS)} or give b1, b2, s1, s2")
        base = dict(zip(("b1", "b2", "s1", "s2"), FREEU_FACTORS[preset]))
    else:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"FreeU: {', '.join(missing)} missing; give all of b1, b2, s1, "
                             f"s2 or a preset ({', '.join(FREEU_FACTORS)})")
        base = {}
    out = {k: (v if v is not None else base[k]) for k, v in given.items()}
    for k, v in out.items():
        if not (isinstance(v, (int, float)) and np.isfinite(v)):
            raise ValueError(f"FreeU {k}={v!r}: must be a finite number")
    return out["b1"], out["b2"], out["s1"], out["s2"]


def freeu_rules(preset: str | None = None, *, b1: float | None = None, b2: float | None = None,
                s1: float | None = None, s2: float | None = None, mean_scaling: bool = False,
                stages: Sequence[int] = (0, 1), threshold: int = 1) -> list:
    """Rules placing :class:`FreeU` at the backbone and skip inputs of every resnet of the
    first two up blocks (stage 1: ``up_blocks.{stages[0]}`` with b1, s1; stage 2:
    ``up_blocks.{stages[1]}`` with b2, s2), as diffusers' ``enable_freeu``.

    Note: the original code keys the stages on the channel count of the hidden states
    (1280 / 640 in SD1), which on SD1 also covers the first resnet of ``up_blocks.2`` and
    gives ``up_blocks.1`` the b1 factor; jattn follows diffusers (by block), which works for
    any channel widths.
    """
    fb1, fb2, fs1, fs2 = freeu_factors(preset, b1=b1, b2=b2, s1=s1, s2=s2)
    if len(stages) != 2:
        raise ValueError(f"freeu_rules stages={tuple(stages)}: give the two up-block indices")
    kinds = ("backbone", "skip")
    return [(Select(path=rf"^up_blocks\.{int(i)}\.", kind=kinds),
             FreeU(jnp.float32(b), jnp.float32(s), threshold=threshold,
                   mean_scaling=mean_scaling))
            for i, b, s in zip(stages, (fb1, fb2), (fs1, fs2))]


def freeu_policy(sites: Sequence, preset: str | None = None, *, layout: Layout = Layout(),
                 **factors) -> Policy:
    """:func:`freeu_rules` resolved against ``sites`` (they must include the feature sites:
    ``pipe.sites(features=True)`` or ``pipe.feature_sites()``); compose it with any method's
    policy (:func:`jattn.policy.core.compose`).

    Args:
      sites: the model's sites (attention sites are ignored).
      preset: a key of :data:`FREEU_FACTORS` (``"sd1.4"``, ``"sd1.5"``, ``"sd2.1"``,
        ``"sdxl"``, ``"sd1-v1"``, ``"sd2.1-v1"``) or None.
      layout: the batch layout of the run.
      factors: b1, b2, s1, s2 (override the preset), mean_scaling, stages, threshold.
    Raises:
      ValueError / PolicyError: bad factors; no feature sites given.
    """
    return resolve(freeu_rules(preset, **factors), sites, layout=layout)
