"""The attention-policy pytree.

A :class:`Policy` is data handed to the pure UNet function together with the step index.
Its **static** part (hashable, part of the compiled program) says which sites are touched
by which operation; its **dynamic** part (array leaves) holds masks, token weights, step
windows, mappers and scales — changing those never recompiles.

Users write ordered ``(selector, op)`` rules; :func:`resolve` matches them against the
model's sites *before* ``jit`` (first matching rule wins per site; a selector matching no
site raises) and returns a Policy with one entry per touched site. Policies compose with
:func:`compose`: at each site the ops of every policy apply in order.

Each op (:class:`Op`) may act at four stages of an attention call:

1. ``qkv``: where Q, K, V come from (other members of the group, concatenation, AdaIN);
2. ``logit_bias``: an additive logit bias (``-inf`` outside a box);
3. ``edit_probs``: probability replacement / reweighting (forces materialised probs);
4. ``record``: what is captured at the site (aux, aggregated by the sampler).

When no op at a site needs probabilities, the fused kernel runs (``jax.nn.dot_product_attention``).

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

Array = jax.Array

__all__ = ["Layout", "SiteContext", "Op", "Select", "Policy", "resolve", "compose",
           "in_window", "PolicyError"]


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
    """What an op knows when it runs: the static site, the traced step, the layout."""

    site: AttentionSite
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

    Class attribute ``needs_probs``: the op needs materialised probabilities.
    """

    needs_probs: bool = False

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array
            ) -> tuple[Array, Array, Array]:
        return q, k, v

    def logit_bias(self, ctx: SiteContext, q: Array, k: Array) -> Array | None:
        return None

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        return p

    def record(self, ctx: SiteContext, p_pre: Array | None, p_post: Array | None) -> dict:
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
      kind: ``"self"``, ``"cross"`` or None (both).
      resolutions: query resolutions ``((h, w), …)`` or None (all); an int r means (r, r).
      blocks: subset of ``("down", "mid", "up")`` or None.
    """

    path: str = ""
    kind: str | None = None
    resolutions: tuple | None = None
    blocks: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in (None, "self", "cross"):
            raise PolicyError(f"Select.kind={self.kind!r}: use 'self', 'cross' or None")
        if self.blocks is not None:
            bad = set(self.blocks) - {"down", "mid", "up"}
            if bad:
                raise PolicyError(f"Select.blocks has unknown names {sorted(bad)}; use "
                                  "'down', 'mid', 'up'")
        try:
            re.compile(self.path)
        except re.error as e:
            raise PolicyError(f"Select.path={self.path!r} is not a regular expression: {e}") from e

    def matches(self, site: AttentionSite) -> bool:
        if self.kind is not None and site.kind != self.kind:
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
      sites: static tuple of every site of the model (for aggregation shapes).
      context_tokens: static S of cross-attention.
      record_post_edit: static; record the probabilities after edits (P2P's stored-map
        quirk) instead of before.
    """

    ops: tuple = ()
    table: tuple = struct.field(pytree_node=False, default=())
    layout: Layout = struct.field(pytree_node=False, default=Layout())
    sites: tuple = struct.field(pytree_node=False, default=())
    context_tokens: int = struct.field(pytree_node=False, default=77)
    record_post_edit: bool = struct.field(pytree_node=False, default=False)

    def op_indices(self, path: str) -> tuple[int, ...]:
        for p, idx in self.table:
            if p == path:
                return idx
        return ()

    def sites_of(self, op_index: int) -> tuple[AttentionSite, ...]:
        """The sites op ``op_index`` runs at (static)."""
        paths = {p for p, idx in self.table if op_index in idx}
        return tuple(s for s in self.sites if s.path in paths)

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
                rec = op.record(ctx, None, None)
                if rec:
                    aux[str(i)] = rec
            return out, aux
        logits = attention_logits(q, k, upcast=upcast)
        for b in biases:
            logits = logits + b.astype(logits.dtype)
        p_pre = jax.nn.softmax(logits, axis=-1)
        p = p_pre
        for op in ops:
            p = op.edit_probs(ctx, p)
        for i, op in zip(idx, ops):
            rec = op.record(ctx, p if self.record_post_edit else p_pre, p)
            if rec:
                aux[str(i)] = rec
        out = apply_probs(p.astype(v.dtype), v).astype(q.dtype)
        return out, aux

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


def resolve(rules: Sequence[tuple[Any, Op | Sequence[Op]]], sites: Sequence[AttentionSite], *,
            layout: Layout = Layout(), context_tokens: int = 77,
            record_post_edit: bool = False) -> Policy:
    """Resolve ordered ``(selector, op or ops)`` rules against a model's sites.

    The first rule whose selector matches a site gives that site its ops. Every selector
    must match at least one site.

    Args:
      rules: ``[(selector, op), …]``; selector is a path regex, a dict with keys
        path/kind/resolutions/blocks, or a :class:`Select`; op an :class:`Op` or a tuple of
        ops applied in order.
      sites: from ``pipeline.sites()`` or ``jattn.models.unet.list_sites``.
      layout: the batch layout the policy will run with.
    Raises:
      PolicyError: a selector matching no site (names it and lists a few site paths).
    """
    ops: list[Op] = []
    op_ids: list[tuple[int, ...]] = []
    selects = []
    for sel, op in rules:
        selects.append(_as_select(sel))
        group = tuple(op) if isinstance(op, (list, tuple)) else (op,)
        for o in group:
            if not isinstance(o, Op):
                raise PolicyError(f"rule for {sel!r}: {o!r} is not a jattn policy Op")
        op_ids.append(tuple(range(len(ops), len(ops) + len(group))))
        ops.extend(group)
    used = [False] * len(selects)
    table = []
    for site in sites:
        for r, sel in enumerate(selects):
            if sel.matches(site):
                used[r] = True
                table.append((site.path, op_ids[r]))
                break
    for r, ok in enumerate(used):
        if not ok and _any_match(selects[r], sites):
            used[r] = True  # matched, but an earlier rule took those sites
    for r, ok in enumerate(used):
        if not ok:
            examples = ", ".join(s.path for s in list(sites)[:3])
            raise PolicyError(
                f"policy rule {r} selector {selects[r]} matches no attention site of this model "
                f"({len(sites)} sites, e.g. {examples}). Fix: list the sites with `jattn sites` "
                "and correct the pattern/kind/resolution.")
    return Policy(ops=tuple(ops), table=tuple(table), layout=layout, sites=tuple(sites),
                  context_tokens=context_tokens, record_post_edit=record_post_edit)


def _any_match(sel: Select, sites) -> bool:
    return any(sel.matches(s) for s in sites)


def compose(*policies: Policy) -> Policy:
    """Apply several policies in order at each site (their layouts must agree)."""
    policies = [p for p in policies if p is not None]
    if not policies:
        raise PolicyError("compose() needs at least one policy")
    first = policies[0]
    ops: list[Op] = []
    per_site: dict[str, list[int]] = {}
    order: list[str] = [s.path for s in first.sites]
    for pol in policies:
        if pol.layout != first.layout:
            raise PolicyError(f"cannot compose policies with layouts {first.layout} and "
                              f"{pol.layout}")
        base = len(ops)
        ops.extend(pol.ops)
        for path, idx in pol.table:
            per_site.setdefault(path, []).extend(base + i for i in idx)
    table = tuple((p, tuple(per_site[p])) for p in order if p in per_site)
    return Policy(ops=tuple(ops), table=table, layout=first.layout, sites=first.sites,
                  context_tokens=first.context_tokens,
                  record_post_edit=any(p.record_post_edit for p in policies))
