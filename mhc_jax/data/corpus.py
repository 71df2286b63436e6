"""Pretraining text: documents read from the sources named on scripts/prepare_data.py's --source.

A source is one of
  stdlib              the running Python's standard library, one document per .py file (the default:
                      a few tens of MB of code and docstrings that every Python install carries)
  debian:<name>       English text from an installed Debian package (see DEBIAN_SOURCES)
  FILE.txt[.gz]       one document per file
  FILE.jsonl[.gz]     one document per line: the string field --text_field
  FILE.parquet        one document per row: the string column --text_field
  DIR                 a Hugging Face `save_to_disk` folder (column --text_field), or else every
                      .txt, .jsonl and .parquet file below DIR, in sorted order

Reading streams and is deterministic: the same sources give the same documents in the same order.
Bytes that are not UTF-8 become U+FFFD and are counted (`SourceStats.invalid_utf8`).
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mhc_jax.errors import UserError

# name -> (Debian package, its files (a glob), how each file is read)
DEBIAN_SOURCES = {
    "python-docs": ("python3.11-doc", "/usr/share/info/python3.11.info*.gz", "info"),
    "linux-docs": ("linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz", "text"),
    "jargon": ("jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz", "text"),
}
READERS_BY_SUFFIX = {".txt": "text", ".txt.gz": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
                     ".parquet": "parquet"}


@dataclasses.dataclass
class SourceStats:
    """What the manifest records about one source; filled in while its documents are read."""
    source: str
    files: int = 0
    bytes: int = 0
    documents: int = 0
    invalid_utf8: int = 0  # byte sequences that were not UTF-8 and became U+FFFD
    hasher: Any = dataclasses.field(default_factory=hashlib.sha256, repr=False)

    def record(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hasher"}
        return {**fields, "sha256": self.hasher.hexdigest()}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def reader_for(path: Path) -> str:
    for suffix, reader in READERS_BY_SUFFIX.items():
        if path.name.endswith(suffix):
            return reader
    raise UserError(f"--source: {path}: unknown file type; expected one of {', '.join(READERS_BY_SUFFIX)}")


def source_files(source: str) -> list[tuple[Path, str]]:
    """The files of a source, each with the reader that splits it into documents."""
    if source == "stdlib":
        return [(path, "text") for path in stdlib_files()]
    if source.startswith("debian:"):
        name = source.split(":", 1)[1]
        if name not in DEBIAN_SOURCES:
            raise UserError(f"--source: unknown {source!r}; built-in Debian sources: "
                            + ", ".join(f"debian:{n}" for n in DEBIAN_SOURCES))
        package, pattern, reader = DEBIAN_SOURCES[name]
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not files:
            raise UserError(f"--source: {source} needs the Debian package {package} "
                            f"(apt-get install {package}); nothing matches {pattern}")
        return [(path, reader) for path in files]
    path = Path(source)
    if not path.exists():
        raise UserError(f"--source: {source} does not exist; give a file, a folder, stdlib or debian:<name>")
    if path.is_file():
        return [(path, reader_for(path))]
    if (path / "state.json").exists():  # Hugging Face save_to_disk
        state = json.loads((path / "state.json").read_text())
        return [(path / f["filename"], "arrow") for f in state["_data_files"]]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(READERS_BY_SUFFIX)))
    if not files:
        raise UserError(f"--source: {source} holds no {', '.join(READERS_BY_SUFFIX)} files")
    return [(p, reader_for(p)) for p in files]


def decode(data: bytes, stats: SourceStats) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # replacements made, not counting U+FFFD characters already in the input
        stats.invalid_utf8 += text.count("\ufffd") - data.count("\ufffd".encode())
    return text


def json_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where}: no field {text_field!r}; choose the text field with --text_field")
    if not isinstance(record[text_field], str):
        raise UserError(f"{where}: field {text_field!r} is a {type(record[text_field]).__name__}, not a string")
    return record[text_field]


def column_texts(path: Path, data: bytes, reader: str, text_field: str) -> Iterator[str]:
    if reader == "arrow":
        batches = pa.ipc.open_stream(pa.BufferReader(data))
        names = batches.schema.names
    else:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        batches = parquet.iter_batches(columns=[text_field]) if text_field in names else []
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (it has {', '.join(names)}); "
                        "choose it with --text_field")
    for batch in batches:
        for text in batch.column(text_field).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            yield text


def file_texts(path: Path, reader: str, text_field: str, stats: SourceStats) -> Iterator[str]:
    data = path.read_bytes()
    stats.files += 1
    stats.bytes += len(data)
    stats.hasher.update(data)
    if reader in ("arrow", "parquet"):
        yield from column_texts(path, data, reader, text_field)
        return
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if reader == "info":  # GNU info: one document per node; nodes are separated by \x1f
        yield from decode(data, stats).split("\x1f")
    elif reader == "jsonl":
        for line_number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                yield json_text(decode(line, stats), text_field, f"{path}:{line_number}")
    else:
        yield decode(data, stats)


def documents(sources: list[str], text_field: str, stats: list[SourceStats]) -> Iterator[str]:
    """The non-empty documents of all sources, in order; appends one SourceStats per source."""
    for source in sources:
        source_stats = SourceStats(source)
        stats.append(source_stats)
        for path, reader in source_files(source):
            for text in file_texts(path, reader, text_field, source_stats):
                if text.strip():
                    source_stats.documents += 1
                    yield text
