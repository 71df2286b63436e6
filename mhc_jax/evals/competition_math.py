"""MATH (Hendrycks et al., 5,000 competition problems): 4-shot Minerva prompt, greedy, exact match, as
lm-evaluation-harness's `minerva_math` ("Problem:\n...\n\nSolution:", the four Minerva exemplars,
each ending "Final Answer: The final answer is X. I hope it is correct.").

The answer after "The final answer is" and the gold boxed answer are both normalized by Minerva's
rules and compared as strings. The harness also tries a sympy equivalence check; we do not, so a
few equivalent but differently written answers count as wrong here.
"""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task


def block(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def examples(data_dir) -> list[Example]:
    shots = "".join(f"{block(s['problem'])} {s['solution']}\n\n" for s in eval_data.load(data_dir, "math/fewshot.jsonl"))
    return [Example(shots + block(row["problem"]), gold=row["answer"], subtask=row["type"])
            for row in eval_data.load(data_dir, "math/test.jsonl")]


def score(example: Example, generation: str) -> dict:
    return scoring.math_score(generation, example.gold)


TASK = Task("math", "4-shot Minerva prompt, greedy until 'Problem:', at most 256 tokens; exact match of the "
            "Minerva-normalized final answer (no sympy equivalence)", examples, score,
            primary="exact_match", until=("Problem:",), max_new_tokens=256)
