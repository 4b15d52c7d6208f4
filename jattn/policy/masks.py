"""Logit masks per subject: which query pixel may attend to which text token / pixel.

:class:`SubjectMask` is an :class:`~jattn.policy.core.Op` whose ``logit_bias`` turns
per-subject query regions into a ``NEG`` (``finfo(float32).min``, as the reference's
``torch.finfo(dtype).min``: ``exp`` underflows to exactly 0, and a fully masked row stays
finite) logit bias:

* **cross sites** (the conditional half only, by default): a subject token may be attended
  only from its subject's region (the union of the regions of the subjects it belongs to);
  "blocked" tokens (function words) from nowhere, unless they are also a subject's token
  (then inside that subject's region); "background" tokens (EOS) not from the background
  (pixels of no region). Every other token (BOS, other words, padding) is untouched.
  ``include_background``: subject tokens may also be attended from the background and the
  background tokens are not masked (Bounded Attention's guidance passes).
* **self sites** (both halves, by default): a query pixel of some subject cannot attend to
  a key pixel of another subject: blocked iff both pixels lie in regions and share no
  subject. Background pixels attend and are attended freely. (Overlapping regions: a
  pixel in two regions belongs to both.)

Regions are dynamic array leaves, one row per image (``B = G·M``, the layout's groups ×
members): ``boxes`` (fractions ``(x0, y0, x1, y1)``; at a site of ``h × w`` queries the
region is rows ``round(y0·h):round(y1·h)``, cols ``round(x0·w):round(x1·w)``, the
reference's ``_convert_boxes_to_masks``) and/or ``masks`` (any grid, resized to each site
with PyTorch's ``nearest-exact`` rule in-graph); ``use_masks`` (a traced bool) picks the
masks over the boxes. New boxes or masks never recompile.

The masks can also come from an accumulator refined in-graph: with ``refine`` set
(:class:`MaskRefine`) the op records running means of head-averaged self-attention and of
the subjects' leading-token cross-attention at ``refine.record_paths`` and, after the steps
flagged in ``refine.refine_at``, re-clusters them (:func:`refine_masks`, k-means of
:mod:`jattn.policy.kmeans`); the sampler calls the op's ``bind_aux(accumulators)`` before
every UNet call (:func:`jattn.sampling.sampler.sample`), so the next step masks with the
refined regions.

Source: Dahary, Patashnik, Aberman, Cohen-Or, "Be Yourself: Bounded Attention for
Multi-Subject Text-to-Image Generation" (ECCV 2024); omer11a/bounded-attention
``bounded_attention.py`` (``_hide_other_subjects_from_tokens``,
``_hide_other_subjects_from_subjects``, ``_build_self_masks``, ``_obtain_cross_masks``,
``_fix_zero_masks``). Reused by MasaCtrl's and ConsiStory's masked sharing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.policy.core import Layout, Op, SiteContext
from jattn.policy.kmeans import kmeans

Array = jax.Array

__all__ = ["NEG", "box_regions", "resize_nearest_exact", "cross_blocked", "self_blocked",
           "SubjectMask", "MaskRefine", "refine_masks", "assign_clusters", "normalize_maps",
           "final_masks"]

NEG = float(np.finfo(np.float32).min)
EPS = 1e-5  # the reference's BoundedAttention.EPSILON


def box_regions(boxes: Array, h: int, w: int) -> Array:
    """Box regions at an ``h × w`` grid, the reference's rounding.

    Args:
      boxes: float32 ``(..., 4)`` fractions ``(x0, y0, x1, y1)``.
    Returns:
      bool ``(..., h·w)`` (row-major), True at rows ``round(y0·h) ≤ y < round(y1·h)`` and
      cols ``round(x0·w) ≤ x < round(x1·w)`` (``round`` half to even, as Python's).
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    ys = jnp.arange(h, dtype=jnp.float32)
    xs = jnp.arange(w, dtype=jnp.float32)
    x0 = jnp.round(boxes[..., 0] * w)[..., None]
    y0 = jnp.round(boxes[..., 1] * h)[..., None]
    x1 = jnp.round(boxes[..., 2] * w)[..., None]
    y1 = jnp.round(boxes[..., 3] * h)[..., None]
    iny = (ys >= y0) & (ys < y1)                                    # (..., h)
    inx = (xs >= x0) & (xs < x1)                                    # (..., w)
    return (iny[..., :, None] & inx[..., None, :]).reshape(boxes.shape[:-1] + (h * w,))


def _nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch ``nearest-exact``: source index ``floor((dst + 0.5)·n_in/n_out)``."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64),
                      n_in - 1)


