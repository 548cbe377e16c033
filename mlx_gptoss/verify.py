"""Check a converted model directory: its structure and, given the source, a sample of weights.

The structure check is what `load()` would trip over, found without building the model: the
config and its marker, the index against the shards, every tensor's name, shape and dtype
against the model's own parameters, truncated files, the vocabulary's SHA-256. The comparison
re-reads sampled tensors from both sides through the shared format mapping: experts (packed
MXFP4) and unquantized tensors must be identical; quantized modules, dequantized, must equal the
source quantized with the recorded settings and dequantized (their error against the source
floats is reported).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .config import ModelConfig, QuantizationConfig, load_config
from .env import read_json
from .errors import ConfigError, VerificationError
from .formats import CONVERTED_MARKER, canonical_tensors
from .safetensors_io import INDEX_NAME, LazyTensors, open_tensor_dir



@dataclass
class VerifyReport:
    model: Path
    num_tensors: int
    tensor_bytes: int
    compared: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)  # the compared ones that were quantized
    max_quantization_error: float = 0.0  # quantized modules vs the source floats

    def summary(self) -> str:
        lines = [f"{self.model}: structure OK ({self.num_tensors} tensors, "
                 f"{self.tensor_bytes} bytes)"]
        if self.compared:
            exact = len(self.compared) - len(self.quantized)
            line = f"compared {len(self.compared)} tensors with the source: {exact} identical"
            if self.quantized:  # these are not identical, and must not be called so
                line += (f", {len(self.quantized)} quantized exactly as the converter does "
                         f"(largest |dequantized - source| {self.max_quantization_error:.3g})")
            lines.append(line)
        return "\n".join(lines)


def check_structure(model_dir: Path) -> tuple[ModelConfig, dict]:
    """Raises `GptOssError` naming the first problem found."""
    from .formats import mlx_dir
    from .harmony.tokenizer import VOCAB_FILENAME, find_vocabulary

    cfg = load_config(model_dir)
    raw = read_json(model_dir / "config.json", expect=dict, error=ConfigError)
    if CONVERTED_MARKER not in raw:
        raise VerificationError(f"{model_dir / 'config.json'}: no {CONVERTED_MARKER!r} "
                                "section (not a directory written by mlx-gptoss convert)")
    if not (model_dir / INDEX_NAME).is_file():
        raise VerificationError(f"{model_dir}: missing {INDEX_NAME}")
    infos = open_tensor_dir(model_dir)  # index vs shards, truncation
    listed = {info.file.name for info in infos.values()}
    for file in sorted(model_dir.glob("*.safetensors")):
        if file.name not in listed:
            raise VerificationError(f"{file}: shard not listed in {INDEX_NAME}")
    mlx_dir.validate(cfg, infos)
    if not (model_dir / VOCAB_FILENAME).is_file():
        raise VerificationError(f"{model_dir}: missing {VOCAB_FILENAME} (the converted "
                                "directory should work offline)")
    find_vocabulary(model_dir)  # checks the SHA-256
    return cfg, infos


_CHUNK_ROWS_BYTES = 64 * 2**20


def _quantized_rows_match(parts: list[mx.array], source: mx.array, q: QuantizationConfig
                          ) -> tuple[bool, float]:
    """Dequantized `parts` (weight, scales[, biases]) == the source quantized the same way,
    row chunk by row chunk so a 1 GB embedding never exists in float32 at once; also returns
    the largest |dequantized - source|."""
    mx.eval(source, *parts)
    step = max(1, _CHUNK_ROWS_BYTES // max(1, 4 * source.shape[-1]))
    worst = 0.0
    for start in range(0, source.shape[0], step):
        rows = slice(start, start + step)
        got = mx.dequantize(*[p[rows] for p in parts[:2]], parts[2][rows] if len(parts) > 2
                            else None, group_size=q.group_size, bits=q.bits, mode=q.mode)
        redo = mx.quantize(source[rows], group_size=q.group_size, bits=q.bits, mode=q.mode)
        want = mx.dequantize(*redo[:2], redo[2] if len(redo) > 2 else None,
                             group_size=q.group_size, bits=q.bits, mode=q.mode)
        if not mx.array_equal(got, want).item():
            return False, worst
        error = mx.abs(got.astype(mx.float32) - source[rows].astype(mx.float32)).max()
        worst = max(worst, float(error))
    return True, worst


def sample_layers(cfg: ModelConfig) -> set[int]:
    n = cfg.num_hidden_layers
    return {0, n // 2, n - 1}


def verify(model_dir: str | Path, against: str | Path | None = None) -> VerifyReport:
    """Check `model_dir`; with `against` (the source), compare the global tensors and three
    layers' tensors (first, middle, last) dequantized."""
    model_dir = Path(model_dir)
    cfg, infos = check_structure(model_dir)
    report = VerifyReport(model_dir, len(infos), sum(i.nbytes for i in infos.values()))
    if against is None:
        return report
    src = Path(against)
    fused = read_json(model_dir / "config.json", expect=dict,
                      error=ConfigError).get("mlx_gptoss_fused_adapter")
    if isinstance(fused, dict):  # recorded by `fuse`: differing from the source is its point
        raise VerificationError(
            f"{model_dir} has the adapter {fused.get('adapter')} fused into its weights, so "
            f"they differ from {src} by design; verify it without --against (its structure)")
    src_cfg = load_config(src)
    if dataclasses.replace(cfg, quantization=None) != src_cfg:
        raise VerificationError(f"{model_dir}: config.json does not describe the same model as "
                                f"{src / 'config.json'}")
    _, source = canonical_tensors(src, src_cfg, read_json(src / "config.json", expect=dict,
                                                       error=ConfigError),
                                  streaming=True)
    ours = LazyTensors(infos, streaming=True)
    q = cfg.quantization
    layers = sample_layers(cfg)
    for name, want in source:
        if ".layers." in name and int(name.split(".")[2]) not in layers:
            continue
        module = name[: -len(".weight")]
        if name.endswith(".weight") and f"{module}.scales" in infos \
                and ".mlp.experts." not in name:
            suffixes = ("weight", "scales", "biases")
            parts = [ours[f"{module}.{x}"] for x in suffixes if f"{module}.{x}" in infos]
            same, error = _quantized_rows_match(parts, want, q)
            report.max_quantization_error = max(report.max_quantization_error, error)
            report.quantized.append(name)
        elif name in infos:
            got = ours[name]  # experts: the packed MXFP4 bytes themselves
            if got.dtype != want.dtype:  # e.g. an fp32 source written as is; compare values
                got, want = got.astype(mx.float32), want.astype(mx.float32)
            same = got.shape == want.shape and mx.array_equal(got, want).item()
        else:
            raise VerificationError(f"{model_dir}: tensor {name} is missing")
        if not same:
            raise VerificationError(f"{model_dir}: tensor {name} differs from the source "
                                    f"{src}")
        report.compared.append(name)
    return report
