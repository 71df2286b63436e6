"""MMLU (57 subjects, 14,042 test questions): 5-shot, as lm-evaluation-harness's `mmlu` task.

Each subject's prompt opens with "The following are multiple choice questions (with answers) about
<subject>.", followed by the subject's first five dev questions with their answers; the model then
scores the continuations " A" .. " D" after "Answer:". Accuracy is argmax log-likelihood (ties go
to A); the headline is the mean over all questions, i.e. subjects weighted by size.
"""

import itertools

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task

LETTERS = "ABCD"
SHOTS = 5


def question_block(row: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def subject_prefix(subject: str, shots: list[dict]) -> str:
    solved = "".join(f"{question_block(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n{solved}"


def examples(data_dir) -> list[Example]:
    dev = {subject: list(rows)[:SHOTS] for subject, rows in
           itertools.groupby(eval_data.load(data_dir, "mmlu/dev.jsonl"), key=lambda r: r["subject"])}
    prefixes = {subject: subject_prefix(subject, shots) for subject, shots in dev.items()}
    return [Example(prefixes[row["subject"]] + question_block(row), gold=row["answer"],
                    choices=tuple(f" {letter}" for letter in LETTERS), subtask=row["subject"])
            for row in eval_data.load(data_dir, "mmlu/test.jsonl")]


def score(example: Example, loglikelihoods: list[float]) -> dict:
    return {"acc": scoring.multiple_choice_score(loglikelihoods, example.gold, example.choices)["acc"]}


TASK = Task("mmlu", "5-shot (each subject's first 5 dev questions), log-likelihood of ' A'..' D', accuracy; "
            "mean over questions (subjects weighted by size)", examples, score, primary="acc")
