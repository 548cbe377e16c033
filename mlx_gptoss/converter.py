"""Convert a gpt-oss checkpoint (any layout `formats` reads) into a self-contained MLX model dir.

The source is read through `formats.canonical_tensors`, the same mapping `load()` uses, in
streaming mode: one tensor is evaluated, written and dropped before the next, so peak memory is
about the largest single tensor, whatever the model size. MXFP4 experts are repacked byte for
byte; the other linears can optionally be quantized (recorded in config.json so `load()`
rebuilds the same modules). Output goes to a temporary directory beside DST, renamed into place
only when complete: a failure or Ctrl-C leaves nothing at DST.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .config import (DEFAULT_QUANTIZED_MODULES, QUANTIZATION_MODES, ExpertsConfig,
                     ModelConfig, QuantizationConfig, load_config)
from .env import read_json
from .errors import CheckpointError, ConfigError, ConversionError
from .formats import CONVERTED_MARKER, FORMATS, canonical_tensors
from .loading import QUANTIZABLE_MODULES
from .safetensors_io import DTYPE_NAMES, DTYPES, INDEX_NAME, SafetensorsWriter, to_bytes

FORMAT_VERSION = 1
CONVERTER_VERSION = "0.1.0"
MAX_SHARD_BYTES = 5 * 10**9
# Quantize big matrices this many bytes of source rows at a time (row groups are independent).
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].size


@dataclass(frozen=True)
class ConversionReport:
    source_format: str
    destination: Path
    output_bytes: int  # every file in DST
    tensor_bytes: int  # the safetensors payload
    bytes_per_token: int  # weights one decoded token reads
    num_shards: int
    quantization: QuantizationConfig | None
    seconds: float

    def summary(self) -> str:
        q = self.quantization
        quant = "none" if q is None else f"{q.mode} {q.bits}-bit, group {q.group_size}, " \
                                         f"modules {', '.join(q.modules)}"
        return (f"quantization of non-expert weights: {quant}\n"
                f"wrote {self.destination}: {human_bytes(self.output_bytes)} in "
                f"{self.num_shards} shard(s) ({self.output_bytes} bytes), "
                f"{self.seconds:.1f} s\n"
                f"bytes read per decoded token: {human_bytes(self.bytes_per_token)}")


def human_bytes(n: float) -> str:
    """Decimal units, as disk sizes are usually quoted (the 20b checkpoint is "13.8 GB")."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def quantization_config(mode: str = "affine", bits: int | None = None,
                        group_size: int | None = None, router: bool = False
                        ) -> QuantizationConfig:
    """The settings `--quantize` records; bits/group default per mode as in `mx.quantize`.
    Values are checked against `QUANTIZATION_MODES` before MLX sees them."""
    if mode not in QUANTIZATION_MODES:
        raise ConversionError(f"unknown quantization mode {mode!r}; use one of "
                              f"{', '.join(QUANTIZATION_MODES)}")
    d_bits, d_group, _, _ = QUANTIZATION_MODES[mode]
    modules = DEFAULT_QUANTIZED_MODULES + (("router",) if router else ())
    try:
        q = QuantizationConfig(mode=mode, bits=d_bits if bits is None else bits,
                               group_size=d_group if group_size is None else group_size,
                               modules=modules)
    except ConfigError as e:
        raise ConversionError(f"--q-bits/--q-group-size: {e}") from None
    try:  # let MLX itself say whether it supports the combination
        mx.eval(mx.quantize(mx.zeros((1, q.group_size * 4)), group_size=q.group_size,
                            bits=q.bits, mode=q.mode))
    except (ValueError, RuntimeError) as e:
        raise ConversionError(f"unsupported quantization {mode} bits={q.bits} "
                              f"group_size={q.group_size}: {e}") from None
    return q


# ---- planning --------------------------------------------------------------------------
def _quantized_module(name: str, q: QuantizationConfig | None) -> str | None:
    """The module path if `name` is the weight of a module `q` quantizes."""
    if q is None or not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    return module if any(QUANTIZABLE_MODULES[m](module) for m in q.modules) else None


