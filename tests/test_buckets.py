"""gs:// paths through the real clients (gcsfs, TensorStore, ArrayRecord's reader) against a Google
Cloud Storage server on localhost that the tests start (fake-gcs-server; tests/helpers.py):
preparing into a bucket, training from one into another, resuming, evaluating, sweeping, comparing."""

import json
import os
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from helpers import (
    ROOT,
    STRAIGHT,
    assert_user_error,
    corpus_documents,
    losses,
    records,
    run_train,
    stop_with_sigterm,
    storage_server,
    xla_flags,
)

from configs.pretrain import get_config
from mhc_jax import plots, storage
from mhc_jax.data import pipeline, prepare
from mhc_jax.errors import UserError
from mhc_jax.pods import compare, sweep
from mhc_jax.training import checkpoint, runlog

BUCKET = "gs://bucket"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with storage_server(tmp_path_factory.mktemp("storage"), bucket="bucket") as env:
        yield env


def upload(local: Path, remote: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        target = epath.Path(remote) / path.relative_to(local).as_posix()
        storage.copy_file(path, target)


@pytest.mark.slow  # 2 worker processes
def test_a_folder_prepared_into_a_bucket_from_a_bucket_equals_a_local_one(server, tmp_path):
    """Sources and output in the bucket, 2 workers or 2 hosts: the same shards, byte for byte, as one
    local process makes; a rerun does nothing; the windows read in place equal the local ones."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(600)))
    upload(tmp_path, f"{BUCKET}/sources")
    recipe = dict(vocab_size=400, val_fraction=0.2, unit_bytes=20_000)
    local, _ = prepare.prepare(tmp_path / "data", prepare.Recipe(sources=(str(source),), **recipe), command="test")
    out = f"{BUCKET}/data/small"
    remote_recipe = prepare.Recipe(sources=(f"{BUCKET}/sources/docs.jsonl",), **recipe)
    remote, built = prepare.prepare(out, remote_recipe, command="test", workers=2)
    assert built and len(local["splits"]["train"]["shards"]) > 2
    assert pipeline.fingerprint(remote) == pipeline.fingerprint(local)
    for shard in local["splits"]["train"]["shards"] + local["splits"]["validation"]["shards"]:
        assert (epath.Path(out) / shard["file"]).read_bytes() == (tmp_path / "data" / shard["file"]).read_bytes()
    assert not epath.Path(f"{BUCKET}/data/.small.partial").exists()
    assert prepare.prepare(out, remote_recipe, command="test") == (remote, False)
    hosts = f"{BUCKET}/data/two-hosts"  # two hosts sharing the bucket, each preparing its half of the units
    with futures.ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda p: prepare.prepare(hosts, remote_recipe, command="test", process_index=p,
                                                       process_count=2)[0], (0, 1)))
    assert made[1] is None and pipeline.fingerprint(made[0]) == pipeline.fingerprint(local)
    manifest = pipeline.load_manifest(out)
    windows = [pipeline.TokenWindows(folder, manifest, "train", 64) for folder in (out, tmp_path / "data")]
    assert len(windows[0]) == len(windows[1])
    for i in (0, 1, len(windows[1]) // 2, len(windows[1]) - 1):
        np.testing.assert_array_equal(windows[0][i], windows[1][i])
    texts = corpus_documents(3)
    np.testing.assert_array_equal(np.concatenate(pipeline.load_data_tokenizer(out, manifest).encode_batch(texts)),
                                  np.concatenate(pipeline.load_data_tokenizer(tmp_path / "data", local).encode_batch(texts)))


def test_a_bucket_copy_stopped_half_way_is_finished_by_the_same_command(server, tmp_path):
    """Stopped while the finished folder was being copied into place (a bucket has no rename): the
    folder is no dataset meanwhile, and the same command completes it without preparing again."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(200)))
    recipe = prepare.Recipe(sources=(str(source),), vocab_size=300, val_fraction=0.2)
    out = epath.Path(f"{BUCKET}/data/halfway")
    original = storage.copy_file
    copied = []

    def stop_after_two(source_file, destination):
        if str(destination).startswith(str(out) + "/"):
            copied.append(destination)
            if len(copied) > 2:
                raise KeyboardInterrupt
        original(source_file, destination)

    prepare.storage.copy_file = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare(out, recipe, command="test")
    finally:
        prepare.storage.copy_file = original
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="no manifest.json"):
        pipeline.load_manifest(out)
    manifest, built = prepare.prepare(out, recipe, command="test")
    assert built and pipeline.load_manifest(out) == manifest


