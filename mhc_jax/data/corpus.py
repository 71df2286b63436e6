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
  hf:NAME[:CONFIG[:SPLIT]]  a dataset `datasets.load_dataset` streams (a Hub name, which needs the
                      network, or a local folder of data files; split 'train' unless given),
                      column --text_field, one work unit per shard (data file)

Files and folders may be local or in a bucket (gs://..., read through mhc_jax/storage.py).
Reading streams and is deterministic: the same sources give the same documents in the same order.
Bytes that are not UTF-8 become U+FFFD and are counted (`SourceStats.invalid_utf8`).

Work units (`plan`): the documents in order, cut into units of about `unit_bytes` of source that
can be read independently: consecutive small files of a source together, an uncompressed jsonl
file in byte ranges (a line belongs to the range it starts in), a parquet file in runs of row
groups. A .gz file or a text file is read whole by one unit, but streamed (never held in memory
whole, except a text file's one document). The plan depends only on the files' names and sizes.
"""

import contextlib
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
from etils import epath

from mhc_jax import storage
from mhc_jax.errors import UserError

# name -> (Debian package, its files (a glob), how each file is read)
DEBIAN_SOURCES = {
    "python-docs": ("python3.11-doc", "/usr/share/info/python3.11.info*.gz", "info"),
    "linux-docs": ("linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz", "text"),
    "jargon": ("jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz", "text"),
}
HF_PREFIX = "hf:"
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


@dataclasses.dataclass(frozen=True)
class Piece:
    """A file, or a part of one: bytes [start, stop) of a jsonl file (the lines that start there),
    row groups [start, stop) of a parquet file; a whole file has start 0, stop -1."""
    path: str
    reader: str
    start: int = 0
    stop: int = -1


@dataclasses.dataclass(frozen=True)
class Unit:
    """Consecutive documents of one source, read by one worker."""
    source: str
    pieces: tuple[Piece, ...]


def plan(sources: list[str], unit_bytes: int) -> list[Unit]:
    """The work units of `sources`, in document order."""
    units = []
    for source in sources:
        if source.startswith(HF_PREFIX):
            shards = hf_dataset(source).n_shards
            units += [Unit(source, (Piece(source, "hf", shard, shards),)) for shard in range(shards)]
            continue
        group, group_bytes = [], 0
        for path, reader in source_files(source):
            size = storage.stamp(path)[0]
            pieces = split_file(path, reader, size, unit_bytes)
            if len(pieces) > 1:
                units += [Unit(source, tuple(group))] if group else []
                units += [Unit(source, (piece,)) for piece in pieces]
                group, group_bytes = [], 0
                continue
            group.append(pieces[0])
            group_bytes += size
            if group_bytes >= unit_bytes:
                units.append(Unit(source, tuple(group)))
                group, group_bytes = [], 0
        if group:
            units.append(Unit(source, tuple(group)))
    return units


def stamp(piece: Piece) -> list:
    """What tells a changed source: a file's size and modification time (a dataset of the Hub: nothing;
    its name stands for it)."""
    if piece.reader == "hf":
        return []
    return storage.stamp(piece.path)


def hf_dataset(source: str):
    """hf:NAME[:CONFIG[:SPLIT]] streamed by datasets.load_dataset (imported only for such a source)."""
    import datasets

    name, config, split = (source[len(HF_PREFIX):].split(":") + [None, None])[:3]
    try:
        return datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # datasets raises many kinds: no network, no such dataset, config or split
        hint = ("; this host cannot reach the Hugging Face Hub: download the dataset where it can and give "
                "its folder" if isinstance(e, ConnectionError) else "")
        raise UserError(f"--source: {source} cannot be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}){hint}") from None


def hf_texts(piece: Piece, text_field: str, stats: SourceStats) -> Iterator[str]:
    """Shard piece.start of the piece.stop shards of a streamed Hugging Face dataset."""
    stats.files += 1
    for record in hf_dataset(piece.path).shard(num_shards=piece.stop, index=piece.start):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{piece.path}: its records have no string column {text_field!r} (they have "
                            f"{', '.join(record)}); choose it with --text_field")
        encoded = text.encode("utf-8", "surrogatepass")
        stats.bytes += len(encoded)
        stats.hasher.update(encoded)
        yield text


def split_file(path: epath.Path, reader: str, size: int, unit_bytes: int) -> list[Piece]:
    """A file in pieces of about unit_bytes: jsonl by byte ranges, parquet by row groups; others whole."""
    if size <= unit_bytes or reader not in ("jsonl", "parquet") or path.name.endswith(".gz"):
        return [Piece(str(path), reader)]
    if reader == "jsonl":
        return [Piece(str(path), reader, start, min(start + unit_bytes, size)) for start in range(0, size, unit_bytes)]
    metadata = parquet_file(path).metadata
    pieces, first, run_bytes = [], 0, 0
    for group in range(metadata.num_row_groups):
        run_bytes += metadata.row_group(group).total_byte_size
        if run_bytes >= unit_bytes or group == metadata.num_row_groups - 1:
            pieces.append(Piece(str(path), reader, first, group + 1))
            first, run_bytes = group + 1, 0
    return pieces


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def reader_for(path: epath.Path) -> str:
    for suffix, reader in READERS_BY_SUFFIX.items():
        if path.name.endswith(suffix):
            return reader
    raise UserError(f"--source: {path}: unknown file type; expected one of {', '.join(READERS_BY_SUFFIX)}")


def source_files(source: str) -> list[tuple[epath.Path, str]]:
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
    path = epath.Path(source)
    if not path.exists():
        raise UserError(f"--source: {source} does not exist; give a file, a folder, stdlib or debian:<name>")
    if path.is_file():
        return [(path, reader_for(path))]
    if (path / "state.json").exists():  # Hugging Face save_to_disk
        state = json.loads((path / "state.json").read_text())
        return [(path / f["filename"], "arrow") for f in state["_data_files"]]
    files = sorted(folder / name for folder, _, names in path.walk() for name in names
                   if name.endswith(tuple(READERS_BY_SUFFIX)))
    if not files:
        raise UserError(f"--source: {source} holds no {', '.join(READERS_BY_SUFFIX)} files")
    return [(p, reader_for(p)) for p in files]


def decode(data: bytes, stats: SourceStats) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # replacements made, not counting U+FFFD characters already in the input
        stats.invalid_utf8 += text.count("\ufffd") - data.count("\ufffd".encode())
    return text


def json_text(line: str, text_field: str, where) -> str:
    """The text field of a jsonl line; `where()` names the line in an error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where()}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where()}: no field {text_field!r}; choose the text field with --text_field")
    if not isinstance(record[text_field], str):
        raise UserError(f"{where()}: field {text_field!r} is a {type(record[text_field]).__name__}, not a string")
    return record[text_field]


