"""jattn: Stable Diffusion in pure-functional JAX/Flax with attention-policy pytrees.

``jattn.load(path_or_hub_id)`` -> :class:`jattn.pipeline.Pipeline`.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See :func:`jattn.pipeline.load`."""
    from jattn.pipeline import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "__version__"]
