"""PIQA (1,838 validation goals): 0-shot, log-likelihood of the two solutions, acc and acc_norm, as
lm-evaluation-harness's `piqa` ("Question: <goal>\nAnswer: <solution>")."""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task


def examples(data_dir) -> list[Example]:
    return [Example(f"Question: {row['goal']}\nAnswer:", gold=row["label"], choices=(f" {row['sol1']}", f" {row['sol2']}"))
            for row in eval_data.load(data_dir, "piqa/validation.jsonl")]


def score(example: Example, loglikelihoods: list[float]) -> dict:
    return scoring.multiple_choice_score(loglikelihoods, example.gold, example.choices)


TASK = Task("piqa", "0-shot, log-likelihood of the 2 solutions; acc and acc_norm", examples, score, primary="acc")
