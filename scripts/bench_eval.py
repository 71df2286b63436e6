"""How fast evaluation runs: examples per second of each task on a checkpoint, compilations
included (mhc_jax/evals/speed.py).

    python scripts/bench_eval.py --workdir=runs/mhc-10m --tasks=mmlu,gsm8k,bbh,drop --limit=20
"""

import json

from absl import flags

from mhc_jax import cli, storage
from mhc_jax.evals import eval_data, serving, speed
from mhc_jax.evals.registry import TASKS

WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir with checkpoints")
TASK_NAMES = cli.define_choices("tasks", ["mmlu", "gsm8k", "bbh", "drop"], TASKS, "the tasks to time")
LIMIT = flags.DEFINE_integer("limit", 20, "the first K examples of each task", lower_bound=1)
DATA_DIR = flags.DEFINE_string("data_dir", "data/eval", "the folder made by scripts/fetch_eval_data.py")
BATCH_SIZE, MESH = serving.define_flags()
MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "prompts are cut to their last this many tokens", lower_bound=2)
JSON = flags.DEFINE_bool("json", False, "print the result as JSON")


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/mhc-10m"))
    storage.check_reachable(WORKDIR.value, "--workdir")
    if any(name != "perplexity" for name in TASK_NAMES.value):
        eval_data.check(DATA_DIR.value)
    result = speed.benchmark(WORKDIR.value, DATA_DIR.value, TASK_NAMES.value, LIMIT.value,
                             serving.parse_batch_size(BATCH_SIZE.value), MAX_LENGTH.value, MESH.value)
    if JSON.value:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['workdir']} step {result['step']} ({result['residual']}, d_model {result['d_model']}, "
          f"{result['n_layers']} layers), batch {result['batch_size']}, {result['devices']} {result['backend']} "
          f"device(s), {result['cpu_cores']} CPU cores; checkpoint loaded in {result['load_seconds']:.1f} s")
    print("| task | examples | seconds | examples/s |\n|---|---|---|---|")
    for name, task in result["tasks"].items():
        print(f"| {name} | {task['examples']} | {task['seconds']:.1f} | {task['examples_per_sec']:.2f} |")


if __name__ == "__main__":
    cli.run(main)
