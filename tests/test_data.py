"""The grain pipelines: windows, determinism by (seed, step, global batch), process slices,
resume from iterator state, the evaluation pass, global arrays."""

import json
import re
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from helpers import corpus_documents
from jax.sharding import NamedSharding, PartitionSpec

from configs.pretrain import get_config
from mhc_jax.data import pipeline, prepare
from mhc_jax.errors import UserError
from mhc_jax.pods import bench

SEQ_LEN, BATCH = 32, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    source = folder / "source"
    source.mkdir()
    for i, doc in enumerate(corpus_documents(600)):
        (source / f"{i:04d}.txt").write_text(doc)
    recipe = prepare.Recipe(sources=(str(source),), vocab_size=400, val_fraction=0.2)
    manifest, _ = prepare.prepare(folder / "out", recipe, command="test")
    return folder / "out", manifest


def stream(dataset, split):
    out, manifest = dataset
    windows = pipeline.TokenWindows(out, manifest, split, seq_len=1)
    return np.concatenate([np.frombuffer(windows.records[i], windows.dtype) for i in range(len(windows.records))])


def batches(dataset, seed=0, **kwargs):
    out, manifest = dataset
    stream = pipeline.mixture([pipeline.Source(str(out), manifest)], SEQ_LEN, seed)
    return pipeline.train_batches(stream, **{"global_batch_size": BATCH, **kwargs})


def test_windows_are_consecutive_slices_of_the_token_stream(dataset):
    out, manifest = dataset
    tokens = stream(dataset, "train")
    windows = pipeline.TokenWindows(out, manifest, "train", SEQ_LEN)
    assert len(windows) == (len(tokens) - 1) // SEQ_LEN and len(tokens) > 2 * prepare.RECORD_TOKENS
    for i in (0, 1, 255, 256, len(windows) - 1):  # window 255 ends on the first token of record 1
        np.testing.assert_array_equal(windows[i], tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1])
        assert windows[i].dtype == np.int32


def test_an_epoch_visits_every_window_once_and_the_next_epoch_reshuffles(dataset):
    out, manifest = dataset
    n = len(pipeline.TokenWindows(out, manifest, "train", SEQ_LEN))
    ds = batches(dataset, global_batch_size=1)
    epoch = [tuple(ds[k]["tokens"][0]) for k in range(n)]
    assert len(set(epoch)) == n
    assert [tuple(ds[n + k]["tokens"][0]) for k in range(n)] != epoch
    assert set(tuple(ds[n + k]["tokens"][0]) for k in range(n)) == set(epoch)


def test_batches_are_a_function_of_seed_and_step(dataset):
    a, b = batches(dataset), batches(dataset)
    for step in (0, 3, 1000):
        np.testing.assert_array_equal(a[step]["tokens"], b[step]["tokens"])
    assert not np.array_equal(batches(dataset, seed=1)[0]["tokens"], a[0]["tokens"])
    assert a[0]["tokens"].shape == (BATCH, SEQ_LEN + 1)


