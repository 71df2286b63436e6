"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: the train state and a JSON metadata record
(the resolved config, the tokenizer, package versions, the step).

Saves are asynchronous and committed atomically by orbax (a step directory appears only once
complete). The state is restored into abstract arrays that carry the current run's shardings, so a
checkpoint restores onto any mesh, device or process count; the data position is the step itself
(data.py), so nothing else is needed to resume. A checkpoint that cannot be read is moved aside to
<step>.damaged-<time> by the run that owns the workdir (kept for a post-mortem, out of the way of
the next save of that step) and skipped by a reader beside it (eval.py); both use the one before.
"""

import logging
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mhc_jax import storage
from mhc_jax.errors import UserError
from mhc_jax.model.layers import Rope

# What reading a damaged or vanishing checkpoint raises: orbax and tensorstore raise many kinds, plain
# Exception among them. A UserError (another experiment's checkpoint) is never one of these.
UNREADABLE = Exception
# Model config fields added after checkpoints were first written, each with the value that means
# what the model computed before it existed (configs/pretrain.py explains them).
MODEL_FIELDS_ADDED_LATER = {"head_dim": 0, "qkv_bias": False, "qk_norm": False,
                            "rope_scaling": Rope(10_000.0).scaling_fields(),  # unscaled
                            "hc": {"static_res_weight_decay": False}, "mhc": {"v4_eps": 1e-6}, "laurel": {"rank": 16}}


def with_defaults(defaults: dict, given: dict) -> dict:
    """`given`, with the fields of `defaults` that it lacks (in nested groups too)."""
    merged = {**defaults, **given}
    return {key: with_defaults(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict)
            else value for key, value in merged.items()}


class Checkpoints:
    def __init__(self, workdir: str | epath.Path, keep: int | None = None, create: bool = True):
        # A reader (create=False) lists the step folders without reading their metadata yet: beside a
        # writer a step can vanish in between (reload() lists again).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create,
                                               lightweight_initialize=not create)
        self.directory = storage.path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        """The committed steps as last listed, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def reload(self, attempts: int = 20) -> None:
        """Lists the committed steps again. orbax lists the step folders, then reads each one's
        metadata; a step that the train.py writing the workdir rotates away in between raises, and
        the listing is made again (an error that persists is raised)."""
        for _ in range(attempts - 1):
            try:
                return self.manager.reload()
            except OSError:  # FileNotFoundError, NotADirectoryError: a step folder went away
                time.sleep(0.05)
        self.manager.reload()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_newest(self, read, owner: bool, pinned: int | None = None):
        """(step, read(step)) for the newest step that reads (only `pinned` when given), or None when
        no step does. The one recovery path of every reader: a step that fails while the steps change
        (the train.py writing the workdir saves one and rotates the oldest away) sends the search back
        to the newest; one that stays unreadable is moved aside by the run that owns the workdir
        (`owner`: out of the way of the next save of that step) and skipped, with a warning, by a
        reader beside it. A UserError from `read` (a checkpoint of another experiment) is raised, never skipped."""
        while True:
            self.reload()
            steps = self.steps()
            if pinned is not None and pinned not in steps:
                raise UserError(f"--step: {self.directory} has no step {pinned}; it has {sorted(steps)}")
            for step in [pinned] if pinned is not None else steps:
                try:
                    return step, read(step)
                except UserError:
                    raise
                except UNREADABLE as e:
                    self.reload()
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if self.steps() != steps:  # saved, rotated away or set aside meanwhile
                        logging.warning("checkpoint %s/%d: the steps changed while it was read (%s); trying the newest",
                                        self.directory, step, reason)
                        break  # list the steps again
                    if pinned is not None:
                        raise UserError(f"--step: {self.directory}/{step} cannot be read ({reason}); "
                                        "choose another step") from None
                    if owner:
                        self.set_aside(step, reason)
                        steps = self.steps()
                    else:
                        logging.warning("checkpoint %s/%d cannot be read (%s); trying the one before",
                                        self.directory, step, reason)
            else:
                return None

    def restore_latest(self, abstract_state, check_meta):
        """(step, state, meta) of the newest checkpoint that reads, or None; the unreadable ones newer
        than it are moved aside. `check_meta(meta)` may raise (a checkpoint of another experiment is
        refused, not skipped); the state is laid out as `abstract_state` says."""
        def read(step):
            meta = self.read_meta(step)
            check_meta(meta)
            self.check_structure(step, self.manager.item_metadata(step)["state"], abstract_state)
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state, meta

        newest = self.read_newest(read, owner=True)
        return None if newest is None else (newest[0], *newest[1])

    def check_structure(self, step: int, saved, abstract_state) -> None:
        """A readable checkpoint whose arrays are not the ones this run has was written by other code
        or another optimizer: refused (UserError), never mistaken for a damaged one and moved aside."""
        if saved is None:
            raise KeyError("the state's tree metadata is missing")
        missing, extra = leaf_paths(abstract_state) - leaf_paths(saved), leaf_paths(saved) - leaf_paths(abstract_state)
        if missing or extra:
            difference = f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(extra)[0]}"
            raise UserError(f"--workdir: {self.directory}/{step} holds a train state of another structure ({difference}; "
                            f"{len(missing)} missing, {len(extra)} unexpected arrays): it was written by other code; "
                            "use another --workdir or the code that wrote it")

    def set_aside(self, step: int, reason: str) -> None:
        """Renames an unreadable step to <step>.damaged-<time>, where orbax no longer sees it."""
        damaged = self.directory / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        logging.warning("checkpoint %s/%d: unreadable (%s); moved to %s, trying the one before",
                        self.directory, step, reason, damaged.name)
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(damaged)
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.reload()

    def read_meta(self, step: int) -> dict:
        """The step's metadata; model fields its config predates get the values it was trained with."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if "config" in meta:
            meta["config"]["model"] = with_defaults(MODEL_FIELDS_ADDED_LATER, meta["config"]["model"])
        return meta

    def restore_params(self, step: int, abstract_params):
        """Only the model parameters of `step` (not the optimizer state), laid out and typed as given."""
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        return restored["params"]

    def close(self) -> None:
        self.manager.close()


def leaf_paths(tree) -> set[str]:
    """'opt/1/0/mu/blocks/attn/wq'-style names of a pytree's leaves (dict keys, indices, attributes)."""
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
