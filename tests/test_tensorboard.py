"""The TensorBoard event-file writer (mhc_jax/training/tensorboard_writer.py), read back by TensorBoard's own
reader (the tensorboard package, without TensorFlow: its pure-Python record reader checks CRCs)."""

import math

import numpy as np
from etils import epath
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat import tf as tb_tf

from mhc_jax import storage
from mhc_jax.training import tensorboard_writer

# Multi-byte varint steps (300, 2**40) and every kind of value write_scalars takes or skips.
STEPS = [0, 1, 300, 2**40]


def scalars(step):
    return {"train/loss": 3.0 / (step + 1), "train/lr": np.float32(1e-3 * (step % 7)), "tokens": step * 4096,
            "grad_norm": np.float64("nan") if step == 1 else 0.5, "overflow": 1e39,
            "per_layer": [1.0, 2.0], "name": "mhc", "stopped": False, "np_flag": np.bool_(True)}


EXPECTED_TAGS = {"train/loss", "train/lr", "tokens", "grad_norm", "overflow"}


def write(logdir, steps=STEPS):
    writer = tensorboard_writer.TensorBoardWriter(logdir)
    for step in steps:
        writer.write_scalars(step, scalars(step))
    writer.close()
    return writer.path


def check_scalars(logdir, steps=STEPS):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == EXPECTED_TAGS
    for tag in EXPECTED_TAGS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps
        for e in events:
            with np.errstate(over="ignore"):
                want = np.float32(np.float64(scalars(e.step)[tag]))  # float32 precision; 1e39 becomes inf
            assert (math.isnan(e.value) and math.isnan(want)) or e.value == want, (tag, e.step, e.value, want)
    assert math.isnan(acc.Scalars("grad_norm")[1].value)
    assert acc.Scalars("overflow")[0].value == math.inf


def events(path):
    return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def test_round_trip(tmp_path):
    path = write(tmp_path)
    assert path.parent == tmp_path and path.name.startswith("events.out.tfevents.") and path.name.endswith(".0")
    check_scalars(tmp_path)
    first, *rest = events(path)
    assert first.file_version == "brain.Event:2" and first.wall_time > 0
    assert [e.step for e in rest] == STEPS
    assert all(len(e.summary.value) == len(EXPECTED_TAGS) for e in rest)


def test_local_file_appends_on_flush(tmp_path):
    writer = tensorboard_writer.TensorBoardWriter(tmp_path)
    writer.write_scalars(5, {"loss": 1.5})
    writer.flush()
    assert [e.step for e in events(writer.path)][1:] == [5]  # readable before close
    writer.write_scalars(6, {"loss": 1.25})
    writer.close()
    assert [(e.step, e.summary.value[0].simple_value) for e in events(writer.path)[1:]] == [(5, 1.5), (6, 1.25)]


def test_remote_path_rewritten_whole_on_flush(tmp_path, monkeypatch):
    """A bucket path (no appends): the writer buffers and rewrites the file; here 'gs://b/run' maps to a local folder."""
    monkeypatch.setattr(storage, "path", lambda d: epath.Path(tmp_path / str(d).split("://")[1]))
    writer = tensorboard_writer.TensorBoardWriter("gs://bucket/run")
    assert writer._file is None
    writer.write_scalars(0, scalars(0))
    writer.flush()
    assert [e.step for e in events(writer.path)] == [0, 0]  # the file_version event, then step 0
    for step in STEPS[1:]:
        writer.write_scalars(step, scalars(step))
    writer.close()
    check_scalars(tmp_path / "bucket/run")  # no duplicated records from the two flushes


def test_crc32c_known_vector():
    assert tensorboard_writer.crc32c(b"123456789") == 0xE3069283
    assert tensorboard_writer.crc32c(b"") == 0


def test_reader_rejects_a_flipped_byte(tmp_path):
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    first_len = int.from_bytes(data[:8], "little")
    second = 8 + 4 + first_len + 4  # where the second record (the first scalars) begins
    data[second + 12 + 5] ^= 0x01  # a byte inside its data
    path.write_bytes(bytes(data))
    # TensorBoard's pure-Python record reader checks the data CRC and raises DataLossError ...
    reader = tb_tf.pywrap_tensorflow.PyRecordReader_New(str(path))
    reader.GetNext()  # the untouched first record
    try:
        reader.GetNext()
        raise AssertionError("the corrupted record was read without a CRC error")
    except tb_tf.errors.DataLossError as e:
        assert "failed event crc32 check" in str(e)
    # ... which its event loader swallows: it stops at the bad record, so only the file_version event remains.
    assert [e.file_version for e in events(path)] == ["brain.Event:2"]
