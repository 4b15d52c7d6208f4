"""Attention sharing between the members of a group: AdaIN of Q/K toward a source member,
shared (concatenated) keys and values with a score scale/shift, masked sharing with mask
dropout. Generic ops; the methods compose them:

* StyleAligned (Hertz, Voynov et al. CVPR 2024; google/style-aligned ``sa_handler.py``:
  ``adain``, ``calc_mean_std``, ``concat_first``, ``shifted_scaled_dot_product_attention``):
  :class:`AdaIN` of Q and K toward member 0, then :class:`SharedAttention` with K, V :=
  concat[own; member 0], ``k_scale`` = ``shared_score_scale``, ``shift`` =
  ``shared_score_shift``; ``full_attention_share`` = :func:`shared_table` with
  ``sources="all"`` and no AdaIN, no scale, no shift (the reference's ``__call__`` then
  runs plain attention over each CFG half's concatenated tokens, bypassing
  ``shared_call``);
* MasaCtrl (Cao et al. ICCV 2023; TencentARC/MasaCtrl): the union variant = concat[own;
  member 0]; the mask variants = ``own=False`` (Q attends to member 0's K, V only) with a
  mask over member 0's tokens (``match_query=True``: foreground queries of the target to
  the source's foreground, background to background, as ``MutualSelfAttentionControlMask``);
* ConsiStory (Tewel et al. SIGGRAPH 2024; NVlabs/consistory ``consistory_attention_
  processor.py``, ``attention_store.py``: ``get_extended_attn_mask_instance``, mask
  dropout in ``aggregate_last_steps_attention``): each member attends to its own tokens and
  to the anchors' tokens inside their subject masks, the masks dropped out with p = 0.5.

Member tables are int32 dynamic leaves (:func:`shared_table`, or ``ops.member_table``
for :class:`AdaIN`): new sources or step windows never recompile. A table entry equal to
the member itself means "no source" (the slot is off).

Shapes: q ``(B, T, N, H)``, k and v ``(B, S, N, H)``; B = halves × G × M rows (``Layout``),
group-major, CFG halves ``[uncond; cond]``. With ``A`` source slots the keys/values that
:meth:`SharedAttention.qkv` returns are ``(B, S·(1 + A), N, H)`` (own first, then the
slots in order); :class:`jattn.policy.core.Policy` runs the fused kernel on them, or
materialised probabilities when a logit bias (shift, mask, excluded slots) is produced.

Exactness outside a window / for the source member: a row whose slots are all off sees
``[own; own …]`` on the fused path (the same distribution, not the same bits) or ``-inf``
on its off slots on the bias path (rounded differently from the fused kernel), so
:meth:`SharedAttention.edit_output` replaces those rows by plain attention over their own
keys and values, computed by the fused call of no policy and selected with ``jnp.where``:
bit-identical to no policy (at the same batch), at the cost of one plain attention of the
site's rows, or of the source's rows only (``plain_members=(0,)``, as StyleAligned and
MasaCtrl use; cost in ``configs/style_aligned_world.py``). AdaIN leaves rows without a
source bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.models.attention import default_attention
from jattn.policy.core import Op, PolicyError, SiteContext
from jattn.policy.ops import HALVES, _member_rows, take_members, window_mask

Array = jax.Array

__all__ = ["adain_tokens", "token_stats", "AdaIN", "shared_table", "SharedAttention",
           "MaskProvider", "GivenMask", "AuxMask", "resize_mask", "drop_mask", "group_keys"]


# ---------------------------------------------------------------------------------------
# AdaIN of queries / keys / values toward a source member


def token_stats(x: Array, eps: float = 1e-5) -> tuple[Array, Array]:
    """Per row, head and channel: mean and ``sqrt(var + eps)`` over the tokens.

    Args:
      x: ``(B, T, N, H)``. The variance is unbiased (``T − 1`` in the denominator), as
        torch's ``var`` in the reference's ``calc_mean_std``.
    Returns:
      ``(mean, std)`` float32, each ``(B, 1, N, H)``.
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=1, keepdims=True)
    var = jnp.sum((xf - mean) ** 2, axis=1, keepdims=True) / max(x.shape[1] - 1, 1)
    return mean, jnp.sqrt(var + eps)


