"""Training recipe of jattn's bundled model (VAE, latent cache, UNet + text encoder, export).

Modules: :mod:`~jattn.train.config` (typed frozen configs), :mod:`~jattn.train.data`
(deterministic samples and batches), :mod:`~jattn.train.steps` (losses, optimizer, EMA,
jitted steps), :mod:`~jattn.train.checkpointing` (Orbax), :mod:`~jattn.train.loop` (the
resumable loop), :mod:`~jattn.train.stages` (the stages), :mod:`~jattn.train.export`
(diffusers layout). Entry point: ``scripts/train_bundled.py``.
"""
