"""jattn: Stable Diffusion in pure-functional JAX/Flax with attention-policy pytrees.

``jattn.load(path_or_hub_id)`` -> :class:`jattn.pipeline.Pipeline`.
"""

import os as _os

__version__ = "0.1.0"

# XLA CPU default: YNNPACK fusions off. On this project's 2-core AVX-512 machine XLA's
# YNNPACK convolution/matmul fusions run the SD UNet's 3x3 convolutions 1.3-2.3x slower
# than the Eigen path (SD1.5 at 64² latents: 17.8 s -> 10.3 s per batch-2 forward, see
# scripts/bench_generate.py). Only takes effect if set before JAX creates its CPU client;
# a flag the user already put in XLA_FLAGS wins; JATTN_KEEP_XLA_FLAGS=1 leaves XLA_FLAGS
# alone. No effect on GPU/TPU backends.
if not _os.environ.get("JATTN_KEEP_XLA_FLAGS"):
    _flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
        _os.environ["XLA_FLAGS"] = (_flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


def load(*args, **kwargs):
    """See :func:`jattn.pipeline.load`."""
    from jattn.pipeline import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "__version__"]