def adain_tokens(x: Array, src_mean: Array, src_std: Array, eps: float = 1e-5) -> Array:
    """AdaIN over tokens: ``(x − μ_x)/σ_x · σ_src + μ_src`` per row, head and channel.

    Source: Huang & Belongie (ICCV 2017); StyleAligned's ``adain`` on Q and K
    (google/style-aligned ``sa_handler.py``), statistics from :func:`token_stats`.

    Args:
      x: ``(B, T, N, H)``; src_mean, src_std: ``(B, 1, N, H)`` the source's statistics
        (already gathered per row).
    Returns:
      ``(B, T, N, H)`` in x's dtype.
    """
    mean, std = token_stats(x, eps)
    out = (x.astype(jnp.float32) - mean) / std * src_std + src_mean
    return out.astype(x.dtype)


def _step_row(table: Array, step: Array | None) -> Array:
    """Row of a per-step table (``(n, …)``; a step past the table uses its last row)."""
    i = 0 if step is None else jnp.clip(step, 0, table.shape[0] - 1)
    return table[i]


@struct.dataclass
class AdaIN(Op):
    """AdaIN of Q, K and/or V toward a source member of the same group and CFG half.

    Member ``m`` of each group gets, at every token, ``(x − μ_m)/σ_m · σ_s + μ_s`` with
    ``s = table[m]``: mean and std per head and channel over the tokens (unbiased variance
    + ``eps``; :func:`token_stats`). Where ``table[m] == m`` the member is left unchanged
    (bit for bit; the reference normalises member 0 toward itself, a no-op up to rounding).

    Source: StyleAligned (Hertz, Voynov et al. CVPR 2024), google/style-aligned
    ``sa_handler.py`` (``adain_queries``, ``adain_keys``, ``adain_values``; source = the
    first member of each CFG half, ``expand_first``).

    Attributes:
      q_from, k_from, v_from: int32 ``(M,)`` or ``(n_steps, M)`` (per step; a step past
        the table uses its last row), source member per member, or None (untouched).
        ``ops.member_table`` builds them (``{m: 0 for m in 1..M-1}`` for StyleAligned).
      eps: static; added to the variance (the reference: 1e-5).
      halves: static; CFG halves edited (``"both"`` as the reference, ``"cond"``,
        ``"uncond"``).
    Keeps the fused attention path.
    """

    q_from: Array | None = None
    k_from: Array | None = None
    v_from: Array | None = None
    eps: float = struct.field(pytree_node=False, default=1e-5)
    halves: str = struct.field(pytree_node=False, default="both")

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"AdaIN.halves={self.halves!r}: use one of {HALVES}")

    def _apply(self, ctx: SiteContext, x: Array, table: Array | None) -> Array:
        if table is None:
            return x
        table = jnp.asarray(table, jnp.int32)
        m = ctx.layout.members
        if table.ndim not in (1, 2) or table.shape[-1] != m:
            raise PolicyError(f"AdaIN table of shape {table.shape}: use (M,) or (n_steps, M) "
                              f"with M = {m} members of the layout")
        row = table if table.ndim == 1 else _step_row(table, ctx.step)
        mean, std = token_stats(x, self.eps)                      # (B, 1, N, H)
        src_mean = take_members(ctx, mean, row)
        src_std = take_members(ctx, std, row)
        moved = ((x.astype(jnp.float32) - mean) / std * src_std + src_mean).astype(x.dtype)
        on = _member_rows(ctx, row != jnp.arange(m), self.halves)  # (B,)
        return jnp.where(on[:, None, None, None], moved, x)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        return (self._apply(ctx, q, self.q_from), self._apply(ctx, k, self.k_from),
                self._apply(ctx, v, self.v_from))


