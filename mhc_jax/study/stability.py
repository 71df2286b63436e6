"""The stability study of scripts/stability.py: train `residual`, `hc` and `mhc` on the same data with the
same seeds and schedule (and a stress setting at a multiple of the learning rate), the variants that
followed the paper, and two controls of HC's gain (a 10x lower learning rate; weight decay on its
static H_res), within a time budget.

OUT/ holds plan.json (the settings and the step count, fixed once), runs/<run>/ (each a train.py
workdir: metrics.jsonl, checkpoints), timings.json, summary.json, the plots and report.md. Running the
same command again continues where it stopped and rebuilds the report.
"""

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from mhc_jax import sharding
from mhc_jax.data import pipeline
from mhc_jax.errors import UserError
from mhc_jax.model import diagnostics, residual
from mhc_jax.training import checkpoint, trainer
from mhc_jax.training.experiment import Experiment

VARIANTS = ("residual", "hc", "mhc")  # the mHC paper's comparison, HC in its dynamic form, at every seed
LATER_VARIANTS = ("mhc_v4", "mhc_lite", "kromhc", "laurel_lr")  # the variants that followed (default), at the extra seeds
HC_CONTROLS = ((0.1, False), (1.0, True))  # HC at the extra seeds: (lr factor, weight decay on the static H_res)
EVALUATIONS = 5  # validation losses per run (train.eval_every follows from the steps)
DIAGNOSTICS = 40  # Amax measurements per run (train.diag_every follows)
CHECKPOINTS = 4  # saves per run; the newest is kept for the heat maps, and a diverged run keeps one
RUN_STARTUP_SECONDS = 10.0  # per run besides compiling: building the pipeline, compiling eval and trace, plots
REPORT_SECONDS = 60.0  # kept aside from the budget for the heat maps, plots and report
MIN_STEPS = 20  # a budget that buys fewer steps per run is refused


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    lr_factor: float
    decay_res: bool = False  # AdamW's weight decay also on HC's static H_res (model.hc.static_res_weight_decay)

    @property
    def name(self) -> str:
        return f"{self.variant}-lr{self.lr_factor:g}x-seed{self.seed}" + ("-decayed-res" if self.decay_res else "")

    @property
    def label(self) -> str:
        """What the tables and plots group the run's seeds under."""
        return self.variant + (" (decayed H_res)" if self.decay_res else "")


def study_runs(seeds: list[int], stress_seeds: list[int], stress_lr_factor: float, extra_seeds: list[int],
               extra_variants=LATER_VARIANTS) -> list[Run]:
    """Every variant at each seed (learning rate x1), then every variant at each stress seed, then at
    each extra seed the `extra_variants` and HC's two controls."""
    return ([Run(v, s, 1.0) for s in seeds for v in VARIANTS]
            + [Run(v, s, stress_lr_factor) for s in stress_seeds for v in VARIANTS]
            + [Run(v, s, 1.0) for s in extra_seeds for v in extra_variants]
            + [Run("hc", s, factor, decay) for s in extra_seeds for factor, decay in HC_CONTROLS])


