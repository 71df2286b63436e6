"""Do our evaluation numbers mean what lm-evaluation-harness's mean? Runs the same examples of a
checkpoint through eval.py's path and through lm-eval's own task definitions (its packaged YAMLs,
fed our fetched rows in memory; nothing from a hub) with our adapter, and compares them:

    python scripts/lmeval_check.py --workdir=runs/mhc-debug --tasks=mmlu,gsm8k,bbh --limit=5

Per task it prints how many prompts, log-likelihoods (to 1e-3), generations and scores agree, and
for a mismatch where the two first differ. Exit 0 when all agree, 1 when not, 2 on bad input.
Needs lm-eval 0.4.13 (requirements-test.txt).
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

from mhc_jax import cli, workdirs  # noqa: E402
from mhc_jax.errors import UserError  # noqa: E402
from mhc_jax.evals import bbh, eval_data, gsm8k, harness, mmlu  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "a train.py workdir with checkpoints")
STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the newest)")
OURS = {"mmlu": mmlu.TASK, "gsm8k": gsm8k.TASK, "bbh": bbh.TASK}  # the tasks that claim lm-eval's format
TASK_NAMES = cli.define_choices("tasks", list(OURS), OURS, "the tasks")
LIMIT = flags.DEFINE_integer("limit", 5, "the first K examples of each task", lower_bound=1)
DATA_DIR = flags.DEFINE_string("data_dir", "data/eval", "the folder made by scripts/fetch_eval_data.py")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")

TOLERANCE = 1e-3  # log-likelihoods
SHOWN = 3  # mismatches spelled out per kind and task


def first_difference(ours: str, theirs: str, context: int = 30) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    start = max(0, at - context)
    return f"at character {at}: ours {ours[start:at + context]!r}, lm-eval's {theirs[start:at + context]!r}"


def counterpart(metric: str, scores: dict) -> str | None:
    """lm-eval's 'metric,filter' key for our metric name ('acc' -> 'acc,none', 'exact_match' ->
    'exact_match,get-answer'), when exactly one matches."""
    if metric in scores:
        return metric
    keys = [key for key in scores if key.split(",")[0] == metric]
    return keys[0] if len(keys) == 1 else None


def compare(name: str, model, adapter, data_dir, limit: int) -> tuple[dict, list[str]]:
    """{kind: (agreeing, compared)} and the mismatch lines for one task."""
    from mhc_jax.evals.lmeval_tasks import harness_answers, harness_tasks

    task = OURS[name]
    examples = task.examples(data_dir)[:limit]
    outputs, per_example = harness.answer(model, task, examples)
    counts, problems = {}, []

    def check(kind: str, index: int, agree: bool, detail: str) -> None:
        done, total = counts.get(kind, (0, 0))
        counts[kind] = (done + agree, total + 1)
        if not agree and sum(kind in p for p in problems) < SHOWN:
            problems.append(f"  {kind} of example {index}: {detail}")

    for harness_task, indices in harness_tasks(name, data_dir, limit):
        for index, theirs in zip(indices, harness_answers(harness_task, adapter), strict=True):
            example, output, scores = examples[index], outputs[index], per_example[index]
            check("prompts", index, example.prompt == theirs["context"],
                  first_difference(example.prompt, theirs["context"]))
            if task.max_new_tokens:
                generated = theirs["responses"][0]
                check("generations", index, output == generated, first_difference(output, generated))
            else:
                continuations = [arguments[1] for arguments in theirs["arguments"]]
                logprobs = [response[0] for response in theirs["responses"]]
                agree = list(example.choices) == continuations and all(
                    abs(a - b) <= TOLERANCE for a, b in zip(output, logprobs))
                check("log-likelihoods", index, agree, f"ours {list(zip(example.choices, output))}, "
                                                       f"lm-eval's {list(zip(continuations, logprobs))}")
            for metric, value in scores.items():
                key = counterpart(metric, theirs["scores"])
                check("scores", index, key is not None and theirs["scores"][key] == value,
                      f"{metric}: ours {value}, lm-eval's {theirs['scores'].get(key, 'missing')} ({key})")
    return counts, problems


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/mhc-debug"))
    workdirs.check_reachable(WORKDIR.value, "--workdir")
    eval_data.check(DATA_DIR.value)
    try:
        from mhc_jax.evals.lm_eval_adapter import HarnessModel
    except ImportError:
        raise UserError("lm-eval is not installed; pip install -r requirements-test.txt (lm-eval==0.4.13)") from None
    adapter = HarnessModel(WORKDIR.value, STEP.value, BATCH_SIZE.value)
    print(f"{WORKDIR.value} step {adapter.model.step}: our eval.py path against lm-eval 0.4.13's tasks, "
          f"first {LIMIT.value} examples")
    all_agree = True
    for name in TASK_NAMES.value:
        counts, problems = compare(name, adapter.model, adapter, DATA_DIR.value, LIMIT.value)
        all_agree &= all(done == total for done, total in counts.values())
        print(f"{name}: " + ", ".join(f"{kind} {done}/{total}" for kind, (done, total) in counts.items()) + " agree")
        for line in problems:
            print(line)
    print("all agree" if all_agree else "MISMATCH")
    return 0 if all_agree else 1


if __name__ == "__main__":
    cli.run(main)
