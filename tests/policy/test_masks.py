"""SubjectMask: which token / pixel may attend where, against NumPy restatements of
omer11a/bounded-attention ``_hide_other_subjects_from_tokens`` /
``_hide_other_subjects_from_subjects`` / ``_build_self_masks``; box rounding; the
``nearest-exact`` resize; in-graph refinement read back through ``bind_aux``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.attention import AttentionSite
from jattn.policy.core import Layout, SiteContext, resolve
from jattn.policy.masks import (NEG, MaskRefine, SubjectMask, assign_clusters, box_regions,
                                cross_blocked, final_masks, resize_nearest_exact,
                                self_blocked)

MIN = np.finfo(np.float32).min


def ref_tokens(subject_masks, token_indices, filter_indices, eos, include_background,
               d=77):
    """The reference's _hide_other_subjects_from_tokens (conditional half), loops kept."""
    b, s, n = subject_masks.shape
    background = subject_masks.sum(1) == 0
    if include_background:
        subject_masks = subject_masks | background[:, None]
    sim = np.zeros((b, n, d), np.float32)
    for idx in (*token_indices, filter_indices):
        sim[:, :, idx] = MIN
    for bi in range(b):
        for mask, idx in zip(subject_masks[bi], token_indices):
            for t in idx:
                sim[bi, mask, t] = 0
    if not include_background:
        for bi in range(b):
            sim[bi, background[bi], eos] = MIN
    return sim


def ref_subjects(subject_masks):
    """The reference's _hide_other_subjects_from_subjects (one half), loops kept."""
    b, s, n = subject_masks.shape
    background = subject_masks.sum(1) == 0
    sim = np.zeros((b, n, n), np.float32)
    for bi in range(b):
        allsub = ~background[bi][None] & ~background[bi][:, None]
        sim[bi, allsub] = MIN
    for bi in range(b):
        for mask in subject_masks[bi]:
            rows = sim[bi, mask]
            cond = (rows == 0) | mask[None]
            sim[bi, mask] = np.where(cond, 0, MIN)
    return sim


def _random_masks(rng, b=2, s=3, n=16):
    m = rng.random((b, s, n)) < 0.3
    m[0, 2] = False          # an empty subject
    m[1, 0, :4] = True       # overlap of subjects 0 and 1
    m[1, 1, 2:6] = True
    return m


@pytest.mark.parametrize("include_background", [False, True])
def test_cross_mask_matches_reference(include_background):
    rng = np.random.default_rng(0)
    m = _random_masks(rng)
    toks = [[2, 3], [5], [7, 8]]
    filt = [1, 4, 6, 3]      # token 3 is both a function word and a subject token
    eos = 9
    want = ref_tokens(m, toks, filt, eos, include_background) == MIN
    ts = np.zeros((2, 3, 77), bool)
    for j, t in enumerate(toks):
        ts[:, j, t] = True
    blocked = np.zeros((2, 77), bool)
    blocked[:, filt] = True
    eos_row = np.zeros((2, 77), bool)
    eos_row[:, eos] = True
    got = jax.jit(cross_blocked, static_argnums=4)(
        jnp.asarray(m), jnp.asarray(ts), jnp.asarray(blocked), jnp.asarray(eos_row),
        include_background)
    np.testing.assert_array_equal(np.asarray(got), want)
    # BOS and padding tokens are never masked
    assert not np.asarray(got)[..., 0].any() and not np.asarray(got)[..., 10:].any()


def test_self_mask_matches_reference():
    rng = np.random.default_rng(1)
    m = _random_masks(rng)
    want = ref_subjects(m) == MIN
    got = np.asarray(jax.jit(self_blocked)(jnp.asarray(m)))
    np.testing.assert_array_equal(got, want)
    # every pixel may attend to itself: no fully masked row
    assert not np.diagonal(got, axis1=1, axis2=2).any()


def test_box_regions_reference_rounding():
    boxes = np.array([[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8], [0.0, 0.0, 0.5, 0.25],
                      [0.125, 0.375, 0.625, 0.875]], np.float32)
    for r in (4, 8, 16):
        got = np.asarray(jax.jit(box_regions, static_argnums=(1, 2))(
            jnp.asarray(boxes), r, r)).reshape(-1, r, r)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            want = np.zeros((r, r), bool)
            want[round(float(y0) * r):round(float(y1) * r),
                 round(float(x0) * r):round(float(x1) * r)] = True
            np.testing.assert_array_equal(got[k], want, err_msg=f"box {k} at {r}")


def test_resize_nearest_exact_matches_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    m = (rng.random((1, 2, 8, 8)) < 0.5).astype(np.float32)
    for size in (4, 8, 16, 6):
        want = F.interpolate(torch.from_numpy(m), size, mode="nearest-exact").numpy()
        got = np.asarray(resize_nearest_exact(jnp.asarray(m), size, size))
        np.testing.assert_array_equal(got, want)


