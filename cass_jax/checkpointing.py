"""Checkpoints of the train state and the data-iterator position, with orbax, for exact resume.

A crash between saves loses only the steps since the last save: orbax writes to a temporary folder and
renames it when complete, so the latest checkpoint is always whole.
"""

from pathlib import Path
from typing import Any

import grain
from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `{state, data}` every `every_steps` steps (and when forced), keeping the newest `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, every_steps: int = 500):
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
        logging.info("Checkpoint of step %d: %s", step, self.manager.directory / str(step))

    def restore(self, step: int, state_template: Any, data_iterator: Any) -> Any:
        """Restores the state into the shapes/shardings of `state_template`, and the iterator in place."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
