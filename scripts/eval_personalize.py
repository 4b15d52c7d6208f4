#!/usr/bin/env python
"""Nested Attention vs its baselines on held-out subjects of the world: identity and prompt
alignment, measured by the world's detector (issue 13, §"What it must show").

  python scripts/eval_personalize.py --cases 64 --two-subject 16 --steps 25 --out DIR
  python scripts/eval_personalize.py --weights-nested /tmp/nested_mid.safetensors \\
      --rows nested plain --cases 8 --two-subject 2 --steps 10 --out /tmp/ev

Cases (:func:`make_cases`, deterministic, a pure function of ``--case-seed`` and the case
index): subjects are the held-out (colour, shape) pairs of :mod:`jattn.world.pairs`
(:data:`HELDOUT_SUBJECT_PAIRS`: never a subject nor another object in training), cycled so
every pair appears equally often, each with both renderable fills (solid and outlined;
rings solid); size medium (3/4) or large (1/4). The subject image is the subject alone
near the centre of a background other than the target's (as the training pairs); the
prompt always states the subject's position (one of five) and the background, and w.p. 1/2
another object (a training (colour, shape) pair of another colour and shape, at another
stated position), in the world's caption variants, the subject written ``s*``:
"a photo of s* on the left and a blue square at the top on a beige background".

* ``single`` (``--cases``, the headline): identity and alignment below;
* ``two`` (``--two-subject``): two different held-out subjects (solid) in one prompt, "s*
  on the left and s* on the right on a gray background" (opposite positions), the j-th s*
  = subject image j;
* ``patterned`` (``--patterned``): striped / dotted subjects, reported apart — the bundled
  VAE draws these fills as solid (../shared/BUNDLED_LIMITS.md), a limit of the model, not
  of the method: their identity is colour + shape, fill is shown for information.

Figures per row (:func:`score_case`, :func:`summarize`; ``jattn.world.evaluate.
score_generated`` matches detections to the prompt's objects one-to-one):

* identity: the detection matched to the subject has the subject's colour, shape and fill
  (goal ≥ 0.85); also colour + shape alone;
* alignment: the subject's stated position right, the background right, and the other
  stated object (when there is one) found with its colour, shape and position (goal ≥
  0.85); each part apart too;
* two subjects: both subjects' identities right (goal ≥ 0.7), and both right at their
  stated positions.

Rows: ``nested`` (Nested Attention, default weights = the shipped
jattn/assets/nested/nested_attention.safetensors), ``token`` (baseline (a): one learned
subject token predicted by the encoder), ``ip_adapter`` (baseline (b): decoupled image
cross-attention), each from a weights file of ``scripts/train_personalize.py``
(``--weights-<row>``; without it, ``<--ckpt-root>/personalize_<row>/weights.safetensors``
when that training has finished, else the row is reported "not trained yet" with its
step count), and ``plain``: plain generation of the prompt with the subject's words
instead of s* ("a large red outlined circle on the left …"): identity by text, the
reference for alignment. Every row uses the same cases, seeds, sampler, steps and CFG
(the empty negative prompt; the subject acts on the conditional rows only). Two subjects
with the baselines: ``token`` predicts one embedding per s* slot; ``ip_adapter`` gets
both subjects' tokens concatenated (IP-Adapter's multi-image prompt), it cannot route them.

Output: one table (printed) and ``--out/result.json`` (summary per row, settings, the
cases, per-case records); ``--save-images`` also writes ``--out/images/<row>/<kind>_<i>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("nested", "token", "ip_adapter", "plain")
TRAINED = ("nested", "token", "ip_adapter")
GOALS = {"identity": 0.85, "alignment": 0.85, "two_identity": 0.70}
KINDS = ("single", "two", "patterned")
_CASE_STREAM = 1313_7  # case generator's stream (never the training pairs' seeds)
_OPPOSITE = (("on the left", "on the right"), ("at the top", "at the bottom"))


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Subject:
    """A held-out subject: what it looks like (fill/size as the world's words, "solid"
    and "medium" included) and its subject image (uint8 (128, 128, 3))."""

    color: str
    shape: str
    fill: str
    size: str
    image_background: str
    image: np.ndarray = dataclasses.field(repr=False, compare=False)

    def object_spec(self, position: str | None = None):
        """The subject as a stated :class:`ObjectSpec` (size unstated: not scored)."""
        from jattn.world.spec import ObjectSpec

        return ObjectSpec(self.color, self.shape, None, position,
                          None if self.fill == "solid" else self.fill)

    def words(self) -> str:
        """What s* stands for, with an article: "a large red outlined circle"."""
        from jattn.world.pairs import subject_phrase
        from jattn.world.spec import ObjectSpec

        return subject_phrase(ObjectSpec(self.color, self.shape,
                                         self.size if self.size != "medium" else None, None,
                                         None if self.fill == "solid" else self.fill))


@dataclasses.dataclass(frozen=True)
class Case:
    """One evaluation case.

    Attributes:
      index: its index within its kind.
      kind: ``"single"``, ``"two"`` or ``"patterned"``.
      subjects: 1 (2 for ``"two"``) :class:`Subject` s, the j-th for the j-th s*.
      prompt: with ``s*``; plain_prompt: with the subjects' words instead.
      spec: what the prompt states, subjects first (for the detector).
      other: index in ``spec.objects`` of the other stated object, or None.
    """

    index: int
    kind: str
    subjects: tuple
    prompt: str
    plain_prompt: str
    spec: object
    other: int | None

    def to_json(self) -> dict:
        return {"index": self.index, "kind": self.kind, "prompt": self.prompt,
                "plain_prompt": self.plain_prompt,
                "subjects": [{"color": s.color, "shape": s.shape, "fill": s.fill,
                              "size": s.size, "image_background": s.image_background}
                             for s in self.subjects],
                "background": self.spec.background,
                "positions": [o.position for o in self.spec.objects],
                "other": None if self.other is None else {
                    "color": self.spec.objects[self.other].color,
                    "shape": self.spec.objects[self.other].shape}}


def _subject(color, shape, fill, size, target_bg, rng) -> Subject:
    """The subject alone near the centre (±4 px) of a background other than the target's."""
    from jattn.world.scene import render
    from jattn.world.spec import BACKGROUNDS, ObjectSpec, SceneSpec

    bgs = [b for b in BACKGROUNDS if b != target_bg]
    sbg = bgs[int(rng.integers(len(bgs)))]
    spec = SceneSpec((ObjectSpec(color, shape, size if size != "medium" else None,
                                 "in the center", None if fill == "solid" else fill),), sbg)
    image = render(spec, rng, variant=0, split=None).image
    return Subject(color, shape, fill, size, sbg, image)