def resize_nearest_exact(masks: Array, h: int, w: int) -> Array:
    """``(..., h0, w0) -> (..., h, w)`` by PyTorch's ``F.interpolate(mode='nearest-exact')``
    rule (static indices; identity when the size is unchanged)."""
    h0, w0 = masks.shape[-2:]
    if (h0, w0) == (h, w):
        return masks
    iy = _nearest_exact_index(h0, h)
    ix = _nearest_exact_index(w0, w)
    return masks[..., iy, :][..., ix]


def cross_blocked(region: Array, token_subject: Array, token_blocked: Array | None,
                  token_background: Array | None, include_background: bool = False) -> Array:
    """Which (query pixel, text token) pairs are masked at a cross site.

    Args:
      region: bool ``(B, N, T)``: subject n's region at the site's T query pixels.
      token_subject: bool ``(B, N, S)``: token s is one of subject n's tokens.
      token_blocked: bool ``(B, S)`` or None: tokens masked everywhere (function words).
      token_background: bool ``(B, S)`` or None: tokens masked in the background (EOS).
      include_background: subject tokens also allowed in the background; no background
        masking (the reference's ``include_background`` during guidance).
    Returns:
      bool ``(B, T, S)``: True where the logit gets ``NEG``.
    """
    region = region.astype(bool)
    ts = token_subject.astype(bool)
    background = ~jnp.any(region, axis=1)                           # (B, T)
    if include_background:
        region = region | background[:, None, :]
    allowed = jnp.einsum("bnt,bns->bts", region.astype(jnp.float32),
                         ts.astype(jnp.float32)) > 0                # (B, T, S)
    candidate = jnp.any(ts, axis=1)                                 # (B, S) subject tokens
    if token_blocked is not None:
        candidate = candidate | token_blocked.astype(bool)
    blocked = candidate[:, None, :] & ~allowed
    if token_background is not None and not include_background:
        blocked = blocked | (background[:, :, None] & token_background.astype(bool)[:, None, :])
    return blocked


def self_blocked(region: Array) -> Array:
    """Which (query pixel, key pixel) pairs are masked at a self site.

    Args:
      region: bool ``(B, N, T)`` subject regions.
    Returns:
      bool ``(B, T, T)``: True where both pixels lie in regions and share no subject.
    """
    r = region.astype(jnp.float32)
    inside = jnp.any(region.astype(bool), axis=1)                   # (B, T)
    share = jnp.einsum("bnt,bnu->btu", r, r) > 0
    return inside[:, :, None] & inside[:, None, :] & ~share


def normalize_maps(maps: Array, axis: int = 1, reduce_min: bool = False) -> Array:
    """The reference's ``_normalize_maps``: ``(m − min) / (max − min + 1e-5)`` along the
    query axis (``min`` = 0 unless ``reduce_min``)."""
    mx = jnp.max(maps, axis=axis, keepdims=True)
    mn = jnp.min(maps, axis=axis, keepdims=True) if reduce_min else 0.0
    return (maps - mn) / (mx - mn + EPS)


