"""Do our evaluation numbers mean what lm-evaluation-harness's mean? The same examples of a
checkpoint through eval.py's path and through lm-eval's own task definitions (its packaged YAMLs,
fed our fetched rows in memory; nothing from a hub) with our adapter, compared item by item
(scripts/lmeval_check.py prints the counts). Needs lm-eval 0.4.13 (requirements-test.txt).
"""

from mhc_jax.evals import bbh, gsm8k, harness, mmlu

TASKS = {"mmlu": mmlu.TASK, "gsm8k": gsm8k.TASK, "bbh": bbh.TASK}  # the tasks that claim lm-eval's format
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

    task = TASKS[name]
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