def _caption(phrases: list[str], background: str, variant: int) -> str:
    from jattn.world.captions import decode_variant

    prefix, _, comma_join, bg_form = decode_variant(variant)
    if len(phrases) > 2 and comma_join:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        body = " and ".join(phrases)
    return prefix + body + bg_form.format(background)


def _expand(prompt: str, subjects) -> str:
    """The prompt with the j-th s* replaced by subject j's words."""
    out = prompt
    for s in subjects:
        out = out.replace("s*", s.words(), 1)
    return out


def make_cases(n_single: int = 64, n_two: int = 16, n_patterned: int = 16, *,
               seed: int = 0, split: str = "heldout") -> list[Case]:
    """The evaluation cases (see the module docstring), in order single, two, patterned;
    case i of a kind is a pure function of ``(seed, kind, i, split)``.

    ``split="train"`` draws the subjects from the training subjects' (colour, shape) pairs
    instead (a diagnostic: is identity learned at all, or only not carried to new
    combinations?); the headline is ``"heldout"``.

    Raises:
      ValueError: a negative count, no case at all, or an unknown split.
    """
    from jattn.world.captions import NUM_CAPTION_VARIANTS, decode_variant, object_phrase
    from jattn.world.pairs import HELDOUT_SUBJECT_PAIRS, other_pairs, subject_pairs
    from jattn.world.spec import BACKGROUNDS, POSITIONS, ObjectSpec, SceneSpec

    for name, v in (("--cases", n_single), ("--two-subject", n_two), ("--patterned", n_patterned)):
        if v < 0:
            raise ValueError(f"{name} {v}: give a count ≥ 0")
    if n_single + n_two + n_patterned == 0:
        raise ValueError("--cases/--two-subject/--patterned: at least one case is needed")
    if split not in ("heldout", "train"):
        raise ValueError(f"--subject-split {split!r}: use 'heldout' or 'train'")
    pairs = sorted(HELDOUT_SUBJECT_PAIRS) if split == "heldout" else list(subject_pairs("train"))
    others = other_pairs()
    stream = _CASE_STREAM if split == "heldout" else _CASE_STREAM + 1
    cases: list[Case] = []
    for kind, n in (("single", n_single), ("two", n_two), ("patterned", n_patterned)):
        k_code = KINDS.index(kind)
        for i in range(n):
            rng = np.random.default_rng((seed, stream, k_code, i))
            variant = int(rng.integers(NUM_CAPTION_VARIANTS))
            articles = decode_variant(variant)[1]
            background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
            size = "large" if rng.random() < 0.25 else "medium"
            if kind == "two":
                pa = pairs[i % len(pairs)]
                if split == "heldout":  # one pair per colour
                    pb = pairs[(i + int(rng.integers(1, len(pairs)))) % len(pairs)]
                else:
                    cand = [p for p in pairs if p[0] != pa[0]]
                    pb = cand[int(rng.integers(len(cand)))]
                fills = ["solid", "solid"]
                pos = list(_OPPOSITE[int(rng.integers(2))])
                if rng.random() < 0.5:
                    pos = pos[::-1]
                subs = tuple(_subject(c, s, f, "medium", background, rng)
                             for (c, s), f in zip((pa, pb), fills))
                prompt = _caption([f"s* {p}" for p in pos], background, variant)
                spec = SceneSpec(tuple(s.object_spec(p) for s, p in zip(subs, pos)), background)
                cases.append(Case(i, kind, subs, prompt, _expand(prompt, subs), spec, None))
                continue
            color, shape = pairs[i % len(pairs)]
            if kind == "single":
                fill = ("solid", "outlined")[(i // len(pairs) if split == "heldout" else i) % 2]
                fill = "solid" if shape == "ring" else fill
            else:
                fill = ("striped", "dotted")[(i // len(pairs)) % 2]
            position = POSITIONS[int(rng.integers(len(POSITIONS)))]
            sub = _subject(color, shape, fill, size, background, rng)
            objs = [sub.object_spec(position)]
            phrases = [f"s* {position}"]
            other = None
            if rng.random() < 0.5:
                cand = [p for p in others if p[0] != color and p[1] != shape]
                oc, osh = cand[int(rng.integers(len(cand)))]
                free = [p for p in POSITIONS if p != position]
                opos = free[int(rng.integers(len(free)))]
                ospec = ObjectSpec(oc, osh, None, opos, None)
                objs.append(ospec)
                other = 1
                oph = object_phrase(ospec, articles)
                phrases = phrases + [oph] if rng.random() < 0.5 else [oph] + phrases
            prompt = _caption(phrases, background, variant)
            cases.append(Case(i, kind, (sub,), prompt, _expand(prompt, (sub,)),
                              SceneSpec(tuple(objs), background), other))
    return cases


# ----------------------------------------------------------------------------- scoring
def _as_world_image(image: np.ndarray) -> np.ndarray:
    """uint8 (128, 128, 3) for the detector (nearest resize of another size: tiny test
    pipelines)."""
    from jattn.world.spec import IMAGE_SIZE

    image = np.asarray(image, np.uint8)
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                          Image.NEAREST))
    return image


def score_case(image: np.ndarray, case: Case) -> dict:
    """Judge one image of ``case`` (detector only).

    Returns dict: ``identity`` (per subject: colour, shape and fill of the matched detection
    right), ``colour_shape`` (per subject), ``fill_ok`` (per subject), ``position_ok`` (per
    subject), ``background_ok``, ``other_ok`` (None without another object), ``alignment``
    (subject positions, background and the other object right), ``detected`` (per subject
    the matched detection's colour/shape/fill/position or None).
    """
    from jattn.world.evaluate import score_generated

    r = score_generated(_as_world_image(image), case.spec)
    ident, cs, fills, pos, det = [], [], [], [], []
    for j, s in enumerate(case.subjects):
        o = r["objects"][j]
        d = o["detection"]
        c_ok = d is not None and d["color"] == s.color and d["shape"] == s.shape
        f_ok = d is not None and d["fill"] == s.fill
        cs.append(bool(c_ok))
        fills.append(bool(f_ok))
        ident.append(bool(c_ok and f_ok))
        pos.append(bool(o["position_ok"]))
        det.append(None if d is None else {k: d[k] for k in ("color", "shape", "fill",
                                                               "position", "size")})
    other_ok = None
    if case.other is not None:
        o = r["objects"][case.other]
        other_ok = bool(o["found"] and o["color_ok"] and o["shape_ok"] and o["position_ok"])
    bg_ok = bool(r["background_ok"])
    return {"identity": ident, "colour_shape": cs, "fill_ok": fills, "position_ok": pos,
            "background_ok": bg_ok, "other_ok": other_ok,
            "alignment": bool(all(pos) and bg_ok and other_ok is not False),
            "detected": det, "background": r["background"],
            "num_detections": r["num_detections"]}


def _mean(v) -> float | None:
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else None


def summarize(records: list[dict], cases: list[Case]) -> dict:
    """Figures of one row from its per-case records (same order as ``cases``)."""
    by = {k: [(c, r) for c, r in zip(cases, records) if c.kind == k] for k in KINDS}
    out: dict = {}
    s = by["single"]
    if s:
        ident = [r["identity"][0] for _, r in s]
        align = [r["alignment"] for _, r in s]
        out["single"] = {
            "cases": len(s), "identity": _mean(ident),
            "colour_shape": _mean(r["colour_shape"][0] for _, r in s),
            "fill": _mean(r["fill_ok"][0] for _, r in s),
            "identity_solid": _mean(r["identity"][0] for c, r in s
                                    if c.subjects[0].fill == "solid"),
            "identity_outlined": _mean(r["identity"][0] for c, r in s
                                       if c.subjects[0].fill == "outlined"),
            "alignment": _mean(align),
            "position": _mean(r["position_ok"][0] for _, r in s),
            "background": _mean(r["background_ok"] for _, r in s),
            "other_object": _mean(r["other_ok"] for _, r in s),
            "identity_and_alignment": _mean(i and a for i, a in zip(ident, align)),
            "identity_by_subject": {
                f"{c0} {s0}": _mean(r["identity"][0] for c, r in s
                                    if (c.subjects[0].color, c.subjects[0].shape) == (c0, s0))
                for c0, s0 in sorted({(c.subjects[0].color, c.subjects[0].shape)
                                      for c, _ in s})}}
    t = by["two"]
    if t:
        out["two"] = {
            "cases": len(t), "both_identity": _mean(all(r["identity"]) for _, r in t),
            "both_colour_shape": _mean(all(r["colour_shape"]) for _, r in t),
            "both_identity_and_position": _mean(
                all(r["identity"]) and all(r["position_ok"]) for _, r in t),
            "alignment": _mean(r["alignment"] for _, r in t)}
    p = by["patterned"]
    if p:
        out["patterned"] = {
            "cases": len(p), "colour_shape": _mean(r["colour_shape"][0] for _, r in p),
            "fill": _mean(r["fill_ok"][0] for _, r in p),
            "alignment": _mean(r["alignment"] for _, r in p)}
    return out


def _f(v) -> str:
    return "  —  " if v is None else f"{v:5.3f}"


def format_table(result: dict) -> str:
    """The one table: a line per row (trained or not)."""
    head = (f"{'row':<12}{'identity':>9}{'solid':>7}{'outl':>7}{'col+shape':>10}{'align':>7}"
            f"{'pos':>7}{'bg':>7}"
            f"{'other':>7}{'id&al':>7}{'2-subj id':>10}{'2-subj id+pos':>14}"
            f"{'patt c+s':>9}{'s/img':>7}  note")
    lines = [head, "-" * len(head)]
    for row, r in result["rows"].items():
        if r.get("status") != "ok":
            lines.append(f"{row:<12}{r.get('note', r.get('status', '')):>9}")
            continue
        sm = r["summary"]
        s, t, p = sm.get("single", {}), sm.get("two", {}), sm.get("patterned", {})
        lines.append(
            f"{row:<12}{_f(s.get('identity')):>9}{_f(s.get('identity_solid')):>7}"
            f"{_f(s.get('identity_outlined')):>7}{_f(s.get('colour_shape')):>10}"
            f"{_f(s.get('alignment')):>7}{_f(s.get('position')):>7}{_f(s.get('background')):>7}"
            f"{_f(s.get('other_object')):>7}{_f(s.get('identity_and_alignment')):>7}"
            f"{_f(t.get('both_identity')):>10}{_f(t.get('both_identity_and_position')):>14}"
            f"{_f(p.get('colour_shape')):>9}{r['seconds_per_image']:7.2f}  {r.get('note', '')}")
    st = result["settings"]
    lines.append(f"goals: identity ≥ {GOALS['identity']}, alignment ≥ {GOALS['alignment']}, "
                 f"two subjects both identities ≥ {GOALS['two_identity']}; "
                 f"{st['cases']} single / {st['two_subject']} two-subject / "
                 f"{st['patterned']} patterned cases × {len(st['seeds'])} seed(s), "
                 f"{st['steps']} steps, CFG {st['guidance_scale']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rows
def _training_status(folder: Path) -> dict:
    """``{"step", "steps"}`` of a training folder (metrics.jsonl, config.json), Nones
    when unknown."""
    step = steps = None
    m = folder / "metrics.jsonl"
    if m.is_file():
        for line in m.read_text().splitlines():
            try:
                step = int(json.loads(line).get("step", step))
            except (ValueError, TypeError, AttributeError):
                continue
    c = folder / "config.json"
    if c.is_file():
        try:
            steps = int(json.loads(c.read_text()).get("steps"))
        except (ValueError, TypeError):
            pass
    return {"step": step, "steps": steps}


def resolve_row(row: str, weights: str | None, ckpt_root: Path) -> dict:
    """Where a row's weights come from: ``{"status": "ok", "weights": path, "note"}`` or
    ``{"status": "not trained yet", "note", "step", "steps"}``."""
    if row == "plain":
        return {"status": "ok", "weights": None, "note": "text: the subject's words"}
    folder = ckpt_root / f"personalize_{row}"
    st = _training_status(folder)
    step_note = (f"step {st['step']}/{st['steps']}" if st["step"] is not None else "")
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise SystemExit(f"--weights-{row.replace('_', '-')} {weights}: no such file "
                             "(export one with scripts/train_personalize.py --export-only)")
        return {"status": "ok", "weights": str(p), "note": f"{p.name}", **st}
    if row == "nested":
        from jattn.methods.personalize import DEFAULT_WEIGHTS

        if DEFAULT_WEIGHTS.is_file():
            return {"status": "ok", "weights": str(DEFAULT_WEIGHTS), "note": "shipped weights"}
    p = folder / "weights.safetensors"
    finished = st["step"] is not None and st["steps"] is not None and st["step"] >= st["steps"]
    if p.is_file() and finished:
        return {"status": "ok", "weights": str(p), "note": step_note, **st}
    return {"status": "not trained yet", "note": "not trained yet"
            + (f" ({step_note})" if step_note else " (no run)"), **st}


@functools.lru_cache(maxsize=4)
def _slot_context_fn(text_config, tok_id: int):
    """``(text params, ids (B, S), slot embeddings (B, J, D)) -> context``: the j-th
    placeholder token of a row gets ``slots[:, j]`` as its input embedding."""
    import jax
    import jax.numpy as jnp

    from jattn.models import clip_text as clip_lib

    def run(text, ids, slots):
        table = text["text_model"]["embeddings"]["token_embedding"]["embedding"]
        emb = jnp.take(table, ids, axis=0).astype(jnp.float32)
        is_tok = ids == tok_id
        slot = jnp.clip(jnp.cumsum(is_tok, axis=1) - 1, 0, slots.shape[1] - 1)
        rep = jnp.take_along_axis(slots.astype(jnp.float32), slot[..., None], axis=1)
        emb = jnp.where(is_tok[..., None], rep, emb)
        return clip_lib.CLIPTextModel(text_config).apply(
            {"params": text}, ids, inputs_embeds=emb)["last_hidden_state"]

    return jax.jit(run)


def generate_multi(pipe, loaded, subject_images, prompts, seeds, *, steps: int,
                   guidance_scale: float, scheduler: str | None = None,
                   scale: float | None = None):
    """Images of a trained variant for prompts with J ≥ 1 ``s*`` each: row i's j-th s* is
    ``subject_images[i][j]``, in one call (one compiled program per batch size and J).

    ``loaded``: ``(variant, encoder config, params, info)`` of
    :func:`jattn.train.personalize.load_weights`. nested: per-slot nested K̃/Ṽ
    (:func:`jattn.methods.personalize.personalize_policy`, as :func:`personalize`);
    token: per-slot predicted embeddings; ip_adapter: the row's subjects' tokens
    concatenated (λ on the conditional rows). ``scale``: λ (nested: on V*, default 1;
    ip_adapter: default the trained ``ip_scale``). Returns uint8 images ``(B, H, W, 3)``.
    """
    import jax.numpy as jnp

    from jattn.methods.personalize import (load_subject_images, personalize_policy,
                                           placeholder_positions)
    from jattn.models import nested as nested_lib
    from jattn.train.personalize import _encode_fn, ip_adapter_policy

    variant, enc, params, info = loaded
    b = len(prompts)
    j = len(subject_images[0])
    flat = [im for row in subject_images for im in row]
    pixels = load_subject_images(flat, enc)
    _, ids, pos = placeholder_positions(pipe.tokenizer, prompts,
                                        placeholder_token=enc.placeholder_token,
                                        max_length=pipe.text_config.max_position_embeddings)
    if pos.shape[1] != j or (pos < 0).any():
        raise ValueError(f"every prompt must have exactly {j} s* (one per subject image)")
    tok_id = pipe.tokenizer(enc.placeholder_token, add_special_tokens=False)["input_ids"][0]
    tokens = _encode_fn(enc)(params, jnp.asarray(pixels, jnp.float32))  # (B·J, R, D)
    ctx_fn = _slot_context_fn(pipe.text_config, tok_id)
    text = pipe.params["text_encoder"]
    ids = jnp.asarray(ids, jnp.int32)
    pol = None
    if variant == "token":
        cond = ctx_fn(text, ids, tokens[:, 0].reshape(b, j, -1))
    else:
        ph = jnp.asarray(params["placeholder"]["text_encoder"], jnp.float32)
        cond = ctx_fn(text, ids, jnp.broadcast_to(ph, (b, j, ph.shape[-1])))
        sites = pipe.sites()
        if variant == "nested":
            keys, values = nested_lib.nested_kv(params, tokens, sites)
            subj = np.arange(b * j, dtype=np.int32).reshape(b, j)
            pol = personalize_policy(pipe, keys, values, pos, subj,
                                     scale=1.0 if scale is None else scale)
        else:
            lam = float(info.get("ip_scale", 1.0) if scale is None else scale)
            tok = tokens.reshape(b, j * tokens.shape[1], tokens.shape[2])
            pol = ip_adapter_policy(pipe, params, tok, lam, sites)
    uncond = pipe.encode_prompts([""] * b, name="negative_prompt")
    return pipe.generate(prompts, prompt_embeds=cond, uncond_embeds=uncond, seed=list(seeds),
                         num_inference_steps=steps, guidance_scale=guidance_scale,
                         scheduler=scheduler, policy=pol).images


def _chunks(items: list, size: int):
    """Fixed-size chunks, the last padded by repeating its last item (one batch shape:
    no recompilation); yields ``(chunk, number of real items)``."""
    for s in range(0, len(items), size):
        c = items[s:s + size]
        n = len(c)
        yield c + [c[-1]] * (size - n), n


def run_row(pipe, row: str, weights: str | None, cases: list[Case], seeds: list[int], *,
            steps: int, guidance_scale: float, batch: int, scheduler: str | None = None,
            scale: float | None = None, image_dir: Path | None = None,
            log=print) -> tuple[list[dict], float]:
    """Generate and score every (case, seed) of one row; returns ``(records, seconds)``
    (records: ``case × seed``, case-major)."""
    loaded = None
    if row != "plain":
        from jattn.train.personalize import load_weights

        loaded = load_weights(weights)
        if loaded[0] != row:
            raise SystemExit(f"--weights-{row.replace('_', '-')} {weights}: a {loaded[0]!r} "
                             f"weights file, not {row!r}")
    jobs = [(ci, s) for ci in range(len(cases)) for s in seeds]
    records: list = [None] * len(jobs)
    t0 = time.perf_counter()
    for j_count in (1, 2):
        idx = [k for k, (ci, _) in enumerate(jobs) if len(cases[ci].subjects) == j_count]
        for chunk, n in _chunks(idx, batch):
            cs = [cases[jobs[k][0]] for k in chunk]
            sd = [10_000 * jobs[k][1] + KINDS.index(c.kind) * 1000 + c.index
                  for k, c in zip(chunk, cs)]
            if row == "plain":
                images = pipe.generate([c.plain_prompt for c in cs], seed=sd,
                                       num_inference_steps=steps, guidance_scale=guidance_scale,
                                       scheduler=scheduler).images
            else:
                images = generate_multi(pipe, loaded, [[s.image for s in c.subjects] for c in cs],
                                        [c.prompt for c in cs], sd, steps=steps,
                                        guidance_scale=guidance_scale, scheduler=scheduler,
                                        scale=scale)
            for k, c, img, seed in list(zip(chunk, cs, images, sd))[:n]:
                rec = score_case(img, c)
                rec.update(kind=c.kind, case=c.index, seed=seed)
                records[k] = rec
                if image_dir is not None:
                    from PIL import Image

                    d = image_dir / row
                    d.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.asarray(img)).save(d / f"{c.kind}_{c.index:03d}_s{seed}.png")
            log(f"[eval_personalize] {row}: {sum(r is not None for r in records)}/{len(jobs)} "
                f"images, {time.perf_counter() - t0:.0f} s")
    return records, time.perf_counter() - t0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="rows of the table (default: all four)")
    ap.add_argument("--weights-nested", default=None,
                    help="default: the shipped jattn/assets/nested/nested_attention.safetensors")
    ap.add_argument("--weights-token", default=None,
                    help="default: CKPT_ROOT/personalize_token/weights.safetensors once trained")
    ap.add_argument("--weights-ip", dest="weights_ip_adapter", default=None,
                    help="default: CKPT_ROOT/personalize_ip_adapter/weights.safetensors once "
                         "trained")
    ap.add_argument("--ckpt-root", default="/work/ckpt",
                    help="training folders personalize_<variant> (configs/personalize_world.py)")
    ap.add_argument("--cases", type=int, default=64, help="single-subject cases (headline)")
    ap.add_argument("--two-subject", type=int, default=16, help="two-subject cases")
    ap.add_argument("--patterned", type=int, default=16,
                    help="striped/dotted subject cases (reported apart)")
    ap.add_argument("--case-seed", type=int, default=0)
    ap.add_argument("--subject-split", choices=("heldout", "train"), default="heldout",
                    help="train: subjects of training (colour, shape) pairs — a diagnostic, "
                         "not the measure (default: held out)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--scheduler", default=None, help="default: the model's")
    ap.add_argument("--scale", type=float, default=None,
                    help="λ of the trained rows (nested: on V*, default 1; ip_adapter: default "
                         "its trained ip_scale; token: none) — a diagnostic")
    ap.add_argument("--batch", type=int, default=16, help="images per compiled call")
    ap.add_argument("--model", default=None, help="base model folder (default: the bundled)")
    ap.add_argument("--out", default=None, help="folder for result.json (and images)")
    ap.add_argument("--save-images", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: give a positive number of steps")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: give a positive batch size")
    try:
        cases = make_cases(args.cases, args.two_subject, args.patterned, seed=args.case_seed,
                           split=args.subject_split)
    except ValueError as e:
        ap.error(str(e))
    ckpt_root = Path(args.ckpt_root)
    rows = {r: resolve_row(r, getattr(args, f"weights_{r}", None), ckpt_root)
            for r in ROWS if r in args.rows}

    import jax

    import jattn

    pipe = jattn.load(args.model)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    result = {"rows": {}, "settings": dict(
        cases=args.cases, two_subject=args.two_subject, patterned=args.patterned,
        case_seed=args.case_seed, subject_split=args.subject_split, seeds=args.seeds,
        steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler or "model default",
        batch=args.batch, scale=args.scale, model=str(args.model or "bundled"),
        backend=jax.default_backend(),
        goals=GOALS)}
    all_records = {}
    for row, info in rows.items():
        if info["status"] != "ok":
            result["rows"][row] = info
            print(f"[eval_personalize] {row}: {info['note']}", flush=True)
            continue
        recs, secs = run_row(pipe, row, info["weights"], cases, args.seeds, steps=args.steps,
                             guidance_scale=args.guidance_scale, batch=args.batch,
                             scheduler=args.scheduler, scale=args.scale,
                             image_dir=out / "images" if (out and args.save_images) else None,
                             log=lambda m: print(m, flush=True))
        cases_rep = [cases[i] for i in range(len(cases)) for _ in args.seeds]
        result["rows"][row] = dict(info, summary=summarize(recs, cases_rep),
                                   seconds=secs, seconds_per_image=secs / max(len(recs), 1))
        all_records[row] = recs
    table = format_table(result)
    print(table, flush=True)
    result["table"] = table
    if out:
        (out / "result.json").write_text(json.dumps(
            dict(result, cases=[c.to_json() for c in cases], records=all_records), indent=1))
        print(f"[eval_personalize] wrote {out / 'result.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
