"""Read the benchmark folder that scripts/fetch_eval_data.py builds, checked against its manifest.

The folder holds one JSON-lines file per benchmark split (e.g. `mmlu/test.jsonl`) and a
`manifest.json` with each file's row count and sha256. A scorer must never run on a file that was
edited or cut short since it was fetched, so `load` checks both before it returns a row.
"""

import hashlib
import json
from pathlib import Path

from mhc_jax.errors import UserError

FORMAT = "mhc-jax eval data v1"
MANIFEST = "manifest.json"
FETCH_COMMAND = "python scripts/fetch_eval_data.py"


def check(data_dir: str | Path) -> dict:
    """The manifest of the eval data folder `data_dir`; UserError, naming the fetch command, if it has none."""
    folder = Path(data_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no eval data (no {MANIFEST}); fetch it with {FETCH_COMMAND} --out={folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fetch again with {FETCH_COMMAND} --out={folder} "
                        "--overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a manifest of {FORMAT!r}; fetch again with {FETCH_COMMAND} --out={folder} "
                        "--overwrite")
    return manifest


def files(data_dir: str | Path, prefix: str = "") -> list[str]:
    """The folder's files whose relative path starts with `prefix` (e.g. 'bbh/'), sorted."""
    return sorted(path for path in check(data_dir)["files"] if path.startswith(prefix))


def load(data_dir: str | Path, relative_path: str) -> list[dict]:
    """The rows of `data_dir/relative_path` (e.g. 'gsm8k/test.jsonl'), once the file matches the manifest."""
    folder = Path(data_dir)
    entry = check(folder)["files"].get(relative_path)
    path = folder / relative_path
    refetch = f"fetch again with {FETCH_COMMAND} --out={folder} --overwrite"
    if entry is None:
        raise UserError(f"{path}: not listed in {folder / MANIFEST}; check the name, or {refetch}")
    if not path.is_file():
        raise UserError(f"{path}: missing; {refetch}")
    data = path.read_bytes()
    # Split on "\n" only: JSON escapes it inside strings, but not U+2028 and the other line breaks
    # that str.splitlines() would also cut at (TriviaQA has some).
    lines = data.split(b"\n")[:-1]
    if len(lines) != entry["rows"]:
        raise UserError(f"{path}: {len(lines)} rows, but the manifest says {entry['rows']}; {refetch}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{path}: its sha256 differs from the manifest's (the file changed after it was fetched); "
                        f"{refetch}")
    return [json.loads(line) for line in lines]
