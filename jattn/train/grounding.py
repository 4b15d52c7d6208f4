"""Token grounding: a cross-attention loss from the world's object masks (training only).

Trained from scratch on short captions, a text encoder puts the whole caption into every
token after the end of text (the causal CLIP encoder lets padding tokens see the
sentence), so the UNet can read the prompt from any key and has no reason to look at the
word tokens: its cross-attention stays nearly uniform over the 77 tokens and locates
nothing. The world knows every object's mask, so the diffusion stage can add the token
grounding losses of TokenCompose on the attribute words of each object:

* token loss ``(1 - sum_u a_i(u) M(u))^2`` with ``a_i = A_i / sum_u A_i`` the spatially
  normalised map of token i (its attention mass must lie on its object);
* pixel loss ``BCE(A_i(u), M(u))`` on the per-pixel attention share (inside the mask the
  token should take a large share, outside none);

averaged over the grounded tokens and over every cross-attention site, masks area-pooled
to each site's resolution. The grounded words of an object are its size, colour, fill and
shape words and the last word of its position ("left", "top", "center" …), as stated in
the caption (first BPE token of a word). Grounding the position word ties the word to
where the object is drawn, which the UNet otherwise learns only slowly.

Source: Wang et al., "TokenCompose: Text-to-Image Diffusion with Token-level Supervision"
(CVPR 2024), mlpc-ucsd/TokenCompose ``train/src/train_token_compose.py``
(``get_grounding_loss_by_layer``). Differences: the masks come from the renderer rather
than a segmenter, every cross-attention resolution is used, and the pixel loss is on the
raw probabilities (no per-map rescaling).

Legend: B batch, K object slots (3), R grounded roles (5), T query tokens, S key tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ROLES", "MASK_SIDE", "object_token_positions", "grounding_targets",
           "grounding_policy", "grounding_loss"]

ROLES = ("size", "color", "fill", "shape", "position")
MASK_SIDE = 16  # masks are stored at 16², the highest cross resolution of the bundled UNet


def _first_ids(tokenizer, words: Sequence[str]) -> dict[int, str]:
    out = {}
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        out[int(ids[0])] = w
    return out


def object_token_positions(ids: np.ndarray, num_objects: Sequence[int], tokenizer,
                           k_slots: int = 3) -> np.ndarray:
    """Token positions of each object's size/colour/fill/shape/position word in tokenized
    captions.

    The world writes an object as ``[article] [size] [colour] [fill] shape [position]`` and
    objects in order, so walking the tokens, attribute words belong to the current object,
    its shape noun (or "shape"/"object") closes it and a position word after it belongs to
    it. Attribute words after the last object (the background phrase, e.g. "on a striped
    background") are ignored.

    Args:
      ids: int ``(N, S)`` token ids (BOS at 0).
      num_objects: per caption, the number of objects.
      tokenizer: the CLIP tokenizer the ids came from.
      k_slots: K.
    Returns:
      int32 ``(N, K, R)``: position in ``ids`` or -1 (word not stated, or no object).
    Raises:
      ValueError: a caption with fewer shape nouns than objects.
    """
    from jattn.world.spec import COLORS, POSITIONS, SHAPES, STATED_FILLS, STATED_SIZES

    vocab = {"size": STATED_SIZES, "color": COLORS, "fill": STATED_FILLS,
             "shape": SHAPES + ("shape", "object"),
             "position": tuple(p.split()[-1] for p in POSITIONS)}
    role_of = {}
    for role, words in vocab.items():
        for i in _first_ids(tokenizer, words):
            role_of[i] = ROLES.index(role)
    shape_role, pos_role = ROLES.index("shape"), ROLES.index("position")
    ids = np.asarray(ids)
    out = np.full((ids.shape[0], k_slots, len(ROLES)), -1, np.int32)
    for n, row in enumerate(ids):
        k, total = 0, int(num_objects[n])
        for pos, t in enumerate(row.tolist()):
            r = role_of.get(t)
            if r is None:
                continue
            if r == pos_role:
                if 0 < k <= total and out[n, k - 1, r] < 0:
                    out[n, k - 1, r] = pos
                continue
            if k >= total:
                continue
            if out[n, k, r] < 0:
                out[n, k, r] = pos
            if r == shape_role:
                k += 1
        if k < total:
            raise ValueError(f"caption {n}: found {k} shape nouns for {total} objects "
                             f"(ids {row[:24].tolist()} …)")
    return out


def grounding_targets(source: str, seed: int, start: int, count: int, ids: np.ndarray,
                      tokenizer, *, split: str = "train", side: int = MASK_SIDE
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Object masks and word positions of samples ``start .. start + count - 1``.

    Args:
      source: ``"world"`` (the only source with masks).
      ids: int ``(count, S)`` the samples' token ids (as cached).
    Returns:
      (float16 ``(count, K, side, side)`` masks area-pooled from the 128² silhouettes (holes
      of rings filled), int32 ``(count, K, R)`` positions).
    Raises:
      ValueError: a source other than "world".
    """
    if source != "world":
        raise ValueError(f"token grounding needs the world's masks; source is {source!r}")
    from jattn.world import make_dataset
    from jattn.world.detector import fill_holes

    d = make_dataset(count, seed=seed, split=split, start=start, masks=True)
    m = d["masks"]  # (count, K, 128, 128) bool
    n, k, h, w = m.shape
    m = m.copy()
    for i in range(n):
        for j in range(int(d["num_objects"][i])):
            m[i, j] = fill_holes(m[i, j])
    pooled = m.reshape(n, k, side, h // side, side, w // side).mean((3, 5)).astype(np.float16)
    return pooled, object_token_positions(ids, d["num_objects"], tokenizer, k)


def grounding_policy(unet_config, batch: int, sample_size: int):
    """A policy recording the head-mean probabilities at every cross-attention site of a
    ``batch``-row UNet call without CFG (differentiable)."""
    from jattn.models.unet import list_sites
    from jattn.policy.capture import Capture
    from jattn.policy.core import Layout, resolve

    sites = list_sites(unet_config, sample_size)
    return resolve([({"kind": "cross"}, Capture(all_halves=True))], sites,
                   layout=Layout(groups=batch, members=1, cfg=False))


def grounding_loss(aux: Mapping[str, dict], sites_res: Mapping[str, tuple[int, int]],
                   masks: jax.Array, positions: jax.Array, keep: jax.Array,
                   eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """TokenCompose token and pixel losses (module docstring), means over sites.

    Args:
      aux: the UNet's aux under :func:`grounding_policy`: ``{site_path: {"0": {"probs":
        (B, T, S)}}}``.
      sites_res: ``{site_path: (h, w)}``.
      masks: float ``(B, K, m, m)`` soft object masks (m divisible by every h, w).
      positions: int32 ``(B, K, R)`` token positions, -1 where absent.
      keep: bool ``(B,)`` rows whose caption was used (False: dropped to "").
    Returns:
      (token loss, pixel loss) float32 scalars (0 when nothing is grounded).
    """
    b, k, m, _ = masks.shape
    r = positions.shape[-1]
    wv = ((positions >= 0) & keep[:, None, None]).astype(jnp.float32)  # (B, K, R)
    flat_pos = jnp.clip(positions, 0).reshape(b, k * r)
    n_valid = jnp.maximum(wv.sum(), 1.0)
    tok_l, pix_l = [], []
    for path, rec in aux.items():
        probs = rec["0"]["probs"].astype(jnp.float32)  # (B, T, S)
        h, w = sites_res[path]
        mk = masks.astype(jnp.float32).reshape(b, k, h, m // h, w, m // w).mean((3, 5))
        mk = mk.reshape(b, k, 1, h * w)  # broadcast over the R roles
        a = jnp.take_along_axis(probs, flat_pos[:, None, :], axis=2)  # (B, T, K·R)
        a = jnp.swapaxes(a, 1, 2).reshape(b, k, r, h * w)  # (B, K, R, T)
        inside = jnp.sum(a * mk, -1) / (jnp.sum(a, -1) + eps)
        tok_l.append(jnp.sum(wv * jnp.square(1.0 - inside)) / n_valid)
        p = jnp.clip(a, eps, 1.0 - eps)
        bce = -(mk * jnp.log(p) + (1.0 - mk) * jnp.log1p(-p)).mean(-1)
        pix_l.append(jnp.sum(wv * bce) / n_valid)
    return jnp.mean(jnp.stack(tok_l)), jnp.mean(jnp.stack(pix_l))
