"""The ``jattn`` commands of the methods, one module each (see :mod:`jattn.commands.common`).

A module listed in :data:`MODULES` defines ``register(sub, edit_sub)``: it adds its
subparser to ``sub`` (``jattn NAME``) or to ``edit_sub`` (``jattn edit NAME``) and sets
``func``. ``jattn/cli.py`` registers them after its own commands.
"""

MODULES: tuple[str, ...] = ("mix", "cross_image", "segment", "batch", "excite", "layout")
MODULES += ("style_aligned",)
MODULES += ("masactrl", "pnp")
MODULES += ("consistory",)
MODULES += ("personalize",)
