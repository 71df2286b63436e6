"""HellaSwag (10,042 validation contexts): 10-shot, log-likelihood of the four endings, acc and acc_norm.

Contexts and endings are cleaned as lm-evaluation-harness does ("<activity>: <ctx_a> <Ctx_b>",
WikiHow's bracketed artefacts removed). The harness draws exemplars from the training split, which
is not available offline: we use the first ten validation contexts with their gold endings as
exemplars and score the other 10,032.
"""

import re

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task

SHOTS = 10


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def query(row: dict) -> str:
    return clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")


def examples(data_dir) -> list[Example]:
    rows = eval_data.load(data_dir, "hellaswag/validation.jsonl")
    prefix = "".join(f"{query(r)} {clean(r['endings'][r['label']])}\n\n" for r in rows[:SHOTS])
    return [Example(prefix + query(row), gold=row["label"], choices=tuple(" " + clean(e) for e in row["endings"]))
            for row in rows[SHOTS:]]


def score(example: Example, loglikelihoods: list[float]) -> dict:
    return scoring.multiple_choice_score(loglikelihoods, example.gold, example.choices)


TASK = Task("hellaswag", "10-shot (the first 10 validation contexts as exemplars; the training split is not "
            "offline), log-likelihood of the 4 endings; acc and acc_norm (per-character)", examples, score,
            primary="acc_norm")
