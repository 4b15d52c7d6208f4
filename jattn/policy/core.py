"""The attention-policy pytree.

A :class:`Policy` is data handed to the pure UNet function together with the step index.
Its **static** part (hashable, part of the compiled program) says which sites are touched
by which operation; its **dynamic** part (array leaves) holds masks, token weights, step
windows, mappers and scales — changing those never recompiles.

Users write ordered ``(selector, op)`` rules; :func:`resolve` matches them against the
model's sites *before* ``jit`` (first matching rule wins per site; a selector matching no
site raises) and returns a Policy with one entry per touched site. Policies compose with
:func:`compose`: at each site the ops of every policy apply in order.

Each op (:class:`Op`) may act at five stages of an attention call:

1. ``qkv``: where Q, K, V come from (other members of the group, concatenation, AdaIN);
2. ``logit_bias``: an additive logit bias (``-inf`` outside a box);
3. ``edit_probs``: probability replacement / reweighting (forces materialised probs);
4. ``record``: what is captured at the site (aux, aggregated by the sampler; also
   ``record_qkv`` from the final Q, K, V);
5. ``edit_output``: the attention output per head, edited (may read the probabilities
   when they are materialised, and the final Q, K, V).

When no op at a site needs probabilities, the fused kernel runs (``jax.nn.dot_product_attention``).

**Feature seam.** The UNet also calls ``policy.feature(site, x, step)`` at its feature sites
(:class:`jattn.models.features.FeatureSite`: resnet outputs, GroupNorms, FreeU's
backbone/skip inputs). Rules select them with the same :class:`Select` (feature kinds
``"resnet"``, ``"group_norm"``, ``"backbone"``, ``"skip"``). An op acts there at three stages:

6. ``norm_stats`` (GroupNorm sites only): the statistics ``(mean, var)`` to normalise with
   (e.g. shared with a source member); the seam normalises and the GroupNorm applies its
   affine;
7. ``feature``: replace the value (inject a member's feature, FreeU scaling);
8. ``record_feature``: what is captured (aux, aggregated like attention records).

Which seam an op acts at is its class attribute ``seams`` (``("attention",)`` by default,
``("feature",)`` for feature ops): a rule is matched only against the sites of its ops'
seams, so ``Select("")`` with an attention op never touches a feature site.

Batch layout: the UNet batch is ``[uncond; cond]`` halves (with CFG) of ``G × M`` rows
each, ordered group-major (row ``g*M + m``). Ops refer to members by index within a group.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jattn.models.attention import (AttentionSite, apply_probs, attention_logits,
                                    default_attention)
from jattn.models.features import (FEATURE_KINDS, FeatureSite, group_norm_stats,
                                   group_normalize)

Array = jax.Array

__all__ = ["Layout", "SiteContext", "Op", "Select", "Policy", "resolve", "compose",
           "in_window", "PolicyError", "ATTENTION_KINDS", "FEATURE_KINDS", "seam_of"]

ATTENTION_KINDS = ("self", "cross")


def seam_of(site) -> str:
    """``"feature"`` for a :class:`FeatureSite`, else ``"attention"``."""
    return "feature" if isinstance(site, FeatureSite) else "attention"


class PolicyError(ValueError):
    """A policy does not fit the model (unmatched pattern, unknown key, bad layout)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Batch layout of one UNet call: ``halves × groups × members`` rows.

    Attributes:
      groups: G, independent groups (sharded over devices).
      members: M, images of one group that ops relate (member 0 is usually the source).
      cfg: True when the UNet batch is ``[uncond; cond]`` (two halves).
    """

    groups: int = 1
    members: int = 1
    cfg: bool = True

    @property
    def halves(self) -> int:
        return 2 if self.cfg else 1

    @property
    def rows(self) -> int:
        return self.halves * self.groups * self.members

    def split(self, x: Array) -> Array:
        """``(rows, …) -> (halves, G, M, …)``."""
        if x.shape[0] != self.rows:
            raise PolicyError(f"batch of {x.shape[0]} rows does not match layout {self}: expected "
                              f"{self.rows} (halves {self.halves} × groups {self.groups} × "
                              f"members {self.members})")
        return x.reshape((self.halves, self.groups, self.members) + x.shape[1:])

    def merge(self, x: Array) -> Array:
        """Inverse of :meth:`split`."""
        return x.reshape((self.rows,) + x.shape[3:])

    def cond(self, x: Array) -> Array:
        """Conditional half ``(G, M, …)`` of a batch-leading array."""
        return self.split(x)[-1]


@dataclasses.dataclass(frozen=True)
class SiteContext:
    """What an op knows when it runs: the static site (an :class:`AttentionSite` or, at the
    feature seam, a :class:`FeatureSite`), the traced step, the layout."""

    site: AttentionSite | FeatureSite
    step: Array | None
    layout: Layout
    upcast: bool = False


def in_window(step: Array | None, window: Array) -> Array:
    """``start <= step < end`` for a window array ``(2,)`` int32 (True when step is None)."""
    if step is None:
        return jnp.asarray(True)
    return (step >= window[..., 0]) & (step < window[..., 1])


class Op:
    """Base class of policy operations. Subclasses are ``flax.struct.dataclass`` es.

    Class attributes: ``needs_probs``: the op needs materialised probabilities;
    ``seams``: the seams it acts at, ``("attention",)`` (default) and/or ``("feature",)``
    (rules are matched only against those sites).
    """

    needs_probs: bool = False
    seams: tuple[str, ...] = ("attention",)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array
            ) -> tuple[Array, Array, Array]:
        return q, k, v

    def logit_bias(self, ctx: SiteContext, q: Array, k: Array) -> Array | None:
        return None

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        return p

    def record(self, ctx: SiteContext, p_pre: Array | None, p_post: Array | None) -> dict:
        return {}

    def record_qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array) -> dict:
        """What to record from the final Q ``(B, T, N, H)``, K, V ``(B, S, N, H)`` (after
        every op's :meth:`qkv`), merged into the op's :meth:`record` (e.g. a plain pass's
        queries for ConsiStory's query blending, :mod:`jattn.policy.prepass`). Default:
        nothing (no array op is added)."""
        return {}

    def edit_output(self, ctx: SiteContext, out: Array, p: Array | None, q: Array, k: Array,
                    v: Array) -> Array:
        """The attention output ``out`` ``(B, T, N, H)`` (per head, before the heads are
        merged and projected by ``to_out``), edited. ``p``: the (edited) probabilities
        ``(B, N, T, S)`` when they are materialised at this site (some op of the site has
        ``needs_probs`` or a logit bias), else None; ``q``, ``k``, ``v``: as after every
        op's :meth:`qkv`. Runs after every op's :meth:`edit_probs` and :meth:`record`, in
        rule order (e.g. Nested Attention's per-query value of token s*, ConsiStory's
        feature injection). Default: unchanged (no array op is added)."""
        return out

    # ---- feature seam (FeatureSite); x (B, h, w, C), B = halves × G × M rows
    def norm_stats(self, ctx: SiteContext, x: Array) -> tuple[Array, ...] | None:
        """GroupNorm sites only: ``(mean, var)`` float32 ``(B, 1, G, 1)`` to normalise the
        norm's input ``x`` with (:func:`jattn.models.features.group_norm_stats`), or None
        (own statistics). A third element ``keep``, bool ``(B,)``, names rows normalised
        with their own statistics by the very computation of no policy (bit-identical;
        selecting own statistics inside ``mean``/``var`` is not: XLA fuses the reductions
        differently once they feed other rows)."""
        return None

    def feature(self, ctx: SiteContext, x: Array) -> Array:
        """The site's value, edited (GroupNorm sites: the normalised, pre-affine value)."""
        return x

    def record_feature(self, ctx: SiteContext, x_pre: Array, x_post: Array) -> dict:
        """What to record at a feature site: ``x_pre`` before, ``x_post`` after the site's
        edits; aggregated by :meth:`aux_init`/:meth:`aux_update` like :meth:`record`."""
        return {}

    # in-graph aggregation of what record() returns, over the op's sites and the steps
    def aux_init(self, sites: Sequence[AttentionSite], layout: Layout, context_tokens: int
                 ) -> Any:
        """Accumulator for the op's ``sites`` (static), or None."""
        return None

    def on_step(self, latents: Array, acc: Any, step: Array, layout: Layout) -> Array:
        """Per-step callback on the latents ``(R, h, w, C)`` after the scheduler step (R =
        G·M rows), with this op's accumulator (e.g. P2P local blend)."""
        return latents

    def aux_update(self, acc: Any, per_site: dict[str, dict], step: Array,
                   sites: Sequence[AttentionSite]) -> Any:
        """``per_site``: ``{site_path: what record() returned there}`` for one UNet call;
        ``sites``: the op's sites (static)."""
        return acc


@dataclasses.dataclass(frozen=True)
class Select:
    """Which sites a rule applies to.

    Attributes:
      path: regular expression searched in the site's diffusers path (``re.search``);
        ``""`` matches every site.
      kind: attention ``"self"``/``"cross"``, feature ``"resnet"``/``"group_norm"``/
        ``"backbone"``/``"skip"``, a tuple of them, or None (every kind of the seam).
      resolutions: query (feature) resolutions ``((h, w), …)`` or None (all); an int r
        means (r, r).
      blocks: subset of ``("down", "mid", "up")`` or None.
    """

    path: str = ""
    kind: str | tuple[str, ...] | None = None
    resolutions: tuple | None = None
    blocks: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.kind, list):
            object.__setattr__(self, "kind", tuple(self.kind))
        if self.kind is not None:
            allowed = ATTENTION_KINDS + FEATURE_KINDS
            kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
            if (not isinstance(kinds, tuple) or not kinds
                    or any(k not in allowed for k in kinds)):
                raise PolicyError(f"Select.kind={self.kind!r}: use one of {allowed}, a tuple of "
                                  "them, or None")
        if self.blocks is not None:
            bad = set(self.blocks) - {"down", "mid", "up"}
            if bad:
                raise PolicyError(f"Select.blocks has unknown names {sorted(bad)}; use "
                                  "'down', 'mid', 'up'")
        try:
            re.compile(self.path)
        except re.error as e:
            raise PolicyError(f"Select.path={self.path!r} is not a regular expression: {e}") from e

    def matches(self, site: AttentionSite | FeatureSite) -> bool:
        if self.kind is not None:
            kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
            if site.kind not in kinds:
                return False
        if self.blocks is not None and site.block not in self.blocks:
            return False
        if self.resolutions is not None:
            res = {(r, r) if isinstance(r, int) else tuple(r) for r in self.resolutions}
            if tuple(site.resolution) not in res:
                return False
        return re.search(self.path, site.path) is not None


def _as_select(sel) -> Select:
    if isinstance(sel, Select):
        return sel
    if isinstance(sel, str):
        return Select(path=sel)
    if isinstance(sel, dict):
        unknown = set(sel) - {"path", "kind", "resolutions", "blocks"}
        if unknown:
            raise PolicyError(f"selector has unknown keys {sorted(unknown)}; allowed: path, kind, "
                              "resolutions, blocks")
        return Select(**sel)
    raise PolicyError(f"selector {sel!r}: use a path regex string, a dict or a Select")


@struct.dataclass
class Policy:
    """The resolved policy pytree.

    Attributes:
      ops: tuple of ops (their array fields are the dynamic leaves).
      table: static ``((site_path, (op_index, …)), …)``.
      layout: static batch layout.
      sites: static tuple of every attention site of the model (for aggregation shapes).
      context_tokens: static S of cross-attention.
      record_post_edit: static; record the probabilities after edits (P2P's stored-map
        quirk) instead of before.
      feature_sites: static tuple of the feature sites given to :func:`resolve` (empty
        when only attention sites were given).
    """

    ops: tuple = ()
    table: tuple = struct.field(pytree_node=False, default=())
    layout: Layout = struct.field(pytree_node=False, default=Layout())
    sites: tuple = struct.field(pytree_node=False, default=())
    context_tokens: int = struct.field(pytree_node=False, default=77)
    record_post_edit: bool = struct.field(pytree_node=False, default=False)
    feature_sites: tuple = struct.field(pytree_node=False, default=())

    def op_indices(self, path: str) -> tuple[int, ...]:
        for p, idx in self.table:
            if p == path:
                return idx
        return ()

    def sites_of(self, op_index: int) -> tuple[AttentionSite, ...]:
        """The sites op ``op_index`` runs at (static; attention sites, then feature sites)."""
        paths = {p for p, idx in self.table if op_index in idx}
        return tuple(s for s in self.sites + self.feature_sites if s.path in paths)

    # ---------------------------------------------------------------- the seam
    def attend(self, site: AttentionSite, q: Array, k: Array, v: Array, step: Array | None,
               *, upcast: bool = False):
        idx = self.op_indices(site.path)
        if not idx:
            return None
        ops = [self.ops[i] for i in idx]
        ctx = SiteContext(site, step, self.layout, upcast)
        for op in ops:
            q, k, v = op.qkv(ctx, q, k, v)
        biases = [b for b in (op.logit_bias(ctx, q, k) for op in ops) if b is not None]
        needs_probs = bool(biases) or any(op.needs_probs for op in ops)
        aux: dict = {}
        if not needs_probs:
            out = default_attention(q, k, v, upcast=upcast)
            for i, op in zip(idx, ops):
                rec = {**op.record(ctx, None, None), **op.record_qkv(ctx, q, k, v)}
                if rec:
                    aux[str(i)] = rec
            for op in ops:
                out = op.edit_output(ctx, out, None, q, k, v)
            return out, aux
        logits = attention_logits(q, k, upcast=upcast)
        for b in biases:
            logits = logits + b.astype(logits.dtype)
        p_pre = jax.nn.softmax(logits, axis=-1)
        p = p_pre
        for op in ops:
            p = op.edit_probs(ctx, p)
        for i, op in zip(idx, ops):
            rec = {**op.record(ctx, p if self.record_post_edit else p_pre, p),
                   **op.record_qkv(ctx, q, k, v)}
            if rec:
                aux[str(i)] = rec
        out = apply_probs(p.astype(v.dtype), v).astype(q.dtype)
        for op in ops:
            out = op.edit_output(ctx, out, p, q, k, v)
        return out, aux

    def feature(self, site: FeatureSite, x: Array, step: Array | None):
        """The feature seam (:mod:`jattn.models.features`): None when no rule touches the
        site (bit-identical to no policy), else ``(x_new, aux)``.

        At a GroupNorm site ``x`` is the norm's input; the statistics are the last op's
        :meth:`Op.norm_stats` (own statistics when none gives any; rows in its optional
        ``keep`` are normalised with their own, bit for bit), the value is normalised
        with them and then edited by the ops' :meth:`Op.feature`; ``x_new`` is the
        normalised, pre-affine value. Elsewhere the ops' :meth:`Op.feature` edit ``x`` in
        order. Records see the value before and after the edits.
        """
        idx = self.op_indices(site.path)
        if not idx:
            return None
        ops = [self.ops[i] for i in idx]
        ctx = SiteContext(site, step, self.layout)
        if site.kind == "group_norm":
            stats = None
            for op in ops:
                st = op.norm_stats(ctx, x)
                if st is not None:
                    stats = st
            own = None
            if stats is None or len(stats) > 2:  # own statistics, as with no policy
                own = group_normalize(x, *group_norm_stats(x, site.groups), site.groups,
                                      site.eps)
            if stats is None:
                x = own
            else:
                y = group_normalize(x, stats[0], stats[1], site.groups, site.eps)
                if own is not None:  # rows in `keep` (stats[2]) take their own normalisation
                    keep = jnp.reshape(stats[2], (-1,) + (1,) * (x.ndim - 1))
                    y = jnp.where(keep, own, y)
                x = y
        x_pre = x
        for op in ops:
            x = op.feature(ctx, x)
        aux: dict = {}
        for i, op in zip(idx, ops):
            rec = op.record_feature(ctx, x_pre, x)
            if rec:
                aux[str(i)] = rec
        return x, aux

    # ---------------------------------------------------------------- aggregation
    def aux_init(self, latents: Array | None = None) -> tuple:
        """Initial in-graph accumulators, one per op (``None`` for ops recording nothing)."""
        return tuple(op.aux_init(self.sites_of(i), self.layout, self.context_tokens)
                     for i, op in enumerate(self.ops))

    def aux_update(self, acc: tuple, aux: dict, step: Array) -> tuple:
        """Fold one UNet call's aux ``{site_path: {op_index: record}}`` into the accumulators."""
        out = []
        for i, (op, a) in enumerate(zip(self.ops, acc)):
            mine = {path: rec[str(i)] for path, rec in aux.items() if str(i) in rec}
            out.append(op.aux_update(a, mine, step, self.sites_of(i)) if mine else a)
        return tuple(out)

    def on_step(self, state: dict) -> dict:
        """The sampler's per-step callback: each op's :meth:`Op.on_step` in order."""
        x = state["latents"]
        for op, a in zip(self.ops, state["aux"]):
            x = op.on_step(x, a, state["step"], self.layout)
        return dict(state, latents=x)


def resolve(rules: Sequence[tuple[Any, Op | Sequence[Op]]],
            sites: Sequence[AttentionSite | FeatureSite], *,
            layout: Layout = Layout(), context_tokens: int = 77,
            record_post_edit: bool = False) -> Policy:
    """Resolve ordered ``(selector, op or ops)`` rules against a model's sites.

    ``sites`` may hold attention sites (:class:`AttentionSite`), feature sites
    (:class:`FeatureSite`) or both. A rule is matched only against the sites of the seams
    its ops act at (:attr:`Op.seams`): attention ops against attention sites, feature ops
    against feature sites. Per site, the first matching rule gives the site its ops. Every
    selector must match at least one site.

    Args:
      rules: ``[(selector, op), …]``; selector is a path regex, a dict with keys
        path/kind/resolutions/blocks, or a :class:`Select`; op an :class:`Op` or a tuple of
        ops applied in order.
      sites: ``pipeline.sites()`` (attention), ``pipeline.sites(features=True)`` (both),
        ``jattn.models.unet.list_sites`` / ``list_feature_sites``.
      layout: the batch layout the policy will run with.
    Raises:
      PolicyError: a selector matching no site of its seam (names it, lists a few site
        paths); a rule with feature ops when no feature sites were given (says how to get
        them).
    """
    sites = list(sites)
    att_sites = tuple(s for s in sites if seam_of(s) == "attention")
    feat_sites = tuple(s for s in sites if seam_of(s) == "feature")
    ops: list[Op] = []
    op_ids: list[tuple[int, ...]] = []
    selects = []
    rule_seams = []
    for sel, op in rules:
        selects.append(_as_select(sel))
        group = tuple(op) if isinstance(op, (list, tuple)) else (op,)
        for o in group:
            if not isinstance(o, Op):
                raise PolicyError(f"rule for {sel!r}: {o!r} is not a jattn policy Op")
        rule_seams.append({seam for o in group for seam in o.seams})
        op_ids.append(tuple(range(len(ops), len(ops) + len(group))))
        ops.extend(group)
    used = [False] * len(selects)
    table = []
    for site in att_sites + feat_sites:
        seam = seam_of(site)
        for r, sel in enumerate(selects):
            if seam in rule_seams[r] and sel.matches(site):
                used[r] = True
                table.append((site.path, op_ids[r]))
                break
    for r, ok in enumerate(used):
        if not ok and any(seam_of(s) in rule_seams[r] and selects[r].matches(s) for s in sites):
            used[r] = True  # matched, but an earlier rule took those sites
    for r, ok in enumerate(used):
        if ok:
            continue
        pool = [s for s in sites if seam_of(s) in rule_seams[r]]
        what = " or ".join(f"{seam} site" for seam in sorted(rule_seams[r]))
        if "feature" in rule_seams[r] and not feat_sites:
            raise PolicyError(
                f"policy rule {r} selector {selects[r]} acts at feature sites, but no feature "
                "sites were given. Fix: pass `pipe.sites(features=True)` (or add "
                "`jattn.models.unet.list_feature_sites(config, sample_size)`) to resolve.")
        examples = ", ".join(s.path for s in pool[:3])
        raise PolicyError(
            f"policy rule {r} selector {selects[r]} matches no {what} of this model "
            f"({len(pool)} sites, e.g. {examples}). Fix: list the sites with `jattn sites` "
            "(`--features` for feature sites) and correct the pattern/kind/resolution.")
    return Policy(ops=tuple(ops), table=tuple(table), layout=layout, sites=att_sites,
                  context_tokens=context_tokens, record_post_edit=record_post_edit,
                  feature_sites=feat_sites)


def _any_match(sel: Select, sites) -> bool:
    return any(sel.matches(s) for s in sites)


def compose(*policies: Policy) -> Policy:
    """Apply several policies in order at each site (their layouts must agree). The result
    knows the union of their attention and feature sites."""
    policies = [p for p in policies if p is not None]
    if not policies:
        raise PolicyError("compose() needs at least one policy")
    first = policies[0]
    ops: list[Op] = []
    per_site: dict[str, list[int]] = {}
    sites: dict[str, Any] = {}
    feature_sites: dict[str, Any] = {}
    for pol in policies:
        if pol.layout != first.layout:
            raise PolicyError(f"cannot compose policies with layouts {first.layout} and "
                              f"{pol.layout}")
        for s in pol.sites:
            sites.setdefault(s.path, s)
        for s in pol.feature_sites:
            feature_sites.setdefault(s.path, s)
        base = len(ops)
        ops.extend(pol.ops)
        for path, idx in pol.table:
            per_site.setdefault(path, []).extend(base + i for i in idx)
    order = list(sites) + list(feature_sites)
    table = tuple((p, tuple(per_site[p])) for p in order if p in per_site)
    return Policy(ops=tuple(ops), table=table, layout=first.layout,
                  sites=tuple(sites.values()), context_tokens=first.context_tokens,
                  record_post_edit=any(p.record_post_edit for p in policies),
                  feature_sites=tuple(feature_sites.values()))
