"""TriviaQA (no context): 5-shot, greedy, exact match against the answer's aliases, as
lm-evaluation-harness's `triviaqa` ("Question: <q>?\nAnswer:", stop at a newline, '.' or ',').

Offline we have the rc.wikipedia.nocontext validation split (not the harness's rc.nocontext) and
no training split: the first five validation questions, with their canonical answers, are the
exemplars and the rest are scored.
"""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task

SHOTS = 5


def examples(data_dir) -> list[Example]:
    rows = eval_data.load(data_dir, "triviaqa/validation.jsonl")
    prefix = "".join(f"Question: {r['question']}?\nAnswer: {r['value']}\n\n" for r in rows[:SHOTS])
    return [Example(f"{prefix}Question: {row['question']}?\nAnswer:", gold=row["aliases"]) for row in rows[SHOTS:]]


def score(example: Example, generation: str) -> dict:
    return scoring.triviaqa_score(generation, example.gold)


TASK = Task("triviaqa", "5-shot (the first 5 validation questions as exemplars), greedy until newline, '.' or ',', "
            "at most 32 tokens; exact match against any alias, case and punctuation ignored; "
            "rc.wikipedia.nocontext validation", examples, score,
            primary="exact_match", until=("\n", ".", ","), max_new_tokens=32)
