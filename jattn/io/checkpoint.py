"""Loading diffusers-layout checkpoints (folders or hub ids) into jattn params.

Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``); each model folder has
``config.json`` and safetensors weights (single file or a sharded
``*.safetensors.index.json``). Which components a pipeline has is one table of
:class:`Component` rows read by :func:`load_components` (``jattn.pipeline`` holds the SD
and SDXL tables). Pickle weights (``.bin``/``.ckpt``) are refused
unless ``allow_pickle=True`` (then torch, if installed, reads them with
``weights_only=True``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["resolve_checkpoint", "read_config", "read_json", "parse_config", "load_state_dict",
           "save_state_dict", "Component", "check_components_present", "load_components",
           "load_component_weights", "CheckpointError", "CheckpointNotFoundError",
           "CheckpointDamagedError", "CheckpointConfigError", "CheckpointUnsupportedError",
           "CheckpointMismatchError", "PickleRefusedError"]

_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors",
                 "*/*.safetensors.index.json", "tokenizer/*", "tokenizer_2/*", "scheduler/*"]
_REDOWNLOAD = "re-download the checkpoint or re-export it"


# ------------------------------------------------------------------------------ errors
class CheckpointError(ValueError):
    """Base of every error about a checkpoint's files or their content.

    ``except CheckpointError`` catches all of them; each subclass is also the builtin its
    meaning suggests (``CheckpointNotFoundError`` is a ``FileNotFoundError``, …), so older
    ``except`` clauses keep working. Every message names the file (or component), what is
    wrong and the fix.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint folder/hub id is missing files; the message lists them."""


class CheckpointDamagedError(CheckpointError):
    """A file exists but cannot be read as what it should be: truncated or corrupted
    safetensors, invalid JSON, NaN/inf weights, a directory or an unreadable file."""


class CheckpointConfigError(CheckpointError):
    """A config value has the wrong type or an invalid value, or a required key is missing."""


class CheckpointUnsupportedError(CheckpointError, NotImplementedError):
    """The config is valid but asks for a feature jattn does not implement."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model: lists every missing, unexpected and misshapen key."""


class PickleRefusedError(CheckpointError, RuntimeError):
    """A component only has pickle weights and ``allow_pickle`` was not given."""


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Return a local folder for a diffusers-layout checkpoint.

    A local folder is used as is. Anything else is taken as a Hugging Face hub id and
    downloaded with ``huggingface_hub.snapshot_download`` (safetensors, configs, tokenizer
    and scheduler files only).

    Raises:
      TypeError: ``path_or_id`` is not a str / ``os.PathLike``.
      ValueError: ``path_or_id`` is an empty string.
      CheckpointNotFoundError: a folder without ``model_index.json``, or a hub id that
        cannot be fetched (offline), naming the missing files and the fix.
    """
    if not isinstance(path_or_id, (str, os.PathLike)) or isinstance(path_or_id, bytes):
        raise TypeError(
            f"model={_short(path_or_id)} ({type(path_or_id).__name__}): expected a folder path "
            "(str or pathlib.Path) of a diffusers-layout checkpoint, a Hugging Face hub id such "
            "as 'org/name', or None for the bundled model.")
    if not str(path_or_id).strip():
        raise ValueError("model='' is empty: pass a diffusers-layout folder, a Hugging Face hub "
                         "id such as 'org/name', or None (CLI: leave out --model) for the "
                         "bundled model.")
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointNotFoundError(
                f"model={str(path_or_id)!r} is a file; jattn.load expects a diffusers-layout "
                "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
        mi = p / "model_index.json"
        if mi.exists() and not mi.is_file():
            raise CheckpointDamagedError(
                f"{mi}: is a directory, not a JSON file. Fix: replace it with the "
                f"checkpoint's model_index.json: {_REDOWNLOAD}.")
        if not mi.is_file():
            raise CheckpointNotFoundError(
                f"{p}: missing model_index.json — not a diffusers-layout checkpoint folder. "
                "Fix: point --model at the folder that contains model_index.json.")
        return p
    looks_local = str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1
    if looks_local:
        raise CheckpointNotFoundError(f"model={str(path_or_id)!r}: no such folder.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(path_or_id), revision=revision,
                                  allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated …
        raise CheckpointNotFoundError(
            f"model={str(path_or_id)!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {e}). Needed files: model_index.json, "
            "unet/config.json, unet/diffusion_pytorch_model.safetensors, vae/config.json, "
            "vae/diffusion_pytorch_model.safetensors, text_encoder/config.json, "
            "text_encoder/model.safetensors, tokenizer/vocab.json, tokenizer/merges.txt, "
            "scheduler/scheduler_config.json (SDXL also text_encoder_2/config.json, "
            "text_encoder_2/model.safetensors, tokenizer_2/vocab.json, tokenizer_2/merges.txt)"
            ". Fix: go online, or download the checkpoint "
            "elsewhere and pass its local folder.") from e
    return Path(local)


# ------------------------------------------------------------------------------ JSON files
def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file that must hold one object (``model_index.json``, ``config.json``, …).

    Raises:
      CheckpointNotFoundError: the file does not exist.
      CheckpointDamagedError: a directory, unreadable, not UTF-8, invalid JSON (the message
        gives the line and column) or not a JSON object.
    """
    path = Path(path)
    _check_file(path, "JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointDamagedError(
            f"{path}: damaged — not a UTF-8 text file ({e.reason} at byte {e.start}). "
            f"Fix: {_REDOWNLOAD}.") from e
    except OSError as e:
        raise CheckpointDamagedError(
            f"{path}: cannot be read ({e.strerror or e}). Fix: make it readable "
            f"(permissions), or {_REDOWNLOAD}.") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointDamagedError(
            f"{path}: invalid JSON — {e.msg} at line {e.lineno}, column {e.colno}. Fix: "
            f"correct the file at that position, or {_REDOWNLOAD}.") from e
    if not isinstance(obj, dict):
        raise CheckpointDamagedError(
            f"{path}: expected a JSON object {{...}}, found a JSON {type(obj).__name__}. "
            f"Fix: {_REDOWNLOAD}.")
    return obj


