"""scripts/prepare_data.py and what is behind it: sources, split, tokenizers, shards, manifest."""

import gzip
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
from helpers import DEEPSEEK_EOS, assert_user_error, corpus_documents, deepseek_style_tokenizer

from mhc_jax.data import corpus, pipeline, prepare, throughput
from mhc_jax.data.tokenizer import gpt2_tokenizer, load_tokenizer, train_bpe
from mhc_jax.errors import UserError

ROOT = Path(__file__).parents[1]
DOCUMENTS = corpus_documents()
SMALL = dict(vocab_size=400, val_fraction=0.25)


def write_source(folder: Path, kind: str, documents=DOCUMENTS) -> Path:
    """The documents in one of the formats a user can bring."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        for i, doc in enumerate(documents):
            (folder / f"doc-{i:04d}.txt").write_text(doc)
        return folder
    if kind in ("jsonl", "jsonl.gz"):
        lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(documents))
        path = folder / f"docs.{kind}"
        path.write_bytes(gzip.compress(lines.encode(), mtime=0) if kind.endswith(".gz") else lines.encode())
        return path
    if kind == "parquet":
        path = folder / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), path)
        return path
    if kind == "save_to_disk":
        datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(folder / "hf"))
        return folder / "hf"
    raise ValueError(kind)


def split_documents(out: Path, manifest: dict, split: str) -> list[str]:
    """A split's documents, read back from its shards and decoded."""
    tokenizer = pipeline.load_data_tokenizer(out, manifest)
    windows = pipeline.TokenWindows(out, manifest, split, seq_len=1)
    stream = np.concatenate([np.frombuffer(windows.records[i], windows.dtype)
                             for i in range(len(windows.records))]).astype(np.int64)
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    assert ends[-1] == len(stream) - 1  # every document, the last one too, ends with end-of-text
    return [tokenizer.decode(doc[:-1]) for doc in np.split(stream, ends + 1)[:-1]]


def build(out: Path, sources, **recipe) -> dict:
    manifest, built = prepare.prepare(out, prepare.Recipe(sources=tuple(map(str, sources)), **{**SMALL, **recipe}),
                                      command="test")
    assert built
    return manifest


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "parquet", "save_to_disk"])
def test_every_source_format_round_trips(tmp_path, kind):
    source = write_source(tmp_path / "source", kind)
    manifest = build(tmp_path / "data", [source])
    train = split_documents(tmp_path / "data", manifest, "train")
    validation = split_documents(tmp_path / "data", manifest, "validation")
    assert train == [d for d in DOCUMENTS if not prepare.in_validation(d, 0.25)]
    assert validation == [d for d in DOCUMENTS if prepare.in_validation(d, 0.25)]
    assert not set(train) & set(validation)  # the duplicated documents land on one side
    assert 0.15 < len(validation) / len(DOCUMENTS) < 0.35
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["sources"][0]["documents"] == len(DOCUMENTS)


def test_same_inputs_give_identical_bytes(tmp_path):
    source = write_source(tmp_path / "source", "jsonl")
    first, second = build(tmp_path / "a", [source]), build(tmp_path / "b", [source])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first.pop("created"), second.pop("created")
    assert first == second


def test_same_recipe_again_changes_nothing(tmp_path):
    source = write_source(tmp_path / "source", "txt")
    build(tmp_path / "data", [source])
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    _, built = prepare.prepare(tmp_path / "data", prepare.Recipe(sources=(str(source),), **SMALL), command="test")
    assert not built
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}