def _site(kind, r=4, path=None):
    return AttentionSite(path or f"up_blocks.1.attentions.0.transformer_blocks.0."
                         f"{'attn2' if kind == 'cross' else 'attn1'}", kind, (r, r), 2, 4, "up")


def test_op_bias_rows_and_probabilities():
    """Through the policy seam: cross masks on the conditional half only, self masks on
    both halves; masked pairs get probability exactly 0."""
    b, r = 2, 4
    boxes = np.array([[[0, 0, .5, 1], [.5, 0, 1, 1]], [[0, 0, 1, .5], [0, 0, 0, 0]]],
                     np.float32)
    ts = np.zeros((b, 2, 77), bool)
    ts[:, 0, 2] = ts[:, 1, 5] = True
    ts[1, 1] = False
    op = SubjectMask(token_subject=jnp.asarray(ts), token_blocked=None,
                     token_background=jnp.asarray(np.eye(77, dtype=bool)[[9, 9]]),
                     boxes=jnp.asarray(boxes))
    sites = [_site("self", r), _site("cross", r)]
    pol = resolve([("", op)], sites, layout=Layout(groups=b, members=1, cfg=True))
    rng = np.random.default_rng(3)
    for site in sites:
        s = 77 if site.kind == "cross" else r * r
        q = jnp.asarray(rng.standard_normal((2 * b, r * r, 2, 4)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2 * b, s, 2, 4)), jnp.float32)
        ctx = SiteContext(site, jnp.int32(0), pol.layout)
        bias = np.asarray(jax.jit(lambda o, q, k: o.logit_bias(ctx, q, k))(op, q, k))
        assert bias.shape == (2 * b, 1, r * r, s)
        reg = np.asarray(box_regions(jnp.asarray(boxes), r, r))  # checked below
        if site.kind == "cross":
            assert not bias[:b].any()                     # unconditional half untouched
            want = ref_tokens(reg, [[2], [5]], [], 9, False)
            want[1, :, 5] = False                         # image 1 has one subject only
            np.testing.assert_array_equal(bias[b:, 0] == NEG, want == MIN)
            # subject 0's token (2) attends only inside the left half in image 0
            assert (bias[b, 0].reshape(r, r, 77)[:, :2, 2] == 0).all()
            assert (bias[b, 0].reshape(r, r, 77)[:, 2:, 2] == NEG).all()
        else:
            np.testing.assert_array_equal(bias[:b], bias[b:])  # both halves
            np.testing.assert_array_equal(bias[b:, 0] == NEG, ref_subjects(reg) == MIN)
        logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k)) / 2.0 + bias
        p = np.exp(logits - logits.max(-1, keepdims=True))
        assert (p[np.broadcast_to(bias == NEG, p.shape)] == 0).all()


def ref_assign(labels, k, cross_mean, existing, boxes_masks, thr_c=0.2, thr_s=0.2):
    """NumPy restatement of _obtain_cross_masks + _build_self_masks + _fix_zero_masks."""
    eps = 1e-5
    maps = cross_mean / (cross_mean.max(1, keepdims=True) + eps)
    maps = 1 / (1 + np.exp(-10 * (maps - thr_c)))
    mn, mx = maps.min(1, keepdims=True), maps.max(1, keepdims=True)
    maps = (maps - mn) / (mx - mn + eps)
    cross = maps.transpose(0, 2, 1) * existing
    b, s, n = cross.shape
    cl = np.stack([labels == c for c in range(k)], 2).astype(np.float64)
    inter = cross @ cl
    with np.errstate(invalid="ignore"):  # 0/0 of an empty cluster (no pixel reads it)
        ratio = inter / np.minimum(cross.sum(2, keepdims=True), cl.sum(1, keepdims=True))
    score, subj = ratio.max(1), ratio.argmax(1)
    subjects = np.take_along_axis(subj, labels, 1)
    scores = np.take_along_axis(score, labels, 1)
    masks = np.stack([subjects == j for j in range(s)], 1)
    masks[np.broadcast_to(scores[:, None] < thr_s, masks.shape)] = False
    for i in range(b):
        for j in range(s):
            if masks[i, j].sum() == 0:
                for kk in range(s):
                    masks[i, kk] = boxes_masks[i, j] if kk == j else \
                        masks[i, kk] & ~boxes_masks[i, j]
    return masks


_assign = jax.jit(assign_clusters, static_argnums=(1, 8))