@struct.dataclass
class MaskRefine:
    """In-graph refinement of :class:`SubjectMask` regions (Bounded Attention).

    Attributes:
      leading: int32 ``(B, N)``: each subject's leading token (its cross map seeds the mask).
      subjects: bool ``(B, N)``: real subjects (False: padding).
      refine_at: bool ``(n_steps,)``: after step i's UNet call, re-cluster (the masks of
        step i+1 on are the refined ones).
      key: PRNG key data ``uint32 (2,)`` of the k-means (folded with the step).
      cross_threshold: float32 ``()``: ``sigmoid(scale·(norm − thr))`` of the cross maps (0.2).
      self_threshold: float32 ``()``: minimum cluster–subject overlap score (0.2).
      record_paths: static; the sites whose maps are averaged (one query resolution).
      n_clusters: static k of the k-means (reference: 3 × subjects).
      n_init: static k-means restarts.
      scale: static sigmoid scale (10).
      name: static; names the accumulator (distinct per refined op of one policy).
    """

    leading: Array
    subjects: Array
    refine_at: Array
    key: Array
    cross_threshold: Array
    self_threshold: Array
    record_paths: tuple = struct.field(pytree_node=False, default=())
    n_clusters: int = struct.field(pytree_node=False, default=6)
    n_init: int = struct.field(pytree_node=False, default=10)
    scale: float = struct.field(pytree_node=False, default=10.0)
    name: str = struct.field(pytree_node=False, default="subject_masks")


def refine_masks(self_mean: Array, cross_mean: Array, existing: Array, boxes: Array,
                 refine: MaskRefine, key: Array, hw: tuple[int, int]) -> Array:
    """One refinement of the reference's ``_build_self_masks`` + ``_fix_zero_masks``.

    Args:
      self_mean: float32 ``(B, T, T)`` running-mean head-averaged self-attention.
      cross_mean: float32 ``(B, T, N)`` running-mean leading-token cross-attention.
      existing: bool/float ``(B, N, T)``: the current regions (boxes at first).
      boxes: float32 ``(B, N, 4)`` box fractions (for the zero-mask fix).
      key: PRNG key (same for every image: image i does not depend on the batch).
      hw: static ``(h, w)`` of the T query pixels.
    Returns:
      float32 ``(B, N, T)`` new regions (1 inside).

    Steps: self maps ``m / (max over queries + ε)``; k-means (``n_clusters``) of their rows;
    cross maps normalised likewise, ``sigmoid(scale·(m − thr))``, min–max normalised,
    times the existing regions; each cluster goes to the subject of largest
    ``|cross ∩ cluster| / min(|cross|, |cluster|)``, dropped when that score is below
    ``self_threshold``; a subject left without pixels takes its box back (removed from the
    others).
    """
    k = refine.n_clusters
    x = normalize_maps(self_mean.astype(jnp.float32))
    labels = jax.vmap(lambda xi: kmeans(xi, k, key, n_init=refine.n_init).labels)(x)  # (B, T)
    return assign_clusters(labels, k, cross_mean, existing, boxes, refine.subjects,
                           refine.cross_threshold, refine.self_threshold, hw, refine.scale)


def assign_clusters(labels: Array, k: int, cross_mean: Array, existing: Array, boxes: Array,
                    subjects: Array, cross_threshold, self_threshold, hw: tuple[int, int],
                    scale: float = 10.0) -> Array:
    """Clusters → subject regions (the reference's ``_build_self_masks`` after the
    clustering, ``_obtain_cross_masks``, ``_fix_zero_masks``).

    Args:
      labels: int32 ``(B, T)`` cluster of each pixel (k clusters, static).
      cross_mean: float32 ``(B, T, N)``; existing: ``(B, N, T)``; boxes ``(B, N, 4)``;
      subjects: bool ``(B, N)``.
    Returns:
      float32 ``(B, N, T)``.
    """
    n = cross_mean.shape[-1]
    cm = normalize_maps(cross_mean.astype(jnp.float32))
    cm = jax.nn.sigmoid(scale * (cm - cross_threshold))
    cm = normalize_maps(cm, reduce_min=True)
    cross = jnp.swapaxes(cm, 1, 2) * existing.astype(jnp.float32)  # (B, N, T)
    onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)          # (B, T, k)
    cl_area = onehot.sum(1, keepdims=True)                          # (B, 1, k)
    cr_area = cross.sum(2, keepdims=True)                           # (B, N, 1)
    inter = jnp.einsum("bnt,btk->bnk", cross, onehot,
                       precision=jax.lax.Precision.HIGHEST)
    min_area = jnp.minimum(cr_area, cl_area)
    ratio = jnp.where(min_area > 0, inter / jnp.where(min_area > 0, min_area, 1.0), 0.0)
    ratio = jnp.where(subjects[:, :, None], ratio, -jnp.inf)
    score_k = jnp.max(ratio, axis=1)                                # (B, k)
    subj_k = jnp.argmax(ratio, axis=1)                              # (B, k)
    subj_t = jnp.take_along_axis(subj_k, labels, axis=1)            # (B, T)
    score_t = jnp.take_along_axis(score_k, labels, axis=1)
    masks = (subj_t[:, None, :] == jnp.arange(n)[None, :, None]) \
        & (score_t[:, None, :] >= self_threshold) & subjects[:, :, None]
    bx = box_regions(boxes, hw[0], hw[1])                            # (B, N, T)
    for j in range(n):  # the reference's _fix_zero_masks, subject by subject
        empty = subjects[:, j] & ~jnp.any(masks[:, j], axis=-1)    # (B,)
        fixed = masks & ~bx[:, j][:, None, :]
        fixed = fixed.at[:, j].set(bx[:, j])
        masks = jnp.where(empty[:, None, None], fixed, masks)
    return masks.astype(jnp.float32)