def column_texts(piece: Piece, text_field: str, stats: SourceStats) -> Iterator[str]:
    """A parquet piece's row groups, or a Hugging Face arrow file, batch by batch."""
    path = epath.Path(piece.path)
    if piece.reader == "arrow":
        batches = pa.ipc.open_stream(path.open("rb") if storage.is_remote(path) else pa.memory_map(str(path)))
        names = batches.schema.names
    else:
        parquet = parquet_file(path)
        names = parquet.schema_arrow.names
        groups = range(piece.start, parquet.metadata.num_row_groups if piece.stop < 0 else piece.stop)
        batches = parquet.iter_batches(row_groups=groups, columns=[text_field]) if text_field in names else []
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (it has {', '.join(names)}); "
                        "choose it with --text_field")
    for batch in batches:
        for text in batch.column(text_field).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            encoded = text.encode("utf-8", "surrogatepass")
            stats.bytes += len(encoded)
            stats.hasher.update(encoded)
            yield text


def piece_texts(piece: Piece, text_field: str, stats: SourceStats) -> Iterator[str]:
    """The texts of one piece, streamed; its bytes (as read) go into stats."""
    if piece.reader == "hf":
        yield from hf_texts(piece, text_field, stats)
        return
    path = epath.Path(piece.path)
    stats.files += piece.start == 0
    if piece.reader in ("arrow", "parquet"):
        yield from column_texts(piece, text_field, stats)
    elif piece.reader == "jsonl":
        yield from jsonl_texts(piece, text_field, stats)
    else:
        data = gzip.decompress(read_counted(path, stats)) if path.name.endswith(".gz") else read_counted(path, stats)
        text = decode(data, stats)
        yield from text.split("\x1f") if piece.reader == "info" else [text]  # GNU info: one document per node


def read_counted(path: epath.Path, stats: SourceStats) -> bytes:
    data = path.read_bytes()
    stats.bytes += len(data)
    stats.hasher.update(data)
    return data


def jsonl_texts(piece: Piece, text_field: str, stats: SourceStats) -> Iterator[str]:
    """The lines that start in the piece's byte range, one at a time (gz: the whole file, streamed)."""
    path = epath.Path(piece.path)
    with open_binary(path) as f:
        if piece.start:
            f.seek(piece.start - 1)
            f.readline()  # the end of a line that started before the range
        while piece.stop < 0 or f.tell() < piece.stop:
            at = f.tell()
            line = f.readline()
            if not line:
                break
            stats.bytes += len(line)
            stats.hasher.update(line)
            if line.strip():
                yield json_text(decode(line, stats), text_field, lambda: f"{path}:{line_number(path, at)}")


@contextlib.contextmanager
def open_binary(path: epath.Path):
    """A file's bytes, decompressed as they are read if it is gzipped."""
    with path.open("rb") as raw:
        yield gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw


def parquet_file(path: epath.Path) -> pq.ParquetFile:
    """Read in place: a local file by name, a bucket's through its file object."""
    return pq.ParquetFile(path.open("rb") if storage.is_remote(path) else str(path))


def line_number(path: epath.Path, offset: int) -> int:
    """The number of the line starting at byte `offset` (counted only for an error message)."""
    with open_binary(path) as f:
        return f.read(offset).count(b"\n") + 1


def unit_documents(unit: Unit, text_field: str, stats: SourceStats) -> Iterator[str]:
    """The non-empty documents of a unit, in order, counted into `stats`."""
    for piece in unit.pieces:
        try:
            for text in piece_texts(piece, text_field, stats):
                if text.strip():
                    stats.documents += 1
                    yield text
        except FileNotFoundError:
            raise UserError(f"--source: {piece.path} disappeared while the data was being prepared; run the "
                            "command again once the sources are settled") from None


def documents(sources: list[str], text_field: str, stats: list[SourceStats]) -> Iterator[str]:
    """The non-empty documents of all sources, in order; appends one SourceStats per source."""
    for source in sources:
        stats.append(SourceStats(source))
        for path, reader in source_files(source):
            yield from unit_documents(Unit(source, (Piece(str(path), reader),)), text_field, stats[-1])