def test_starting_at_step_k_gives_the_kth_batch(dataset):
    ds = batches(dataset)
    from_zero = pipeline.train_iterator(ds)
    for _ in range(7):
        next(from_zero)
    started = pipeline.train_iterator(ds, start_step=7)
    for _ in range(3):
        np.testing.assert_array_equal(next(started)["tokens"], next(from_zero)["tokens"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_their_rows_of_the_same_global_batch(dataset, process_count):
    single = batches(dataset)
    shares = [batches(dataset, process_index=p, process_count=process_count) for p in range(process_count)]
    for step in (0, 1, 50):
        rows = [share[step]["tokens"] for share in shares]
        assert rows[0].shape == (BATCH // process_count, SEQ_LEN + 1)
        np.testing.assert_array_equal(np.concatenate(rows), single[step]["tokens"])


def test_evaluation_is_one_ordered_pass_with_weighted_padding(dataset):
    out, manifest = dataset
    windows = pipeline.TokenWindows(out, manifest, "validation", SEQ_LEN)
    evals = pipeline.eval_batches(out, manifest, seq_len=SEQ_LEN, global_batch_size=BATCH)
    tokens = np.concatenate([b["tokens"] for b in evals])
    weights = np.concatenate([b["weight"] for b in evals])
    assert len(evals) == -(-len(windows) // BATCH) and weights.sum() == len(windows)
    np.testing.assert_array_equal(tokens[:len(windows)], np.stack([windows[i] for i in range(len(windows))]))
    assert not weights[len(windows):].any()
    halves = [pipeline.eval_batches(out, manifest, seq_len=SEQ_LEN, global_batch_size=BATCH, process_index=p,
                                process_count=2) for p in range(2)]
    last = len(evals) - 1
    np.testing.assert_array_equal(np.concatenate([h[last]["tokens"] for h in halves]), evals[last]["tokens"])
    assert len(pipeline.eval_batches(out, manifest, seq_len=SEQ_LEN, global_batch_size=BATCH, max_batches=2)) == 2


def test_global_batch_on_eight_devices(dataset):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    local = batches(dataset)[0]
    sharded = pipeline.global_batch(local, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    assert len(sharded["tokens"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(sharded["tokens"]), local["tokens"])


def test_vocab_size_comes_from_the_data_unless_overridden(dataset):
    _, manifest = dataset
    assert pipeline.resolve_vocab_size(32768, manifest, overridden=False) == 400
    assert pipeline.resolve_vocab_size(512, manifest, overridden=True) == 512
    with pytest.raises(UserError, match="model.vocab_size: 300 is smaller than the data's tokenizer"):
        pipeline.resolve_vocab_size(300, manifest, overridden=True)


def test_bad_pipeline_inputs(dataset, tmp_path):
    out, manifest = dataset
    with pytest.raises(UserError, match="prepare_data.py --out="):
        pipeline.load_manifest(tmp_path)
    with pytest.raises(UserError, match="train.seq_len"):
        pipeline.TokenWindows(out, manifest, "validation", seq_len=10**7)
    with pytest.raises(UserError, match="train.batch_size: 8 is not divisible by the 3 processes"):
        batches(dataset, process_count=3)


@pytest.mark.slow
def test_bench_reports_every_variant_and_the_pipeline(dataset):
    """scripts/bench.py's tiny mode: valid JSON with every field (no timing is asserted)."""
    out, _ = dataset
    result = subprocess.run([sys.executable, "scripts/bench.py", "--config=configs/pretrain.py:mhc,debug",
                             f"--config.data.dir={out}", "--config.train.seq_len=32", "--variants=residual,mhc",
                             "--steps=2", "--depths=1", "--profile", "--data_batches=20"],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["contenders"]) == {"residual", "mhc"} and report["devices"] == 8
    assert report["mesh"]["fsdp"] == 8 and report["overrides"][0] == f"--config.data.dir={out}"
    for timing in report["contenders"].values():
        assert timing["tokens_per_sec"] == pytest.approx(8 * 32 / timing["step_seconds"], rel=0.01)
        assert timing["step_seconds_min"] <= timing["step_seconds"] <= timing["step_seconds_max"]
        assert 0 < timing["mfu"] and timing["memory_bytes"] > 0 and timing["compile_seconds"] > 0
        assert set(timing["compile_seconds_by_depth"]) == {"1"}
        profile = timing["profile"]
        assert sum(profile["by_source"].values()) == pytest.approx(profile["op_seconds"], rel=0.01, abs=1e-3)
    assert any(source.startswith("residual.py:") for source in report["contenders"]["mhc"]["profile"]["by_source"])
    assert report["baseline"] == "residual" and report["contenders"]["residual"]["step_time_vs_baseline"] == 1.0
    fastest = max(timing["tokens_per_sec"] for timing in report["contenders"].values())
    assert report["data_over_fastest_step"] == pytest.approx(report["data_tokens_per_sec"] / fastest, rel=0.01)

@pytest.mark.slow
def test_bench_times_the_values_of_one_field(dataset):
    """pods/bench.py with --vary's contenders, in-process: one entry per value, each step the field's."""
    out, _ = dataset
    config = get_config("mhc,debug")
    config.data.dir, config.train.seq_len = str(out), 32
    configs = bench.varied_configs(config, "train.seq_len=32,16")
    assert [c.train.seq_len for c in configs.values()] == [32, 16]
    report = bench.benchmark(configs, "train.seq_len=32", steps=1, depths=[], profile=False, data_batches=2)
    assert list(report["contenders"]) == ["train.seq_len=32", "train.seq_len=16"]
    for name, timing in report["contenders"].items():
        tokens = 8 * configs[name].train.seq_len
        assert timing["tokens_per_sec"] == pytest.approx(tokens / timing["step_seconds"], rel=0.01)
    assert report["contenders"]["train.seq_len=32"]["step_time_vs_baseline"] == 1.0


def test_epochs_count_passes_over_the_shuffled_examples():
    assert [pipeline.epoch_of(rows, 10) for rows in (0, 1, 10, 11, 20, 21)] == [1, 1, 1, 2, 2, 3]


def test_a_mixture_takes_each_source_by_its_weight_in_every_block_and_resumes_anywhere(dataset):
    """Two sources, 0.7 and 0.3: every block of MIXTURE_BLOCK rows holds 2,867 and 1,229 of them
    (rounded by largest remainder); batch shares scatter around the weights; a source's rows are its
    own shuffled examples in order; row m depends on m alone; one source is today's stream."""
    out, manifest = dataset
    sources = [pipeline.Source(str(out), manifest, 0.7), pipeline.Source(str(out), manifest, 0.3)]
    stream = pipeline.mixture(sources, SEQ_LEN, seed=3)
    assert list(stream.counts) == [2867, 1229]
    block = pipeline.MIXTURE_BLOCK
    np.testing.assert_array_equal(stream.taken(5 * block), [5 * 2867, 5 * 1229])
    shares = np.diff([stream.taken(k * 64)[0] for k in range(0, 5 * block // 64 + 1)]) / 64
    assert abs(shares.mean() - 2867 / block) < 1e-9 and 0.5 < shares.min() <= 0.7 <= shares.max() < 0.9
    own = [pipeline.mixture(sources[:1], SEQ_LEN, seed=3).examples[0][j] for j in range(3)]
    first_rows = [m for m in range(200) if stream.block(0)[0][m] == 0][:3]
    for row, example in zip(first_rows, own):
        np.testing.assert_array_equal(stream[row], example)
    fresh = pipeline.mixture(sources, SEQ_LEN, seed=3)
    for m in (7 * block + 5, 123, 2 * block):
        np.testing.assert_array_equal(fresh[m], stream[m])
    single = pipeline.mixture(sources[:1], SEQ_LEN, seed=0)
    examples = grain.MapDataset.source(pipeline.TokenWindows(out, manifest, "train", SEQ_LEN)).shuffle(seed=0).repeat()
    for m in (0, 5, block + 9):
        np.testing.assert_array_equal(single[m], examples[m])


@pytest.mark.parametrize("text, problem", [
    ("data/a:0.7,data/b", "'data/b' is not FOLDER:WEIGHT with a positive weight"),
    ("data/a:0,data/b:1", "'data/a:0' is not FOLDER:WEIGHT"),
    ("data/a:1,other/a:1", "names two folders of the same name"),
])
def test_a_bad_mixture_is_named(text, problem):
    assert pipeline.parse_mixture(text)[1].startswith(problem)
    assert pipeline.parse_mixture("data/a:0.7, data/b:0.3") == ([("data/a", 0.7), ("data/b", 0.3)], None)


def test_a_folder_of_an_older_format_is_refused_with_the_command_that_remakes_it(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "mhc-jax tokens v2", "recipe": {"sources": ["a.jsonl", "b"], "tokenizer": "gpt2"}}))
    with pytest.raises(UserError, match=re.escape(
            f"expected {prepare.FORMAT!r}; prepare it again: python scripts/prepare_data.py --out={tmp_path} "
            "--source=a.jsonl,b --tokenizer=gpt2 --overwrite")):
        pipeline.load_manifest(tmp_path)
