"""Loading diffusers-layout checkpoints (folders or hub ids) into jattn params.

Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; each model folder has ``config.json`` and safetensors weights (single file
or a sharded ``*.safetensors.index.json``). Pickle weights (``.bin``/``.ckpt``) are refused
unless ``allow_pickle=True`` (then torch, if installed, reads them with
``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["resolve_checkpoint", "read_config", "load_state_dict", "PickleRefusedError",
           "CheckpointNotFoundError", "save_state_dict"]

_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors",
                 "*/*.safetensors.index.json", "tokenizer/*", "scheduler/*"]


class PickleRefusedError(RuntimeError):
    """A component only has pickle weights and ``allow_pickle`` was not given."""


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint folder/hub id is missing files; the message lists them."""


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Return a local folder for a diffusers-layout checkpoint.

    A local folder is used as is. Anything else is taken as a Hugging Face hub id and
    downloaded with ``huggingface_hub.snapshot_download`` (safetensors, configs, tokenizer
    and scheduler files only).

    Raises:
      CheckpointNotFoundError: a folder without ``model_index.json``, or a hub id that
        cannot be fetched (offline), naming the missing files and the fix.
    """
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointNotFoundError(
                f"model={str(path_or_id)!r} is a file; jattn.load expects a diffusers-layout "
                "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
        if not (p / "model_index.json").is_file():
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
            "scheduler/scheduler_config.json. Fix: go online, or download the checkpoint "
            "elsewhere and pass its local folder.") from e
    return Path(local)


def read_config(folder: Path, component: str) -> dict:
    """Read ``<folder>/<component>/config.json`` (scheduler: ``scheduler_config.json``)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    f = Path(folder) / component / name
    if not f.is_file():
        raise CheckpointNotFoundError(f"{f}: missing. Every diffusers-layout checkpoint "
                                      f"needs {component}/{name}.")
    return json.loads(f.read_text())


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in files:
        # framework "flax" reads bf16 as well (numpy has no bfloat16)
        with safe_open(str(f), framework="flax") as fh:
            for k in fh.keys():
                out[k] = np.asarray(fh.get_tensor(k))
    return out


def load_state_dict(folder: Path, component: str, *, allow_pickle: bool = False,
                    variant: str | None = None) -> dict[str, np.ndarray]:
    """Read a component's weights as ``{torch_key: numpy array}``.

    Order of preference: ``<name>[.variant].safetensors``, a sharded
    ``<name>[.variant].safetensors.index.json``, then pickle files (only with
    ``allow_pickle=True``).

    Raises:
      CheckpointNotFoundError: no weight file (lists what was looked for).
      PickleRefusedError: only pickle files exist and ``allow_pickle`` is False.
    """
    d = Path(folder) / component
    base = _WEIGHT_NAMES[component]
    stem = f"{base}.{variant}" if variant else base
    single = d / f"{stem}.safetensors"
    index = d / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _read_safetensors([single])
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index}: shard files missing: {missing}")
        return _read_safetensors([d / s for s in shards])
    pickles = sorted(p for p in d.glob("*") if p.suffix in _PICKLE_SUFFIXES) if d.is_dir() else []
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
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            obj = obj.get("state_dict", obj)
            sd.update({k: v.float().numpy() for k, v in obj.items()})
        return sd
    raise CheckpointNotFoundError(
        f"{component}: no weights in {d} (looked for {single.name}, {index.name} and "
        "pickle .bin/.ckpt files).")


def save_state_dict(state_dict: dict[str, np.ndarray], path: Path) -> None:
    """Write a torch-layout state dict as safetensors (numpy arrays, any float dtype)."""
    from safetensors.numpy import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
