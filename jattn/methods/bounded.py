"""Bounded Attention (Dahary, Patashnik, Aberman, Cohen-Or, "Be Yourself: Bounded Attention
for Multi-Subject Text-to-Image Generation", ECCV 2024; reference omer11a/bounded-attention
``bounded_attention.py``, ``run_sd.py`` defaults).

A front-end over generic pieces:

* **masks** (:class:`jattn.policy.masks.SubjectMask`, every attention layer, every step):
  cross-attention (conditional half): each subject's tokens ``NEG`` outside its region,
  function-word tokens ``NEG`` everywhere, EOS ``NEG`` in the background; self-attention
  (both halves): a subject's pixels cannot attend to another subject's pixels. Regions are
  the boxes until ``first_refinement_step`` (15), then, after every ``refine_every`` (5)
  steps, k-means (``3 × subjects`` clusters) of the running-mean self-attention of the first
  up block with attention (SD: ``up_blocks.1``), clusters assigned to subjects by overlap
  with the leading tokens' cross masks ``sigmoid(10·(norm − 0.2))`` (score ≥ 0.2) — all
  inside the compiled loop (:class:`jattn.policy.masks.MaskRefine`).
* **guidance** (:mod:`jattn.sampling.guidance`) for the first ``num_guidance_steps`` (15)
  steps: at most ``num_gd_iterations`` (5) gradient steps on ``z_t`` of size
  ``init + (final − init)/num_guidance_steps · i`` (8 → 2 for SD: 8 at step 0, 2.4 at
  step 14, the reference's formula), while the sample's loss / subjects ≥ 0.2. The
  guidance pass masks with the boxes, subject tokens also allowed in the background, EOS
  unmasked (the reference's ``include_background`` while ``optimized``). Loss per layer
  and subject: cross ``fg = Σ_{heads, box pixels, subject tokens + EOS} A``, ``bg`` the same
  over background pixels (outside every box); self ``fg = Σ_{heads, queries in box, keys in
  box} A``, ``bg`` over background queries; ``fg``/``bg`` averaged over the layers (mid block
  and the first up block with attention), ``(1 − fg / (fg + N·bg))²`` with N subjects;
  total ``1.5·Σ cross + 0.5·Σ self``.

Differences from the reference (also in the report of the method):

* function words are a fixed word list (:data:`FUNCTION_WORDS`: the words of the Penn tags
  the reference filters with NLTK, CC CD DT EX IN LS MD PDT POS PRP PRP$ RP TO UH WDT WP
  WRB, plus left/right/top/bottom), and a subject's leading token is its last token (the
  head noun of an English noun phrase; the reference takes the last NLTK noun): no POS
  tagger here;
* k-means: :func:`jattn.policy.kmeans.kmeans` (k-means++, ``kmeans_n_init`` restarts, a
  fixed key folded with the step) at every refinement; the reference (torch_kmeans) runs 100
  random restarts the first time and then warm-starts from the previous centres;
* the stopping rule is per sample (``loss_b / N < 0.2``: image i never depends on the rest
  of the batch); the reference stops the whole batch on ``Σ_b loss_b / (B·N)``
  (``reference_quirks=True``: that batch-coupled rule). Identical for one image;
* a cluster–subject score of 0/0 (an empty cross mask) is 0 here, NaN (kept) there;
* guidance steps after the first refinement (not with the defaults) mask with boxes here,
  with the refined masks there.

Option (not the reference): ``padding="blocked"`` also masks EOS and the padding tokens
everywhere (``"eos"``: padding masked in the background like EOS); see
:func:`bounded_inputs` and ``configs/bounded_world.py`` for its effect on leakage.

Overlapping boxes are accepted, as in the reference: a pixel in two boxes belongs to both
subjects (their tokens may attend there, and it may attend to both subjects' pixels)
until the refinement gives every pixel to at most one subject.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.io.words import prompt_ids, word_spans
from jattn.methods.layout import RecordHeads
from jattn.methods.subjects import _norm, check_boxes, mid_and_first_up, subject_tokens
from jattn.policy.core import Layout, Policy, resolve
from jattn.policy.masks import MaskRefine, SubjectMask, box_regions, final_masks
from jattn.sampling.guidance import Guidance

Array = jax.Array

__all__ = ["FUNCTION_WORDS", "bounded_inputs", "bounded_policy", "bounded_guidance",
           "bounded_generate", "bounded_loss", "step_sizes", "refine_schedule",
           "loss_sites", "record_sites"]

K_MAX = 8  # tokens per subject (static)
MASK_NAME = "bounded"

FUNCTION_WORDS = frozenset((
    # CC, DT, PDT, EX
    "and or but nor yet so either neither both a an the this that these those some any each "
    "every all no another half such there "
    # IN (+ the reference's TAG_RULES: left right top bottom), RP, TO
    "in on at of to with by for from into onto over under above below beside besides near "
    "behind between among through across against along around inside outside upon within "
    "without beneath underneath atop toward towards off up down out about after before "
    "during like than as if while because left right top bottom "
    # PRP, PRP$, POS, MD, WDT, WP, WRB, UH
    "i you he she it we they me him us them my your his her its our their 's "
    "can could may might must shall should will would "
    "which who whom whose what where when why how oh "
    # CD
    "one two three four five six seven eight nine ten eleven twelve").split())


def _is_function_word(w: str) -> bool:
    n = _norm(w)
    return n in FUNCTION_WORDS or n.replace(".", "").isdigit()


# SDXL (reference run_xl.py): loss and mask layers = attention calls [70, 82) of SDXL base's
# 140, i.e. transformer blocks 1–6 of up_blocks.0.attentions.0 (self and cross); step sizes
# 18 -> 5 instead of SD's 8 -> 2.
SDXL_BLOCKS = (1, 7)
SDXL_STEP_SIZES = (18.0, 5.0)
SD_STEP_SIZES = (8.0, 2.0)


def _box_sites(sites, sdxl: bool = False):
    """``(loss sites, record sites)``: SD1/SD2: mid block + first up block with attention
    (both kinds); the first up block with attention (the reference's layers 12–19 and
    14–19 of SD's 32 attention calls). SDXL (``sdxl=True``): both are transformer blocks
    ``[1, 7)`` (:data:`SDXL_BLOCKS`; those the model has, block 0 if it has only one) of the
    first attention module of the first up block with attention — on SDXL base
    ``up_blocks.0.attentions.0.transformer_blocks.1–6``, the reference's calls 70–81
    (``run_xl.py``: ``list(range(70, 82))`` for the loss, the masks default to them)."""
    mid, first_up = mid_and_first_up(sites)
    if not sdxl:
        return mid + first_up, first_up
    if not first_up:
        return [], []
    module = ".".join(first_up[0].path.split(".")[:4])  # up_blocks.i.attentions.0
    first = [s for s in first_up if s.path.startswith(module + ".")]

    def block(s):
        parts = s.path.split(".")
        return int(parts[5]) if len(parts) > 5 and parts[5].isdigit() else 0

    picked = [s for s in first if SDXL_BLOCKS[0] <= block(s) < SDXL_BLOCKS[1]]
    picked = picked or [s for s in first if block(s) == 0]
    return picked, picked


def loss_sites(sites, sdxl: bool = False):
    """Sites of the guidance loss: mid block + the first up block with attention (SDXL:
    see :func:`_box_sites`)."""
    return _box_sites(sites, sdxl)[0]


def record_sites(sites, sdxl: bool = False):
    """Sites whose maps the mask refinement averages: the first up block with attention
    (SDXL: see :func:`_box_sites`)."""
    return _box_sites(sites, sdxl)[1]


def _is_sdxl(pipe) -> bool:
    return bool(getattr(pipe, "is_sdxl", False))


def _occurrences(prompt: str, phrase: str) -> int:
    words = [_norm(w) for w in prompt.split()]
    want = [_norm(w) for w in phrase.split()]
    return sum(words[k:k + len(want)] == want for k in range(len(words) - len(want) + 1))


PADDING = ("reference", "eos", "blocked")


def bounded_inputs(tokenizer, prompts: Sequence[str], phrases, boxes, height: int,
                   width: int, arg: str = "boxes", padding: str = "reference"
                   ) -> dict[str, np.ndarray]:
    """Per prompt, per subject arrays (N = most subjects of any prompt, padded).

    Returns a dict of NumPy arrays: ``tokens`` int32 ``(B, N, K)``, ``valid`` bool
    ``(B, N, K)``, ``subjects`` bool ``(B, N)``, ``token_subject`` bool ``(B, N, 77)``,
    ``blocked`` bool ``(B, 77)`` (function words), ``eos`` bool ``(B, 77)``, ``leading``
    int32 ``(B, N)``, ``boxes`` float32 ``(B, N, 4)`` fractions (padding: empty boxes),
    ``background`` bool ``(B, 77)`` (tokens masked in the background).

    ``padding`` (the tokens after EOS, which a causal text encoder fills with the whole
    prompt): ``"reference"`` leaves them unmasked (omer11a/bounded-attention); ``"eos"``
    masks them in the background like EOS; ``"blocked"`` masks EOS and them everywhere (a
    subject's pixels then read only its own words and BOS). Not the reference: on the
    bundled model the padding carries the last-named subject into the first one's region.
    Raises:
      ValueError: naming ``arg``: box/phrase counts that differ, a phrase not in the
        prompt or given more times than it occurs (more boxes than subjects), a phrase of
        stop words only, a subject of more than 8 tokens, a box outside the image or
        with x1 ≤ x0 / y1 ≤ y0.
    """
    if padding not in PADDING:
        raise ValueError(f"padding={padding!r}: one of {PADDING}")
    b = len(prompts)
    if len(phrases) != b or len(boxes) != b:
        raise ValueError(f"{arg}: {len(boxes)} box lists and {len(phrases)} phrase lists for "
                         f"{b} prompts; give one per prompt")
    toks, fracs = [], []
    for i, pr in enumerate(prompts):
        if len(phrases[i]) != len(boxes[i]):
            raise ValueError(f"{arg}: prompt {i} has {len(boxes[i])} boxes for "
                             f"{len(phrases[i])} phrases; give one box per subject phrase")
        seen: dict[str, int] = {}
        for ph in phrases[i]:
            key = " ".join(_norm(w) for w in str(ph).split())
            seen[key] = seen.get(key, 0) + 1
            occ = _occurrences(pr, str(ph))
            if occ and seen[key] > occ:
                raise ValueError(
                    f"{arg}: {seen[key]} boxes for {ph!r}, which occurs {occ} time(s) in "
                    f"{pr!r}: more boxes than subjects; give one box per occurrence")
        toks.append(subject_tokens(tokenizer, pr, phrases[i], arg))
        fracs.append(check_boxes(boxes[i], height, width, arg))
    n = max([len(t) for t in toks] + [1])
    out = {"tokens": np.zeros((b, n, K_MAX), np.int32), "valid": np.zeros((b, n, K_MAX), bool),
           "subjects": np.zeros((b, n), bool), "token_subject": np.zeros((b, n, 77), bool),
           "blocked": np.zeros((b, 77), bool), "eos": np.zeros((b, 77), bool),
           "leading": np.zeros((b, n), np.int32), "boxes": np.zeros((b, n, 4), np.float32),
           "background": np.zeros((b, 77), bool)}
    for i, pr in enumerate(prompts):
        for j, t in enumerate(toks[i]):
            t = np.asarray(t, np.int32)
            if t.size > K_MAX:
                raise ValueError(f"{arg}: subject {phrases[i][j]!r} has {t.size} tokens; at "
                                 f"most {K_MAX}")
            out["tokens"][i, j, :t.size] = t
            out["valid"][i, j, :t.size] = True
            out["subjects"][i, j] = True
            out["token_subject"][i, j, t] = True
            out["leading"][i, j] = t[-1]
            out["boxes"][i, j] = fracs[i][j]
        for w, span in zip(pr.split(), word_spans(tokenizer, pr)):
            if _is_function_word(w):
                out["blocked"][i, span] = True
        e = len(prompt_ids(tokenizer, pr)) - 1
        out["eos"][i, e] = True
        out["background"][i, e:e + 1 if padding == "reference" else 77] = True
        if padding == "blocked":
            out["blocked"][i, e:] = True
    return out


def refine_schedule(n_steps: int, first_refinement_step: int = 15, every: int = 5
                    ) -> np.ndarray:
    """bool ``(n_steps,)``: True after step i when step i+1 starts with new masks: i+1 =
    ``first_refinement_step``, then every multiple of ``every`` after it (the reference's
    ``cur_step % delta_refine_mask_steps == 0`` once ``cur_step ≥ min_clustering_step``)."""
    out = np.zeros((n_steps,), bool)
    for i in range(n_steps - 1):
        s = i + 1
        out[i] = s == first_refinement_step or (s > first_refinement_step and s % every == 0)
    return out


def step_sizes(n_steps: int, init_step_size: float = 8.0, final_step_size: float = 2.0,
               num_guidance_steps: int = 15) -> np.ndarray:
    """``init + (final − init)/num_guidance_steps · i`` for ``i < num_guidance_steps``, else 0
    (the reference's ``start_step_size + step_size_coef · i``)."""
    out = np.zeros((n_steps,), np.float32)
    g = int(num_guidance_steps)
    if g > 0:
        coef = (float(final_step_size) - float(init_step_size)) / g
        for i in range(min(g, n_steps)):
            out[i] = float(init_step_size) + coef * i
    return out


def _policy_sites(pipe, height, width):
    return pipe.sites(height, width)


def bounded_policy(pipe, prompts: Sequence[str], phrases, boxes, *,
                   num_inference_steps: int = 50, first_refinement_step: int = 15,
                   refine_every: int = 5, num_clusters_per_subject: int = 3,
                   cross_mask_threshold: float = 0.2, self_mask_threshold: float = 0.2,
                   kmeans_n_init: int = 10, layout: Layout | None = None, cfg: bool = True,
                   height: int | None = None, width: int | None = None,
                   inputs: dict | None = None) -> Policy | None:
    """The masking policy (every site; refined masks in-graph). None without any box.

    ``layout``: the batch layout (default ``Layout(groups=B, members=1, cfg=cfg)``); its
    rows ``G·M`` must be the prompts, in order. ``inputs``: :func:`bounded_inputs`' dict.
    """
    height, width = pipe.check_size(height, width, len(prompts))
    inp = inputs if inputs is not None else bounded_inputs(pipe.tokenizer, prompts, phrases,
                                                           boxes, height, width)
    if not inp["subjects"].any():
        return None
    sites = _policy_sites(pipe, height, width)
    rec = record_sites(sites, _is_sdxl(pipe))
    if not rec:
        raise ValueError("bounded_policy: this model has no up block with attention to "
                         "refine the masks from")
    b, n = inp["subjects"].shape
    layout = Layout(groups=b, members=1, cfg=cfg) if layout is None else layout
    if layout.groups * layout.members != b:
        raise ValueError(f"layout: {layout.groups}×{layout.members} rows for {b} prompts")
    k = int(num_clusters_per_subject) * n
    t = rec[0].query_tokens
    if k > t:
        raise ValueError(f"num_clusters_per_subject={num_clusters_per_subject}: {k} clusters "
                         f"for {t} pixels of the {rec[0].resolution} maps; use fewer")
    refine = MaskRefine(
        leading=jnp.asarray(inp["leading"]), subjects=jnp.asarray(inp["subjects"]),
        refine_at=jnp.asarray(refine_schedule(int(num_inference_steps),
                                              int(first_refinement_step), int(refine_every))),
        key=jax.random.key_data(jax.random.key(0)),
        cross_threshold=jnp.float32(cross_mask_threshold),
        self_threshold=jnp.float32(self_mask_threshold),
        record_paths=tuple(s.path for s in rec), n_clusters=k, n_init=int(kmeans_n_init),
        name=MASK_NAME)
    op = SubjectMask(token_subject=jnp.asarray(inp["token_subject"]),
                     token_blocked=jnp.asarray(inp["blocked"]),
                     token_background=jnp.asarray(inp["background"]),
                     boxes=jnp.asarray(inp["boxes"]), refine=refine)
    return resolve([("", op)], sites, layout=layout)


def bounded_loss(cross_maps, self_maps, cross_regions, self_regions, token_weights: Array,
                 subjects: Array, cross_loss_scale: float | Array = 1.5,
                 self_loss_scale: float | Array = 0.5) -> Array:
    """Per-sample Bounded Attention loss (before normalisation), the reference's
    ``_save_loss_values`` + ``_compute_loss``.

    Args:
      cross_maps: per cross site ``(B, H, T, S)`` per-head probabilities.
      self_maps: per self site ``(B, H, T, T)``.
      cross_regions / self_regions: per site bool ``(B, N, T)`` box regions.
      token_weights: float32 ``(B, N, S)``: 1 at subject n's tokens and at EOS.
      subjects: bool ``(B, N)``.
    Returns:
      ``(B,)``: ``cross_scale·Σ_n (1 − iou_cross)² + self_scale·Σ_n (1 − iou_self)²``.
    """
    nsub = jnp.sum(subjects, axis=-1).astype(jnp.float32)           # (B,)

    def term(fgs, bgs):
        if not fgs:
            return jnp.zeros(subjects.shape, jnp.float32)
        fg = jnp.mean(jnp.stack(fgs), axis=0)
        bg = jnp.mean(jnp.stack(bgs), axis=0)
        den = fg + nsub[:, None] * bg
        iou = fg / jnp.where(subjects, den, 1.0)
        return jnp.where(subjects, (1.0 - iou) ** 2, 0.0)

    def fg_bg(ctx, reg):  # ctx (B, T, N): summed attention to each subject's context
        r = reg.astype(jnp.float32)
        bgm = 1.0 - jnp.any(reg, axis=1).astype(jnp.float32)        # (B, T)
        return jnp.einsum("bnt,btn->bn", r, ctx), jnp.einsum("bt,btn->bn", bgm, ctx)

    cf, cb, sf, sb = [], [], [], []
    for a, reg in zip(cross_maps, cross_regions):
        ctx = jnp.einsum("bts,bns->btn", a.astype(jnp.float32).sum(1), token_weights)
        f, g = fg_bg(ctx, reg)
        cf.append(f)
        cb.append(g)
    for a, reg in zip(self_maps, self_regions):
        ctx = jnp.einsum("btu,bnu->btn", a.astype(jnp.float32).sum(1),
                         reg.astype(jnp.float32))
        f, g = fg_bg(ctx, reg)
        sf.append(f)
        sb.append(g)
    return (cross_loss_scale * term(cf, cb).sum(-1)
            + self_loss_scale * term(sf, sb).sum(-1))


@struct.dataclass
class _LossArgs:
    dyn: dict
    cross_paths: tuple = struct.field(pytree_node=False, default=())
    self_paths: tuple = struct.field(pytree_node=False, default=())
    resolutions: tuple = struct.field(pytree_node=False, default=())
    record_op: int = struct.field(pytree_node=False, default=1)
    coupled: bool = struct.field(pytree_node=False, default=False)


def _loss_fn(acc, step, args: _LossArgs):
    rec = acc[args.record_op]
    res = dict(args.resolutions)
    d = args.dyn
    regions = {p: box_regions(d["boxes"], *res[p]) for p in args.cross_paths + args.self_paths}
    total = bounded_loss([rec[p] for p in args.cross_paths], [rec[p] for p in args.self_paths],
                         [regions[p] for p in args.cross_paths],
                         [regions[p] for p in args.self_paths], d["weights"], d["subjects"],
                         d["cross_scale"], d["self_scale"])
    nsub = jnp.maximum(jnp.sum(d["subjects"], axis=-1), 1).astype(jnp.float32)
    if args.coupled:  # the reference: one stopping value for the batch, Σ loss / (B·N)
        total = jnp.sum(total)
        return total + jax.lax.stop_gradient(total / jnp.sum(nsub) - total)
    # value: loss / N (checked against the threshold); gradient: that of the loss
    return total + jax.lax.stop_gradient(total / nsub - total)


def bounded_guidance(pipe, prompts: Sequence[str], phrases, boxes, *,
                     num_inference_steps: int = 50, init_step_size: float | None = None,
                     final_step_size: float | None = None, num_guidance_steps: int = 15,
                     num_gd_iterations: int = 5, loss_threshold: float = 0.2,
                     cross_loss_scale: float = 1.5, self_loss_scale: float = 0.5,
                     height: int | None = None, width: int | None = None,
                     reference_quirks: bool = False, inputs: dict | None = None
                     ) -> Guidance | None:
    """The guidance of Bounded Attention (module docstring); None without any box or
    without a guided step (all step sizes 0).

    Runs in the sampler's guidance hook: per guided step a bounded ``while_loop`` of at
    most ``num_gd_iterations`` gradient steps while the sample's ``loss / N`` is above
    ``loss_threshold`` (``reference_quirks``: the batch's ``Σ loss / (B·N)``).
    ``init_step_size`` / ``final_step_size`` default to the reference's: 8 → 2 on SD1/SD2
    (``run_sd.py``), 18 → 5 on SDXL (``run_xl.py``).
    """
    height, width = pipe.check_size(height, width, len(prompts))
    inp = inputs if inputs is not None else bounded_inputs(pipe.tokenizer, prompts, phrases,
                                                           boxes, height, width)
    n = int(num_inference_steps)
    defaults = SDXL_STEP_SIZES if _is_sdxl(pipe) else SD_STEP_SIZES
    init_step_size = defaults[0] if init_step_size is None else init_step_size
    final_step_size = defaults[1] if final_step_size is None else final_step_size
    steps = step_sizes(n, init_step_size, final_step_size, num_guidance_steps)
    if not inp["subjects"].any() or not steps.any():
        return None
    sites = _policy_sites(pipe, height, width)
    ls = loss_sites(sites, _is_sdxl(pipe))
    if not ls:
        raise ValueError("bounded_guidance: this model has no mid/up attention sites")
    b = len(prompts)
    mask = SubjectMask(token_subject=jnp.asarray(inp["token_subject"]),
                       token_blocked=jnp.asarray(inp["blocked"]),
                       token_background=jnp.asarray(inp["background"]),
                       boxes=jnp.asarray(inp["boxes"]), include_background=True)
    sel = "^(" + "|".join(s.path.replace(".", "[.]") for s in ls) + ")$"
    pol = resolve([(sel, (mask, RecordHeads())), ("", mask)], sites,
                  layout=Layout(groups=b, members=1, cfg=False))
    thr = np.where(steps != 0, np.float32(loss_threshold), np.float32(np.inf))
    weights = inp["token_subject"].astype(np.float32) + inp["eos"][:, None, :]
    args = _LossArgs(
        dyn={"boxes": jnp.asarray(inp["boxes"]), "weights": jnp.asarray(weights),
             "subjects": jnp.asarray(inp["subjects"]),
             "cross_scale": jnp.float32(cross_loss_scale),
             "self_scale": jnp.float32(self_loss_scale)},
        cross_paths=tuple(s.path for s in ls if s.kind == "cross"),
        self_paths=tuple(s.path for s in ls if s.kind == "self"),
        resolutions=tuple((s.path, tuple(s.resolution)) for s in ls),
        record_op=1, coupled=bool(reference_quirks))
    return Guidance(policy=pol, step_size=jnp.asarray(steps), loss_fn=_loss_fn, iterations=0,
                    threshold=jnp.asarray(thr), max_refine=int(num_gd_iterations),
                    refine_from="reset", loss_args=args)


def bounded_generate(pipe, prompts, phrases, boxes, *, num_inference_steps: int = 50,
                     guidance_scale: float = 7.5, seed=0, latents=None,
                     scheduler: str | None = None, height=None, width=None,
                     reference_quirks: bool = False, decode: bool = True,
                     return_masks: bool = False, policy: Policy | None = None,
                     padding: str = "reference", sdxl: dict | None = None, **kw):
    """Generate with Bounded Attention (one image per prompt).

    Args:
      prompts: B prompts (a str: one prompt, then ``phrases``/``boxes`` are its lists).
      phrases: per prompt, the subject phrases (words of the prompt; a phrase given twice
        takes successive occurrences).
      boxes: per prompt, one ``(x0, y0, x1, y1)`` per phrase, pixels or fractions (all ≤ 1).
      policy: another policy to compose with (applied first at each site, e.g.
        Prompt-to-Prompt's); its layout's rows must be the prompts in order.
      padding: ``"reference"``, ``"eos"`` or ``"blocked"`` (see :func:`bounded_inputs`).
      sdxl: SDXL only: ``Pipeline.generate``'s ``prompt_2``, ``negative_prompt_2`` and
        micro-conditioning keywords (``original_size``, …), forwarded to it.
      return_masks: also return the final regions, float32 ``(B, N, h, w)`` at the
        refinement maps' grid (the boxes there when no refinement ran), N subjects.
      kw: :func:`bounded_guidance` / :func:`bounded_policy` options (``init_step_size``,
        ``final_step_size``, ``num_guidance_steps``, ``num_gd_iterations``,
        ``loss_threshold``, ``cross_loss_scale``, ``self_loss_scale``,
        ``first_refinement_step``, ``refine_every``, ``num_clusters_per_subject``,
        ``cross_mask_threshold``, ``self_mask_threshold``, ``kmeans_n_init``).
    Returns:
      :class:`jattn.pipeline.GenerateOutput` (and the masks, NumPy, with ``return_masks``).
      Without any box it is plain generation (bit for bit).
    Raises:
      ValueError: see :func:`bounded_inputs`; unknown keyword arguments.
    """
    from jattn.policy.core import compose

    if isinstance(prompts, str):
        prompts, phrases, boxes = [prompts], [phrases], [boxes]
    prompts = list(prompts)
    gkeys = {"init_step_size", "final_step_size", "num_guidance_steps", "num_gd_iterations",
             "loss_threshold", "cross_loss_scale", "self_loss_scale"}
    pkeys = {"first_refinement_step", "refine_every", "num_clusters_per_subject",
             "cross_mask_threshold", "self_mask_threshold", "kmeans_n_init"}
    unknown = set(kw) - gkeys - pkeys
    if unknown:
        raise ValueError(f"bounded_generate: unknown options {sorted(unknown)}; see "
                         f"{sorted(gkeys | pkeys)}")
    h, w = pipe.check_size(height, width, len(prompts))
    inp = bounded_inputs(pipe.tokenizer, prompts, phrases, boxes, h, w, padding=padding)
    cfg = float(guidance_scale) > 1.0
    g = bounded_guidance(pipe, prompts, phrases, boxes, num_inference_steps=num_inference_steps,
                         height=h, width=w, reference_quirks=reference_quirks, inputs=inp,
                         **{k: v for k, v in kw.items() if k in gkeys})
    layout = policy.layout if policy is not None else None
    pol = bounded_policy(pipe, prompts, phrases, boxes, num_inference_steps=num_inference_steps,
                         layout=layout, cfg=cfg, height=h, width=w, inputs=inp,
                         **{k: v for k, v in kw.items() if k in pkeys})
    if policy is not None:
        pol = policy if pol is None else compose(policy, pol)
    out = pipe.generate(prompts, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, seed=seed, latents=latents,
                        scheduler=scheduler, height=height, width=width, guidance=g,
                        policy=pol, decode=decode, **(sdxl or {}))
    if not return_masks:
        return out
    m = final_masks(out.aux, MASK_NAME)
    return out, (None if m is None else np.asarray(m, np.float32))
