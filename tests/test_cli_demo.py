"""`mlx-gptoss demo`, the README's first command: write, convert, generate."""
from __future__ import annotations

import json

import pytest

from mlx_gptoss.cli import main


def run(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    run("demo", "--dir", str(tmp_path), "--max-tokens", "6", "--seed", "3")
    out, err = capsys.readouterr()
    assert "2/3 converting" in err and "generation: " in err
    assert out.startswith("[")  # one line per parsed message, e.g. "[final] ..."
    config = json.loads((tmp_path / "mlx-model" / "config.json").read_text())
    assert "mlx_gptoss" in config and config["vocab_size"] == 201088
    assert (tmp_path / "mlx-model" / "o200k_base.tiktoken").is_file()
    assert not (tmp_path / "hf-checkpoint").exists()
    # A second run reuses the converted model and is deterministic for a seed.
    run("demo", "--dir", str(tmp_path), "--max-tokens", "6", "--seed", "3")
    again, err2 = capsys.readouterr()
    assert again == out and "converting" not in err2