def _config_file(folder: Path, component: str) -> Path:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return Path(folder) / component / name


def read_config(folder: Path, component: str) -> dict:
    """Read ``<folder>/<component>/config.json`` (scheduler: ``scheduler_config.json``).

    Raises:
      CheckpointNotFoundError: the component folder or its config file is missing.
      CheckpointDamagedError: the file is not a valid JSON object (see :func:`read_json`).
    """
    f = _config_file(folder, component)
    if not f.parent.is_dir():
        raise CheckpointNotFoundError(
            f"{f.parent}: missing folder. Every diffusers-layout checkpoint needs "
            f"{component}/ (with {f.name}"
            + (f" and {_WEIGHT_NAMES[component]}.safetensors" if component in _WEIGHT_NAMES
               else "") + "). Fix: copy or download the complete checkpoint folder.")
    if not f.exists():
        raise CheckpointNotFoundError(f"{f}: missing. Every diffusers-layout checkpoint "
                                      f"needs {component}/{f.name}.")
    return read_json(f)


def parse_config(folder: Path, component: str, parser: Callable[[dict], Any]) -> Any:
    """``parser(read_config(folder, component))`` with the parser's errors naming the file.

    Raises:
      CheckpointNotFoundError / CheckpointDamagedError: see :func:`read_config`.
      CheckpointConfigError: the parser rejected a value (wrong type, invalid value, missing
        key); the message starts with the file's path.
      CheckpointUnsupportedError: the parser raised ``NotImplementedError`` (a valid config
        asking for a feature jattn does not implement).
    """
    cfg = read_config(folder, component)
    f = _config_file(folder, component)
    where = f"{component}/{f.name}"
    try:
        return parser(cfg)
    except NotImplementedError as e:
        msg = str(e)
        if "Fix:" not in msg:
            msg = (msg.rstrip(".") + f". Fix: if this value is a mistake, correct it in {where}; "
                   "otherwise jattn does not support this checkpoint.")
        raise CheckpointUnsupportedError(f"{f}: {msg}") from e
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        if "Fix:" not in msg:
            fits = "" if component == "scheduler" else " (it must describe the weights next to it)"
            msg = msg.rstrip(".") + f". Fix: correct {where}{fits}, or {_REDOWNLOAD}."
        raise CheckpointConfigError(f"{f}: {msg}") from e


