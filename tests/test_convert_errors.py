"""Bad input and interruptions: exit code non-zero, one line on stderr, nothing left at DST.
Also the `convert`/`verify` commands in-process and as real subprocesses."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, subprocess_env

from mlx_gptoss.cli import main
from mlx_gptoss.loading import load_model
from mlx_gptoss.safetensors_io import INDEX_NAME, SafetensorsWriter



def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def src(checkpoint_factory, tmp_path) -> Path:
    """A private copy of a tiny hub checkpoint, free to corrupt."""
    return Path(shutil.copytree(checkpoint_factory("convert_errors", seed=2), tmp_path / "src"))


def shard_of(path: Path, tensor: str) -> Path:
    return path / json.loads((path / INDEX_NAME).read_text())["weight_map"][tensor]


def rewrite(path: Path, tensor: str, value: mx.array | None, new_name: str | None = None):
    """Replace (or add, under `new_name`) one tensor in the shard that holds `tensor`."""
    shard = shard_of(path, tensor)
    arrays = dict(mx.load(str(shard)))
    arrays[new_name or tensor] = value
    mx.save_safetensors(str(shard), arrays, {"format": "pt"})
    if new_name:
        index = json.loads((path / INDEX_NAME).read_text())
        index["weight_map"][new_name] = shard.name
        (path / INDEX_NAME).write_text(json.dumps(index))


def expect_failure(capsys, src: Path, dst: Path, message: str, *extra, code: int = 2) -> str:
    got, out, err = cli(capsys, "convert", "--hf-path", src, "--mlx-path", dst, *extra)
    assert got == code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err + out
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]
    return lines[0]


ROUTER_BIAS = "model.layers.1.mlp.router.bias"
SCALES = "model.layers.1.mlp.experts.down_proj_scales"


@pytest.mark.parametrize("case", ["truncated", "missing_shard", "missing_tensor",
                                  "unknown_tensor", "wrong_shape", "wrong_dtype", "not_gpt_oss",
                                  "no_config"])
def test_bad_source(capsys, src, tmp_path, case):
    if case == "truncated":
        shard = shard_of(src, SCALES)
        shard.write_bytes(shard.read_bytes()[:-100])
        message = f"{shard}: truncated"
    elif case == "missing_shard":
        shard_of(src, SCALES).unlink()
        message = "listed in model.safetensors.index.json is missing"
    elif case == "missing_tensor":
        index = json.loads((src / INDEX_NAME).read_text())
        del index["weight_map"][ROUTER_BIAS]
        (src / INDEX_NAME).write_text(json.dumps(index))
        message = f"missing tensor {ROUTER_BIAS}"
    elif case == "unknown_tensor":
        rewrite(src, ROUTER_BIAS, mx.zeros((3,)), new_name="model.layers.1.mlp.extra")
        message = "unknown tensor model.layers.1.mlp.extra"
    elif case == "wrong_shape":
        rewrite(src, ROUTER_BIAS, mx.zeros((5,), dtype=mx.bfloat16))
        message = f"tensor {ROUTER_BIAS} has shape [5], expected [4]"
    elif case == "wrong_dtype":
        rewrite(src, SCALES, mx.zeros((4, 64, 2), dtype=mx.bfloat16))
        message = f"tensor {SCALES} has dtype BF16, expected U8"
    elif case == "not_gpt_oss":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        message = "model_type is 'llama', expected 'gpt_oss'"
    else:
        (src / "config.json").unlink()
        message = "no config.json"
    expect_failure(capsys, src, tmp_path / "dst", message)


def test_unwritable_destination(capsys, src, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = cli(capsys, "convert", "--hf-path", src, "--mlx-path", blocker / "dst")
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write there ({blocker} is not a writable directory)" in err
    assert blocker.read_text() == "not a directory"


def _failing_writes(monkeypatch, exc: BaseException, after: int = 5) -> None:
    original = SafetensorsWriter.write
    calls = {"n": 0}

    def write(self, name, data):
        calls["n"] += 1
        if calls["n"] == after:
            raise exc
        return original(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", write)


def test_full_disk(capsys, src, tmp_path, monkeypatch):
    _failing_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), after=40)
    expect_failure(capsys, src, tmp_path / "dst", "disk full; nothing was written to")


def test_ctrl_c_mid_write(capsys, src, tmp_path, monkeypatch):
    _failing_writes(monkeypatch, KeyboardInterrupt(), after=40)
    expect_failure(capsys, src, tmp_path / "dst", "interrupted", code=130)


def test_existing_destination_needs_force(capsys, src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "convert", "--hf-path", src, "--mlx-path", dst)
    assert code == 2 and "not empty (use --force" in err
    assert (dst / "keep.txt").read_text() == "mine"
    code, out, _ = cli(capsys, "convert", "--hf-path", src, "--mlx-path", dst, "--force")
    assert code == 0 and "source format: hf" in out
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    load_model(dst)
    # An empty directory is fine without --force; the source itself never is.
    (tmp_path / "empty").mkdir()
    assert cli(capsys, "convert", "--hf-path", src, "--mlx-path", tmp_path / "empty")[0] == 0
    code, _, err = cli(capsys, "convert", "--hf-path", src, "--mlx-path", src, "--force")
    assert code == 2 and "must not be" in err and (src / "config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--q-bits", "8"], "need --quantize"),
    (["--quantize", "--q-mode", "fancy"], "unknown quantization mode 'fancy'"),
    (["--quantize", "--q-bits", "3", "--q-group-size", "128"], "cannot quantize a weight"),
])
def test_bad_quantization_options(capsys, src, tmp_path, args, message):
    expect_failure(capsys, src, tmp_path / "dst", message, *args)


@pytest.mark.slow
def test_verify(capsys, src, tmp_path):
    dst = tmp_path / "dst"
    code, out, _ = cli(capsys, "convert", "--hf-path", src, "--mlx-path", dst, "--quantize",
                       "--q-bits", "8")
    assert code == 0 and "affine 8-bit, group 64" in out
    code, out, err = cli(capsys, "verify", "--model", dst, "--against", src)
    assert code == 0 and "structure OK" in out and "identical" in out, err
    # A converted directory that does not match the source: one flipped expert byte.
    name = "model.layers.1.mlp.experts.down.weight"
    arrays = dict(mx.load(str(shard_of(dst, name))))
    flipped = np.array(arrays[name]).copy()
    flipped.flat[0] ^= 1
    arrays[name] = mx.array(flipped)
    mx.save_safetensors(str(shard_of(dst, name)), arrays, {"format": "mlx"})
    assert cli(capsys, "verify", "--model", dst)[0] == 0  # structure alone is still fine
    code, _, err = cli(capsys, "verify", "--model", dst, "--against", src)
    assert code == 2 and f"tensor {name} differs" in err
    # ... and in a quantized module (compared dequantized against the re-quantized source).
    name = "lm_head.scales"
    arrays = dict(mx.load(str(shard_of(dst, name))))
    arrays[name] = arrays[name] * 1.5
    mx.save_safetensors(str(shard_of(dst, name)), arrays, {"format": "mlx"})
    code, _, err = cli(capsys, "verify", "--model", dst, "--against", src)
    assert code == 2 and "tensor lm_head.weight differs" in err
    (dst / "o200k_base.tiktoken").unlink()
    code, _, err = cli(capsys, "verify", "--model", dst)
    assert code == 2 and "missing o200k_base.tiktoken" in err
    code, _, err = cli(capsys, "verify", "--model", src)
    assert code == 2 and "not a directory written by mlx-gptoss convert" in err


@pytest.mark.slow
def test_subprocess_script_and_console(src, tmp_path):
    """The real thing: `python convert/convert.py` from the checkout, then a failing command."""
    env = subprocess_env(PYTHONPATH="")  # the script finds the checkout by itself
    dst = tmp_path / "dst"
    done = subprocess.run([sys.executable, str(ROOT / "convert" / "convert.py"), "--hf-path",
                           str(src), "--mlx-path", str(dst)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "source format: hf" in done.stdout and "bytes read per decoded token" in done.stdout
    assert "converting 100.0%" in done.stderr  # the progress bar (non-tty: whole lines)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    failed = subprocess.run([sys.executable, "-c", "from mlx_gptoss.cli import main; main()",
                             "convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "x")],
                            env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"error: {src / 'config.json'}: model_type is 'llama', expected 'gpt_oss'"]
    assert not (tmp_path / "x").exists()