def test_run_files_in_a_bucket_are_written_whole_and_read_back(server):
    """metrics.jsonl rewritten whole (a bucket has no append), a resume's cut, compare's and the
    plot's reading, and an orbax checkpoint through TensorStore: nothing lands in a local gs:/ folder."""
    run = sweep.grid(["mhc"], ["debug"], [0], [], group="g")[0]
    root = f"{BUCKET}/files"
    assert f"--workdir={root}/{run.name}" in sweep.train_command(run, root)
    assert not sweep.finished(root, run)
    config, workdir = get_config("mhc,debug"), storage.path(f"{root}/{run.name}")
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    (workdir / "data.json").write_text(json.dumps({"dir": "data/default", "fingerprint": "f", "tokenizer_sha256": "t"}))
    log = runlog.RunLog(str(workdir), config, start_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 4.0 / step, "eval_loss": 5.0 / step, "amax_forward": 1.0, "amax_backward": 1.0})
    log.close()
    assert [r["step"] for r in records(workdir)] == [1, 2, 3]
    runlog.RunLog(str(workdir), config, start_step=2).close()
    assert [r["step"] for r in records(workdir)] == [1, 2]
    runs = compare.find_runs([root])
    assert [r.name for r in runs] == [run.name] and runs[0].summary()["final_eval_loss"] == 2.5
    plots.plot_run(str(workdir))
    assert (workdir / "run.png").stat().length > 1000
    saved = checkpoint.Checkpoints(workdir, keep=2)
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    saved.save(5, state, {"step": 5})
    saved.wait()
    assert saved.steps() == [5] and saved.read_meta(5) == {"step": 5}
    restored = saved.manager.restore(5).state
    np.testing.assert_array_equal(restored["w"], state["w"])
    saved.close()
    assert not Path("gs:").exists() and not Path(tempfile.gettempdir(), "gs:").exists()


@pytest.mark.slow
def test_a_bucket_that_cannot_be_reached_is_one_line(server, tmp_path):
    """A bucket that does not exist: prepare_data.py stops with one line naming --out (exit 2); the
    other path flags go through the same check and name theirs."""
    missing = "gs://no-such-bucket"
    prepared = subprocess.run([sys.executable, "scripts/prepare_data.py", f"--out={missing}/data"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert_user_error(prepared, "--out: cannot reach gs://no-such-bucket/data", "no bucket no-such-bucket")
    for flag in ("--workdir", "--root"):  # train.py and eval.py; sweep.py
        with pytest.raises(UserError, match=f"^{flag}: cannot reach {missing}/run .*no bucket no-such-bucket"):
            storage.check_reachable(f"{missing}/run", flag)
    with pytest.raises(UserError, match=f"^data dir: cannot reach {missing}/data"):
        pipeline.load_manifest(f"{missing}/data")
    with pytest.raises(UserError, match="--source: gs://bucket/absent.jsonl does not exist"):
        prepare.prepare(tmp_path / "out", prepare.Recipe(sources=(f"{BUCKET}/absent.jsonl",)), command="test")


@pytest.mark.slow
def test_train_stop_resume_evaluate_sweep_and_compare_in_a_bucket(server, straight_run, default_data):
    """data.dir and --workdir in the bucket: SIGTERM, the same command resumes, and every loss equals
    the local straight run's; eval.py on the bucket's checkpoint; a sweep and compare.py on a
    bucket root."""
    data = f"{BUCKET}/data/default"
    upload(default_data, data)
    workdir = f"{BUCKET}/runs/hc"
    process = run_train(workdir, *STRAIGHT, data_dir=data, wait=False)
    stop_with_sigterm(process, workdir, after_lines=8)
    assert 8 <= losses(workdir)[-1][0] < 24
    resumed = run_train(workdir, *STRAIGHT, data_dir=data)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(workdir) == losses(straight_run)
    assert "Could not" not in resumed.stderr and "Traceback" not in resumed.stderr, resumed.stderr  # quiet clients

    evaluated = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", "--tasks=perplexity", "--limit=2"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((epath.Path(workdir) / "eval/24/results.json").read_text())
    assert results["tasks"]["perplexity"]["n"] == 2 and np.isfinite(results["tasks"]["perplexity"]["metrics"]["loss"])

    root = f"{BUCKET}/sweep"
    swept = subprocess.run([sys.executable, "scripts/sweep.py", f"--root={root}", "--variants=hc", "--scales=debug",
                            "--seeds=0", "--config.train.steps=2", "--config.train.eval_every=2",
                            "--config.log.progress=False", f"--config.data.dir={data}"],
                           cwd=ROOT, env={**os.environ, "XLA_FLAGS": xla_flags(1)},
                           capture_output=True, text=True, timeout=600)
    assert swept.returncode == 0, swept.stderr
    compared = subprocess.run([sys.executable, "scripts/compare.py", root], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert compared.returncode == 0, compared.stderr
    assert "### debug" in compared.stdout and "| hc | 1 |" in compared.stdout
    summary = json.loads((epath.Path(root) / "compare" / "summary.json").read_text())["debug"]
    assert summary["hc"]["final_eval_loss"]["mean"] == records(f"{root}/hc-debug-seed0")[-1]["eval_loss"]
    assert (epath.Path(root) / "compare" / "loss_vs_tokens.png").stat().length > 1000
