"""TensorBoard scalars without TensorFlow: a small writer of TensorBoard event files.

An event file is TFRecord framing around serialized tensorflow `Event` protobufs; the few messages
needed for scalars are encoded here by hand, so training writes TensorBoard scalars beside
metrics.jsonl with neither TensorFlow nor protobuf installed.
"""

import numbers
import os
import socket
import struct
import time

import numpy as np

from mhc_jax import storage

_CRC_TABLE = []
for _n in range(256):
    for _ in range(8):
        _n = (_n >> 1) ^ 0x82F63B78 if _n & 1 else _n >> 1  # Castagnoli polynomial, bit-reflected
    _CRC_TABLE.append(_n)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n, out = n & 0xFFFFFFFFFFFFFFFF, bytearray()  # an int64 as protobuf writes it (a negative one in 10 bytes)
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return bytes(out) + bytes([n])


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class TensorBoardWriter:
    """Appends to a local event file; on a bucket (no appends there) flush rewrites the whole file."""

    def __init__(self, logdir):
        folder = storage.path(logdir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._buffer = bytearray() if storage.is_remote(logdir) else None
        self._file = None if self._buffer is not None else self.path.open("ab")
        self._write(_field(3, b"brain.Event:2"))
        self.flush()

    def _write(self, fields: bytes) -> None:
        """One TFRecord (uint64 length, masked crc32c of it, data, masked crc32c of it) holding
        Event{1 wall_time double, 2 step int64, 3 file_version string, 5 summary Summary}."""
        data = b"\x09" + struct.pack("<d", time.time()) + fields
        length = struct.pack("<Q", len(data))
        (self._buffer.extend if self._buffer is not None else self._file.write)(
            length + _masked_crc(length) + data + _masked_crc(data))

    def write_scalars(self, step: int, scalars: dict) -> None:
        """One Event at `step` with every real-number value of `scalars` (bools, lists, strings skipped)."""
        with np.errstate(over="ignore"):  # beyond float32's range: inf
            values = b"".join(  # Summary{repeated Value value = 1}, Value{1 tag string, 2 simple_value float}
                _field(1, _field(1, str(k).encode()) + b"\x15" + np.asarray(float(v), "<f4").tobytes())
                for k, v in scalars.items() if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)))
        self._write(b"\x10" + _varint(int(step)) + _field(5, values))

    def flush(self) -> None:
        if self._buffer is not None:
            self.path.write_bytes(bytes(self._buffer))
        elif self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
