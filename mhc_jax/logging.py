"""Run logs: WORKDIR/metrics.jsonl (always), a progress bar, Weights & Biases (when asked), and
the FLOP count behind the MFU figure.

FLOPs per trained token = 3 x the forward pass's (the backward costs twice the forward):
  forward = 2 x the active parameters (model.param_counts: every weight a token is multiplied
            by, unembedding included, in MoE layers only its top_k routed experts)
          + 2 x seq_len x heads x (query-key dims + value dims) per layer (QK^T and AV, counted in
            full as in PaLM's formula, not halved for causality)
          + the residual connection's own FLOPs at each of the 2L sites (residual.site_flops:
            stream mixing and, for HC/mHC, the coefficients)
MFU = FLOPs per token x tokens per second / (devices x peak FLOP/s per device).
"""

import json
import secrets
import tempfile

import jax
from etils import epath
from tqdm import tqdm

from mhc_jax import residual, workdirs
from mhc_jax.model import param_counts

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12))


def train_flops_per_token(model_config, seq_len: int) -> float:
    c = model_config
    counts = param_counts(c)
    if c.attention == "mla":
        qk_dims, v_dims = c.mla.head_dim + c.mla.rope_dim, c.mla.head_dim
    else:
        qk_dims = v_dims = c.d_model // c.n_heads
    forward = (2 * (counts["active"] - counts["residual_overhead"])  # site_flops counts the HC/mHC weights
               + 2 * c.n_layers * seq_len * c.n_heads * (qk_dims + v_dims)
               + 2 * c.n_layers * residual.site_flops(c))
    return 3.0 * forward


def peak_flops_per_device(log_config) -> float | None:
    if log_config.peak_tflops > 0:
        return log_config.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


class RunLog:
    """metrics.jsonl, the progress bar and wandb; everything is a no-op outside process 0.

    The workdir may be a bucket (gs://...), where files cannot be appended to: metrics.jsonl is
    rewritten whole at every write, through a temporary file renamed over it, so a reader never
    sees a partial file."""

    def __init__(self, workdir: str | epath.Path, config, start_step: int):
        self.active = jax.process_index() == 0
        self.path = workdirs.path(workdir) / "metrics.jsonl"
        self.lines = []
        self.wandb_run = None
        self.bar = None
        if not self.active:
            return
        if self.path.exists():  # a resumed run drops what it logged past its checkpoint
            self.lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.flush()
        if config.log.wandb:
            self.wandb_run = start_wandb(workdirs.path(workdir), config)
        if config.log.progress:
            self.bar = tqdm(total=config.train.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.lines.append(json.dumps(record))
        self.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def flush(self) -> None:
        partial = self.path.parent / (self.path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in self.lines))
        partial.replace(self.path)

    def advance(self, loss: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(workdir: epath.Path, config):
    """A wandb run that a resumed training run continues (its id is kept in WORKDIR/wandb_run_id).
    wandb keeps its files in the workdir, or in a local temporary folder when that is a bucket."""
    import wandb  # imported only when asked for: it is slow to import

    id_file = workdir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8))
    files = tempfile.mkdtemp(prefix="mhc-jax-wandb-") if workdirs.is_remote(workdir) else str(workdir)
    return wandb.init(project=config.log.wandb_project, mode=config.log.wandb_mode, dir=files,
                      id=id_file.read_text().strip(), resume="allow", name=workdir.name,
                      group=config.log.wandb_group or None, config=config.to_dict())