# ---------------------------------------------------------------------------------------
# Masks over the source's tokens


class MaskProvider(Protocol):
    """What :class:`SharedAttention` needs from a mask: the mask of every member's tokens
    at a site, ``(G, M, T)`` with T = the site's ``h·w`` query tokens (self-attention:
    S = T), values in [0, 1] (binarised at 0.5 by the op)."""

    def site_mask(self, ctx: SiteContext) -> Array: ...


def resize_mask(mask: Array, hw: tuple[int, int]) -> Array:
    """``(…, h, w)`` -> float32 ``(…, h', w')`` (bilinear, as ConsiStory's
    ``F.interpolate(mode='bilinear')``; unchanged when the size matches)."""
    mask = jnp.asarray(mask, jnp.float32)
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    return jax.image.resize(mask, mask.shape[:-2] + tuple(hw), "linear")


def _as_gm(mask: Array, layout, what: str) -> Array:
    g, m = layout.groups, layout.members
    if mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[1] != m or mask.shape[0] not in (1, g):
        raise PolicyError(f"{what}: mask of shape {tuple(mask.shape)}; expected (G, M, h, w) "
                          f"or (M, h, w) with G = {g} groups, M = {m} members")
    return jnp.broadcast_to(mask, (g, m) + mask.shape[2:])


@struct.dataclass
class GivenMask:
    """A given mask: float or bool ``(G, M, h, w)`` or ``(M, h, w)`` (every group), any
    grid; resized bilinearly to each site's resolution (:func:`resize_mask`). Dynamic: a
    new mask never recompiles (a new grid size does)."""

    mask: Array

    def site_mask(self, ctx: SiteContext) -> Array:
        m = _as_gm(jnp.asarray(self.mask), ctx.layout, "GivenMask")
        r = resize_mask(m, ctx.site.resolution)
        return r.reshape(r.shape[:2] + (-1,))


@struct.dataclass
class AuxMask:
    """A mask read from the sampler's accumulator of another op of the same policy (e.g.
    a recorder that thresholds cross-attention maps in its ``aux_update``).

    The sampler calls :meth:`SharedAttention.bind_aux` before every UNet call with the
    accumulators as they are after the previous step (ConsiStory likewise uses the masks
    aggregated up to the previous step); before the producer's first update the mask is
    whatever its ``aux_init`` holds.

    Attributes:
      op_index: static; index of the producing op in the policy's ``ops``.
      key: static; the accumulator entry (a dict key) holding the mask, or None (the
        accumulator is the mask). The entry is ``(G, M, h, w)`` or ``(M, h, w)``.
      mask: filled by :meth:`bind` (None until then: using it unbound raises).
    """

    op_index: int = struct.field(pytree_node=False, default=0)
    key: str | None = struct.field(pytree_node=False, default=None)
    mask: Array | None = None

    def bind(self, acc: Sequence[Any]) -> "AuxMask":
        a = acc[self.op_index]
        return self.replace(mask=a if self.key is None else a[self.key])

    def site_mask(self, ctx: SiteContext) -> Array:
        if self.mask is None:
            raise PolicyError("AuxMask has no mask: it is filled from the sampler's "
                              "accumulators (run it through jattn's sampler, or use GivenMask)")
        return GivenMask(self.mask).site_mask(ctx)


def group_keys(keys: Array) -> Array:
    """Typed PRNG keys ``(G,)`` from typed keys or integer seeds ``(G,)``."""
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.vmap(jax.random.key)(keys.astype(jnp.uint32))


