"""Orbax checkpoints of a train stage: ``<workdir>/<stage>/ckpt/<step>/``.

The whole train state (params, EMA, optimizer state, step) is one pytree saved with
``PyTreeSave`` and restored onto the structure of a freshly initialised state, so the
optimizer's named tuples come back as they were. Saving is synchronous (the loop
continues only once the step is on disk); the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["StageCheckpoints"]


class StageCheckpoints:
    """Checkpoints of one stage.

    Args:
      directory: the stage's checkpoint folder (created if missing).
      keep: number of newest checkpoints kept (older ones are deleted).
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        """Save ``state`` as step ``step`` (a no-op if that step is already saved)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """Restore step ``step`` (default: the newest) onto the structure, shapes and dtypes
        of ``like`` (a state or its ``jax.eval_shape``).

        Raises:
          FileNotFoundError: there is no checkpoint (of that step).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} "
                                    f"(saved steps: {sorted(self._manager.all_steps())})")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        # Restored as numpy (much faster on CPU than one committed jax.Array per leaf), then
        # made uncommitted jax arrays like a fresh state's, so jit reuses the program a
        # fresh state compiled (committed arrays would compile a second one).
        restore_args = jax.tree_util.tree_map(
            lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract)
        restored = self._manager.restore(
            step, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
        return jax.tree_util.tree_map(lambda x, a: jnp.asarray(np.asarray(x, a.dtype)),
                                      restored, abstract)

    def close(self) -> None:
        self._manager.close()