def run_config(base, run: Run, steps: int):
    """The train.py config of one run: the study config with the run's variant, seed and lr, `steps`
    long, with evaluation, diagnostic and checkpoint cadences that follow from the steps."""
    config = copy.deepcopy(base)
    m, t = config.model, config.train
    residual.set_variant(m, run.variant)
    n_streams = residual.overridden_stream_count(base.model)  # the study config's n, if it sets one
    m.n_streams = n_streams if n_streams and m.n_streams > 1 else m.n_streams
    m.hc.static_res_weight_decay = run.decay_res
    t.seed, t.lr, t.steps = run.seed, base.train.lr * run.lr_factor, steps
    t.warmup_steps = base.train.warmup_steps or max(1, steps // 10)
    t.eval_every = max(1, steps // EVALUATIONS)
    t.diag_every = max(1, steps // DIAGNOSTICS)
    t.checkpoint_every = max(1, steps // CHECKPOINTS)
    t.log_every = 1
    t.stop_at_step = 0
    return config


def example_run_config(base):
    """A run config of the study, for validating `base` before any run: train.steps = 0 (set by the
    budget) is a placeholder, so this one is MIN_STEPS long unless the steps are fixed."""
    return run_config(base, Run("mhc", 0, 1.0), steps=base.train.steps or MIN_STEPS)


@dataclasses.dataclass
class StepTiming:
    first_step: float  # seconds of the first step, compiling included
    step: float  # seconds of a later step


def time_steps(config, timed_steps: int = 3) -> StepTiming:
    """Times this config's train step on random tokens on this machine."""
    experiment = Experiment(config, sharding.make_mesh(config.mesh))
    state = experiment.init_state()
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size,
                                               (config.train.batch_size, config.train.seq_len + 1), dtype=np.int32)
    batch = experiment.global_batch({"tokens": tokens})["tokens"]
    started = time.perf_counter()
    state, metrics = experiment.train_step(state, batch, experiment.hyper)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(timed_steps):
        state, metrics = experiment.train_step(state, batch, experiment.hyper)
    jax.block_until_ready(metrics)
    return StepTiming(first, (time.perf_counter() - started) / timed_steps)


def affordable_steps(seconds: float, runs: list[Run], timings: dict[str, StepTiming], eval_batches: int) -> int:
    """The step count that spends `seconds` on `runs`: every run pays its startup, its steps, and
    forward passes (a third of a step each) for the evaluations and diagnostics."""
    forwards_per_run = (EVALUATIONS * eval_batches + DIAGNOSTICS) / 3
    fixed = sum(timings[r.variant].first_step + RUN_STARTUP_SECONDS + timings[r.variant].step * forwards_per_run
                for r in runs)
    per_step = sum(timings[r.variant].step for r in runs)
    return max(0, math.floor((seconds - fixed) / per_step))


def load_plan(out: Path, settings: dict) -> dict | None:
    """The plan of an earlier invocation with the same settings, or None for a new study."""
    path = out / "plan.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out: {out} exists and holds no plan.json of a study; choose a new folder")
        return None
    plan = json.loads(path.read_text())
    if plan["settings"] != settings:
        changed = sorted(k for k in set(plan["settings"]) | set(settings) if plan["settings"].get(k) != settings.get(k))
        raise UserError(f"--out: {out} holds a study with other settings ({', '.join(changed)}); "
                        f"rerun it with its own settings (see {path}) or choose a new --out")
    return plan


def make_plan(out: Path, base, runs: list[Run], budget_minutes: float, settings: dict) -> dict:
    """Fixes the step count: train.steps when set, otherwise what the budget buys after calibrating."""
    started = time.perf_counter()
    timings = {}
    if base.train.steps > 0:
        steps = base.train.steps
    else:
        for variant in dict.fromkeys(r.variant for r in runs):
            timings[variant] = time_steps(run_config(base, Run(variant, 0, 1.0), steps=100))
            print(f"calibration: {variant} {timings[variant].step:.2f} s/step "
                  f"({timings[variant].first_step:.1f} s with compiling)", flush=True)
        spend = budget_minutes * 60 - (time.perf_counter() - started) - REPORT_SECONDS
        steps = affordable_steps(spend, runs, timings, base.train.eval_batches)
        if steps < MIN_STEPS:
            raise UserError(f"--budget_minutes: {budget_minutes:g} minutes buy {steps} steps per run for "
                            f"{len(runs)} runs here (at least {MIN_STEPS} needed); raise it or pass fewer --seeds")
    plan = {"settings": settings, "steps": steps, "runs": [r.name for r in runs],
            "calibration": {v: dataclasses.asdict(t) for v, t in timings.items()},
            "calibration_seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def read_records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(workdir: Path, steps: int) -> bool:
    """The run reached its last step or diverged (rerunning it would diverge again)."""
    records = read_records(workdir)
    return bool(records) and (records[-1]["step"] == steps or not math.isfinite(records[-1]["loss"]))


def read_timings(out: Path) -> dict[str, float]:
    """Seconds each run has trained, over every invocation."""
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def train_runs(out: Path, base, runs: list[Run], steps: int, vocab_overridden: bool) -> bool:
    """Trains every unfinished run; False when a run was stopped by SIGTERM/SIGINT."""
    timings = read_timings(out)
    for index, run in enumerate(runs, 1):
        workdir = out / "runs" / run.name
        if finished(workdir, steps):
            continue
        started = time.perf_counter()
        try:
            trainer.train(run_config(base, run, steps), workdir, vocab_overridden=vocab_overridden)
        except trainer.TrainingDiverged as e:
            print(f"  {run.name}: diverged ({e})", flush=True)
        timings[run.name] = round(timings.get(run.name, 0.0) + time.perf_counter() - started, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
        if not finished(workdir, steps):
            return False
        summary = summarize_run(read_records(workdir))
        numbers = ", ".join(f"{name} {summary[key]:.4g}" for name, key in (
            ("final validation loss", "final_eval_loss"), ("max composite Amax forward", "max_amax_forward"),
            ("backward", "max_amax_backward")) if summary[key] is not None)
        print(f"[{index}/{len(runs)}] {run.name}: {timings[run.name]:.0f} s, {numbers}", flush=True)
    return True


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


def summarize_run(records: list[dict]) -> dict:
    """A run's numbers for the report, all read from its metrics.jsonl."""
    diagnosed = [r for r in records if "amax_forward" in r and finite(r["amax_forward"])]
    losses = [r["loss"] for r in records if finite(r["loss"])]
    evals = [r for r in records if "eval_loss" in r]
    first_over_2 = next((r["step"] for r in diagnosed if r["amax_forward"] > 2.0), None)
    last = diagnosed[-1] if diagnosed else {}
    tail = max(1, len(losses) // 10)
    return {
        "steps": records[-1]["step"] if records else 0,
        "diverged_at": records[-1]["step"] if records and not finite(records[-1]["loss"]) else None,
        "final_train_loss": float(np.mean(losses[-tail:])) if losses else None,  # mean of the last 10% of steps
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "max_amax_forward": max((r["amax_forward"] for r in diagnosed), default=None),
        "max_amax_backward": max((r["amax_backward"] for r in diagnosed), default=None),
        "max_abs_forward_minus_1": max((abs(r["amax_forward"] - 1) for r in diagnosed), default=None),
        "first_amax_forward": diagnosed[0]["amax_forward"] if diagnosed else None,
        "final_amax_forward": last.get("amax_forward"),
        "final_amax_backward": last.get("amax_backward"),
        "first_step_forward_over_2": first_over_2,
    }


def representative_h_res(out: Path, base, runs: list[Run], steps: int) -> dict:
    """For the first hc and mhc runs at lr x1: the mean over the tokens of one validation batch of
    H_res at the site where hc's own forward gain is largest, and of the composite map of all sites,
    from the newest checkpoint. Empty when those runs have no checkpoint."""
    maps = {}
    site = None
    for variant in ("hc", "mhc"):
        run = next(r for r in runs if r.variant == variant and r.lr_factor == 1.0 and not r.decay_res)
        config = run_config(base, run, steps)
        workdir = out / "runs" / run.name
        saved = checkpoint.Checkpoints(workdir, create=False)
        step = saved.steps()[0] if saved.steps() else None
        if step is None:
            saved.close()
            return {}
        experiment = Experiment(config, sharding.make_mesh(config.mesh))
        params = saved.restore_params(step, experiment.abstract_state["params"])
        saved.close()
        manifest = pipeline.load_manifest(config.data.dir)
        local = pipeline.eval_batches(config.data.dir, manifest, seq_len=config.train.seq_len,
                                  global_batch_size=config.train.batch_size, max_batches=1)[0]
        tokens = experiment.global_batch(local)["tokens"]
        trace = jax.jit(lambda p, t: experiment.trace(p, t[:, :-1])[1])(params, tokens)
        h_res = np.asarray(trace.maps.res, np.float64)  # [S, B, T, n, n]
        if site is None:
            site = int(np.argmax(np.asarray(diagnostics.amax_gain(trace.maps.res)["single_forward"])))
        composite = np.asarray(diagnostics.composite_maps(trace.maps.res), np.float64)[0]
        maps[variant] = {"run": run.name, "step": step,
                         "single": h_res[site].mean(axis=(0, 1)).tolist(),
                         "composite": composite.mean(axis=(0, 1)).tolist()}
    return {"site": site, **maps}
