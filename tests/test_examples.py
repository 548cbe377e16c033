"""The example scripts and the notebook run against a small generated model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args, timeout: int = 180) -> str:
    env = subprocess_env(EXAMPLE_MAX_TOKENS="24")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_generate_example(chat_checkpoint):
    out = run_example("generate.py", chat_checkpoint, "Hello")
    assert "stop: " in out and "tok/s" in out


@pytest.mark.slow
def test_chat_with_tools_example(chat_checkpoint):
    out = run_example("chat_with_tools.py", chat_checkpoint)
    assert out.count("> ") >= 2 and "tok/s" in out


@pytest.mark.slow
def test_structured_output_example(chat_checkpoint):
    pytest.importorskip("llguidance", reason="structured output needs llguidance (issue 7)")
    out = run_example("structured_output.py", chat_checkpoint)
    assert out.startswith(("{", "no complete answer"))
    if out.startswith("{"):
        assert set(json.loads(out)) == {"city", "country", "population_millions"}


@pytest.mark.slow
def test_convert_example(checkpoint_factory, tmp_path):
    source = checkpoint_factory("example_source", seed=9, vocab_size=201088, num_hidden_layers=2)
    out = run_example("convert.py", source, tmp_path / "converted")
    assert (tmp_path / "converted" / "config.json").is_file() and "tok/s" in out


@pytest.mark.slow
def test_notebook_executes(chat_checkpoint, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("MLX_GPTOSS_MODEL", str(chat_checkpoint))
    monkeypatch.setenv("EXAMPLE_MAX_TOKENS", "24")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code"
               for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "tok/s" in text and "messages in the history" in text
