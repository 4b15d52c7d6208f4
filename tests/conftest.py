"""Shared test settings and helpers.

* float64 off (jattn runs in float32/bfloat16; x64 would hide dtype bugs);
* default matmul precision "highest", so float32 parity against PyTorch holds to 1e-5
  on every backend (TPU/GPU would otherwise use bf16/TF32 passes);
* XLA backend optimisation level 0 (unless XLA_FLAGS already sets one): tests run tiny
  models where compile time dominates; -O0 cuts it ~2.5x and changes no float semantics
  (XLA never reassociates float math unless fast-math is on, which it is not);
* fixtures ``torch_to_numpy_state_dict`` and ``randomize_torch_module`` (functions), for
  parity tests against diffusers/transformers on the same random weights.
"""

from __future__ import annotations

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")


def _torch_to_numpy_state_dict(module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as float32 numpy arrays (detached copies)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in module.state_dict().items()}


def _randomize_torch_module(module, seed: int = 0, std: float = 0.2,
                            norm_std: float = 0.1):
    """Fill every parameter of a torch module with random normal values, in place.

    Weights get ``N(0, std)``; 1-D parameters of normalisation layers (GroupNorm,
    LayerNorm) get ``1 + N(0, norm_std)`` scales and ``N(0, norm_std)`` biases, so that
    every parameter matters (zero-initialised output layers would hide bugs) while
    activations stay O(1). Returns the module (in eval mode).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if isinstance(m, norms):
                    p.copy_((1.0 if name == "weight" else 0.0) + norm_std * noise)
                else:
                    p.copy_(std * noise)
    return module.eval()


@pytest.fixture
def torch_to_numpy_state_dict():
    """The function ``module -> {key: float32 numpy array}``."""
    return _torch_to_numpy_state_dict


@pytest.fixture
def randomize_torch_module():
    """The function ``(module, seed=0, std=0.2, norm_std=0.1) -> module`` (in place)."""
    return _randomize_torch_module