def test_assign_clusters_matches_reference():
    rng = np.random.default_rng(4)
    b, r, k = 2, 4, 6
    boxes = np.array([[[0, 0, .5, 1], [.5, 0, 1, 1]], [[0, 0, 1, .5], [0, .5, 1, 1]]],
                     np.float32)
    labels = rng.integers(0, k, (b, r * r)).astype(np.int32)
    labels[:, :k] = np.arange(k)                              # no empty cluster
    cross_mean = rng.random((b, r * r, 2)).astype(np.float32)
    cross_mean[1, :, 1] *= 1e-3                               # a weak subject
    existing = np.asarray(box_regions(jnp.asarray(boxes), r, r))
    got = np.asarray(_assign(jnp.asarray(labels), k, jnp.asarray(cross_mean),
                                     jnp.asarray(existing), jnp.asarray(boxes),
                                     jnp.ones((b, 2), bool), 0.2, 0.2, (r, r)))
    want = ref_assign(labels, k, cross_mean.astype(np.float64), existing, existing)
    np.testing.assert_array_equal(got > 0.5, want)
    # a subject without pixels takes its box back
    empty_case = np.zeros((1, r * r, 2), np.float32)
    empty_case[0, :, 0] = 1.0
    got = np.asarray(_assign(jnp.zeros((1, r * r), jnp.int32), 2,
                                     jnp.asarray(empty_case), jnp.asarray(existing[:1]),
                                     jnp.asarray(boxes[:1]), jnp.ones((1, 2), bool), 0.2, 0.2,
                                     (r, r)))
    want = ref_assign(np.zeros((1, r * r), np.int64), 2, empty_case.astype(np.float64),
                      existing[:1], existing[:1])
    np.testing.assert_array_equal(got > 0.5, want)


def test_refinement_in_graph_and_bind_aux():
    """aux_update folds recorded maps and re-clusters at flagged steps; bind_aux hands the
    refined regions to the op (use_masks), which then masks with them."""
    b, r = 1, 4
    boxes = np.array([[[0, 0, .5, 1], [.5, 0, 1, 1]]], np.float32)
    ts = np.zeros((b, 2, 77), bool)
    ts[0, 0, 2] = ts[0, 1, 5] = True
    sites = [_site("self", r), _site("cross", r)]
    refine = MaskRefine(leading=jnp.asarray([[2, 5]], jnp.int32), subjects=jnp.ones((1, 2), bool),
                        refine_at=jnp.asarray([False, True, False]),
                        key=jax.random.key_data(jax.random.key(0)),
                        cross_threshold=jnp.float32(0.2), self_threshold=jnp.float32(0.2),
                        record_paths=tuple(s.path for s in sites), n_clusters=4, n_init=2)
    op = SubjectMask(token_subject=jnp.asarray(ts), boxes=jnp.asarray(boxes), refine=refine)
    pol = resolve([("", op)], sites, layout=Layout(groups=1, members=1, cfg=False))
    update = jax.jit(pol.aux_update)
    acc = pol.aux_init()
    init = np.asarray(final_masks(acc)).reshape(1, 2, -1)
    np.testing.assert_array_equal(init > 0.5, np.asarray(box_regions(jnp.asarray(boxes), r, r)))
    # the top row belongs to subject 0 (token 2), the rest to subject 1 (token 5)
    top = np.zeros((r, r), bool)
    top[0] = True
    top = top.reshape(-1)
    selfp = np.where(top[:, None] == top[None, :], 1.0, 0.0)
    selfp = selfp / selfp.sum(-1, keepdims=True)
    crossp = np.zeros((r * r, 77), np.float32)
    crossp[top, 2] = 1.0
    crossp[~top, 5] = 1.0
    aux = {sites[0].path: {"0": {"self": jnp.asarray(selfp[None], jnp.float32)}},
           sites[1].path: {"0": {"cross": jnp.asarray(crossp[None][:, :, [2, 5]])}}}
    acc = update(acc, aux, jnp.int32(0))
    assert not bool(acc[0]["subject_masks/subject_masks"]["refined"])
    acc = update(acc, aux, jnp.int32(1))
    a = acc[0]["subject_masks/subject_masks"]
    assert bool(a["refined"]) and float(a["self_n"]) == 2 and float(a["cross_n"]) == 2
    m = np.asarray(a["masks"]).reshape(2, -1) > 0.5
    # existing regions (boxes) times the cross masks: subject 0 keeps the top-left part
    # of its box, subject 1 its box's part of the bottom rows
    assert m[0][top].any() and not m[0][~top].any()
    assert m[1][~top].any() and not m[1][top].any()
    bound = pol.ops[0].bind_aux(acc)
    np.testing.assert_array_equal(np.asarray(bound.region(r, r)), m[None])
    assert (np.asarray(pol.ops[0].region(r, r)) != m[None]).any()
