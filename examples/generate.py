"""Generate an answer, streaming the reasoning and the answer as they are sampled.

    python examples/generate.py [MODEL] [PROMPT]

MODEL is a model directory or a Hugging Face repo id (default: openai/gpt-oss-20b).
"""
import os
import sys

from mlx_gptoss import SamplingParams, load, stream_generate
from mlx_gptoss.generate import GenerationResult
from mlx_gptoss.harmony import MessageStart, TextDelta

model_name = sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b"
prompt = sys.argv[2] if len(sys.argv) > 2 else "Explain MXFP4 quantization in two sentences."
max_tokens = int(os.environ.get("EXAMPLE_MAX_TOKENS", "1024"))

model, tokenizer = load(model_name)
channel = None
for event in stream_generate(model, tokenizer, prompt, reasoning_effort="low",
                             max_tokens=max_tokens, sampling=SamplingParams(seed=0)):
    if isinstance(event, MessageStart):
        channel = event.channel
        print(f"\n[{channel}] ", end="", flush=True)
    elif isinstance(event, TextDelta):
        print(event.text, end="", flush=True)
    elif isinstance(event, GenerationResult):
        print(f"\n\nstop: {event.stop}; {event.stats.summary()}")
