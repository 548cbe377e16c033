"""`mlx-gptoss demo`: the whole pipeline on a generated model, for a fresh install.

No real gpt-oss weights are needed: it writes a small random-weight checkpoint in the exact
Hugging Face layout (with the real harmony vocabulary), converts it with the converter,
and generates from it through the harmony renderer and parser. Random weights produce
gibberish; what the demo shows is that every stage runs on this machine.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from ..errors import GptOssError


def demo(
    directory: Optional[Path] = typer.Option(
        None, "--dir", help="Where to keep the demo model (default: a temporary directory)."),
    prompt: str = typer.Option("Say hello in three languages.", "--prompt"),
    max_tokens: int = typer.Option(40, "--max-tokens", min=1),
    seed: int = typer.Option(0, "--seed", min=0, max=2**64 - 1),
) -> None:
    """Generate a small random gpt-oss checkpoint, convert it, and generate from it."""
    from ..converter import convert
    from ..generate import generate
    from ..harmony.tokenizer import VOCAB_SIZE
    from ..hub import load
    from ..synthetic import TINY, hf_config, write_hf_checkpoint

    if not prompt.strip():
        raise GptOssError("the prompt (--prompt) is empty")
    work = _work_dir(directory)
    source, converted = work / "hf-checkpoint", work / "mlx-model"
    try:
        if not converted.is_dir():
            print(f"1/3 writing a random-weight checkpoint (hub layout) to {source}",
                  file=sys.stderr)
            # The real harmony vocabulary, so the real tokenizer, renderer and parser run.
            config = hf_config(**{**TINY, "vocab_size": VOCAB_SIZE, "num_hidden_layers": 2})
            write_hf_checkpoint(source, config, seed=seed)
            print(f"2/3 converting it to {converted}", file=sys.stderr)
            report = convert(source, converted, progress=False)
            print("    " + report.summary().replace("\n", "\n    "), file=sys.stderr)
            shutil.rmtree(source)
        print(f"3/3 generating (random weights: expect gibberish)\n--- prompt: {prompt}",
              file=sys.stderr)
        model, tokenizer = load(str(converted))
        result = generate(model, tokenizer, prompt, max_tokens=max_tokens,
                          sampling=model.sampling_defaults.with_overrides(seed=seed))
        for message in result.messages:
            print(f"[{message.channel or '?'}] {message.text()}")
        print(f"--- {result.stats.summary()}", file=sys.stderr)
    finally:
        if directory is None:
            shutil.rmtree(work, ignore_errors=True)


def _work_dir(directory: Optional[Path]) -> Path:
    """`--dir` (created, and checked writable before minutes of work), or a temporary one."""
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="mlx-gptoss-demo-"))
    work = Path(directory).expanduser()
    try:
        work.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=work).close()
    except OSError as e:
        raise GptOssError(f"--dir {work}: cannot write there ({e.strerror or e})") from None
    return work


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