def _quantized_layout(shape: tuple[int, ...], dtype: mx.Dtype, q: QuantizationConfig
                      ) -> list[tuple[str, mx.Dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of each `mx.quantize` output for a weight of `shape`."""
    if shape[-1] % q.group_size:
        raise ConversionError(f"cannot quantize a weight of shape {list(shape)} with group "
                              f"size {q.group_size} (its last dimension must be a multiple)")
    outs = mx.quantize(mx.zeros((1, shape[-1]), dtype=dtype), group_size=q.group_size,
                       bits=q.bits, mode=q.mode)
    suffixes = ("weight", "scales", "biases")
    return [(s, o.dtype, (*shape[:-1], o.shape[-1])) for s, o in zip(suffixes, outs)]


def plan_tensors(tensors: Iterator[tuple[str, mx.array]], q: QuantizationConfig | None
                 ) -> list[list[PlannedTensor]]:
    """The output tensors (name, dtype, shape) of each source tensor, from the lazy arrays
    alone: nothing is read. A quantized weight becomes weight, scales (and biases)."""
    out = []
    for name, array in tensors:
        module = _quantized_module(name, q)
        if module is None:
            out.append([PlannedTensor(name, DTYPE_NAMES[array.dtype], tuple(array.shape))])
            continue
        out.append([PlannedTensor(f"{module}.{suffix}", DTYPE_NAMES[dtype], shape) for
                    suffix, dtype, shape in _quantized_layout(tuple(array.shape), array.dtype, q)])
    return out


def plan_shards(groups: list[list[PlannedTensor]], max_bytes: int = MAX_SHARD_BYTES
                ) -> list[list[list[PlannedTensor]]]:
    """Consecutive groups packed into files of at most `max_bytes` (a bigger group alone);
    a group (one source tensor's outputs) never straddles two files."""
    shards: list[list[list[PlannedTensor]]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def bytes_per_token(cfg: ModelConfig, sizes: dict[str, int]) -> int:
    """Weight bytes one decoded token reads: active experts only, one embedding row."""
    total = 0.0
    for name, nbytes in sizes.items():
        if ".mlp.experts." in name:
            total += nbytes * cfg.num_experts_per_tok / cfg.num_local_experts
        elif "embed_tokens" in name and not cfg.tie_word_embeddings:
            total += nbytes / cfg.vocab_size
        else:
            total += nbytes
    return round(total)


# ---- writing ---------------------------------------------------------------------------
class Progress:
    """A byte-count progress line on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.start = self._last = time.monotonic()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def close(self) -> None:
        """End a half-drawn terminal line, so an error message starts on its own line."""
        if self.enabled and self.tty and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last > (0.2 if self.tty else 5.0)
                             or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            line = (f"converting {100 * self.done / max(self.total, 1):5.1f}% "
                    f"{human_bytes(self.done)} / {human_bytes(self.total)} "
                    f"({human_bytes(rate)}/s)")
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            if self.tty and self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()


def _evaluate(name: str, *arrays: mx.array) -> None:
    try:
        mx.eval(*arrays)
    except (RuntimeError, ValueError) as e:  # mlx's own errors on unreadable data
        raise CheckpointError(f"failed to read the source of {name} ({e})") from None


def _write_array(writer: SafetensorsWriter, name: str, array: mx.array,
                 progress: Progress) -> None:
    _evaluate(name, array)
    data = to_bytes(array)
    writer.write(name, data)
    progress.update(data.nbytes)


def _write_quantized(writer: SafetensorsWriter, group: list[PlannedTensor], weight: mx.array,
                     q: QuantizationConfig, progress: Progress) -> None:
    """Quantize row chunks (groups run along rows, so chunks are exact), streaming the packed
    weight; the small scales (and biases) are kept and follow it."""
    _evaluate(group[0].name, weight)
    rows = weight.shape[0]
    step = max(1, _CHUNK_BYTES // max(1, weight.nbytes // max(rows, 1)))
    extras: list[list[np.ndarray]] = []
    for start in range(0, rows, step):
        outs = mx.quantize(weight[start:start + step], group_size=q.group_size, bits=q.bits,
                           mode=q.mode)
        mx.eval(outs)
        data = to_bytes(outs[0])
        writer.write(group[0].name, data)
        progress.update(data.nbytes)
        extras.append([np.array(to_bytes(o)) for o in outs[1:]])
        del outs
    del weight
    for k, planned in enumerate(group[1:]):
        for chunk in extras:
            writer.write(planned.name, memoryview(chunk[k]).cast("B"))
            progress.update(chunk[k].nbytes)


def _write_shards(tensors: Iterator[tuple[str, mx.array]],
                  shards: list[list[list[PlannedTensor]]], out_dir: Path,
                  q: QuantizationConfig | None, progress: Progress) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    tensors = iter(tensors)
    for index, shard in enumerate(shards):
        file = shard_name(index, len(shards))
        entries = [(t.name, t.dtype, t.shape) for group in shard for t in group]
        with SafetensorsWriter(out_dir / file, entries, {"format": "mlx"}) as writer:
            for group in shard:
                name, array = next(tensors)
                if _quantized_module(name, q) is None:
                    _write_array(writer, name, array, progress)
                else:
                    _write_quantized(writer, group, array, q, progress)
                del array
        weight_map.update({name: file for name, *_ in entries})
    return weight_map


def _copy_side_files(src: Path, out_dir: Path, vocab: Path | None) -> None:
    from .harmony.tokenizer import copy_vocabulary

    for candidate in (src / "generation_config.json", src.parent / "generation_config.json"
                      if src.name == "original" else None):
        if candidate is not None and candidate.is_file():
            shutil.copyfile(candidate, out_dir / "generation_config.json")
            break
    copy_vocabulary(out_dir, vocab)


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ConversionError(f"{dst}: the destination must not be or contain the source "
                              f"{src}")
    ancestor = dst.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"{dst}: cannot write there ({ancestor} is not a writable "
                              "directory)")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ConversionError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"{dst}: destination exists and is not empty "
                              "(use --force to replace it)")


def _os_error(dst: Path, e: OSError) -> ConversionError:
    reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = e.filename or dst
    return ConversionError(f"conversion failed: {where}: {reason}; nothing was written to "
                           f"{dst}")


def convert(hf_path: str | Path, mlx_path: str | Path, *,
            quantization: QuantizationConfig | None = None, force: bool = False,
            progress: bool = True, vocab: str | Path | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES,
            log: Callable[[str], None] | None = None,
            transform: Callable[[Iterator[tuple[str, mx.array]]],
                                Iterator[tuple[str, mx.array]]] | None = None,
            experts: ExpertsConfig | None = None) -> ConversionReport:
    """Convert the checkpoint at `hf_path` into an MLX model directory at `mlx_path`.

    `quantization` (see `quantization_config`) quantizes the non-expert modules it names;
    experts always stay MXFP4. `progress` draws a byte progress bar on stderr; `log` gets the
    detected format before the work starts. Raises a `GptOssError` on bad input or an
    unwritable destination, leaving nothing at `mlx_path`; KeyboardInterrupt also cleans up,
    then propagates. `transform(tensors)` may replace the stream of (name, lazy array) pairs
    (`fuse` merges LoRA updates so); it is run twice (once to plan the files from the lazy
    shapes, once to write), must be lazy and must give the same names and shapes each time.
    `experts` records a changed expert storage (`fuse --experts`; default: the source's).
    """
    started = time.monotonic()
    src, dst = Path(hf_path), Path(mlx_path)
    log = log or (lambda line: None)
    if not src.is_dir():
        raise ConversionError(f"{src}: source directory not found")
    cfg = load_config(src)
    raw = read_json(src / "config.json", expect=dict, error=ConfigError)
    fmt, tensors = canonical_tensors(src, cfg, raw, streaming=True)
    tensors = _transformed(tensors, transform)
    log(f"source format: {fmt} ({FORMATS[fmt]})")
    _check_destination(src, dst, force)
    groups = plan_tensors(tensors, quantization)
    planned = [t for group in groups for t in group]
    shards = plan_shards(groups, max_shard_bytes)
    out_cfg = dataclasses.replace(cfg, quantization=quantization,
                                  experts=experts or cfg.experts).to_hf_dict()
    out_cfg[CONVERTED_MARKER] = {
        "format_version": FORMAT_VERSION, "converter_version": CONVERTER_VERSION,
        "source_format": fmt,
        "quantization": None if quantization is None else out_cfg["mlx_quantization"],
        "max_shard_bytes": max_shard_bytes,
    }

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
        # mkdtemp makes the directory private; the model directory gets the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    except OSError as e:
        raise _os_error(dst, e) from None
    try:
        _copy_side_files(src, tmp, Path(vocab) if vocab is not None else None)
        total = sum(t.nbytes for t in planned)
        _, tensors = canonical_tensors(src, cfg, raw, streaming=True)
        tensors = _transformed(tensors, transform)
        bar = Progress(total, progress)
        try:
            weight_map = _write_shards(tensors, shards, tmp, quantization, bar)
        finally:
            bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2))
        _replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(dst, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {t.name: t.nbytes for t in planned}
    return ConversionReport(
        source_format=fmt, destination=dst,
        output_bytes=sum(f.stat().st_size for f in dst.iterdir() if f.is_file()),
        tensor_bytes=total, bytes_per_token=bytes_per_token(cfg, sizes),
        num_shards=len(shards), quantization=quantization,
        seconds=time.monotonic() - started)


def _transformed(tensors: Iterator[tuple[str, mx.array]],
                 transform: Callable[[Iterator[tuple[str, mx.array]]],
                                     Iterator[tuple[str, mx.array]]] | None
                 ) -> Iterator[tuple[str, mx.array]]:
    return tensors if transform is None else transform(tensors)


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished directory into place; a replaced DST is removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
