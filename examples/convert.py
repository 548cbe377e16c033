"""Convert a Hugging Face gpt-oss checkpoint into an MLX model directory, then load it.

    python examples/convert.py HF_DIR MLX_DIR

(`mlx-gptoss convert --hf-path HF_DIR --mlx-path MLX_DIR` does the same from the shell.)
"""
import sys

from mlx_gptoss import generate, load
from mlx_gptoss.converter import convert

source, destination = sys.argv[1], sys.argv[2]
report = convert(source, destination, progress=False)
print(report.summary())
model, tokenizer = load(destination)
print(generate(model, tokenizer, "Say hi.", max_tokens=16).stats.summary())
