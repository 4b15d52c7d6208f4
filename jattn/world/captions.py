"""Captions of the world: spec → text in several natural variants, and text → spec.

A caption states exactly the attributes a :class:`SceneSpec` states (None = not
mentioned). Object phrase: ``[article] [size] [color] [fill] shape [position]``, e.g.
"a large red striped circle on the left"; objects joined by "and" (or "A, B and C");
optional background phrase. Variants (an int in ``range(NUM_CAPTION_VARIANTS)``) change
the prefix ("a photo of", "a drawing of", …), articles, joining and background phrasing,
so the same object lands on different token positions:

  variant 0   "a red circle on the left and a blue square on the right on a gray background"
  variant 1   "a photo of a red circle on the left and a blue square on the right on a gray background"
  variant 3   "there is a red circle on the left and a blue square on the right on a gray background"
  variant 7   "red circle on the left and blue square on the right on a gray background"
  variant 8   "a red circle on the left, a blue square on the right and a green star on a gray background"
"""

from __future__ import annotations

import re

from jattn.world.spec import (
    BACKGROUNDS, COLORS, POSITIONS, SHAPES, STATED_FILLS, STATED_SIZES, ObjectSpec, SceneSpec,
)

# Prefixes of 0, 3, 3, 2, 3, 4, 5 tokens, so object words land on many token positions.
PREFIXES = ("", "a photo of ", "a drawing of ", "there is ", "an image showing ",
            "a simple drawing of ", "a high quality photo of ")
# (prefix, articles): every prefix with articles, plus the bare form "red circle on the left"
_OPENINGS = tuple((p, True) for p in PREFIXES) + (("", False),)
BACKGROUND_FORMS = (" on a {} background", ", on a {} background", " in front of a {} background")
NUM_CAPTION_VARIANTS = len(_OPENINGS) * 2 * len(BACKGROUND_FORMS)  # 48

_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "dots": "dotted",
             "stripes": "striped", "checkerboard": "checkered", "checked": "checkered"}
_SYNONYM_RE = re.compile(r"\b(?:" + "|".join(_SYNONYMS) + r")\b")
_PREFIX_RE = re.compile(
    r"^(?:" + "|".join(re.escape(p) for p in PREFIXES if p)
    + r"|(?:an? )?(?:[a-z ]+ )?(?:photo|drawing|image|picture|rendering|painting|illustration"
    r"|render) (?:of|showing|with) |there (?:is|are) )")
_BG_RE = re.compile(
    r"(?:,\s*)?\s*(?:on|in front of|against|with) (?:an? |the )?("
    + "|".join(sorted(map(re.escape, BACKGROUNDS), key=len, reverse=True)) + r") background")
_POS_RE = re.compile("|".join(re.escape(p) for p in POSITIONS))
_ARTICLES = {"a", "an", "the"}
_GENERIC_NOUNS = {"shape", "object"}


def decode_variant(variant: int) -> tuple[str, bool, bool, str]:
    """variant → (prefix, articles, comma_join, background_form).

    Raises:
      ValueError: variant outside ``range(NUM_CAPTION_VARIANTS)``.
    """
    if not 0 <= variant < NUM_CAPTION_VARIANTS:
        raise ValueError(f"caption variant {variant} not in range({NUM_CAPTION_VARIANTS})")
    v = int(variant)
    prefix, articles = _OPENINGS[v % len(_OPENINGS)]
    v //= len(_OPENINGS)
    comma_join = v % 2 == 1
    return prefix, articles, comma_join, BACKGROUND_FORMS[v // 2]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def object_phrase(obj: ObjectSpec, articles: bool = True) -> str:
    """e.g. "a large red striped circle on the left"; an unstated shape reads "shape"."""
    words = [w for w in (obj.size, obj.color, obj.fill) if w is not None]
    words.append(obj.shape if obj.shape is not None else "shape")
    text = " ".join(words)
    if articles:
        text = f"{_article(words[0])} {text}"
    if obj.position is not None:
        text = f"{text} {obj.position}"
    return text


def caption_for(spec: SceneSpec, variant: int = 0) -> str:
    """The caption of ``spec`` in variant ``variant`` (see module docstring).

    Raises:
      ValueError: variant out of range.
    """
    prefix, articles, comma_join, bg_form = decode_variant(variant)
    phrases = [object_phrase(o, articles) for o in spec.objects]
    if len(phrases) == 1:
        body = phrases[0]
    elif comma_join:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        body = " and ".join(phrases)
    text = prefix + body
    if spec.background is not None:
        text += bg_form.format(spec.background)
    return text


def _parse_object(chunk: str, text: str) -> ObjectSpec:
    fields: dict[str, str] = {}

    def put(name, value):
        if name in fields and fields[name] != value:
            raise ValueError(f"object phrase {chunk!r} of prompt {text!r} states two {name}s")
        fields[name] = value

    m = _POS_RE.search(chunk)
    if m:
        put("position", m.group(0))
        chunk_rest = chunk[: m.start()] + " " + chunk[m.end():]
    else:
        chunk_rest = chunk
    generic = False
    for w in chunk_rest.split():
        w = _SYNONYMS.get(w, w)
        if w in _ARTICLES:
            continue
        if w in STATED_SIZES:
            put("size", w)
        elif w in COLORS:
            put("color", w)
        elif w in STATED_FILLS:
            put("fill", w)
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            put("shape", w if w in SHAPES else w[:-1])
        elif w in _GENERIC_NOUNS:
            generic = True
        elif w in ("medium", "solid"):
            continue  # the defaults, never stated
        else:
            raise ValueError(
                f"unknown word {w!r} in object phrase {chunk!r} of prompt {text!r}; the world's "
                f"words are {COLORS + SHAPES + STATED_SIZES + STATED_FILLS} and {POSITIONS}")
    if "shape" not in fields and not generic:
        raise ValueError(f"object phrase {chunk!r} of prompt {text!r} names no shape "
                         f"(one of {SHAPES}, or 'shape'/'object')")
    return ObjectSpec(**fields)


def parse_prompt(text: str) -> SceneSpec:
    """What a prompt asks for, as a :class:`SceneSpec` (inverse of :func:`caption_for`).

    Accepts every caption variant, "grey"/"centre" spellings, optional trailing period.

    Raises:
      ValueError: a word outside the world's vocabulary, an object phrase without a shape
        noun, conflicting attributes, or more than 3 objects.
    """
    t = re.sub(r"\s+", " ", text.lower().strip()).rstrip(".").strip()
    t = _SYNONYM_RE.sub(lambda m: _SYNONYMS[m.group(0)], t)
    background = None
    m = _BG_RE.search(t)
    if m:
        background = m.group(1)
        t = (t[: m.start()] + t[m.end():]).strip()
    t = _PREFIX_RE.sub("", t)
    chunks = [c.strip() for c in re.split(r",\s*(?:and\s+)?|\s+and\s+", t) if c.strip()]
    if not chunks:
        raise ValueError(f"prompt {text!r} names no object")
    return SceneSpec(tuple(_parse_object(c, text) for c in chunks), background)
