"""Argument checks shared by the API and the CLI: one clear ``ValueError``/``TypeError``
naming the argument and the fix, raised before any compute.

Every function returns the normalised value (e.g. a list of ints for seeds).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["whole_number", "finite_number", "seed_list", "prompt_list", "float_array",
           "MAX_SEED"]

MAX_SEED = 2**32 - 1


def whole_number(value: Any, name: str, *, minimum: int | None = None,
                 maximum: int | None = None) -> int:
    """An int (not a bool; a float only when integral, e.g. 50.0) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a whole number.")
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        v = int(value)
    else:
        raise ValueError(f"{name}={value!r}: expected a whole number (e.g. "
                         f"{max(minimum or 0, int(value) if math.isfinite(value) else 0)}).")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}={v}: must be ≥ {minimum}.")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name}={v}: must be ≤ {maximum}.")
    return v


def finite_number(value: Any, name: str, *, minimum: float | None = None,
                  maximum: float | None = None, hint: str = "") -> float:
    """A finite real number within the closed bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a number.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r}: must be a finite number.{' ' + hint if hint else ''}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}={v:g}: must be ≥ {minimum:g}.{' ' + hint if hint else ''}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name}={v:g}: must be ≤ {maximum:g}.{' ' + hint if hint else ''}")
    return v


def seed_list(seed: Any, n: int, name: str = "seed") -> list[int]:
    """Seeds for ``n`` samples: an int ``s`` gives ``s, s+1, …`` (sample i uses ``s + i``);
    a sequence gives one per sample. Each must be in ``[0, 2**32 - 1]``."""
    if isinstance(seed, (numbers.Integral, np.integer)) and not isinstance(seed, bool):
        s = int(seed)
        if s < 0 or s > MAX_SEED:
            raise ValueError(f"{name}={s}: seeds are in [0, {MAX_SEED}].")
        if s + n - 1 > MAX_SEED:
            raise ValueError(f"{name}={s}: sample i uses seed + i, and {s} + {n - 1} exceeds "
                             f"{MAX_SEED}; use a seed ≤ {MAX_SEED - n + 1} or one seed per "
                             "sample.")
        return [s + i for i in range(n)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, np.ndarray)):
        raise TypeError(f"{name}={seed!r}: give an int or one int per sample.")
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"{name}: got {len(seeds)} seeds for {n} samples; give one per "
                         "sample or a single int.")
    return [whole_number(s, f"{name}[{i}]", minimum=0, maximum=MAX_SEED)
            for i, s in enumerate(seeds)]


def prompt_list(prompt: Any, name: str = "prompt", *, allow_empty_list: bool = False
                ) -> list[str]:
    """A str (one prompt) or a non-empty sequence of str."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
        raise TypeError(f"{name}={prompt!r}: expected a string or a list of strings.")
    prompts = list(prompt)
    if not prompts and not allow_empty_list:
        raise ValueError(f"{name}: the list is empty; give at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]={p!r}: expected a string.")
    return prompts


def float_array(value: Any, name: str, shape: tuple[int, ...] | None = None,
                hint: str = "") -> np.ndarray:
    """A finite float array as float32 (ints, bools, objects and NaN/inf refused)."""
    try:
        a = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name}: not an array ({e}).") from None
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name}: dtype {a.dtype}, expected a float array (float32).{hint}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape}, expected {tuple(shape)}.{hint}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name}: {bad} NaN/inf values; every value must be finite.")
    return a