def drop_mask(mask: Array, p: Array | float, keys: Array, step: Array | None,
              salt: int = 0) -> Array:
    """Mask dropout: each token of a (binary) mask is dropped with probability ``p``.

    ConsiStory (NVlabs/consistory ``attention_store.py``, ``aggregate_last_steps_attention``:
    ``rand < mask_dropout -> False``, p = 0.5, one draw per step and resolution). Here the
    draw of group ``g`` comes from ``fold_in(fold_in(keys[g], step), salt)`` only, so a
    group's dropout does not depend on the other groups of the batch (batch-invariant);
    the reference draws once for the whole batch from ``torch.manual_seed(0)``.

    Args:
      mask: ``(G, M, T)`` bool or {0, 1}.
      p: drop probability in [0, 1] (traced).
      keys: ``(G,)`` typed keys or integer seeds, one per group.
      step: the step index (None = 0).
      salt: static int folded in (the site's resolution: sites of one resolution share
        the pattern, as the reference's per-resolution draw).
    Returns:
      bool ``(G, M, T)``.
    """
    keys = group_keys(keys)
    g = mask.shape[0]
    if keys.shape[0] != g:
        raise PolicyError(f"mask dropout keys of shape {tuple(keys.shape)}: one key per group "
                          f"(G = {g})")
    s = jnp.int32(0) if step is None else jnp.asarray(step, jnp.int32)
    u = jax.vmap(lambda k: jax.random.uniform(
        jax.random.fold_in(jax.random.fold_in(k, s), salt), mask.shape[1:]))(keys)
    return jnp.asarray(mask, bool) & (u >= jnp.asarray(p, jnp.float32))


# ---------------------------------------------------------------------------------------
# Shared attention


def shared_table(num_steps: int, members: int,
                 sources: Mapping[int, int | Sequence[int]] | str, *,
                 window: tuple[float, float] | tuple[int, int] = (0.0, 1.0),
                 steps: np.ndarray | None = None) -> np.ndarray:
    """A per-step source table ``(num_steps, M, A)`` int32 for :class:`SharedAttention`.

    Entry ``[i, m, a]`` is the member whose keys/values member ``m`` also attends to in
    slot ``a`` at step ``i``; ``m`` itself means the slot is off (outside the window, for
    members without sources, and as padding when members have different numbers of
    sources).

    Args:
      num_steps: denoising steps; members: M.
      sources: ``{member: source or [sources…]}``; ``"all"``: every member attends to all
        the other members (StyleAligned's ``full_attention_share``, ConsiStory with every
        member an anchor); ``"first"``: members 1..M-1 attend to member 0 (StyleAligned).
      window: ``(start, end)`` fractions in [0, 1] (``int(f·n)``) or step indices; steps
        ``start <= i < end``.
      steps: optional bool ``(num_steps,)`` ANDed with the window.
    Raises:
      ValueError: members outside ``[0, M)``, a member listed as its own source, a bad
        window, or no source at all.
    """
    n, m = int(num_steps), int(members)
    if isinstance(sources, str):
        if sources == "all":
            sources = {i: [j for j in range(m) if j != i] for i in range(m)}
        elif sources == "first":
            sources = {i: 0 for i in range(1, m)}
        else:
            raise ValueError(f"sources={sources!r}: use a {{member: sources}} mapping, 'all' "
                             "or 'first'")
    lists = {int(k): ([int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v])
             for k, v in sources.items()}
    for k, v in lists.items():
        if not 0 <= k < m or any(not 0 <= x < m for x in v):
            raise ValueError(f"sources={dict(sources)}: members must be in [0, {m})")
        if k in v:
            raise ValueError(f"sources: member {k} lists itself; a member always attends to "
                             "its own tokens")
    a = max((len(v) for v in lists.values()), default=0)
    if a == 0:
        raise ValueError(f"sources={dict(sources)}: no member has a source (a group of one "
                         "member shares nothing; give at least two members)")
    on = window_mask(n, window, steps)
    table = np.tile(np.arange(m, dtype=np.int32)[None, :, None], (n, 1, a))
    for k, v in lists.items():
        for j, src in enumerate(v):
            table[on, k, j] = src
    return table


def _concrete(x) -> np.ndarray | None:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            return np.asarray(x)
        except Exception:  # noqa: BLE001  (e.g. not fully addressable)
            return None
    return None


