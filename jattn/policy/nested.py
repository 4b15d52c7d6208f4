"""Nested Attention: a per-query value of the subject token s* at cross-attention sites.

Source: Patashnik, Gal, Ostashev, Tulyakov, Aberman, Cohen-Or, "Nested Attention:
Semantic-aware Attention Values for Concept Personalization" (SIGGRAPH 2025), Sec. 3–4;
the authors' inference release (Hugging Face ``orpatashnik/NestedAttentionEncoder``,
``nested_attention_processor.py``) could not be read here (no hub access, not in the code
index), so the op follows the paper and the third-party IP-Adapter-based reimplementation
(``ip_adapter/nested_attention_processor.py``, ``NestedAttnProcessor2_0``: nested keys and
values ``to_k_nest``/``to_v_nest`` of the encoder tokens, ``F.scaled_dot_product_attention``
between the layer's queries and them, the result written into the value of token
``indices_to_alter`` per query, ``regularize_scale`` multiplying it).

At a cross-attention site with queries ``q`` ``(B, T, N, H)``, text keys/values ``k, v``
``(B, S, N, H)`` and, per row and subject j, nested keys/values ``K̃_j, Ṽ_j`` ``(R, N, H)``
(the R subject tokens of the encoder through the site's nested projections,
:func:`jattn.models.nested.nested_kv`)::

    V*_{q,j} = λ · softmax(q · K̃_jᵀ / √H) · Ṽ_j                   (per query, per head)
    out      = Σ_s p[q, s] v_s  with v_{s*_j} replaced by V*_{q,j}
             = out_plain + Σ_j p[q, s*_j] · (V*_{q,j} − v_{s*_j})

The outer softmax ``p`` over the S text tokens is untouched: where s* lands stays under the
prior's control (its key is the text encoder's), what it contributes depends on the query.

Design choices (documented deviations / decisions):

* Conditional half only: with CFG the unconditional rows (the empty prompt has no s*) are
  unchanged. The third-party reimplementation runs its unconditional pass with zero image
  embeddings through the same processor at the same index; the authors' choice is unknown.
* No materialised probabilities are required: when another op of the site materialised
  them the op reads ``p[..., s*]`` from them, else it computes that one column
  (``exp(q·k_{s*}/√H − logsumexp_s q·k_s/√H)``) itself, so the fused kernel's output is kept
  and rows without a subject (``positions == -1``) are bit-identical to plain attention.
* λ (``scale``) is the third-party "regularisation" (``regularize_scale``; 1 = off).

The many-token baseline of the paper (IP-Adapter's decoupled cross-attention) is
:class:`jattn.policy.decoupled.DecoupledImageAttention`.

Legend: B rows of the conditional half (``layout.groups × layout.members``), J subject slots
per row, R subject tokens, T queries, S text tokens, N heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Layout, Op, Policy, PolicyError, SiteContext, resolve

Array = jax.Array

__all__ = ["NestedAttention", "nested_policy", "nested_value", "star_probs"]


def nested_value(q: Array, k_nest: Array, v_nest: Array) -> Array:
    """``V*_q = softmax(q·K̃ᵀ/√H)·Ṽ`` per query and head, in float32.

    Args:
      q: ``(B, T, N, H)``; k_nest, v_nest: ``(B, R, N, H)``.
    Returns:
      ``(B, T, N, H)`` float32.
    """
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k_nest, v_nest))
    logits = jnp.einsum("btnh,brnh->bntr", q32, k32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bntr,brnh->btnh", w, v32)


def star_probs(q: Array, k: Array, pos: Array, p: Array | None = None) -> Array:
    """The outer probability of token ``pos[b]`` per query: ``(B, T, N)`` float32.

    From materialised probabilities ``p`` ``(B, N, T, S)`` when given, else computed from
    ``q`` ``(B, T, N, H)`` and ``k`` ``(B, S, N, H)`` (the same softmax as the plain
    attention, one column of it). ``pos`` ``(B,)`` int32, clipped to ``[0, S)`` (absent
    subjects are masked by the caller)."""
    s = k.shape[1]
    idx = jnp.clip(pos, 0, s - 1)
    if p is not None:
        col = jnp.take_along_axis(p.astype(jnp.float32), idx[:, None, None, None], axis=-1)
        return jnp.moveaxis(col[..., 0], 1, 2)  # (B, N, T) -> (B, T, N)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("btnh,bsnh->btns", q32, k32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    lse = jax.nn.logsumexp(logits, axis=-1)
    ks = jnp.take_along_axis(k32, idx[:, None, None, None], axis=1)[:, 0]  # (B, N, H)
    ls = jnp.einsum("btnh,bnh->btn", q32, ks) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.exp(ls - lse)


def _cond_rows(layout: Layout, x: Array) -> Array:
    """The conditional half's rows ``(G·M, …)`` of a batch-leading array."""
    return x[x.shape[0] - layout.groups * layout.members:]


def _with_cond_rows(layout: Layout, x: Array, new_cond: Array) -> Array:
    n = layout.groups * layout.members
    if x.shape[0] == n:
        return new_cond
    return jnp.concatenate([x[: x.shape[0] - n], new_cond], axis=0)


def _check_site(op_name: str, ctx: SiteContext, keys: Mapping, q: Array) -> None:
    site = ctx.site
    if not site.is_cross:
        raise PolicyError(f"{op_name} acts at cross-attention sites only; it was matched to "
                          f"{site.path} ({site.kind}). Fix: select kind='cross'.")
    if site.path not in keys:
        raise PolicyError(f"{op_name}: no nested keys/values for site {site.path}; the "
                          f"weights cover {len(keys)} sites (e.g. {sorted(keys)[:2]}). Fix: "
                          "compute them with jattn.models.nested.nested_kv for this UNet's "
                          "cross-attention sites.")


