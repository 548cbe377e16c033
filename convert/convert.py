"""Run the converter from a source checkout: `python convert/convert.py --hf-path SRC --mlx-path DST`.

The implementation lives in the package (`mlx_gptoss.converter`, command `mlx-gptoss convert`)
so an installed wheel has it without a top-level `convert` module; this script only forwards.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_gptoss.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
