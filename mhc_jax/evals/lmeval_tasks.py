"""lm-evaluation-harness's own task definitions, fed our fetched benchmark rows instead of a download:
the reference that tests/test_lmeval_prompts.py and scripts/lmeval_check.py hold our prompts,
requests and scores against. lm-eval 0.4.13 is optional (a test dependency); only those two import this.

`harness_tasks(name, data_dir, count)` builds, for `mmlu` (the `mmlu_<subject>` tasks at 5 shots),
`gsm8k` (`gsm8k_cot`) and `bbh` (`bbh_cot_fewshot_<task>`), the harness tasks whose documents are our
first `count` examples, each with the indices of our examples it holds; `harness_answers` runs one
through a model the way lm-eval's evaluator does (requests, responses, filters, process_results).
"""

from pathlib import Path

import datasets
import lm_eval
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from mhc_jax.evals import eval_data

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
MMLU_SHOTS = 5  # lm_eval --num_fewshot=5; the mmlu YAMLs leave it unset (0-shot)
TASKS = ("mmlu", "gsm8k", "bbh")  # ours whose protocol is lm-eval's format

datasets.disable_progress_bars()


class OfflineTask(ConfigurableTask):
    """A harness task whose dataset is the rows it is given, split by split, not a download."""

    def __init__(self, config: dict, splits: dict[str, list[dict]]):
        self.splits = splits
        super().__init__(config=config)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        self.dataset = datasets.DatasetDict({name: datasets.Dataset.from_list(rows)
                                             for name, rows in self.splits.items()})


def harness_task(yaml_path: str, splits: dict[str, list[dict]]) -> OfflineTask:
    return OfflineTask(load_yaml(HARNESS_TASKS / yaml_path), splits)


def harness_tasks(name: str, data_dir, count: int | None = None) -> list[tuple[OfflineTask, list[int]]]:
    """(harness task, the indices of our examples that are its documents, in order) covering our
    first `count` examples of benchmark `name` (mmlu, gsm8k or bbh)."""
    if name == "mmlu":
        test = eval_data.load(data_dir, "mmlu/test.jsonl")[:count]
        dev = eval_data.load(data_dir, "mmlu/dev.jsonl")
        tasks = []
        for subject in dict.fromkeys(row["subject"] for row in test):  # in our order
            rows = [i for i, row in enumerate(test) if row["subject"] == subject]
            task = harness_task(f"mmlu/default/mmlu_{subject}.yaml", {
                "dev": [row for row in dev if row["subject"] == subject], "test": [test[i] for i in rows]})
            task.set_config("num_fewshot", MMLU_SHOTS)
            tasks.append((task, rows))
        return tasks
    if name == "gsm8k":
        rows = [{"question": row["question"], "answer": row["answer"]}
                for row in eval_data.load(data_dir, "gsm8k/test.jsonl")[:count]]
        return [(harness_task("gsm8k/gsm8k-cot.yaml", {"test": rows}), list(range(len(rows))))]
    if name == "bbh":
        tasks, first = [], 0
        for path in eval_data.files(data_dir, "bbh/"):  # sorted, as bbh.examples orders them
            if count is not None and first >= count:
                break
            rows = [{"input": row["input"], "target": row["target"]} for row in eval_data.load(data_dir, path)]
            rows = rows[:None if count is None else count - first]
            tasks.append((harness_task(f"bbh/cot_fewshot/{Path(path).stem}.yaml", {"test": rows}),
                          list(range(first, first + len(rows)))))
            first += len(rows)
        return tasks
    raise ValueError(f"no harness task for {name!r}; choose from {', '.join(TASKS)}")


def harness_answers(task: OfflineTask, model) -> list[dict]:
    """Per document, what lm-eval's evaluator makes of it with `model` (an lm_eval LM): 'context' (the
    prompt of its requests), 'arguments', 'responses' (log-likelihoods or generated texts, unfiltered)
    and 'scores' ({'metric,filter': value}, from its filters and process_results)."""
    task.build_all_requests()
    by_type: dict = {}
    for instance in task.instances:
        by_type.setdefault(instance.request_type, []).append(instance)
    for request_type, instances in by_type.items():
        for instance, response in zip(instances, getattr(model, request_type)(instances), strict=True):
            instance.resps.append(response)
    task.apply_filters()
    per_doc: dict = {}
    for instance in task.instances:
        per_doc.setdefault(instance.doc_id, []).append(instance)
    answers = []
    for doc_id, doc in enumerate(task.test_docs()):
        instances = sorted(per_doc[doc_id], key=lambda instance: instance.idx)
        scores = {}
        for filter_key in instances[0].filtered_resps:
            metrics = task.process_results(doc, [instance.filtered_resps[filter_key] for instance in instances])
            scores.update({f"{metric},{filter_key}": float(value) for metric, value in metrics.items()})
        answers.append({"context": instances[0].args[0], "arguments": [instance.args for instance in instances],
                        "responses": [instance.resps[0] for instance in instances], "scores": scores})
    return answers
