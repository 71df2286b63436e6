"""Do our evaluation numbers mean what lm-evaluation-harness's mean? Runs the same examples of a
checkpoint through eval.py's path and through lm-eval's own task definitions (its packaged YAMLs,
fed our fetched rows in memory; nothing from a hub) with our adapter, and compares them:

    python scripts/lmeval_check.py --workdir=runs/mhc-debug --tasks=mmlu,gsm8k,bbh --limit=5

Per task it prints how many prompts, log-likelihoods (to 1e-3), generations and scores agree, and
for a mismatch where the two first differ. Exit 0 when all agree, 1 when not, 2 on bad input.
Needs lm-eval 0.4.13 (requirements-test.txt).
"""

from absl import flags

from mhc_jax import cli, storage
from mhc_jax.errors import UserError
from mhc_jax.evals import eval_data, lmeval_check, serving

WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir with checkpoints")
STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the newest)")
TASK_NAMES = cli.define_choices("tasks", list(lmeval_check.TASKS), lmeval_check.TASKS, "the tasks")
LIMIT = flags.DEFINE_integer("limit", 5, "the first K examples of each task", lower_bound=1)
DATA_DIR = flags.DEFINE_string("data_dir", "data/eval", "the folder made by scripts/fetch_eval_data.py")
BATCH_SIZE, MESH = serving.define_flags()


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/mhc-debug"))
    storage.check_reachable(WORKDIR.value, "--workdir")
    eval_data.check(DATA_DIR.value)
    try:
        from mhc_jax.evals.lm_eval_adapter import HarnessModel
    except ImportError:
        raise UserError("lm-eval is not installed; pip install -r requirements-test.txt (lm-eval==0.4.13)") from None
    adapter = HarnessModel(WORKDIR.value, STEP.value, BATCH_SIZE.value, mesh=MESH.value)
    print(f"{WORKDIR.value} step {adapter.model.step}: our eval.py path against lm-eval 0.4.13's tasks, "
          f"first {LIMIT.value} examples")
    all_agree = True
    for name in TASK_NAMES.value:
        counts, problems = lmeval_check.compare(name, adapter.model, adapter, DATA_DIR.value, LIMIT.value)
        all_agree &= all(done == total for done, total in counts.values())
        print(f"{name}: " + ", ".join(f"{kind} {done}/{total}" for kind, (done, total) in counts.items()) + " agree")
        for line in problems:
            print(line)
    print("all agree" if all_agree else "MISMATCH")
    return 0 if all_agree else 1


if __name__ == "__main__":
    cli.run(main)
