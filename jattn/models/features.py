"""The feature seam: where a policy may read or replace intermediate UNet features.

Legend: B batch, h/w height/width in latent cells, C channels, G GroupNorm groups.

Besides attention (:mod:`jattn.models.attention`), the UNet offers a second seam at a few
static points, each described by a :class:`FeatureSite` named by its diffusers path:

======================  ===========================================  ==================
kind                    path (diffusers module)                      value ``x``
======================  ===========================================  ==================
``"resnet"``            ``up_blocks.1.resnets.1``                    the block's output
``"resnet_residual"``   ``up_blocks.1.resnets.1.conv2``              the residual branch
                                                                     (conv2's output,
                                                                     before the shortcut
                                                                     is added)
``"group_norm"``        ``up_blocks.1.resnets.1.norm1`` / ``.norm2``, the norm's input
                        ``up_blocks.1.attentions.0.norm``,           (see below)
                        ``conv_norm_out``
``"backbone"``          ``up_blocks.0.resnets.2.backbone``           hidden states
                                                                     entering the resnet
                                                                     (before the concat)
``"skip"``              ``up_blocks.0.resnets.2.skip``               the skip feature
                                                                     concatenated there
======================  ===========================================  ==================

(``backbone``/``skip`` have no diffusers module: they are the two inputs of the
``torch.cat`` before each up-block resnet, where FreeU acts — diffusers' ``apply_freeu``.)

At each point the UNet calls :func:`feature_seam`, which calls ``policy.feature(site, x,
step)`` **only if the policy object has a ``feature`` method** (models/ knows no policy
type). It returns ``None`` (untouched: the UNet continues with ``x`` itself, so a policy
without feature rules is bit-identical to no policy, the jaxpr is unchanged) or
``(x_new, aux)``.

**GroupNorm sites** (kind ``"group_norm"``): the seam is called with the norm's *input*
``x`` ``(B, h, w, C)`` before any statistics are taken, and a returned ``x_new`` is the
*normalised, pre-affine* value ``(x − mean)/sqrt(var + eps)`` (float32); the GroupNorm then
applies its own ``scale``/``bias``. A policy that wants other statistics (StyleAligned's
shared GroupNorm: mean/var over own + a source member's tokens) computes them with
:func:`group_norm_stats` and normalises with :func:`group_normalize` — the very functions
the plain GroupNorm uses, so replacing the statistics by the same statistics gives the
same normalised bits (what XLA fuses downstream can still move the UNet output by an ulp
when the policy's graph differs: seen at ``-O0`` only). ``site.groups`` and ``site.eps``
give G and eps.

Aux: ``aux`` is a dict of arrays; the UNet returns it beside the attention aux under the
site's path, ``{site_path: aux}`` (only when non-empty).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["FeatureSite", "FEATURE_KINDS", "feature_seam", "group_norm_stats",
           "group_normalize", "FeatureSiteRecorder"]

FEATURE_KINDS = ("resnet", "resnet_residual", "group_norm", "backbone", "skip")


@dataclasses.dataclass(frozen=True)
class FeatureSite:
    """Static description of one feature point of a model (hashable).

    Attributes:
      path: diffusers module path (``"up_blocks.1.resnets.1"``, ``"….norm1"``) or, for
        ``backbone``/``skip``, the resnet's path + ``".backbone"`` / ``".skip"``.
      kind: one of :data:`FEATURE_KINDS`.
      resolution: ``(h, w)`` of the feature map in latent cells.
      channels: C.
      block: ``"down"``, ``"mid"``, ``"up"`` or ``""`` (``conv_norm_out``).
      groups: G for ``group_norm`` sites (0 otherwise).
      eps: the GroupNorm epsilon for ``group_norm`` sites (0 otherwise).
    """

    path: str
    kind: Literal["resnet", "resnet_residual", "group_norm", "backbone", "skip"]
    resolution: tuple[int, int]
    channels: int
    block: str = ""
    groups: int = 0
    eps: float = 0.0

    def describe(self) -> str:
        h, w = self.resolution
        extra = f"  groups={self.groups}" if self.kind == "group_norm" else ""
        return f"{self.path}  kind={self.kind}  res={h}x{w}  channels={self.channels}{extra}"


def feature_seam(site: FeatureSite, x: Array, policy: Any = None, step: Array | None = None
                 ) -> tuple[Array, dict] | None:
    """THE feature seam. Returns ``None`` when nothing touches the site, else
    ``(x_new, aux)`` with ``x_new`` of x's shape.

    Args:
      site: static description of the point.
      x: ``(B, h, w, C)`` the feature (GroupNorm sites: the norm's input).
      policy: ``None`` or any object; its ``feature(site, x, step)`` is called if it has one.
      step: int32 scalar step index or ``None``.
    Raises:
      ValueError: the policy returned a wrong shape.
    """
    fn = getattr(policy, "feature", None) if policy is not None else None
    if fn is None:
        return None
    res = fn(site, x, step)
    if res is None:
        return None
    out, aux = res
    if out.shape != x.shape:
        raise ValueError(f"{site.path}: policy feature returned shape {out.shape}, expected "
                         f"{x.shape}")
    return out, aux


def _grouped(x: Array, groups: int) -> Array:
    """``(B, …, C) -> (B, P, G, C/G)`` float32 (P the positions)."""
    c = x.shape[-1]
    return x.astype(jnp.float32).reshape(x.shape[0], -1, groups, c // groups)


def group_norm_stats(x: Array, groups: int, mean: Array | None = None
                     ) -> tuple[Array, Array]:
    """GroupNorm statistics of ``x`` ``(B, …, C)``: mean and (biased, two-pass) variance
    over every position and the ``C/G`` channels of each group, float32 ``(B, 1, G, 1)``.

    ``mean``: centre the variance on this mean instead of x's own.
    """
    xg = _grouped(x, groups)
    own = jnp.mean(xg, axis=(1, 3), keepdims=True)
    m = own if mean is None else mean
    var = jnp.mean(jnp.square(xg - m), axis=(1, 3), keepdims=True)
    return own, var


def group_normalize(x: Array, mean: Array, var: Array, groups: int, eps: float) -> Array:
    """``(x − mean)·rsqrt(var + eps)`` per group, float32 of x's shape (no affine).

    mean, var: ``(B, 1, G, 1)`` as from :func:`group_norm_stats`.
    """
    xg = _grouped(x, groups)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)


class FeatureSiteRecorder:
    """A policy that records the feature sites it sees (in call order) and changes nothing.

    Used by :func:`jattn.models.unet.list_feature_sites` under ``jax.eval_shape``.
    """

    def __init__(self) -> None:
        self.sites: list[FeatureSite] = []

    def attend(self, site, q, k, v, step, *, upcast):  # noqa: D102
        return None

    def feature(self, site, x, step):  # noqa: D102
        self.sites.append(site)
        return None
