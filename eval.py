"""Evaluation entry point:

    python eval.py --workdir=DIR [--step=N] [--tasks=perplexity,mmlu,gsm8k,bbh,drop] [--limit=K]
                   [--data_dir=data/eval] [--batch_size=auto] [--mesh=auto] [--distributed]

Rebuilds the model from the checkpoint's own metadata (no config needed) on whatever devices are
present, runs the tasks, prints a table and writes DIR/eval/<step>/results.json (tasks already in
that file from earlier runs are kept unless run again). Several processes (the hosts of a slice)
run the same command with --distributed, as train.py: each reads the checkpoint, the batches are
split over all their devices, and process 0 writes the results. Benchmark data comes from
scripts/fetch_eval_data.py; perplexity uses the validation split of the model's training data.
Tasks: perplexity, mmlu, gsm8k, bbh, drop, hellaswag, piqa, triviaqa, math.
"""

import json
from pathlib import Path

import jax
from absl import flags

from mhc_jax import cli, storage
from mhc_jax.evals import eval_data, serving
from mhc_jax.evals.harness import LanguageModel, write_results
from mhc_jax.evals.registry import TASKS

WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir with checkpoints")
STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the newest)")
TASK_NAMES = cli.define_choices("tasks", ["perplexity", "mmlu", "gsm8k", "bbh", "drop"], TASKS, "the tasks")
LIMIT = flags.DEFINE_integer("limit", None, "score only the first K examples of each task (a quick look)", lower_bound=1)
DATA_DIR = flags.DEFINE_string("data_dir", "data/eval", "the folder made by scripts/fetch_eval_data.py")
BATCH_SIZE, MESH = serving.define_flags()
MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "prompts are cut to their last this many tokens")
cli.define_process_flags()


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/mhc-10m"))
    storage.check_reachable(WORKDIR.value, "--workdir")
    if any(name != "perplexity" for name in TASK_NAMES.value):
        eval_data.check(DATA_DIR.value)
    cli.start_processes()
    model = LanguageModel(WORKDIR.value, STEP.value, serving.parse_batch_size(BATCH_SIZE.value), MAX_LENGTH.value,
                          MESH.value)
    path = storage.path(WORKDIR.value) / "eval" / str(model.step) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"step": model.step, "tasks": {}}
    writer = jax.process_index() == 0
    for name in TASK_NAMES.value:
        results["tasks"][name] = {**TASKS[name](model, Path(DATA_DIR.value), LIMIT.value), "limit": LIMIT.value}
        if writer:
            write_results(path, results)
    if writer:
        print_table(results, TASK_NAMES.value)
        print(f"wrote {path}")


def print_table(results: dict, names: list[str]) -> None:
    print(f"{'task':<11} {'metric':<28} {'value':>8} {'n':>6}  protocol")
    for name in names:
        task = results["tasks"][name]
        for metric, value in task["metrics"].items():
            protocol = task["protocol"] if metric == task["primary"] else ""
            print(f"{name:<11} {metric:<28} {value:>8.4f} {task['n']:>6}  {protocol}")


if __name__ == "__main__":
    cli.run(main)