def _rows(ctx: SiteContext, cond_bias: Array, halves: str) -> Array:
    """Per-image bias ``(B, T, S)`` → the UNet rows ``(rows, 1, T, S)`` (cfg: uncond rows
    zero when ``halves == "cond"``)."""
    x = cond_bias[:, None]
    if not ctx.layout.cfg:
        return x
    other = jnp.zeros_like(x) if halves == "cond" else x
    return jnp.concatenate([other, x], axis=0)


@struct.dataclass
class SubjectMask(Op):
    """Per-subject logit masks (module docstring). B = G·M images (one row per image of
    the layout), N subjects (padded), S text tokens.

    Attributes:
      token_subject: bool ``(B, N, S)``: the subjects' tokens (cross sites).
      token_blocked: bool ``(B, S)`` or None: masked everywhere (function words).
      token_background: bool ``(B, S)`` or None: masked in the background (EOS).
      boxes: float32 ``(B, N, 4)`` fractions or None; a padded subject has an empty box.
      masks: float ``(B, N, h, w)`` or None: regions (> 0.5 inside) on any grid.
      use_masks: bool ``()`` or None: masks instead of boxes when both are given.
      refine: :class:`MaskRefine` or None.
      cross_halves / self_halves: static ``"cond"`` or ``"both"`` (CFG halves masked).
      include_background: static (see :func:`cross_blocked`).
      cross / self_attention: static; mask at cross / self sites.
    Raises (at trace time):
      ValueError: neither boxes nor masks.
    """

    token_subject: Array
    token_blocked: Array | None = None
    token_background: Array | None = None
    boxes: Array | None = None
    masks: Array | None = None
    use_masks: Array | None = None
    refine: MaskRefine | None = None
    cross_halves: str = struct.field(pytree_node=False, default="cond")
    self_halves: str = struct.field(pytree_node=False, default="both")
    include_background: bool = struct.field(pytree_node=False, default=False)
    cross: bool = struct.field(pytree_node=False, default=True)
    self_attention: bool = struct.field(pytree_node=False, default=True)

    needs_probs = True

    def region(self, h: int, w: int) -> Array:
        """bool ``(B, N, h·w)``: the regions at an ``h × w`` grid."""
        if self.boxes is None and self.masks is None:
            raise ValueError("SubjectMask: give boxes or masks")
        from_boxes = None if self.boxes is None else box_regions(self.boxes, h, w)
        if self.masks is None:
            return from_boxes
        m = resize_nearest_exact(self.masks, h, w) > 0.5
        m = m.reshape(m.shape[:2] + (h * w,))
        if from_boxes is None or self.use_masks is None:
            return m
        return jnp.where(self.use_masks, m, from_boxes)

    def logit_bias(self, ctx: SiteContext, q: Array, k: Array) -> Array | None:
        site = ctx.site
        h, w = site.resolution
        if site.kind == "cross":
            if not self.cross:
                return None
            blocked = cross_blocked(self.region(h, w), self.token_subject, self.token_blocked,
                                    self.token_background, self.include_background)
            if blocked.shape[-1] != k.shape[1]:
                raise ValueError(f"SubjectMask.token_subject: {blocked.shape[-1]} tokens, the "
                                 f"site {site.path} has {k.shape[1]} keys")
            halves = self.cross_halves
        else:
            if not self.self_attention:
                return None
            blocked = self_blocked(self.region(h, w))
            if blocked.shape[-1] != k.shape[1]:  # keys shared/concatenated by another op
                raise ValueError(f"SubjectMask at {site.path}: {k.shape[1]} keys for "
                                 f"{blocked.shape[-1]} query pixels; place it before ops "
                                 "that concatenate keys")
            halves = self.self_halves
        bias = jnp.where(blocked, jnp.float32(NEG), jnp.float32(0.0))
        return _rows(ctx, bias, halves)

    # ----------------------------------------------------------- in-graph refinement
    def record(self, ctx: SiteContext, p_pre, p_post) -> dict:
        r = self.refine
        if r is None or ctx.site.path not in r.record_paths:
            return {}
        p = p_pre.astype(jnp.float32)
        if ctx.layout.cfg:
            p = p[p.shape[0] // 2:]
        p = p.mean(axis=1)                                          # (B, T, S) head mean
        if ctx.site.kind == "cross":
            return {"cross": jnp.take_along_axis(p, r.leading[:, None, :], axis=-1)}
        return {"self": p}

    def aux_init(self, sites: Sequence, layout: Layout, context_tokens: int) -> Any:
        r = self.refine
        if r is None:
            return None
        rec = [s for s in sites if s.path in r.record_paths]
        if not rec or len({s.resolution for s in rec}) != 1 \
                or {s.kind for s in rec} != {"self", "cross"}:
            raise ValueError("MaskRefine.record_paths: give self and cross sites of one query "
                             f"resolution (got {[s.path for s in rec]})")
        h, w = rec[0].resolution
        b = layout.groups * layout.members
        n = r.leading.shape[-1]
        t = h * w
        return {_acc_key(r): {
            "self": jnp.zeros((b, t, t), jnp.float32), "self_n": jnp.float32(0),
            "cross": jnp.zeros((b, t, n), jnp.float32), "cross_n": jnp.float32(0),
            "masks": self.region(h, w).astype(jnp.float32).reshape(b, n, h, w),
            "refined": jnp.asarray(False)}}

    def aux_update(self, acc, per_site, step, sites):
        r = self.refine
        if r is None or acc is None:
            return acc
        acc = dict(acc[_acc_key(r)])
        for rec in per_site.values():
            for kind in ("self", "cross"):
                if kind in rec:
                    acc[kind] = acc[kind] + rec[kind]
                    acc[kind + "_n"] = acc[kind + "_n"] + 1.0

        b, n, h, w = acc["masks"].shape

        def do(a):
            key = jax.random.fold_in(jax.random.wrap_key_data(r.key), step)
            masks = refine_masks(a["self"] / jnp.maximum(a["self_n"], 1.0),
                                 a["cross"] / jnp.maximum(a["cross_n"], 1.0),
                                 a["masks"].reshape(b, n, h * w) > 0.5, self.boxes, r, key,
                                 (h, w))
            return dict(a, masks=masks.reshape(b, n, h, w), refined=jnp.asarray(True))

        return {_acc_key(r): jax.lax.cond(r.refine_at[step], do, lambda a: a, acc)}

    def bind_aux(self, accs) -> "SubjectMask":
        """This op reading its masks from its own accumulator, found by ``refine.name`` in
        the tuple of every op's accumulators (the sampler calls it before each UNet call)."""
        if self.refine is None or accs is None:
            return self
        key = _acc_key(self.refine)
        mine = [a for a in accs if isinstance(a, dict) and key in a]
        if not mine:
            return self
        a = mine[0][key]
        return self.replace(masks=a["masks"], use_masks=a["refined"])


def _acc_key(refine: MaskRefine) -> str:
    return "subject_masks/" + refine.name


def final_masks(acc, name: str = "subject_masks"):
    """The regions ``(B, N, h, w)`` float32 held in a policy's accumulators (the
    ``aux`` of ``pipe.generate``) by the refined :class:`SubjectMask` named ``name``, or
    None."""
    key = "subject_masks/" + name
    for a in (acc or ()):
        if isinstance(a, dict) and key in a:
            return a[key]["masks"]
    return None