@struct.dataclass
class SharedAttention(Op):
    """Shared self-attention: each member also attends to source members' tokens.

    At the sites it is resolved to, member ``m`` of every group gets keys and values
    ``concat[own; source_1; …; source_A]`` along the tokens (``own=True``), each source
    from the same group and CFG half; per slot ``a`` the source is ``sources[…, m, a]``,
    a slot equal to ``m`` being off. On the source slots the keys are multiplied by
    ``k_scale`` (StyleAligned's ``shared_score_scale``, in ``qkv``) and the logits get
    ``+shift`` (``shared_score_shift``: a logit bias, as the reference's
    ``shifted_scaled_dot_product_attention`` adds it to ``logits[..., T:]``), and, with a
    mask, ``-inf`` outside the source's mask (after mask dropout).

    Rows whose slots are all off (the source member; every row outside the window) get
    their plain attention bit for bit (:meth:`edit_output`).

    Reference differences (numerically none for the output): StyleAligned also runs member
    0 through the shared path (attending to ``[own; own]``, shifted, AdaIN toward itself),
    which gives member 0 its plain attention up to rounding; here member 0's slot is off
    and its attention is the plain one, bit for bit.

    Attributes:
      sources: int32 ``(M,)`` (one slot, every step), ``(n_steps, M)`` (one slot per step)
        or ``(n_steps, M, A)`` (A slots; a step past the table uses its last row);
        :func:`shared_table` builds it.
      k_scale: float32 ``()`` or None: scale of the source keys (None: 1, no multiply).
      shift: float32 ``()`` or None: logit bias on the source columns (None: no bias, the
        fused kernel stays unless a mask is given).
      mask: a :class:`MaskProvider` (:class:`GivenMask`, :class:`AuxMask`) or None: the
        source columns are limited to the source's mask (its tokens where mask >= 0.5).
      dropout: float32 ``()`` or None: mask dropout probability (ConsiStory: 0.5); needs
        ``mask`` and ``keys``.
      keys: ``(G,)`` typed PRNG keys or integer seeds, one per group (:func:`drop_mask`).
      own: static; True: concat[own; sources] (StyleAligned, ConsiStory, MasaCtrl union);
        False: the keys/values are the source's only (one slot; MasaCtrl, with a mask for
        its mask variants); rows whose slot is off keep their own K, V.
      match_query: static; with a mask, query token t of member m may attend to the
        source tokens whose mask value equals m's own mask value at t (foreground queries
        to the source's foreground, background to background): MasaCtrl's mask variant
        (``MutualSelfAttentionControlMask``: two restricted attentions, foreground and
        background of the source, blended by the target's mask — the same as one
        attention whose row t is restricted by the target's mask at t). The bias is then
        ``(B, 1, T, S')`` instead of ``(B, 1, 1, S')``.
      halves: static; CFG halves that share (``"both"`` as the references, ``"cond"``,
        ``"uncond"``); rows of the other half are off.
      exclude_off: static; produce the ``-inf`` bias on off slots even without shift and
        mask. Needed (own=True) when a row can have some slots on and some off (e.g.
        anchors that are members) and no mask/shift is given: on the fused path an off slot
        holds the row's own keys again, which is exact only when all its slots are off.
      plain_members: static; the members whose rows get plain attention when all their
        slots are off (:meth:`edit_output`), a tuple of member indices (e.g. ``(0,)``, the
        source: only its rows are recomputed, 1/M of the cost), None (every member: also
        exact outside the window; the default) or ``()`` (none: no recomputation, for
        policies whose rows are never all off, e.g. ConsiStory's anchors-and-members inside
        its window: the recomputation costs it ~1.09x). Other members' off rows keep the
        shared path's result (plain attention up to rounding).
    Raises:
      PolicyError: bad halves, own=False with several slots, dropout without mask/keys, a
        concrete table with mixed on/off rows on the fused path, tables not matching M.
    """

    sources: Array
    k_scale: Array | None = None
    shift: Array | None = None
    mask: Any = None
    dropout: Array | None = None
    keys: Array | None = None
    own: bool = struct.field(pytree_node=False, default=True)
    match_query: bool = struct.field(pytree_node=False, default=False)
    halves: str = struct.field(pytree_node=False, default="both")
    exclude_off: bool = struct.field(pytree_node=False, default=False)
    plain_members: tuple | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"SharedAttention.halves={self.halves!r}: use one of {HALVES}")
        if self.match_query and self.mask is None:
            raise PolicyError("SharedAttention.match_query needs a mask (the members' masks "
                              "decide which source tokens each query token may attend to)")
        if self.dropout is not None and (self.mask is None or self.keys is None):
            raise PolicyError("SharedAttention.dropout needs a mask and keys (one PRNG key or "
                              "seed per group) so that the draw is per group and per step")
        if not hasattr(self.sources, "shape"):
            return
        nd = len(self.sources.shape)
        if nd not in (1, 2, 3):
            raise PolicyError(f"SharedAttention.sources of shape {self.sources.shape}: use "
                              "(M,), (n_steps, M) or (n_steps, M, A)")
        slots = self.sources.shape[-1] if nd == 3 else 1
        if not self.own and slots != 1:
            raise PolicyError(f"SharedAttention(own=False) takes one source slot, got {slots}")
        t = _concrete(self.sources)
        if t is not None and self.own and not self.has_bias and slots > 1:
            t3 = t.reshape(t.shape[:2] + (-1,)) if t.ndim == 3 else t
            off = t3 == np.arange(t3.shape[1])[None, :, None]
            if np.any(off.any(-1) & ~off.all(-1)):
                raise PolicyError(
                    "SharedAttention.sources has rows with some slots on and some off, and no "
                    "mask or shift: set exclude_off=True (off slots then get a -inf logit bias)")

    @property
    def has_bias(self) -> bool:
        return self.shift is not None or self.mask is not None or self.exclude_off

    def bind_aux(self, acc: Sequence[Any]) -> "SharedAttention":
        """Fill an :class:`AuxMask` from the sampler's accumulators (see :class:`AuxMask`)."""
        if self.mask is not None and hasattr(self.mask, "bind"):
            return self.replace(mask=self.mask.bind(acc))
        return self

    def _rows(self, ctx: SiteContext) -> Array:
        """The slot table of this step, int32 ``(M, A)``."""
        t = jnp.asarray(self.sources, jnp.int32)
        m = ctx.layout.members
        if t.shape[-2 if t.ndim == 3 else -1] != m:
            raise PolicyError(f"SharedAttention.sources of shape {t.shape}: its member axis "
                              f"must be the {m} members of the layout")
        if t.ndim == 1:
            return t[:, None]
        row = _step_row(t, ctx.step)
        return row if row.ndim == 2 else row[:, None]

    def _on(self, ctx: SiteContext, rows: Array) -> Array:
        """bool ``(B, A)``: slot a of row b is on."""
        m = ctx.layout.members
        return jnp.stack([_member_rows(ctx, rows[:, a] != jnp.arange(m), self.halves)
                          for a in range(rows.shape[1])], axis=-1)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        rows = self._rows(ctx)
        on = self._on(ctx, rows)
        ks, vs = [k] if self.own else [], [v] if self.own else []
        for a in range(rows.shape[1]):
            sk = take_members(ctx, k, rows[:, a])
            sv = take_members(ctx, v, rows[:, a])
            if self.k_scale is not None:
                sk = (sk * jnp.asarray(self.k_scale, jnp.float32)).astype(k.dtype)
            o = on[:, a][:, None, None, None]
            ks.append(jnp.where(o, sk, k))
            vs.append(jnp.where(o, sv, v))
        if len(ks) == 1:
            return q, ks[0], vs[0]
        return q, jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1)

    def edit_output(self, ctx: SiteContext, out: Array, p: Array | None, q: Array, k: Array,
                    v: Array) -> Array:
        """Rows whose slots are all off (the source member, every row outside the window)
        get plain attention over their own keys and values, computed by the same fused call
        as no policy (:func:`jattn.models.attention.default_attention`) and selected with
        ``jnp.where``: bit-identical to no policy, whatever path the shared rows took. Only
        the rows of ``plain_members`` (static) are recomputed when it is given."""
        rows = self._rows(ctx)
        off = ~jnp.any(self._on(ctx, rows), axis=-1)                   # (B,)
        s = k.shape[1] // (rows.shape[1] + (1 if self.own else 0))
        if self.plain_members is not None and len(self.plain_members) == 0:
            return out
        if self.plain_members is None:
            plain = default_attention(q, k[:, :s], v[:, :s], upcast=ctx.upcast)
            return jnp.where(off[:, None, None, None], plain, out)
        lay = ctx.layout
        idx = np.arange(lay.rows).reshape(lay.halves, lay.groups, lay.members)
        idx = idx[:, :, list(self.plain_members)].reshape(-1)         # static rows
        plain = default_attention(q[idx], k[idx, :s], v[idx, :s], upcast=ctx.upcast)
        return out.at[idx].set(jnp.where(off[idx, None, None, None], plain, out[idx]))

    def source_mask(self, ctx: SiteContext, rows: Array) -> Array | None:
        """bool ``(B, Tq, A, S)``: the source tokens each row (and, with ``match_query``,
        each of its T query tokens; Tq = 1 otherwise) may attend to per slot: the slot's
        source member's mask after dropout; None without a mask."""
        if self.mask is None:
            return None
        lay = ctx.layout
        mk = self.mask.site_mask(ctx) >= 0.5                          # (G, M, T)
        own_mk = mk
        if self.dropout is not None:
            h, w = ctx.site.resolution
            mk = drop_mask(mk, self.dropout, self.keys, ctx.step, salt=h * 65536 + w)
        per_slot = jnp.stack([jnp.take(mk, rows[:, a], axis=1)
                              for a in range(rows.shape[1])], axis=2)  # (G, M, A, S)
        full = jnp.broadcast_to(per_slot[None], (lay.halves,) + per_slot.shape)
        allowed = full.reshape((lay.rows, 1) + per_slot.shape[2:])    # (B, 1, A, S)
        if not self.match_query:
            return allowed
        q_in = jnp.broadcast_to(own_mk[None], (lay.halves,) + own_mk.shape)
        q_in = q_in.reshape(lay.rows, -1)[:, :, None, None]            # (B, T, 1, 1)
        return jnp.where(q_in, allowed, ~allowed)                      # (B, T, A, S)

    def logit_bias(self, ctx: SiteContext, q: Array, k: Array) -> Array | None:
        if not self.has_bias:
            return None
        rows = self._rows(ctx)
        on = self._on(ctx, rows)                                      # (B, A)
        b, a = on.shape
        s = k.shape[1] // (a + (1 if self.own else 0))
        shift = jnp.float32(0.0) if self.shift is None else jnp.asarray(self.shift, jnp.float32)
        allowed = self.source_mask(ctx, rows)                         # (B, Tq, A, S)
        tq = 1 if allowed is None else allowed.shape[1]
        cols = jnp.broadcast_to(shift, (b, tq, a, s))
        if allowed is not None:
            cols = jnp.where(allowed, cols, -jnp.inf)
        if self.own:
            cols = jnp.where(on[:, None, :, None], cols, -jnp.inf)    # off slots excluded
            cols = jnp.concatenate([jnp.zeros((b, tq, 1, s), jnp.float32), cols], axis=2)
        else:
            # one slot: off rows keep their own keys unbiased; a query whose allowed source
            # tokens are none would have every logit -inf: it attends to the whole source
            ok = on[:, None, :1, None] & jnp.any(jnp.isfinite(cols), axis=-1, keepdims=True)
            cols = jnp.where(ok, cols, 0.0)
        return cols.reshape(b, 1, tq, -1)
