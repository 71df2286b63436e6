"""BIG-Bench Hard (27 tasks, 6,511 questions): 3-shot chain of thought, greedy, as the harness's
`bbh_cot_fewshot`.

The prompt is the task description and its three standard chain-of-thought exemplars, then
"Q: <input>\nA: Let's think step by step.\n", character for character as the harness renders it: the
fetched folder's prefix is rendered from the harness's own task YAMLs (mhc_jax/evals/bbh_prompts.py),
and tests/test_lmeval_prompts.py compares all 6,511 prompts with the harness's. Generation stops at
"Q", a blank line or end of text, after at most 1,024 tokens (the harness's budget). The answer is
what follows "the answer is " up to the line's last character; exact match, case sensitive. The headline is the mean over all questions, as the
harness's bbh_cot_fewshot group aggregates (weight_by_size); results also hold subtask_mean, the
unweighted mean of the 27 task means.
"""

from mhc_jax.evals import eval_data, scoring
from mhc_jax.evals.harness import Example, Task


def examples(data_dir) -> list[Example]:
    rows = []
    for name in sorted(path.split("/")[1][:-len(".jsonl")] for path in eval_data.files(data_dir, "bbh/")):
        rows += eval_data.load(data_dir, f"bbh/{name}.jsonl")
    return [Example(row["prompt"] + "\n", gold=row["target"], subtask=row["task"]) for row in rows]


def score(example: Example, generation: str) -> dict:
    return scoring.bbh_score(generation, example.gold)


TASK = Task("bbh", "3-shot chain of thought (the standard exemplars), greedy until 'Q' or a blank line, at most "
            "1,024 tokens; exact match after 'the answer is'; mean over all questions (the 27 tasks weighted by "
            "size, as lm-eval's bbh_cot_fewshot group; subtask_mean: the unweighted mean of the task means)",
            examples, score, primary="exact_match", until=("</s>", "Q", "\n\n"), max_new_tokens=1024)