# ------------------------------------------------------------------------------ config values
# Typed reads for the config parsers (UNetConfig.from_diffusers, VAEConfig.from_diffusers,
# CLIPTextConfig.from_transformers, SchedulerConfig.from_diffusers). Each returns the value
# converted (int/float/bool/str/tuple) or raises CheckpointConfigError naming the owner, the
# key, the bad value and what is expected. JSON ints written as floats (2.0) are accepted;
# bools are never numbers.
def _short(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + " …" + r[-3:]


def _bad(owner: str, key: str, value, expected: str) -> CheckpointConfigError:
    return CheckpointConfigError(f"{owner}: {key}={_short(value)} is invalid; expected "
                                 f"{expected}.")


def require_keys(owner: str, config: Mapping, keys, what: str = "") -> None:
    """Raise CheckpointConfigError naming every key of ``keys`` missing from ``config``."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise CheckpointConfigError(
            f"{owner}: required key(s) missing: {', '.join(missing)}{what}.")


def _bound(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def config_int(owner: str, key: str, value, *, minimum: int | None = None,
               maximum: int | None = None, hint: str = "") -> int:
    """An int (``2.0`` accepted, ``2.5``/``"2"``/``true``/null refused) within bounds."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok = True
    if ok:
        out = int(value)
        ok = (minimum is None or out >= minimum) and (maximum is None or out <= maximum)
    if not ok:
        raise _bad(owner, key, value, f"an integer{_bound(minimum, maximum)}{hint}")
    return out


def config_float(owner: str, key: str, value, *, minimum: float | None = None,
                 maximum: float | None = None, positive: bool = False,
                 allow_inf: bool = False, hint: str = "") -> float:
    """A number (int or float, not bool) within bounds; ``positive``: > 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        out = float(value)
        ok = (not math.isnan(out) and (allow_inf or math.isfinite(out))
              and (minimum is None or out >= minimum)
              and (maximum is None or out <= maximum) and (not positive or out > 0))
    if not ok:
        what = "a number > 0" if positive else f"a number{_bound(minimum, maximum)}"
        raise _bad(owner, key, value, what + hint)
    return out


def config_bool(owner: str, key: str, value, *, hint: str = "") -> bool:
    """true/false; null reads as false (what diffusers' truthiness tests give)."""
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(owner, key, value, "true or false" + hint)
    return bool(value)


def config_str(owner: str, key: str, value, *, choices=None, hint: str = "") -> str:
    """A string (one of ``choices`` when given)."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        what = ("one of " + ", ".join(repr(c) for c in choices)) if choices else "a string"
        raise _bad(owner, key, value, what + hint)
    return value


def config_list(owner: str, key: str, value, item: Callable, *, length: int | None = None,
                scalar: bool = False, what: str = "integers >= 1", hint: str = "",
                expected: str | None = None) -> Any:
    """A non-empty list/tuple whose items pass ``item(owner, f"{key}[i]", v)`` (tuple back);
    with ``scalar=True`` a single item is accepted too and returned as is. ``expected``
    replaces the generated description of what is accepted."""
    if expected is None:
        n = f"{length} " if length is not None else ""
        expected = (f"one value or a list of {n}{what} (one per block)" if scalar
                    else f"a list of {n}{what}") + hint
    if isinstance(value, (list, tuple)):
        if not value or (length is not None and len(value) != length):
            raise _bad(owner, key, value, expected)
        try:
            return tuple(item(owner, f"{key}[{i}]", v) for i, v in enumerate(value))
        except CheckpointConfigError:
            raise _bad(owner, key, value, expected) from None
    if scalar:
        try:
            return item(owner, key, value)
        except CheckpointConfigError:
            raise _bad(owner, key, value, expected) from None
    raise _bad(owner, key, value, expected)


# ------------------------------------------------------------------------------ weights
def _all_finite(a: np.ndarray) -> bool:
    """No NaN/inf in ``a`` (non-float arrays: True). One pass, no float conversion."""
    dt = a.dtype
    if dt.kind in "biu":
        return True
    if dt == np.float32 or dt == np.float64:
        return bool(np.isfinite(a).all())
    if dt == np.float16 or dt.name == "bfloat16":  # exponent bits all ones = inf/NaN
        mask = np.uint16(0x7C00 if dt == np.float16 else 0x7F80)
        bits = np.ascontiguousarray(a).view(np.uint16)
        return not bool(((bits & mask) == mask).any())
    try:
        return bool(np.isfinite(a.astype(np.float32)).all())
    except (TypeError, ValueError):
        return True


def _check_finite(source: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise CheckpointDamagedError naming ``source`` and the tensors with NaN/inf values."""
    bad = [k for k, a in arrays.items() if not _all_finite(np.asarray(a))]
    if not bad:
        return

    def count(a):
        return int(np.count_nonzero(~np.isfinite(np.asarray(a).astype(np.float32))))

    shown = ", ".join(f"{k} ({count(arrays[k])} of {np.asarray(arrays[k]).size} values)"
                      for k in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise CheckpointDamagedError(
        f"{source}: damaged — NaN/inf values in {len(bad)} tensor(s): {shown}{more}. Such "
        "weights give black or NaN images. Fix: re-download the file, or re-export the "
        "checkpoint from a good copy.")


def _check_file(f: Path, what: str) -> None:
    """``f`` exists and is a regular file (else the error names it and the fix)."""
    if not f.exists():
        raise CheckpointNotFoundError(f"{f}: missing. Fix: {_REDOWNLOAD}.")
    if not f.is_file():
        raise CheckpointDamagedError(
            f"{f}: is a directory (or another non-file), not a {what}. Fix: replace it "
            f"with the checkpoint's {f.name}: {_REDOWNLOAD}.")


def _check_weight_file(f: Path) -> None:
    _check_file(f, "weight file")
    if not os.access(f, os.R_OK):
        raise CheckpointDamagedError(
            f"{f}: cannot be read (permission denied). Fix: make it readable "
            f"(chmod a+r {f}), or copy the checkpoint to a folder you can read.")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in files:
        _check_weight_file(f)
        try:
            # framework "flax" reads bf16 as well (numpy has no bfloat16)
            with safe_open(str(f), framework="flax") as fh:
                arrays = {k: np.asarray(fh.get_tensor(k)) for k in fh.keys()}
        except MemoryError:
            raise
        except Exception as e:  # SafetensorError, OSError, unknown dtype …
            raise CheckpointDamagedError(
                f"{f}: damaged or not a safetensors file ({type(e).__name__}: {e}); an "
                "interrupted download or copy gives this. Fix: re-download the file, or "
                "re-export the checkpoint.") from e
        _check_finite(f, arrays)
        out.update(arrays)
    return out


def load_state_dict(folder: Path, component: str, *, allow_pickle: bool = False,
                    variant: str | None = None) -> dict[str, np.ndarray]:
    """Read a component's weights as ``{torch_key: numpy array}``.

    Order of preference: ``<name>[.variant].safetensors``, a sharded
    ``<name>[.variant].safetensors.index.json``, then pickle files (only with
    ``allow_pickle=True``). Every array is checked for NaN/inf while reading.

    Raises:
      CheckpointNotFoundError: no component folder or no weight file (lists what was
        looked for), or shards listed by the index are missing.
      CheckpointDamagedError: a weight file that is truncated/corrupted, not a file,
        unreadable, or holds NaN/inf values (names the file and the tensors).
      PickleRefusedError: only pickle files exist and ``allow_pickle`` is False.
    """
    d = Path(folder) / component
    base = _WEIGHT_NAMES.get(component, "diffusion_pytorch_model")
    if not d.is_dir():
        raise CheckpointNotFoundError(
            f"{d}: missing folder. Every diffusers-layout checkpoint needs {component}/ (with "
            f"config.json and {base}.safetensors). Fix: copy or download the complete "
            "checkpoint folder.")
    stem = f"{base}.{variant}" if variant else base
    single = d / f"{stem}.safetensors"
    index = d / f"{stem}.safetensors.index.json"
    if single.exists():
        return _read_safetensors([single])
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(v, str) and v for v in weight_map.values())):
            raise CheckpointDamagedError(
                f"{index}: no valid \"weight_map\" (a JSON object {{tensor name: shard "
                f"file}}). Fix: {_REDOWNLOAD}.")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise CheckpointNotFoundError(f"{index}: shard files missing: {missing}. Fix: "
                                          "download every shard the index lists.")
        return _read_safetensors([d / s for s in shards])
    pickles = sorted(p for p in d.glob("*") if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{component}: only pickle weights found ({', '.join(p.name for p in pickles)}). "
                "Pickle files can run arbitrary code when loaded, so jattn refuses them. Fix: "
                "convert them to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
                "if you trust the file.")
        try:
            import torch
        except ImportError as e:
            raise RuntimeError("reading pickle weights needs torch installed") from e
        sd = {}
        for p in pickles:
            _check_weight_file(p)
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
                obj = obj.get("state_dict", obj)
                part = {k: v.float().numpy() for k, v in obj.items()}
            except MemoryError:
                raise
            except Exception as e:
                raise CheckpointDamagedError(
                    f"{p}: damaged or not a torch state dict ({type(e).__name__}: {e}). Fix: "
                    "re-download the file, or re-export the checkpoint.") from e
            _check_finite(p, part)
            sd.update(part)
        return sd
    raise CheckpointNotFoundError(
        f"{component}: no weights in {d} (looked for {single.name}, {index.name} and "
        "pickle .bin/.ckpt files).")


def save_state_dict(state_dict: dict[str, np.ndarray], path: Path) -> None:
    """Write a torch-layout state dict as safetensors (numpy arrays, any float dtype)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))


# ------------------------------------------------------------------------------ components
@dataclasses.dataclass(frozen=True)
class Component:
    """One row of a pipeline's component table: a folder of the checkpoint and how to read it.

    Attributes:
      name: the folder (and ``model_index.json`` key), e.g. ``"text_encoder_2"``.
      kind: ``"model"`` (config + weights), ``"config"`` (config only: the scheduler) or
        ``"tokenizer"`` (read with ``tokenizer`` below).
      parse: ``config dict -> typed config`` (models and config-only components).
      convert: ``(state_dict, typed config) -> params`` (models).
      tokenizer: ``folder -> tokenizer`` (tokenizers).
      required: a missing folder raises (else the component is None).
      what: what the component is, for error messages ("the second text encoder").
    """

    name: str
    kind: str
    parse: Callable[[dict], Any] | None = None
    convert: Callable[[Mapping, Any], Any] | None = None
    tokenizer: Callable[[Path], Any] | None = None
    required: bool = True
    what: str = ""


def _component_files(c: Component) -> str:
    if c.kind == "model":
        return f"config.json and {_WEIGHT_NAMES.get(c.name, 'diffusion_pytorch_model')}.safetensors"
    if c.kind == "tokenizer":
        return "vocab.json and merges.txt"
    return _config_file(Path("."), c.name).name


def check_components_present(folder: Path, table, *, family: str = "diffusers-layout") -> None:
    """Raise one CheckpointNotFoundError naming every required component folder of
    ``table`` missing from ``folder``, what each is, its files and the fix."""
    folder = Path(folder)
    missing = [c for c in table if c.required and not (folder / c.name).is_dir()]
    if not missing:
        return
    parts = "; ".join(f"{folder / c.name}: missing folder"
                      + (f" ({c.what})" if c.what else "")
                      + f", with {_component_files(c)}" for c in missing)
    names = ", ".join(f"{c.name}/" for c in missing)
    raise CheckpointNotFoundError(
        f"{parts}. Every {family} checkpoint needs {names}. Fix: copy or download the "
        f"complete checkpoint folder ({names} included).")


def load_components(folder: Path, table, *, allow_pickle: bool = False,
                    variant: str | None = None, weights: bool = True,
                    family: str = "diffusers-layout") -> tuple[dict, dict, dict]:
    """Read every component of ``table`` from a checkpoint folder.

    Order: presence of every required folder (one error naming all missing ones), every
    config (in table order), every tokenizer, then (``weights=True``) every model's
    weights, converted by the row's ``convert``. Optional components whose folder is
    absent are None.

    Returns:
      ``(configs, tokenizers, params)``: ``{name: typed config}`` for models and
      config-only rows, ``{name: tokenizer}``, ``{name: params}`` for models (empty when
      ``weights`` is False; call again with the configs checked to read the weights).
    Raises:
      CheckpointNotFoundError, CheckpointDamagedError, CheckpointConfigError,
      CheckpointUnsupportedError, PickleRefusedError, CheckpointMismatchError: as
      :func:`parse_config`, :func:`load_state_dict` and the converters.
    """
    folder = Path(folder)
    check_components_present(folder, table, family=family)
    present = [c for c in table if (folder / c.name).is_dir()]
    configs = {c.name: None for c in table if c.kind != "tokenizer"}
    tokenizers = {c.name: None for c in table if c.kind == "tokenizer"}
    for c in present:
        if c.kind in ("model", "config"):
            configs[c.name] = parse_config(folder, c.name, c.parse)
    for c in present:
        if c.kind == "tokenizer":
            tokenizers[c.name] = c.tokenizer(folder / c.name)
    params: dict = {}
    if weights:
        params = load_component_weights(folder, table, configs, allow_pickle=allow_pickle,
                                        variant=variant)
    return configs, tokenizers, params


def load_component_weights(folder: Path, table, configs: Mapping[str, Any], *,
                           allow_pickle: bool = False, variant: str | None = None) -> dict:
    """``{name: params}`` of every model row of ``table`` whose config is in ``configs``
    (not None): its weights read by :func:`load_state_dict` and converted by the row's
    ``convert(state_dict, config)``."""
    out = {}
    for c in table:
        if c.kind == "model" and configs.get(c.name) is not None:
            sd = load_state_dict(folder, c.name, allow_pickle=allow_pickle, variant=variant)
            out[c.name] = c.convert(sd, configs[c.name])
    return out
