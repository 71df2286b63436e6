"""Finished runs -> the paper's comparison: per scale, one row per variant with the mean and range over
seeds of the final losses, the largest composite Amax gains, tokens seen and tokens/s, every
benchmark metric of the runs' newest eval.py results, and the validation-loss gap to the residual
baseline; plus plots of loss against tokens, Amax over steps and final loss against parameters.

Everything is read from the workdirs (config.json, data.json, metrics.jsonl, eval/<step>/results.json),
local or in a bucket. Runs trained on different data or tokenizers are refused, never averaged; runs
whose configs differ in more than the seed get rows of their own, labelled by the differing fields.
"""

import dataclasses
import json

import ml_collections
import numpy as np

from mhc_jax import storage, validation
from mhc_jax.errors import UserError
from mhc_jax.model import residual
from mhc_jax.model.transformer import param_counts
from mhc_jax.study.stability import summarize_run

# Config fields that do not make runs different experiments: the seed (averaged over), logging, layout
# and compilation, bookkeeping; and the fields that name the variant and scale (the table's rows and tables).
SAME_EXPERIMENT = ("train.seed", "train.stop_at_step", "train.log_every", "train.diag_every", "train.eval_every",
                   "train.checkpoint_every", "train.keep_checkpoints", "train.microbatches", "model.remat",
                   "model.scan_layers", "model.residual", "model.n_streams", "model.hc.dynamic", "data.dir", "scale")
SAME_EXPERIMENT_PREFIXES = ("log.", "mesh.")


@dataclasses.dataclass
class RunResult:
    name: str
    config: ml_collections.ConfigDict
    records: list[dict]
    data: dict  # data.json: the data and tokenizer fingerprint
    evals: dict  # 'task/metric' -> value, from the newest eval.py results

    @property
    def variant(self) -> str:
        return residual.variant_name(self.config.model)

    @property
    def scale(self) -> str:
        return self.config.get("scale", "unnamed")

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len

    def summary(self) -> dict:
        timed = [r["tokens_per_sec"] for r in self.records if "tokens_per_sec" in r]
        return {**summarize_run(self.records),
                "tokens_seen": (self.records[-1]["step"] if self.records else 0) * self.tokens_per_step,
                "tokens_per_sec": float(np.median(timed)) if timed else None, **self.evals}


def find_runs(roots: list[str]) -> list[RunResult]:
    """Every workdir with a config.json: a root itself, or the folders directly under it."""
    runs = []
    for root in roots:
        path = storage.path(root)
        if not path.is_dir():
            raise UserError(f"{root}: no such folder")
        found = [path] if (path / "config.json").exists() else sorted(p for p in path.iterdir()
                                                                         if (p / "config.json").exists())
        if not found:
            raise UserError(f"{root}: no runs (folders with a config.json written by train.py)")
        runs += [load_run(p) for p in found]
    return runs


def load_run(path) -> RunResult:
    if not (path / "data.json").exists():
        raise UserError(f"{path}: no data.json (the run predates it); resume it once with train.py to write it")
    metrics = path / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    results = sorted((p for p in (path / "eval").glob("*/results.json")), key=lambda p: int(p.parent.name)) \
        if (path / "eval").exists() else []
    evals = {}
    if results:
        for task, outcome in json.loads(results[-1].read_text())["tasks"].items():
            evals.update({f"{task}/{metric}": value for metric, value in outcome["metrics"].items()})
    return RunResult(path.name, ml_collections.ConfigDict(json.loads((path / "config.json").read_text())),
                     records, json.loads((path / "data.json").read_text()), evals)


def check_same_data(runs: list[RunResult]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.data["fingerprint"] != first.data["fingerprint"]:
            what = "tokenizers" if run.data["tokenizer_sha256"] != first.data["tokenizer_sha256"] else "data"
            raise UserError(f"{run.name} and {first.name} were trained on different {what} "
                            f"({run.data['dir']} vs {first.data['dir']}); compare runs on the same data only")


def experiment_fields(config) -> dict:
    return {k: v for k, v in validation.flat(config).items()
            if k not in SAME_EXPERIMENT and not k.startswith(SAME_EXPERIMENT_PREFIXES)}


def rows_by_scale(runs: list[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    """{scale: {row label: runs}}: a row is a variant and whatever else sets its runs apart."""
    tables = {}
    for scale in dict.fromkeys(r.scale for r in runs):
        members = [r for r in runs if r.scale == scale]
        fields = [experiment_fields(r.config) for r in members]
        varying = sorted(k for k in set().union(*fields) if len({repr(f.get(k)) for f in fields}) > 1)
        rows = {}
        for run, own in zip(members, fields):
            extra = ", ".join(f"{k}={own.get(k)}" for k in varying)
            rows.setdefault(f"{run.variant} ({extra})" if extra else run.variant, []).append(run)
        tables[scale] = dict(sorted(rows.items()))
    return tables


def stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)), "n": len(values)}


def summarize(tables: dict) -> dict:
    """{scale: {row: {metric: {mean, min, max, n}, 'seeds': [...], 'runs': [...]}}}, with the gap of the
    final validation loss to the residual row with the same other fields."""
    out = {}
    for scale, rows in tables.items():
        out[scale] = {}
        for label, runs in rows.items():
            summaries = [r.summary() for r in runs]
            keys = dict.fromkeys(k for s in summaries for k in s)
            out[scale][label] = {"runs": [r.name for r in runs], "seeds": [r.config.train.seed for r in runs],
                                 "parameters": param_counts(runs[0].config.model)["total"],
                                 **{k: stats([s.get(k) for s in summaries]) for k in keys}}
        for label, row in out[scale].items():
            variant, _, extra = label.partition(" ")
            baseline = out[scale].get(f"residual {extra}".strip())
            gap = None
            if baseline and row["final_eval_loss"] and baseline["final_eval_loss"]:
                gap = row["final_eval_loss"]["mean"] - baseline["final_eval_loss"]["mean"]
            row["eval_loss_minus_residual"] = gap
    return out


COLUMNS = (("final_train_loss", "final train loss", 4), ("final_eval_loss", "final validation loss", 4),
           ("max_amax_forward", "max Amax forward", 4), ("max_amax_backward", "max Amax backward", 4),
           ("tokens_seen", "tokens seen", 6), ("tokens_per_sec", "tokens/s", 6))


def cell(value: dict | None, digits: int) -> str:
    if value is None:
        return "-"
    if value["n"] == 1 or value["min"] == value["max"]:
        return f"{value['mean']:.{digits}g}"
    return f"{value['mean']:.{digits}g} ({value['min']:.{digits}g}-{value['max']:.{digits}g})"


def markdown(summary: dict) -> str:
    """One table per scale; a cell is the mean over seeds and, in brackets, their range."""
    lines = []
    for scale, rows in summary.items():
        benchmarks = sorted({k for row in rows.values() for k in row if "/" in k})
        header = ["variant", "seeds", *(title for _, title, _ in COLUMNS), "validation loss - residual", *benchmarks]
        lines += [f"### {scale}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, row in rows.items():
            gap = row["eval_loss_minus_residual"]
            values = [label, str(len(row["seeds"])), *(cell(row.get(key), digits) for key, _, digits in COLUMNS),
                      "-" if gap is None else f"{gap:+.4f}", *(cell(row.get(k), 4) for k in benchmarks)]
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)
