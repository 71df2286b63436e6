"""The safetensors format, read and written without torch.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the tensors' raw bytes.
The header maps each tensor's name to its dtype, shape and [begin, end) byte offsets into the data
that follows; an optional "__metadata__" entry holds string pairs. The `safetensors` library (and
so `save_pretrained`) writes the header compact, metadata first, then the tensors in the order of
their data: larger element sizes first, names ascending within a size; it pads the header with
spaces to a multiple of 8 bytes. `write` does the same, so a folder read and written back is byte
for byte what the library wrote.
"""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


class FormatError(ValueError):
    """The file is not a readable safetensors file (the message says why)."""


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a file, in its order, and its metadata."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise FormatError(f"{path}: {len(data)} bytes, too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as e:
        raise FormatError(f"{path}: its header is not JSON ({e})") from None
    metadata = header.pop("__metadata__", {}) or {}
    tensors, body = {}, memoryview(data)[8 + size:]
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise FormatError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not one of {', '.join(DTYPES)}")
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if end > len(body) or end - begin != dtype.itemsize * int(np.prod(entry["shape"])):
            raise FormatError(f"{path}: tensor {name}'s bytes [{begin}, {end}) do not hold {entry['shape']} "
                              f"{entry['dtype']} in a data section of {len(body)} bytes (truncated?)")
        tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(entry["shape"])
    return tensors, metadata


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """The tensors as the safetensors library writes them (see the module's docstring)."""
    order = sorted(tensors, key=lambda name: (-np.dtype(tensors[name].dtype).itemsize, name))
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in order:
        array = tensors[name]
        header[name] = {"dtype": NAMES[np.dtype(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
