"""Conversion between diffusers/transformers PyTorch state dicts and jattn Flax params.

jattn's Flax modules are named after diffusers' modules, with list indices joined by an
underscore (``down_blocks.0.attentions.1`` -> ``down_blocks_0/attentions_1``). The rules:

* ``*.weight`` of a 4-D tensor (conv, OIHW) -> ``kernel`` HWIO;
* ``*.weight`` of a 2-D tensor (linear, (out, in)) -> ``kernel`` (in, out), except
  embeddings (module name ends in ``embedding``) -> ``embedding`` unchanged;
* ``*.weight`` of a 1-D tensor (norm) -> ``scale``; ``*.bias`` -> ``bias``.

Every converter checks every shape against the model's own parameter shapes and names
every missing and unexpected key in one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jattn.io.checkpoint import CheckpointMismatchError

__all__ = ["CheckpointMismatchError", "torch_key_to_flax", "flax_key_to_torch",
           "state_dict_to_params", "params_to_state_dict"]

# flax module names that contain a literal "_<digit>" in diffusers itself
_LITERAL_UNDERSCORE_DIGIT = {"linear_1", "linear_2"}


def _is_embedding(module: str) -> bool:
    return module.endswith("embedding") and module not in _LITERAL_UNDERSCORE_DIGIT


def torch_key_to_flax(key: str, ndim: int) -> tuple[tuple[str, ...], str]:
    """Map a torch key to ``(flax_path, kind)``; kind in {conv, linear, embedding, norm, bias}."""
    parts = key.split(".")
    merged: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and merged:
            merged[-1] = f"{merged[-1]}_{p}"
        else:
            merged.append(p)
    leaf = parts[-1]
    module = merged[-1] if merged else ""
    if leaf == "bias":
        return tuple(merged) + ("bias",), "bias"
    if leaf != "weight":
        return tuple(merged) + (leaf,), "other"
    if ndim == 4:
        return tuple(merged) + ("kernel",), "conv"
    if ndim == 2:
        if _is_embedding(module):
            return tuple(merged) + ("embedding",), "embedding"
        return tuple(merged) + ("kernel",), "linear"
    if ndim == 1:
        return tuple(merged) + ("scale",), "norm"
    return tuple(merged) + ("weight",), "other"


def flax_key_to_torch(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_flax` for the module path (leaf renamed by the caller)."""
    out = []
    for p in path[:-1]:
        if p in _LITERAL_UNDERSCORE_DIGIT:
            out.append(p)
            continue
        m = re.fullmatch(r"(.*?)_(\d+)", p)
        out.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    leaf = path[-1]
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(out + [leaf])


def _to_flax_array(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(arr, (2, 3, 1, 0))
    if kind == "linear":
        return np.transpose(arr, (1, 0))
    return arr


def _to_torch_array(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return np.transpose(arr, (3, 2, 0, 1))
    if leaf == "kernel" and arr.ndim == 2:
        return np.transpose(arr, (1, 0))
    return arr


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping,
    *,
    model_name: str,
    rename: Callable[[str], str | None] | None = None,
    dtype=None,
) -> dict:
    """Convert a torch-layout state dict (numpy arrays) into a Flax params tree.

    Args:
      state_dict: ``{torch_key: array}``.
      expected: the model's params tree (arrays or ``jax.ShapeDtypeStruct``), e.g. from
        ``jax.eval_shape(model.init, ...)["params"]``.
      model_name: used in error messages ("unet", "vae", "text_encoder").
      rename: optional key rewrite applied first (return ``None`` to drop a key that is
        known to be unused, e.g. ``position_ids`` buffers).
      dtype: cast every array to this dtype (default: keep the expected leaf dtype).
    Returns:
      nested dict of numpy arrays with exactly the structure of ``expected``.
    Raises:
      CheckpointMismatchError: listing every missing key, unexpected key and shape (or
        integer-for-float dtype) mismatch.
    """
    exp_flat = traverse_util.flatten_dict(dict(expected))
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshapen, misshapen_paths = [], [], set()
    for key, arr in state_dict.items():
        if rename is not None:
            key = rename(key)
            if key is None:
                continue
        arr = np.asarray(arr)
        path, kind = torch_key_to_flax(key, arr.ndim)
        if path not in exp_flat:
            unexpected.append(key)
            continue
        value = _to_flax_array(arr, kind)
        want = tuple(exp_flat[path].shape)
        if value.shape != want:
            misshapen.append(f"{key}: checkpoint {tuple(arr.shape)} -> {value.shape}, "
                             f"model expects {want}")
            misshapen_paths.add(path)
            continue
        if (jax.dtypes.issubdtype(exp_flat[path].dtype, np.inexact)
                and not jax.dtypes.issubdtype(arr.dtype, np.inexact)):
            misshapen.append(f"{key}: checkpoint dtype {arr.dtype}, model expects floats "
                             "(quantised or integer weights are not supported)")
            misshapen_paths.add(path)
            continue
        target_dtype = dtype if dtype is not None else exp_flat[path].dtype
        out[path] = value.astype(target_dtype)
    missing = [flax_key_to_torch(p) for p in exp_flat
               if p not in out and p not in misshapen_paths]
    if unexpected or missing or misshapen:
        lines = [f"{model_name}: checkpoint does not match the model configuration."]
        if missing:
            lines.append(f"  in model, not in checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  in checkpoint, not in model ({len(unexpected)}): "
                         + ", ".join(unexpected))
        if misshapen:
            lines.append(f"  shape/dtype mismatches ({len(misshapen)}):\n    "
                         + "\n    ".join(misshapen))
        lines.append("  Fix: check that config.json belongs to these weights (a truncated or "
                     "foreign checkpoint file gives this error).")
        raise CheckpointMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """Flax params tree -> torch-layout state dict (numpy), inverse of :func:`state_dict_to_params`."""
    flat = traverse_util.flatten_dict(dict(jax.device_get(params)))
    sd = {}
    for path, arr in flat.items():
        arr = np.asarray(arr)
        value = _to_torch_array(arr, path[-1])
        if dtype is not None:
            value = value.astype(dtype)
        sd[flax_key_to_torch(path)] = np.ascontiguousarray(value)
    return sd
