"""Safetensors on disk: validated headers for reading, a streaming writer for conversion.

MLX's own `mx.load` maps the data lazily, but it neither says which file is truncated nor lets
a writer emit one tensor at a time; these two small pieces fill exactly that gap.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np

from .env import parse_json, read_json
from .errors import CheckpointError

DTYPES: dict[str, mx.Dtype] = {
    "BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U8": mx.uint8,
    "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "U32": mx.uint32, "I32": mx.int32,
    "I64": mx.int64, "U64": mx.uint64, "BOOL": mx.bool_,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # where the tensor's bytes start in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].size


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a file declares, after checking that every byte they claim is there."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            raw_header = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    header = parse_json(raw_header, f"{path}: corrupt safetensors header", expect=dict,
                        error=CheckpointError)
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(_is_count(v) for v in (*shape, start, end)) or start > end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, path, 8 + n + start)
        if end - start != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name} size does not match its shape")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name} ends at byte {end}, "
                f"but only {data_size} data bytes are present"
            )
        out[name] = info
    return out


def to_bytes(array: mx.array) -> memoryview:
    """The raw little-endian bytes of an MLX array (bf16 included, which numpy lacks)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(array, copy=False)))


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order the header declares."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {"__metadata__": metadata or {"format": "mlx"}}
        offset = 0
        self._order = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].size
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self._partial = 0

    def write(self, name: str, data: bytes | memoryview) -> None:
        """Append bytes of tensor `name`; a large tensor may arrive in several pieces."""
        if self._next >= len(self._order):
            raise ValueError(f"writer got {name} after the last declared tensor")
        expected, nbytes = self._order[self._next]
        size = len(memoryview(data).cast("B"))
        if name != expected or self._partial + size > nbytes:
            raise ValueError(f"writer expected {expected} ({nbytes} bytes), got {name}")
        self._file.write(data)
        self._partial += size
        if self._partial == nbytes:
            self._next, self._partial = self._next + 1, 0

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise ValueError("safetensors file closed before every tensor was written")
        self._file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


INDEX_NAME = "model.safetensors.index.json"


def open_tensor_dir(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors model directory, looked up through its index if any.

    A layer may straddle two shards, so tensors are always found through the index's
    `weight_map`; each shard's header is checked against the bytes actually on disk.
    """
    index_file = path / INDEX_NAME
    if index_file.is_file():
        weight_map = read_json(index_file, expect=dict, error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: unreadable index (no weight_map object)")
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                file = path / shard
                if not file.is_file():
                    raise CheckpointError(f"{file}: shard listed in {INDEX_NAME} is missing")
                headers[shard] = read_header(file)
            if name not in headers[shard]:
                raise CheckpointError(f"{path / shard}: tensor {name} listed in the index "
                                      "is not in this shard")
            out[name] = headers[shard][name]
        return out
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
    out = {}
    for file in files:
        out.update(read_header(file))
    return out


def read_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows `start:stop` of a tensor's first axis, reading only their bytes from disk.

    Slicing a tensor from `mx.load` would read (and keep alive) the whole tensor; a rank of a
    distributed model needs only its experts' rows, which are contiguous on disk.
    """
    if not 0 <= start <= stop <= info.shape[0]:
        raise CheckpointError(f"{info.file}: rows {start}:{stop} outside tensor {info.name} "
                              f"of shape {list(info.shape)}")
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
    raw = DTYPES[info.dtype] if info.dtype != "BF16" else mx.uint16
    dtype = np.dtype(_NUMPY_NAMES[raw])
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset + start * row_bytes)
            data = np.fromfile(f, dtype=dtype, count=(stop - start) * row_bytes // dtype.itemsize)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read ({e.strerror})") from None
    rows = mx.array(data.reshape((stop - start, *info.shape[1:])))
    return rows.view(mx.bfloat16) if info.dtype == "BF16" else rows


_NUMPY_NAMES = {mx.float16: "<f2", mx.float32: "<f4", mx.uint8: "u1", mx.int8: "i1",
                mx.uint16: "<u2", mx.int16: "<i2", mx.uint32: "<u4", mx.int32: "<i4",
                mx.int64: "<i8", mx.uint64: "<u8", mx.bool_: "?"}


class LazyTensors:
    """Tensors by name, read lazily: each shard is opened once with `mx.load` (memory-mapped
    until evaluated) and a tensor's bytes are read only when something evaluates it.

    `streaming=True` (the converter) maps the shard anew for every tensor and keeps nothing, so
    an evaluated tensor is freed as soon as its last user drops it: memory stays bounded by
    one tensor instead of growing to the whole shard."""

    def __init__(self, infos: dict[str, TensorInfo], streaming: bool = False):
        self.infos = infos
        self.streaming = streaming
        self._shards: dict[Path, dict[str, mx.array]] = {}

    def __getitem__(self, name: str) -> mx.array:
        file = self.infos[name].file
        if file in self._shards:
            return self._shards[file][name]
        try:
            shard = mx.load(str(file))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError on bad files
            raise CheckpointError(f"{file}: cannot load ({e})") from None
        if not self.streaming:
            self._shards[file] = shard
        return shard[name]

    def __contains__(self, name: str) -> bool:
        return name in self.infos
