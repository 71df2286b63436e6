"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: the train state, the data iterator's state and
a JSON metadata record (the resolved config, the tokenizer, package versions).

Saves are asynchronous and committed atomically by orbax (a step directory appears only once
complete). The state is restored into abstract arrays that carry the current run's shardings, so a
checkpoint restores onto any mesh or device count. A checkpoint that cannot be read is skipped,
with a warning, in favour of the one before it.
"""

import logging

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mhc_jax import workdirs


class Checkpoints:
    def __init__(self, workdir: str | epath.Path, keep: int | None = None, create: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create)
        self.directory = workdirs.path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state, data_iterator: grain.DatasetIterator, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state, data_iterator: grain.DatasetIterator, check_meta):
        """(step, state, meta) of the newest checkpoint that reads, or None when there is none.
        `check_meta(meta)` may raise (a checkpoint of another experiment is not skipped); the state
        is laid out as `abstract_state` says and `data_iterator` moves to where it was."""
        for step in self.steps():
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged checkpoint)
                logging.warning("checkpoint %s/%d: metadata unreadable (%s); trying the one before", self.directory, step, e)
                continue
            check_meta(meta)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data_iter=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as e:  # noqa: BLE001
                logging.warning("checkpoint %s/%d: state unreadable (%s); trying the one before", self.directory, step, e)
                continue
            return step, restored.state, meta
        return None

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_params(self, step: int, abstract_params):
        """Only the model parameters of `step` (not the optimizer state), laid out as given."""
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
        return restored.state["params"]

    def close(self) -> None:
        self.manager.close()
