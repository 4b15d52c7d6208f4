"""In-graph attention capture: per-token cross-attention and self-attention maps.

:class:`Capture` records, at every site it is given, the attention probabilities averaged
over heads (conditional half of the CFG batch, as the references do) and the sampler folds
them, in-graph, into one running sum per ``(kind, resolution)``: memory stays
``G·M × T × S`` per resolution whatever the number of steps or layers. The result is the
P2P ``aggregate_attention`` quantity: the mean over layers and heads of one resolution,
averaged over the captured steps.

Source: Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control"
(ICLR 2023), google/prompt-to-prompt ``ptp_utils.py``/``AttentionStore``; Tang et al.,
"What the DAAM" (ACL 2023), castorini/daam.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.models.attention import AttentionSite
from jattn.policy.core import Layout, Op, SiteContext, in_window

Array = jax.Array

__all__ = ["Capture", "capture_key", "captured_maps"]


def capture_key(site: AttentionSite) -> str:
    """Aggregation key of a site: ``"cross16x16"``, ``"self8x8"`` …"""
    h, w = site.resolution
    return f"{site.kind}{h}x{w}"


@struct.dataclass
class Capture(Op):
    """Record head-averaged attention probabilities, aggregated over steps in-graph.

    Attributes:
      window: int32 ``(2,)`` steps ``[start, end)`` that are accumulated (dynamic).
      all_halves: static; record the unconditional half too (default: conditional only).
    Aux (per UNet call, per site): ``{"probs": (R, T, S)}`` with R = G·M rows (or 2·G·M).
    Aggregated: ``{key: (R, T, S) sum over steps of the layer-mean, "steps": count}``.
    """

    window: Array = struct.field(default_factory=lambda: jnp.array([0, 1 << 30], jnp.int32))
    all_halves: bool = struct.field(pytree_node=False, default=False)

    needs_probs = True

    def record(self, ctx: SiteContext, p_pre, p_post):
        p = p_pre.astype(jnp.float32).mean(axis=1)  # (B, T, S) head mean
        if ctx.layout.cfg and not self.all_halves:
            p = p[p.shape[0] // 2:]
        return {"probs": p}

    def aux_init(self, sites: Sequence[AttentionSite], layout: Layout, context_tokens: int):
        rows = layout.groups * layout.members * (layout.halves if self.all_halves else 1)
        acc = {}
        for s in sites:
            k = capture_key(s)
            if k not in acc:
                n_keys = s.query_tokens if s.kind == "self" else context_tokens
                acc[k] = jnp.zeros((rows, s.query_tokens, n_keys), jnp.float32)
        acc["steps"] = jnp.zeros((), jnp.int32)
        return acc

    def aux_update(self, acc, per_site, step, sites):
        counts: dict[str, int] = {}
        for s in sites:
            counts[capture_key(s)] = counts.get(capture_key(s), 0) + 1
        on = in_window(step, self.window)
        new = dict(acc)
        by_path = {s.path: s for s in sites}
        for path, rec in per_site.items():
            k = capture_key(by_path[path])
            new[k] = new[k] + jnp.where(on, rec["probs"] / counts[k], 0.0)
        new["steps"] = acc["steps"] + on.astype(jnp.int32)
        return new


def captured_maps(acc: dict) -> dict[str, np.ndarray]:
    """Host-side: ``{key: (R, T, S)}`` maps averaged over the captured steps."""
    steps = max(int(acc["steps"]), 1)
    return {k: np.asarray(v) / steps for k, v in acc.items() if k != "steps"}