def test_records_are_fixed_size_and_shards_hashed(tmp_path):
    manifest = build(tmp_path / "data", [write_source(tmp_path / "source", "jsonl")])
    windows = pipeline.TokenWindows(tmp_path / "data", manifest, "train", seq_len=1)
    sizes = [len(windows.records[i]) // windows.dtype.itemsize for i in range(len(windows.records))]
    assert sizes[:-1] == [prepare.RECORD_TOKENS] * (len(sizes) - 1) and 0 < sizes[-1] <= prepare.RECORD_TOKENS
    assert sum(sizes) == manifest["splits"]["train"]["tokens"]
    for shard in manifest["splits"]["train"]["shards"]:
        assert shard["sha256"] == prepare.file_sha256(tmp_path / "data" / shard["file"])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for i, doc in enumerate(DOCUMENTS[:40]):
        (source / f"{i:02d}.txt").write_text(doc)
    (source / "bad.txt").write_bytes("ok \ufffd stays ".encode() + b"\xff\xfe then " + b"\xc3")
    manifest = build(tmp_path / "data", [source], val_fraction=0.5)
    assert manifest["invalid_utf8"] == 3  # \xff, \xfe and the truncated \xc3; the real U+FFFD is not counted
    everything = split_documents(tmp_path / "data", manifest, "train") + \
        split_documents(tmp_path / "data", manifest, "validation")
    assert "ok \ufffd stays \ufffd\ufffd then \ufffd" in everything


def test_debian_sources_split_info_files_into_nodes(tmp_path, monkeypatch):
    (tmp_path / "manual.info.gz").write_bytes(gzip.compress(b"node one\x1fnode two\x1f\nnode three"))
    monkeypatch.setitem(corpus.DEBIAN_SOURCES, "fixture", ("fixture-doc", str(tmp_path / "*.info.gz"), "info"))
    stats = []
    assert list(corpus.documents(["debian:fixture"], "text", stats)) == ["node one", "node two", "\nnode three"]
    assert stats[0].record()["files"] == 1
    monkeypatch.setitem(corpus.DEBIAN_SOURCES, "absent", ("absent-doc", str(tmp_path / "none*"), "text"))
    with pytest.raises(UserError, match="apt-get install absent-doc"):
        list(corpus.documents(["debian:absent"], "text", []))


def test_stdlib_source_is_sorted_python_files():
    files = corpus.stdlib_files()
    names = [p.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for p in files]
    assert len(files) > 500 and all(name.endswith(".py") for name in names)
    assert names == sorted(names) and not any("site-packages" in name for name in names)


def test_trained_bpe_saves_and_loads(tmp_path):
    tokenizer = train_bpe(DOCUMENTS, 400)
    loaded = load_tokenizer(tokenizer.save(tmp_path))
    assert (loaded.vocab_size, loaded.eos_id) == (tokenizer.vocab_size, tokenizer.eos_id) == (400, 0)
    for doc, a, b in zip(DOCUMENTS, tokenizer.encode_batch(DOCUMENTS), loaded.encode_batch(DOCUMENTS)):
        np.testing.assert_array_equal(a, b)
        assert loaded.decode(b) == doc


def test_gpt2_files_from_the_package(tmp_path):
    tokenizer = gpt2_tokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)
    np.testing.assert_array_equal(tokenizer.encode_batch(["Hello world"])[0], [15496, 995])
    loaded = load_tokenizer(tokenizer.save(tmp_path))
    np.testing.assert_array_equal(loaded.encode_batch(DOCUMENTS[:3])[2], tokenizer.encode_batch(DOCUMENTS[:3])[2])


def test_sentencepiece_model_prepares_and_reloads(tmp_path):
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(DOCUMENTS), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=120, bos_id=-1, eos_id=1, minloglevel=2)
    source = write_source(tmp_path / "source", "jsonl")
    manifest = build(tmp_path / "data", [source], tokenizer=str(tmp_path / "sp.model"))
    assert manifest["tokenizer"]["file"] == "tokenizer.model" and manifest["tokenizer"]["eos_id"] == 1
    reloaded = pipeline.load_data_tokenizer(tmp_path / "data", manifest)
    original = load_tokenizer(tmp_path / "sp.model")
    np.testing.assert_array_equal(reloaded.encode_batch(DOCUMENTS[:1])[0], original.encode_batch(DOCUMENTS[:1])[0])


def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, "scripts/prepare_data.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial" in p.name or ".replaced-" in p.name]


