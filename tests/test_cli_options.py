"""Issue 19, items 2, 4, 5 and 9: options are checked before any work (and before MLX sees
them), every error is one `error:` line with exit code 2, help fits 80 columns, stats are their
own flag. In-process through the real entry point; a bogus model path proves that a check ran
before the model was looked for."""
from __future__ import annotations

import json
import sys

import pytest
from cli_runner import cli, one_line

from mlx_gptoss import __version__
from mlx_gptoss.cli import main
from mlx_gptoss.config import QUANTIZATION_MODES, QuantizationConfig, load_config
from mlx_gptoss.errors import ConfigError, GptOssError
from mlx_gptoss.synthetic import TINY, hf_config

COMMANDS = [["demo"], ["convert"], ["verify"], ["generate"], ["chat"], ["bench"],
            ["harmony", "render"], ["harmony", "parse"]]


# --------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("flags, fragment", [
    (["--q-group-size", "0"], "affine quantization takes group size 32, 64 or 128, got 0"),
    (["--q-group-size", "-64"], "got -64"),
    (["--q-bits", "0"], "affine quantization takes bits 1, 2, 3, 4, 5, 6 or 8, got 0"),
    (["--q-mode", "mxfp4", "--q-group-size", "64"], "mxfp4 quantization takes group size 32"),
    (["--q-mode", "int4"], "unknown quantization mode 'int4'"),
])
def test_convert_checks_quantization_before_mlx(flags, fragment, tmp_path, capsys):
    """`--q-group-size 0` used to kill the process with SIGFPE inside MLX."""
    code, _, err = cli(capsys, "convert", "--hf-path", tmp_path / "none", "--mlx-path",
                       tmp_path / "out", "-q", *flags)
    one_line(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_a_config_with_bad_quantization_is_refused(tmp_path):
    good = {"mode": "affine", "bits": 4, "group_size": 64}
    for bad, fragment in (({"group_size": 0}, "group size 32, 64 or 128, got 0"),
                          ({"bits": True}, "got True"),
                          ({"mode": "fp3"}, "unknown quantization mode"),
                          ({"modules": ["experts"]}, "unknown quantized modules")):
        config = {**hf_config(**TINY), "mlx_quantization": {**good, **bad}}
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=fragment) as e:
            load_config(tmp_path)
        assert str(e.value).startswith(f"{tmp_path / 'config.json'}: mlx_quantization: ")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(**TINY), "mlx_quantization": {}}))
    with pytest.raises(ConfigError, match="mlx_quantization has no 'mode'"):
        load_config(tmp_path)


def test_every_mode_default_is_accepted_by_mlx():
    """The table's defaults are combinations MLX itself accepts (the converter's probe)."""
    import mlx.core as mx

    for mode, (bits, group, _, _) in QUANTIZATION_MODES.items():
        q = QuantizationConfig(mode, bits, group)
        mx.eval(mx.quantize(mx.zeros((1, 4 * q.group_size)), group_size=q.group_size,
                            bits=q.bits, mode=q.mode))


# --------------------------------------------------------------------------- item 4


def test_short_help_version_and_usage_errors(capsys):
    code, out, _ = cli(capsys, "-h")
    assert code == 0 and "--debug" in out and "--version" in out and "generate" in out
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out == f"mlx-gptoss {__version__}\n"
    code, _, err = cli(capsys, "bench", "--layers", "0")  # typer's range check: same style
    one_line(code, err, "'--layers'", "mlx-gptoss bench --help")
    code, _, err = cli(capsys, "no-such-command")
    one_line(code, err, "No such command")
    code, _, err = cli(capsys, "generate", "-m", "x", "--debug")
    one_line(code, err, "--debug goes before the command")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_fits_80_columns(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli(capsys, *command, "-h")
    assert code == 0 and out.startswith("Usage: mlx-gptoss " + " ".join(command))
    assert max(map(len, out.splitlines())) <= 80
    assert "…" not in out and "<bool>" not in out and "╭" not in out


def test_debug_is_a_flag_only_before_the_command(tmp_path, capsys):
    # As a prompt's value, "--debug" is the prompt: the error is the usual one line.
    code, _, err = cli(capsys, "generate", "-m", tmp_path / "nope", "-p", "--debug")
    one_line(code, err, "nope: model directory not found")
    with pytest.raises(GptOssError, match="model directory not found"):  # the traceback
        main(["--debug", "generate", "-m", str(tmp_path / "nope"), "-p", "hi"])


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("flags, fragment", [
    (["--temp", "nan"], "--temp must be a finite number, got nan"),
    (["--temp", "inf"], "--temp must be a finite number, got inf"),
    (["--top-p", "nan"], "--top-p must be a finite number, got nan"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--seed", "-1"], "seed must be in [0, 2**64)"),
    (["--max-tokens", "0"], "'--max-tokens'"),
    (["--max-tool-rounds", "-1"], "'--max-tool-rounds'"),
    (["--dtype", "int8"], "unsupported dtype 'int8'"),
    (["-r", "max"], "--reasoning-effort must be one of"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_values_are_checked_before_the_model_loads(command, flags, fragment, tmp_path, capsys):
    prompt = ["-p", "hi"] if command == "generate" else []
    code, _, err = cli(capsys, command, "-m", tmp_path / "nope", *prompt, *flags)
    one_line(code, err, fragment)


def test_empty_prompt_and_max_tokens_beyond_the_context(chat_checkpoint, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "-m", tmp_path / "nope", "-p", "  ")
    one_line(code, err, "the prompt (--prompt) is empty")
    code, _, err = cli(capsys, "generate", "-m", chat_checkpoint, "-p", "hi", "--max-tokens",
                       "1000000", "--dtype", "float32")
    one_line(code, err, "--max-tokens 1000000 is more than the model's context length (131072")


def test_demo_checks_options_before_writing(tmp_path, capsys):
    work = tmp_path / "demo"
    for flags, fragment in ((["--max-tokens", "0"], "'--max-tokens'"),
                            (["--seed", "-1"], "'--seed'"),
                            (["--prompt", ""], "the prompt (--prompt) is empty")):
        code, _, err = cli(capsys, "demo", "--dir", work, *flags)
        one_line(code, err, fragment)
        assert not work.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = cli(capsys, "demo", "--dir", blocker / "sub")
    one_line(code, err, f"--dir {blocker / 'sub'}: cannot write there")


# --------------------------------------------------------------------------- item 5


def test_stats_are_their_own_flag(chat_checkpoint, capsys):
    flags = ["generate", "-m", chat_checkpoint, "-p", "Hello", "--max-tokens", "3", "--temp", "0",
             "--dtype", "float32", "--hide-reasoning"]
    code, _, err = cli(capsys, *flags, "--stats")
    assert code == 0 and "tok/s" in err and "peak memory" in err
    assert "<|start|>" not in err  # no prompt dump
    code, _, err = cli(capsys, *flags, "-v")
    assert code == 0 and "<|start|>user<|message|>Hello" in err
    assert "tok/s" not in err  # stderr is not a terminal here: stats only when asked
    assert not sys.stderr.isatty()