@struct.dataclass
class NestedAttention(Op):
    """Nested Attention at cross-attention sites (see the module docstring).

    Attributes:
      keys: ``{site_path: K̃ (B, J, R, N, H)}`` nested keys per conditional row and subject
        slot (:func:`jattn.models.nested.nested_kv` of the subject tokens, gathered per row).
      values: ``{site_path: Ṽ (B, J, R, N, H)}`` nested values, same layout.
      positions: ``(B, J)`` int32, the index of subject j's s* token in row b's prompt (BOS
        at 0, the S axis), ``-1`` = no subject in that slot (the row stays plain there).
      scale: ``()`` float32 λ multiplying V* (1 = the paper; the third-party
        "regularisation" uses < 1).

    Every field is dynamic: new subjects, prompts, positions or λ never recompile (B, J, R
    and the set of sites are shapes/structure).
    """

    keys: dict
    values: dict
    positions: Array
    scale: Array

    def edit_output(self, ctx, out, p, q, k, v):
        _check_site("NestedAttention", ctx, self.keys, q)
        lay = ctx.layout
        qc, kc, vc, oc = (_cond_rows(lay, a) for a in (q, k, v, out))
        pc = None if p is None else _cond_rows(lay, p)
        kn, vn = self.keys[ctx.site.path], self.values[ctx.site.path]
        b = qc.shape[0]
        if kn.shape[0] != b or self.positions.shape[0] != b:
            raise PolicyError(
                f"NestedAttention at {ctx.site.path}: nested keys for {kn.shape[0]} rows and "
                f"positions for {self.positions.shape[0]} rows, but the conditional half has "
                f"{b} rows (layout {lay}). Fix: one row per prompt of the conditional half.")
        delta = jnp.zeros(oc.shape, jnp.float32)
        for j in range(self.positions.shape[1]):  # J is static (a shape)
            pos = self.positions[:, j].astype(jnp.int32)
            valid = (pos >= 0)[:, None, None, None]
            vstar = nested_value(qc, kn[:, j], vn[:, j]) * self.scale.astype(jnp.float32)
            ps = star_probs(qc, kc, pos, pc)[..., None]  # (B, T, N, 1)
            vs = jnp.take_along_axis(vc, jnp.clip(pos, 0, vc.shape[1] - 1)[:, None, None, None],
                                     axis=1).astype(jnp.float32)  # (B, 1, N, H)
            delta = delta + jnp.where(valid, ps * (vstar - vs), 0.0)
        new = oc + delta.astype(oc.dtype)
        return _with_cond_rows(lay, out, new)


def nested_policy(sites, keys: Mapping[str, Array], values: Mapping[str, Array],
                  positions, *, scale: float | Array = 1.0, layout: Layout = Layout(),
                  context_tokens: int = 77) -> Policy:
    """A policy with :class:`NestedAttention` at every cross-attention site of ``keys``.

    Args:
      sites: the model's attention sites (``pipe.sites()``).
      keys, values: ``{site_path: (B, J, R, N, H)}`` (B = rows of the conditional half).
      positions: ``(B, J)`` int, s* index per row and subject slot, -1 = none; a ``(B,)``
        array means J = 1.
      scale: λ on V*.
      layout: the batch layout (``Layout(groups=B, members=1, cfg=True)`` for a batch of
        prompts with CFG).
    Raises:
      PolicyError: keys and values for different sites, a site path that is not a
        cross-attention site of ``sites``, shapes that disagree.
    """
    pos = jnp.asarray(positions, jnp.int32)
    if pos.ndim == 1:
        pos = pos[:, None]
        keys = {s: a[:, None] if a.ndim == 4 else a for s, a in keys.items()}
        values = {s: a[:, None] if a.ndim == 4 else a for s, a in values.items()}
    if pos.ndim != 2:
        raise PolicyError(f"nested_policy: positions must be (B,) or (B, J), got {pos.shape}")
    paths = _check_paths("nested_policy", sites, keys, values)
    for s in paths:
        want = (pos.shape[0], pos.shape[1])
        if tuple(keys[s].shape[:2]) != want or keys[s].shape != values[s].shape:
            raise PolicyError(f"nested_policy: at {s} keys {keys[s].shape} / values "
                              f"{values[s].shape} do not match positions {pos.shape} "
                              "(expected (B, J, R, N, H) for both)")
    op = NestedAttention(keys=dict(keys), values=dict(values), positions=pos,
                         scale=jnp.asarray(scale, jnp.float32))
    return resolve([(_site_regex(paths), op)], sites, layout=layout,
                   context_tokens=context_tokens)


def _check_paths(name, sites, keys, values) -> list[str]:
    if set(keys) != set(values):
        raise PolicyError(f"{name}: keys and values cover different sites "
                          f"({sorted(set(keys) ^ set(values))})")
    if not keys:
        raise PolicyError(f"{name}: no sites given (keys is empty)")
    cross = {s.path for s in sites if getattr(s, "kind", None) == "cross"}
    bad = sorted(set(keys) - cross)
    if bad:
        raise PolicyError(f"{name}: {bad[:3]} are not cross-attention sites of this model "
                          f"({len(cross)} cross sites, e.g. {sorted(cross)[:2]}). Fix: the "
                          "nested weights belong to another UNet; use weights made for it.")
    return sorted(keys)


def _site_regex(paths) -> dict:
    import re

    return {"path": "^(" + "|".join(re.escape(p) for p in paths) + ")$", "kind": "cross"}