@pytest.mark.slow
def test_bad_inputs_fail_cleanly(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_prepare(f"--out={out}", f"--source={tmp_path / 'missing'}"), "--source", "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    assert_user_error(run_prepare(f"--out={out}", f"--source={empty}"), "no non-empty documents")
    lines = [json.dumps({"text": "fine"}), json.dumps({"text": "also fine"}), json.dumps({"body": "no text"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    assert_user_error(run_prepare(f"--out={out}", f"--source={tmp_path / 'bad.jsonl'}"),
                      f"{tmp_path / 'bad.jsonl'}:3", "'text'")
    assert_user_error(run_prepare(f"--out={out}", f"--source={empty}", "--vocab_size=100"), "--vocab_size")
    assert not out.exists() and no_leftovers(tmp_path)


@pytest.mark.slow
def test_a_different_dataset_is_kept_unless_overwrite(tmp_path):
    source, out = write_source(tmp_path / "source", "jsonl"), tmp_path / "out"

    def recipe(vocab_size):
        return prepare.Recipe(sources=(str(source),), vocab_size=vocab_size, val_fraction=0.25)

    prepare.prepare(out, recipe(400), command="test")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="--out: .* already holds a different dataset; pass --overwrite"):
        prepare.prepare(out, recipe(300), command="test")
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}
    prepare.prepare(out, recipe(300), command="test", overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 300
    assert no_leftovers(tmp_path)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="files that are not a dataset"):
        prepare.prepare(stranger, recipe(300), command="test")
    assert (stranger / "notes.txt").read_text() == "mine"


def mixed_sources(folder: Path) -> list[Path]:
    """A jsonl file and a parquet file of 50-row row groups: with unit_bytes=20000, about 40 units,
    the jsonl cut in byte ranges and the parquet in runs of row groups."""
    folder.mkdir(parents=True, exist_ok=True)
    documents = corpus_documents(3000)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    pq.write_table(pa.table({"text": documents[:500]}), folder / "docs.parquet", row_group_size=50)
    return [folder / "docs.jsonl", folder / "docs.parquet"]


MIXED = ("--vocab_size=400", "--val_fraction=0.25", "--unit_bytes=20000")


def folder_contents(out: Path) -> tuple[str, dict, dict]:
    """What must not depend on how a folder was made: the data fingerprint, every file but the
    manifest byte for byte, and the manifest but its command and date."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    return pipeline.fingerprint(manifest), files, {k: v for k, v in manifest.items() if k not in ("command", "created")}


@pytest.mark.slow
def test_workers_and_hosts_make_the_same_folder(tmp_path):
    """The same folder from this process alone, from 2 worker processes, and from 2 processes
    (hosts) sharing the output, each with its own workers."""
    sources = mixed_sources(tmp_path / "sources")
    source_flag = "--source=" + ",".join(map(str, sources))
    reference = tmp_path / "one"
    units = build(reference, sources, vocab_size=400, val_fraction=0.25, unit_bytes=20000)["plan"]["units"]
    assert units > 20
    result = run_prepare(f"--out={tmp_path / 'workers'}", source_flag, *MIXED, "--workers=2")
    assert result.returncode == 0, result.stderr
    hosts = [subprocess.Popen([sys.executable, "scripts/prepare_data.py", f"--out={tmp_path / 'hosts'}", source_flag,
                               *MIXED, "--workers=1", "--num_processes=2", f"--process_id={i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    outputs = [host.communicate(timeout=300) for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], outputs
    assert "process 1 prepared its units" in outputs[0][0]
    expected = folder_contents(reference)
    assert folder_contents(tmp_path / "workers") == expected
    assert folder_contents(tmp_path / "hosts") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts", "one", "sources", "workers"]  # no partial folder


@pytest.mark.slow
def test_killed_at_random_points_it_resumes_to_the_same_folder(tmp_path):
    """kill -9 of the whole process group (the command and its workers) at a random moment, then the
    same command run to the end: the folder of an uninterrupted run (docs/data.md: 5 of 5 such
    rounds on a larger source)."""
    source_flag = "--source=" + ",".join(map(str, mixed_sources(tmp_path / "sources")))
    command = [sys.executable, "scripts/prepare_data.py", source_flag, *MIXED, "--workers=2"]
    start = time.time()
    assert subprocess.run([*command, f"--out={tmp_path / 'whole'}"], cwd=ROOT, capture_output=True).returncode == 0
    duration = time.time() - start
    expected = folder_contents(tmp_path / "whole")
    rng = np.random.default_rng(int(time.time()))
    for attempt, delay in enumerate(rng.uniform(0.2 * duration, 0.9 * duration, size=1)):
        out = tmp_path / f"killed-{attempt}"
        process = subprocess.Popen([*command, f"--out={out}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert not out.exists() or folder_contents(out) == expected, delay  # never half-written
        result = subprocess.run([*command, f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, (delay, result.stderr)
        assert folder_contents(out) == expected, delay


def test_a_finished_folder_is_recognised_without_reading_the_sources(tmp_path, monkeypatch):
    source = write_source(tmp_path / "source", "jsonl")
    build(tmp_path / "data", [source])

    def unreadable(*args):
        raise AssertionError("a source was read")

    monkeypatch.setattr(corpus, "piece_texts", unreadable)
    _, built = prepare.prepare(tmp_path / "data", prepare.Recipe(sources=(str(source),), **SMALL), command="test")
    assert not built
    os.utime(source, ns=(0, 0))  # a source that may have changed: built again (and read)
    with pytest.raises(AssertionError, match="a source was read"):
        prepare.prepare(tmp_path / "data", prepare.Recipe(sources=(str(source),), **SMALL), command="test",
                        overwrite=True)


def test_a_source_that_vanishes_mid_preparation_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    sources = [write_source(tmp_path / f"source-{i}", "jsonl") for i in range(2)]
    read = corpus.piece_texts

    def vanishing(piece, *args):
        sources[1].unlink(missing_ok=True)  # while the first is read, the second goes
        return read(piece, *args)

    monkeypatch.setattr(corpus, "piece_texts", vanishing)
    with pytest.raises(UserError, match=f"^--source: {sources[1]} disappeared while the data was being prepared"):
        build(tmp_path / "data", sources)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source-0", "source-1"]


def test_a_tokenizer_names_its_end_of_text_in_its_config_or_on_the_command_line(tmp_path):
    bare = deepseek_style_tokenizer(tmp_path / "bare", with_config=False)
    with pytest.raises(UserError, match="no end-of-text token .* name it with --eos_token"):
        load_tokenizer(bare)
    assert load_tokenizer(bare, DEEPSEEK_EOS).eos_id == 1
    with pytest.raises(UserError, match="^--eos_token: '<eot>' is not a token of this tokenizer"):
        load_tokenizer(bare, "<eot>")
    source = write_source(tmp_path / "source", "jsonl")
    recipe = prepare.Recipe(sources=(str(source),), tokenizer=str(deepseek_style_tokenizer(tmp_path / "ds")),
                            val_fraction=0.25)
    manifest, _ = prepare.prepare(tmp_path / "data", recipe, command="test")
    assert manifest["tokenizer"]["eos_token"] == DEEPSEEK_EOS and manifest["tokenizer"]["eos_id"] == 1
    assert split_documents(tmp_path / "data", manifest, "train") == [
        d for d in DOCUMENTS if not prepare.in_validation(d, 0.25)]
    with pytest.raises(UserError, match="^--eos_token: names the end-of-text token of a tokenizer file"):
        prepare.prepare(tmp_path / "bpe", prepare.Recipe(sources=(str(source),), eos_token=DEEPSEEK_EOS, **SMALL),
                        command="test")


@pytest.mark.slow
def test_the_data_benchmark_tokenizes_what_prepare_writes(tmp_path):
    source = write_source(tmp_path / "source", "jsonl")
    result = throughput.benchmark([1, 2], 0, str(source), unit_bytes=4096)
    manifest = build(tmp_path / "data", [source], tokenizer="gpt2", unit_bytes=4096)
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    assert [(row["workers"], row["units"], row["tokens"]) for row in result["rows"]] == [
        (1, manifest["plan"]["units"], tokens), (2, manifest["plan"]["units"], tokens)]
    assert manifest["plan"]["units"] > 2 and all(row["peak_worker_bytes"] > 50 << 20 for row in result["rows"])


def test_a_hugging_face_dataset_is_streamed_shard_by_shard(tmp_path):
    """hf:FOLDER goes through datasets.load_dataset(..., streaming=True), as a Hub name does: one
    unit per data file, the documents in order."""
    thirds = [DOCUMENTS[i::3] for i in range(3)]
    (tmp_path / "hub").mkdir()
    for i, part in enumerate(thirds):
        (tmp_path / "hub" / f"data-{i:05d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    manifest = build(tmp_path / "data", [f"hf:{tmp_path / 'hub'}"])
    assert manifest["plan"]["units"] == 3
    expected = [d for part in thirds for d in part]
    assert split_documents(tmp_path / "data", manifest, "train") == [
        d for d in expected if not prepare.in_validation(d, 0.25)]
    with pytest.raises(UserError, match="its records have no string column 'body'"):
        build(tmp_path / "other", [f"hf:{tmp_path / 'hub'}"], text_field="body")


@pytest.mark.slow
def test_a_hub_dataset_without_network_is_one_line(tmp_path):
    result = run_prepare(f"--out={tmp_path / 'out'}", "--source=hf:someone/corpus", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "--source: hf:someone/corpus cannot be loaded (ConnectionError",
                      "cannot reach the Hugging Face Hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
