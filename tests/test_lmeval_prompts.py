"""Every prompt of the benchmarks whose protocol claims lm-evaluation-harness's format, character for
character against the harness's own rendering (lm-eval 0.4.13, the test dependency):

  mmlu    the 57 `mmlu_<subject>` tasks (mmlu/default), 5-shot     14,042 prompts (and the continuations ' A'..' D')
  gsm8k   `gsm8k_cot` (gsm8k/gsm8k-cot.yaml), 8-shot                1,319 prompts
  bbh     the 27 `bbh_cot_fewshot_<task>` tasks, 3-shot             6,511 prompts

Each task is built from the YAML the harness ships (lm_eval.tasks._yaml_loader.load_yaml, includes and
`!function`s resolved) as a ConfigurableTask whose download() hands it our fetched rows, in the schema of
the Hugging Face dataset the YAML names, instead of fetching it (mhc_jax/evals/lmeval_tasks.py). Its
build_all_requests() (the evaluator's path: fewshot_context with the task's num_fewshot, plain text, no
system prompt or chat template) then renders every document, and each context must equal our
Example.prompt for the same row.
A change on either side (our prompt code or the fetched data, or the harness's templates) fails here.

The knobs we set, as `lm_eval --tasks=... --num_fewshot=...` would:
  - MMLU: num_fewshot=5; the YAML leaves it unset, which the harness runs as 0-shot. Its few-shot split is
    `dev` (first_n sampler, so each subject's first five dev questions), which we fill with mmlu/dev.jsonl.
  - gsm8k_cot: nothing; the YAML sets num_fewshot=8 and lists the eight exemplars (fewshot_config.samples).
    The test docs carry `answer` as well as `question`, because its doc_to_target reads it.
  - bbh_cot_fewshot: nothing; the template sets num_fewshot=3 and each task YAML lists its three exemplars.

The only change to the harness's code: its Jinja environment compiles each template once rather than at
every use (the same templates render; about 10 s instead of 270 s on 2 cores). The fetched folder comes
from conftest.fetched_eval_data (built once per session).
"""

import functools
import itertools
import logging
from pathlib import Path

import lm_eval.api.task
import lm_eval.utils
import pytest

from mhc_jax.evals import bbh, eval_data, gsm8k, mmlu
from mhc_jax.evals.lmeval_check import first_difference
from mhc_jax.evals.lmeval_tasks import MMLU_SHOTS, OfflineTask, harness_task

pytestmark = pytest.mark.slow  # every test here needs the fetched benchmarks

EXPECTED_PROMPTS = {"mmlu": 14042, "gsm8k": 1319, "bbh": 6511}
SHOWN = 5  # mismatches spelled out in a failure message


@pytest.fixture(autouse=True)
def fast_quiet_harness(monkeypatch):
    """The harness as it is, less two costs: its Jinja environment compiles each template once instead of
    at every use (the same Template renders; compiling is 97% of the run time otherwise), and no logging
    or progress bar."""
    compile_once = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)
    monkeypatch.setattr(lm_eval.utils.env, "from_string", compile_once)
    monkeypatch.setattr(lm_eval.api.task, "tqdm", lambda iterable, **_: iterable)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def harness_requests(task: OfflineTask) -> list[tuple[str, list]]:
    """(context, the continuations or generation arguments of its requests) for every test document, in
    order, as the harness's evaluator builds them."""
    task.build_all_requests()
    by_doc = itertools.groupby(task.instances, key=lambda instance: instance.doc_id)
    requests = []
    for doc_id, (instance_doc_id, instances) in enumerate(by_doc):
        instances = list(instances)
        assert instance_doc_id == doc_id and len({instance.args[0] for instance in instances}) == 1
        requests.append((instances[0].args[0], [instance.args[1] for instance in instances]))
    return requests


