"""HTTP serving throughput: `mlx-gptoss serve` beside `mlx_lm.server` on the same weights.

For 1, 4 and 8 concurrent clients, each client streams one Chat Completion of `--tokens`
tokens (the endpoint both servers have); reported per level: aggregate generated tokens per
second over the wall time of the level, and the time to first token as the median latency of
as many concurrent one-token requests. Both
servers run as subprocesses on 127.0.0.1, on the same random-weight checkpoint (hub layout,
written once under `--cache-dir`): `--widths tiny` (default: the test suite's tiny model with
the real 201088-token vocabulary, cheap on a CPU) or `--widths 20b` (gpt-oss-20b's real
per-layer widths, `--layers` blocks). mlx-lm needs a Hugging Face tokenizer, so the o200k_harmony
vocabulary is converted once with transformers' `TikTokenConverter` and a minimal harmony chat
template is written beside it; random weights rarely sample a stop token, and token counts come
from each server's reported usage.

    python benchmarks/server.py [--widths tiny|20b] [--layers 2] [--tokens 32]
                                [--levels 1,4,8] [--no-compare] [--out benchmarks/results/server-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mlx_gptoss.harmony import copy_vocabulary
from mlx_gptoss.synthetic import REAL_WIDTHS, TINY, hf_config, write_hf_checkpoint

TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
            "{% endfor %}<|start|>assistant")
PROMPT = "Write a long story about a lighthouse keeper."


def checkpoint(cache: Path, widths: str, layers: int) -> Path:
    overrides = {**(TINY if widths == "tiny" else REAL_WIDTHS), "vocab_size": 201088,
                 "num_hidden_layers": layers}
    path = cache / f"serve-{widths}-L{layers}"
    if not (path / "tokenizer.json").exists():
        write_hf_checkpoint(path, hf_config(**overrides), seed=5)
        copy_vocabulary(path)
        write_hf_tokenizer(path)
    return path


def write_hf_tokenizer(path: Path) -> None:
    """tokenizer.json + config for mlx-lm, converted from the same vocabulary file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from mlx_gptoss.harmony.tokenizer import O200K_PATTERN, _special_tokens

    specials = [name for name, _ in sorted(_special_tokens().items(), key=lambda kv: kv[1])]
    converted = TikTokenConverter(vocab_file=str(path / "o200k_base.tiktoken"), pattern=O200K_PATTERN,
                                  extra_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|return|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, model: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if name == "mlx-gptoss":
        command = [sys.executable, "-c", "from mlx_gptoss.cli import main; main()", "serve",
                   "--model", str(model), "--port", str(port), "--served-model-name", "bench",
                   "--max-concurrency", str(concurrency), "--max-queue", "64"]
    else:
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port",
                   str(port), "--decode-concurrency", str(concurrency), "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # a benchmark, not a test: polling readiness is fine
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{name} did not start")


def one_client(url: str, model: str | None, tokens: int, out: list) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "temperature": 1.0, "stream_options": {"include_usage": True}}
    if model is not None:  # mlx_lm.server serves its --model when none is named
        body["model"] = model
    start = time.perf_counter()
    first, usage, chunks = None, None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"):
                    chunks += 1
                    first = first or time.perf_counter() - start
    generated = usage["completion_tokens"] if usage else chunks
    out.append({"ttft_s": first, "tokens": generated, "seconds": time.perf_counter() - start})


def concurrently(url: str, model: str | None, clients: int, tokens: int) -> tuple[list, float]:
    results: list = []
    threads = [threading.Thread(target=one_client, args=(url, model, tokens, results))
               for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def level(url: str, model: str | None, clients: int, tokens: int) -> dict:
    """Time to first token: the latency of `clients` concurrent one-token requests (a parser
    holds back a header-less random-weight stream, so the first streamed delta would not be
    comparable); throughput: `clients` concurrent `tokens`-token streams."""
    first, _ = concurrently(url, model, clients, 1)
    results, wall = concurrently(url, model, clients, tokens)
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": total, "wall_s": round(wall, 3),
            "aggregate_tps": round(total / wall, 2),
            "ttft_median_s": round(statistics.median(r["seconds"] for r in first), 3)}


def measure(name: str, model_dir: Path, levels: list[int], tokens: int) -> list[dict]:
    process, url = start(name, model_dir, max(levels))
    try:
        served = "bench" if name == "mlx-gptoss" else None
        level(url, served, 1, 4)  # warm-up
        return [level(url, served, clients, tokens) for clients in levels]
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", choices=("tiny", "20b"), default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLX_GPTOSS_OFFLINE", "1")
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = checkpoint(args.cache_dir, args.widths, args.layers)
    results = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
               "widths": args.widths, "layers": args.layers, "tokens_per_client": args.tokens,
               "servers": {}}
    for name in ["mlx-gptoss"] + (["mlx-lm"] if args.compare else []):
        results["servers"][name] = measure(name, model_dir, levels, args.tokens)
    print("| server | clients | aggregate tok/s | median TTFT (s) |\n| --- | --- | --- | --- |")
    for name, rows in results["servers"].items():
        for row in rows:
            print(f"| {name} | {row['clients']} | {row['aggregate_tps']} | {row['ttft_median_s']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
