"""The training loop: `train` = `setup` (mesh, data, model, init or restore), `loop` (the jitted
steps, evaluation, stability diagnostics, checkpoints, a clean stop when preempted) and `teardown`.

On an accelerator the loop never makes it wait for the host: each step's metrics are read one step
late, after the next step has been dispatched, except on the steps that evaluate, diagnose or
checkpoint, which read them at once. On CPU the "device" is the host's own cores, so there is
nothing to overlap and the loop reads every step at once (docs/results/2026-12-06-package.md
measured the overlap slower there). Either way: a checkpoint of step k is written only after the
loss and gradient norm of every step up to k were read and found finite; a non-finite one stops the
run (TrainingDiverged) at most one step later, with nothing saved past the last finite checkpoint.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from mhc_jax import config_rules, sharding, storage, validation
from mhc_jax.data import pipeline, prepare
from mhc_jax.errors import UserError
from mhc_jax.model import attention_kernels, moe, residual
from mhc_jax.pretrained import surgery
from mhc_jax.training import checkpoint, flops, runlog
from mhc_jax.training.experiment import Experiment

DEFAULT_DATA_DIR = "data/default"  # prepared with the default recipe when it is missing


class TrainingDiverged(Exception):
    """The loss or the gradient norm stopped being finite."""


def open_data(config, vocab_overridden: bool, init_from: "surgery.Source | None" = None) -> dict:
    """The data manifest (process 0 prepares data/default on first use), the same on every process
    (and prepared with `init_from`'s tokenizer, if given); sets model.vocab_size from it."""
    data_dir = config.data.dir
    if Path(data_dir) == Path(DEFAULT_DATA_DIR) and not (Path(data_dir) / "manifest.json").exists():
        if jax.process_index() == 0:
            print(f"preparing {data_dir} (first use; see scripts/prepare_data.py)", flush=True)
            prepare.prepare(data_dir, prepare.Recipe(), command="train.py, on first use of data/default")
        multihost_utils.sync_global_devices("default data prepared")
    try:
        manifest, problem = pipeline.load_manifest(data_dir), None
    except UserError as e:
        manifest, problem = None, e
    check_same_data_everywhere(data_dir, manifest, problem)
    if init_from is not None and init_from.tokenizer_sha256 != manifest["tokenizer"]["sha256"]:
        raise UserError(f"--init_from: {init_from.path}'s tokenizer (sha256 {init_from.tokenizer_sha256[:12]}) is not "
                        f"the one data.dir was prepared with ({manifest['tokenizer']['sha256'][:12]}); prepare the data "
                        "with the source's tokenizer (scripts/prepare_data.py --tokenizer=...)")
    config.model.vocab_size = pipeline.resolve_vocab_size(config.model.vocab_size, manifest, vocab_overridden)
    return manifest


def check_same_data_everywhere(data_dir: str, manifest: dict | None, problem: UserError | None) -> None:
    """Every process reads its own copy of the data folder: all must hold the same one, or all stop
    with the same line (none trains on missing data or waits for one that stopped)."""
    if jax.process_count() > 1:
        digest = bytes.fromhex(pipeline.fingerprint(manifest)) if manifest else bytes(32)
        digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
        lacking = [p for p in range(jax.process_count()) if not digests[p].any()]
        if lacking:
            raise UserError(f"data.dir: {data_dir} is missing or incomplete on process(es) {lacking} of "
                            f"{jax.process_count()}; every host needs the same prepared folder: put it on a shared "
                            "filesystem or run the same scripts/prepare_data.py command on each host")
        if (digests != digests[0]).any():
            raise UserError(f"data.dir: {data_dir} holds different data on different processes; prepare it once "
                            "and share it, or run the same scripts/prepare_data.py command on each host")
    if problem:
        raise problem


def check_mesh(config, mesh) -> None:
    """The batch must split over the data-parallel axes, the routed experts over the expert axis,
    and the devices must run the attention kernel."""
    t, parallel = config.train, mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    platform = mesh.devices.flat[0].platform
    attention_kernels.check_platform(config.model.attention_kernel, platform)
    moe.check_platform(config.model.moe, platform)
    n_experts = config.model.moe.n_experts
    if n_experts and n_experts % mesh.shape["expert"]:
        raise UserError(f"mesh.expert: {mesh.shape['expert']} does not divide model.moe.n_experts={n_experts}; "
                        f"use an expert axis that divides it")
    if t.microbatches < 1 or t.batch_size % t.microbatches:
        raise UserError(f"train.microbatches: {t.microbatches} does not divide train.batch_size={t.batch_size}")
    if (t.batch_size // t.microbatches) % parallel:
        raise UserError(f"train.batch_size: {t.batch_size} sequences in {t.microbatches} microbatch(es) do not "
                        f"split over data x fsdp x expert = {parallel} devices; make batch_size / microbatches a multiple "
                        f"of {parallel}")


def run_meta(config, manifest) -> dict:
    return {"variant": residual.variant_name(config.model), "n_streams": config.model.n_streams,
            "config": config.to_dict(), "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "eos_token": manifest["tokenizer"]["eos_token"],
            "versions": {name: module.__version__ for name, module in
                         (("jax", jax), ("optax", optax), ("numpy", np), ("grain", grain))}}


def checker(config, manifest, workdir):
    """Refuses a checkpoint from another experiment (different model or tokenizer)."""
    def check(meta):
        if meta["tokenizer_sha256"] != manifest["tokenizer"]["sha256"]:  # before the model: its vocab_size follows
            raise UserError(
                f"data.dir: {config.data.dir} was prepared with another tokenizer ({manifest['tokenizer']['vocab_size']} "
                f"tokens, sha256 {manifest['tokenizer']['sha256'][:12]}) than the checkpoints in {workdir} were "
                f"trained with ({meta['config']['model']['vocab_size']} tokens, sha256 {meta['tokenizer_sha256'][:12]}); "
                "point data.dir at the data they were trained on")
        saved, current = validation.flat(meta["config"]["model"]), validation.flat(config.model)
        differing = sorted(k for k in set(saved) | set(current)
                           if k not in config_rules.COMPILE_ONLY_FIELDS and saved.get(k) != current.get(k))
        if differing:
            changes = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise UserError(f"--workdir: {workdir} holds checkpoints of a different model ({changes}); "
                            f"use another --workdir, or delete {workdir}/checkpoints to start fresh")
    return check


class StopRequest:
    """The first SIGTERM / SIGINT sets a flag: the loop saves a checkpoint and stops after the current
    step. A later one stops the process at once (exit 128 + signal): a save it interrupts is never
    committed (orbax writes a step under a temporary name and renames it when complete), so a resume
    reads only whole checkpoints."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested:
            print(f"error: {signal.Signals(signum).name} again: stopped without finishing the checkpoint; the run "
                  "resumes from its newest committed one", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process has been asked to stop."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def every(step: int, period: int, last: int) -> bool:
    """The cadence of every periodic action: on multiples of `period`, and at step `last`."""
    return step % period == 0 or step == last


class StepClock:
    """Step times from when each step's metrics reach the host. With metrics read one step late, the
    interval between two reads is the time the accelerator took for a step; time spent between
    steps on evaluation or checkpoints is left out by `restart`."""

    def __init__(self, config):
        self.tokens_per_step = config.train.batch_size * config.train.seq_len
        self.flops_per_token = flops.train_flops_per_token(config.model, config.train.seq_len)
        self.peak = flops.peak_flops_per_device(config.log)
        self.compiled = False
        self.restart()

    def restart(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> dict:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if not self.compiled:  # the first step of a process includes compiling it
            self.compiled = True
            return {"compile_seconds": round(seconds, 2)}
        lap = {"step_seconds": round(seconds, 4), "tokens_per_sec": round(self.tokens_per_step / seconds, 1)}
        if self.peak:
            lap["mfu"] = round(self.flops_per_token * self.tokens_per_step / seconds / (self.peak * jax.device_count()), 5)
        return lap


@dataclasses.dataclass
class Training:
    """One training run's live parts, from `setup` to `teardown`."""
    config: object
    workdir: object
    experiment: Experiment
    state: dict
    step: int
    stop_at: int
    iterator: object
    sources: list  # the training folders (data.dir alone, or data.mixture's) with their weights
    stream: pipeline.Mixture  # which source each row of the training stream comes from
    train_examples: list  # each source's train windows: a pass over them is an epoch
    eval_batches: list
    diag_tokens: jax.Array
    checkpoints: checkpoint.Checkpoints
    log: runlog.RunLog
    meta: dict
    clock: StepClock
    stop: StopRequest
    read_late: bool  # read a step's metrics after dispatching the next (accelerators; see the module docstring)


def setup(config, workdir, vocab_overridden: bool = False, init_from: "surgery.Source | None" = None) -> Training:
    """Everything a run needs before its first step: checks, data, the compiled model, and the state
    restored from WORKDIR/checkpoints, or else freshly initialized (from `init_from`'s weights, if
    given: surgery.py)."""
    workdir = storage.path(workdir)
    t = config.train
    mesh = sharding.make_mesh(config.mesh)
    check_mesh(config, mesh)
    workdir.mkdir(parents=True, exist_ok=True)  # a workdir that cannot be made stops the run here, first
    manifest = open_data(config, vocab_overridden, init_from)
    experiment = Experiment(config, mesh)
    if mesh.shape["fsdp"] > 1 and experiment.replicated_fraction > config.mesh.max_replicated:
        raise UserError(f"mesh.fsdp: {experiment.replicated_fraction:.1%} of parameter bytes stay replicated "
                        f"(limit mesh.max_replicated={config.mesh.max_replicated}); check sharding.RULES")
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    sources = training_sources(config, manifest)
    stream = pipeline.mixture(sources, t.seq_len, t.seed)
    batches = pipeline.train_batches(stream, global_batch_size=t.batch_size, **where)
    eval_batches = pipeline.eval_batches(config.data.dir, manifest, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                         max_batches=t.eval_batches or None, **where)
    checkpoints = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
    restored = checkpoints.restore_latest(experiment.abstract_state, checker(config, manifest, workdir))
    state = experiment.init_state() if restored is None else restored[1]
    step = 0 if restored is None else restored[0]
    if restored is None and init_from is not None:
        state = grafted_state(experiment, state, init_from)
    if jax.process_index() == 0:
        write_run_files(config, manifest, sources, workdir)
    return Training(config=config, workdir=workdir, experiment=experiment, state=state, step=step,
                    stop_at=min(t.steps, t.stop_at_step) if t.stop_at_step > 0 else t.steps,
                    iterator=pipeline.train_iterator(batches, start_step=step),  # the data position is the step
                    sources=sources, stream=stream,
                    train_examples=[pipeline.train_examples(s.manifest, t.seq_len) for s in sources],
                    eval_batches=eval_batches, diag_tokens=experiment.global_batch(eval_batches[0])["tokens"],
                    checkpoints=checkpoints, log=runlog.RunLog(workdir, config, start_step=step),
                    meta={**run_meta(config, manifest), "init_from": init_from and init_from.path},
                    clock=StepClock(config), stop=StopRequest(),
                    read_late=jax.default_backend() != "cpu")


def grafted_state(experiment: Experiment, state: dict, source: "surgery.Source") -> dict:
    """A fresh state whose parameters are the source's (surgery.graft): step 0, fresh optimizer."""
    target = jax.device_get(state["params"])
    params = surgery.graft(source.read_params(experiment.mesh), target, experiment.config.model.residual)
    return {**state, "params": jax.tree.map(lambda p, s: jax.device_put(p, s), params, experiment.param_shardings)}


def training_sources(config, manifest) -> list:
    """data.dir alone, or data.mixture's folders with their weights: one tokenizer for all (data.dir's,
    whose validation split the run evaluates on)."""
    pairs, _ = pipeline.parse_mixture(config.data.mixture)  # validated with the config
    if not pairs:
        return [pipeline.Source(config.data.dir, manifest)]
    sources = [pipeline.Source(folder, pipeline.load_manifest(folder), weight) for folder, weight in pairs]
    for source in sources:
        theirs, ours = source.manifest["tokenizer"], manifest["tokenizer"]
        if theirs["sha256"] != ours["sha256"]:
            raise UserError(f"data.mixture: {source.dir} was prepared with another tokenizer ({theirs['vocab_size']} "
                            f"tokens, sha256 {theirs['sha256'][:12]}) than data.dir {config.data.dir} "
                            f"({ours['vocab_size']} tokens, sha256 {ours['sha256'][:12]}); mix folders prepared with "
                            "one tokenizer")
    return sources


def write_run_files(config, manifest, sources, workdir) -> None:
    """What eval.py and compare.py need besides the checkpoints: the config, the data, the tokenizer."""
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    (workdir / "data.json").write_text(json.dumps({"dir": config.data.dir, "mixture": config.data.mixture,
                                                   "fingerprint": pipeline.data_fingerprint(manifest, sources),
                                                   "tokenizer_sha256": manifest["tokenizer"]["sha256"]}) + "\n")
    tokenizer_file = manifest["tokenizer"]["file"]
    (workdir / tokenizer_file).write_bytes((epath.Path(config.data.dir) / tokenizer_file).read_bytes())


def loop(run: Training) -> None:
    """Steps until `stop_at` or a stop request. With `read_late`, each step is dispatched before the
    previous step's metrics are read, so the accelerator always has the next step queued."""
    t = run.config.train
    unread = None  # (step, metrics still on the device)
    run.clock.restart()
    while run.step < run.stop_at:
        batch = run.experiment.global_batch(next(run.iterator))
        run.state, metrics = run.experiment.train_step(run.state, batch["tokens"], run.experiment.hyper)
        run.step += 1
        if unread:
            read_step(run, *unread)
        unread = (run.step, metrics)
        # With several processes, agreeing on a stop is a collective that waits for the device: when the
        # loop reads late, only at log steps.
        agree = not run.read_late or jax.process_count() == 1 or every(run.step, t.log_every, run.stop_at)
        preempted = agree and run.stop.agreed()
        evaluate, diagnose = every(run.step, t.eval_every, t.steps), every(run.step, t.diag_every, t.steps)
        save = every(run.step, t.checkpoint_every, run.stop_at) or preempted
        if evaluate or diagnose or save or not run.read_late:
            read_step(run, *unread, evaluate=evaluate, diagnose=diagnose)
            unread = None
            if save:
                run.checkpoints.save(run.step, run.state, {**run.meta, "step": run.step})
            run.clock.restart()
        if preempted:
            break


def read_step(run: Training, step: int, metrics: dict, evaluate: bool = False, diagnose: bool = False) -> None:
    """Reads one step's metrics on the host, stops a diverged run, adds the validation loss and the
    stability diagnostics when asked (of the current parameters: `step` must be the newest), logs."""
    t = run.config.train
    record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}, **run.clock.lap(),
              **data_position(run, step)}
    if not (np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"])):
        run.log.write(record)
        last = run.checkpoints.steps()[:1]
        raise TrainingDiverged(f"step {step}: loss {record['loss']}, grad_norm {record['grad_norm']}; "
                               f"stopped without saving (last checkpoint: {last[0] if last else 'none'})")
    if evaluate:
        record["eval_loss"] = run.experiment.evaluate(run.state["params"], run.eval_batches)
    if diagnose:
        record.update(run.experiment.diagnose(run.state["params"], run.diag_tokens))
    new_epoch = record.pop("new_epoch")
    if every(step, t.log_every, run.stop_at) or new_epoch or {"eval_loss", "amax_forward", "compile_seconds"} & set(record):
        run.log.write(record)
    run.log.advance(record["loss"], record.get("tokens_per_sec", 0.0))


def data_position(run: Training, step: int) -> dict:
    """Step `step`'s epoch (the furthest source's), with a mixture each source's epoch and share of
    the batch, and whether an epoch began (announced)."""
    size = run.config.train.batch_size
    before, after = run.stream.taken((step - 1) * size), run.stream.taken(step * size)
    epochs = [pipeline.epoch_of(int(rows), n) for rows, n in zip(after, run.train_examples)]
    fields = {"epoch": max(epochs), "new_epoch": False}
    for source, rows_before, rows, epoch, n in zip(run.sources, before, after, epochs, run.train_examples):
        if len(run.sources) > 1:
            fields.update({f"share/{source.name}": float(rows - rows_before) / size, f"epoch/{source.name}": epoch})
        if epoch > pipeline.epoch_of(rows_before, n):
            fields["new_epoch"] = True
            run.log.note(f"step {step}: epoch {epoch} of {source.dir} begins: its {n:,} training examples are read "
                         "again, in a new order")
    return fields


def teardown(run: Training) -> None:
    run.checkpoints.wait()
    run.checkpoints.close()
    run.log.close()
    run.stop.restore()


def train(config, workdir, vocab_overridden: bool = False, init_from: "surgery.Source | None" = None) -> None:
    """Trains to `train.steps` (or `train.stop_at_step`), resuming from WORKDIR/checkpoints (a local
    folder or a bucket path, see storage.py); a new run starts from `init_from`'s weights if given."""
    run = setup(config, workdir, vocab_overridden, init_from)
    try:
        loop(run)
    finally:
        teardown(run)
    if jax.process_index() == 0 and run.step == config.train.steps:
        from mhc_jax import plots  # matplotlib is a fifth of the import time of train.py; only a finished run plots
        plots.plot_run(run.workdir)