def mismatches(task_name: str, file: str, ours: list[str], theirs: list[str], rows=None) -> list[str]:
    """A line for each prompt that differs: the harness task, the row of our data file it was built from
    (`rows[i]` for the i-th prompt; by default the i-th row) and where the two first part."""
    rows = range(len(ours)) if rows is None else rows
    assert len(ours) == len(theirs) == len(rows), f"{task_name}: {len(ours)} prompts, lm-eval's {len(theirs)}"
    return [f"{task_name}, {file} row {row}: {first_difference(a, b, context=40)}"
            for row, a, b in zip(rows, ours, theirs) if a != b]


def assert_none(found: list[str], compared: int) -> None:
    assert not found, (f"{len(found)} of {compared} prompts differ from lm-eval's:\n"
                       + "\n".join(found[:SHOWN]) + ("\n..." if len(found) > SHOWN else ""))


def test_mmlu_prompts_are_lm_evals(fetched_eval_data):
    data_dir, _ = fetched_eval_data
    examples = mmlu.examples(data_dir)
    dev = eval_data.load(data_dir, "mmlu/dev.jsonl")
    test = eval_data.load(data_dir, "mmlu/test.jsonl")
    assert len(examples) == len(test)
    found, compared = [], 0
    for subject in sorted({row["subject"] for row in test}):
        rows = [index for index, row in enumerate(test) if row["subject"] == subject]
        task = harness_task(f"mmlu/default/mmlu_{subject}.yaml", {
            "dev": [row for row in dev if row["subject"] == subject], "test": [test[index] for index in rows]})
        assert task.config.dataset_name == subject and task.config.fewshot_split == "dev"
        task.set_config("num_fewshot", MMLU_SHOTS)
        ours = [examples[index] for index in rows]
        theirs = harness_requests(task)
        found += mismatches(task.config.task, "mmlu/test.jsonl", [example.prompt for example in ours],
                            [ctx for ctx, _ in theirs], rows)
        for row, example, (_, continuations) in zip(rows, ours, theirs):
            assert list(example.choices) == continuations, (
                f"{task.config.task}, mmlu/test.jsonl row {row}: continuations {example.choices}, lm-eval's "
                f"{continuations}")
        compared += len(ours)
    assert compared == len(examples) == EXPECTED_PROMPTS["mmlu"]
    assert_none(found, compared)


def test_gsm8k_prompts_are_lm_evals(fetched_eval_data):
    data_dir, _ = fetched_eval_data
    examples = gsm8k.examples(data_dir)
    rows = [{"question": row["question"], "answer": row["answer"]}
            for row in eval_data.load(data_dir, "gsm8k/test.jsonl")]
    task = harness_task("gsm8k/gsm8k-cot.yaml", {"test": rows})
    assert task.config.task == "gsm8k_cot" and task.config.num_fewshot == 8
    theirs = [ctx for ctx, _ in harness_requests(task)]
    assert len(examples) == EXPECTED_PROMPTS["gsm8k"]
    assert_none(mismatches("gsm8k_cot", "gsm8k/test.jsonl", [example.prompt for example in examples], theirs),
                len(examples))


def test_bbh_prompts_are_lm_evals(fetched_eval_data):
    data_dir, _ = fetched_eval_data
    examples = bbh.examples(data_dir)
    found, compared = [], 0
    for path in eval_data.files(data_dir, "bbh/"):
        name = Path(path).stem
        rows = [{"input": row["input"], "target": row["target"]} for row in eval_data.load(data_dir, path)]
        task = harness_task(f"bbh/cot_fewshot/{name}.yaml", {"test": rows})
        assert task.config.task == f"bbh_cot_fewshot_{name}" and task.config.num_fewshot == 3
        ours = [example.prompt for example in examples if example.subtask == name]
        found += mismatches(task.config.task, path, ours, [ctx for ctx, _ in harness_requests(task)])
        compared += len(ours)
    assert compared == len(examples) == EXPECTED_PROMPTS["bbh"]
    assert_none(found, compared)
