"""Run logs: WORKDIR/metrics.jsonl (always), TensorBoard event files in WORKDIR/tensorboard with the
same scalars, a progress bar, and Weights & Biases (when asked)."""

import json
import secrets
import sys
import tempfile

import jax
from etils import epath
from tqdm import tqdm

from mhc_jax import storage
from mhc_jax.training.tensorboard_writer import TensorBoardWriter


class RunLog:
    """metrics.jsonl, TensorBoard, the progress bar and wandb; everything is a no-op outside process 0.

    The workdir may be a bucket (gs://...), where files cannot be appended to: metrics.jsonl is
    rewritten whole at every write (`storage.write_whole`), so a reader never sees a partial file."""

    def __init__(self, workdir: str | epath.Path, config, start_step: int):
        self.active = jax.process_index() == 0
        self.path = storage.path(workdir) / "metrics.jsonl"
        self.lines = []
        self.wandb_run = self.bar = self.tensorboard = None
        if not self.active:
            return
        if self.path.exists():  # a resumed run drops what it logged past its checkpoint
            self.lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.flush()
        if config.log.tensorboard:
            self.tensorboard = TensorBoardWriter(storage.path(workdir) / "tensorboard")
        if config.log.wandb:
            self.wandb_run = start_wandb(storage.path(workdir), config)
        if config.log.progress:
            self.bar = tqdm(total=config.train.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.lines.append(json.dumps(record))
        self.flush()
        scalars = {k: v for k, v in record.items() if k != "step"}
        if self.tensorboard is not None:
            self.tensorboard.write_scalars(record["step"], scalars)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def flush(self) -> None:
        storage.write_whole(self.path, "".join(line + "\n" for line in self.lines))

    def note(self, message: str) -> None:
        """A line for the person watching (process 0), above the progress bar."""
        if self.active:
            tqdm.write(message, file=sys.stderr) if self.bar is not None else print(message, file=sys.stderr, flush=True)

    def advance(self, loss: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(workdir: epath.Path, config):
    """A wandb run that a resumed training run continues (its id is kept in WORKDIR/wandb_run_id).
    wandb keeps its files in the workdir, or in a local temporary folder when that is a bucket."""
    import wandb  # imported only when asked for: it is slow to import

    id_file = workdir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8))
    files = tempfile.mkdtemp(prefix="mhc-jax-wandb-") if storage.is_remote(workdir) else str(workdir)
    return wandb.init(project=config.log.wandb_project, mode=config.log.wandb_mode, dir=files,
                      id=id_file.read_text().strip(), resume="allow", name=workdir.name,
                      group=config.log.wandb_group or None, config=config.to_dict())
