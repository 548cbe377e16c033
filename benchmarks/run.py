"""Run `mlx-gptoss bench` from a source checkout: `python benchmarks/run.py [OPTIONS]`.

Same options as the installed command (`--help`); results go to benchmarks/results/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gptoss.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
