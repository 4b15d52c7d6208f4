"""Decoupled image cross-attention (IP-Adapter style) as a generic op.

At each cross-attention site it touches, the text attention's output gets a second
attention of the same queries over R image tokens with their own key/value projections:

    out = softmax(q·K_txtᵀ/√H)·V_txt + λ · softmax(q·K_imgᵀ/√H)·V_img,
    K_img = tokens·W_k[site],  V_img = tokens·W_v[site]

per head (the sum is taken before the heads are merged and ``to_out`` projects them, as
IP-Adapter's ``IPAttnProcessor`` adds ``ip_hidden_states`` to ``hidden_states`` before
``to_out``). The text path is untouched (fused kernel when nothing else at the site needs
the probabilities). Used by the decoupled-cross-attention baseline of the personalisation
methods (:mod:`jattn.train.personalize`), and by any image-prompt adapter.

Tokens, projections and λ are dynamic leaves: a new subject image (new tokens) or a new λ
never recompiles. ``to_k``/``to_v`` hold one kernel per touched site, keyed by the site's
diffusers path (IP-Adapter initialises them from the site's ``to_k``/``to_v``).

Shapes: q ``(B, T, N, H)``; tokens ``(B, R, D)`` (B rows as the UNet batch, or 1 to share);
kernels ``(D, N·H)``; λ a scalar or ``(B,)``.

Reference: Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models" (2023); tencent-ailab/IP-Adapter ``ip_adapter/attention_processor.py``
``IPAttnProcessor`` (``to_k_ip``, ``to_v_ip``, ``scale``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jattn.models.attention import default_attention
from jattn.policy.core import Op, PolicyError, SiteContext

Array = jax.Array

__all__ = ["DecoupledImageAttention"]


@struct.dataclass
class DecoupledImageAttention(Op):
    """``out + λ · Attn(q, tokens·W_k, tokens·W_v)`` at cross-attention sites.

    Attributes:
      tokens: ``(B, R, D)`` image tokens (B = the UNet batch's rows, or 1: shared by all).
      to_k, to_v: ``{site path: (D, N·H) kernel}`` for every site the op is resolved to.
      scale: λ, scalar or ``(B,)`` per row (0 switches the image branch off for a row, e.g.
        the unconditional half).
    Raises (at trace time):
      PolicyError: a site without kernels, kernels of the wrong width, or tokens whose
        batch is neither 1 nor the UNet batch.
    """

    tokens: Array
    to_k: dict
    to_v: dict
    scale: Array = struct.field(default_factory=lambda: jnp.float32(1.0))

    def image_kv(self, ctx: SiteContext, batch: int) -> tuple[Array, Array]:
        """``(K_img, V_img)`` ``(B, R, N, H)`` at the context's site."""
        site = ctx.site
        if site.path not in self.to_k or site.path not in self.to_v:
            raise PolicyError(f"DecoupledImageAttention has no to_k/to_v kernels for site "
                              f"{site.path}; give one per site the rule selects "
                              f"(it has {sorted(self.to_k)[:3]}…)")
        wk, wv = self.to_k[site.path], self.to_v[site.path]
        width = site.num_heads * site.head_dim
        d = self.tokens.shape[-1]
        if wk.shape != (d, width) or wv.shape != (d, width):
            raise PolicyError(f"DecoupledImageAttention at {site.path}: kernels {wk.shape}, "
                              f"{wv.shape}; expected ({d}, {width}) "
                              "(token width × heads·head_dim)")
        tokens = self.tokens
        if tokens.shape[0] not in (1, batch):
            raise PolicyError(f"DecoupledImageAttention: tokens have batch {tokens.shape[0]}, "
                              f"the UNet batch is {batch}; give one row per UNet row or 1")
        tokens = jnp.broadcast_to(tokens, (batch,) + tokens.shape[1:])
        r = tokens.shape[1]
        k = (tokens @ wk.astype(tokens.dtype)).reshape(batch, r, site.num_heads, site.head_dim)
        v = (tokens @ wv.astype(tokens.dtype)).reshape(batch, r, site.num_heads, site.head_dim)
        return k, v

    def edit_output(self, ctx: SiteContext, out: Array, p, q: Array, k: Array, v: Array
                    ) -> Array:
        b = q.shape[0]
        k_img, v_img = self.image_kv(ctx, b)
        img = default_attention(q, k_img.astype(q.dtype), v_img.astype(q.dtype),
                                upcast=ctx.upcast)  # (B, T, N, H)
        lam = jnp.asarray(self.scale, jnp.float32)
        lam = lam.reshape((-1, 1, 1, 1)) if lam.ndim == 1 else lam
        return (out.astype(jnp.float32) + lam * img.astype(jnp.float32)).astype(out.dtype)
