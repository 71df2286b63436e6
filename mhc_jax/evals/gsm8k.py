"""GSM8K (1,319 test problems): 8-shot chain of thought, greedy, as lm-evaluation-harness's `gsm8k_cot`.

The eight exemplars are the harness's ("Q: ...\nA: <reasoning> The answer is N."). Generation stops
at "Q:" (or an end-of-text marker); the answer is extracted two ways, both kept from the harness:
strict ("The answer is N." must appear) and flexible (the last number in the output).
"""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task


def examples(data_dir) -> list[Example]:
    shots = "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in eval_data.load(data_dir, "gsm8k/fewshot.jsonl"))
    return [Example(f"{shots}Q: {row['question']}\nA:", gold=row["target"])
            for row in eval_data.load(data_dir, "gsm8k/test.jsonl")]


def score(example: Example, generation: str) -> dict:
    return scoring.gsm8k_score(generation, example.gold)


TASK = Task("gsm8k", "8-shot chain of thought (the harness's exemplars), greedy until 'Q:', at most 256 tokens; "
            "exact match of 'The answer is N.' (strict) and of the last number (flexible)", examples, score,
            primary="exact_match,strict-match", until=("Q:", "</s>", "<|im_end|>"), max_new_tokens=256)
