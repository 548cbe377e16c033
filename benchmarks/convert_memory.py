"""Peak resident memory of converting a checkpoint with the exact gpt-oss-20b shapes (13.8 GB).

Writes a random-weight 20b checkpoint in the hub layout (streaming), converts it in a child
process and reports the child's peak RSS (`ru_maxrss`), which is the figure that matters on a
machine with less RAM than the model. Needs ~28 GB of free disk; everything is deleted after.

    python benchmarks/convert_memory.py [--workdir DIR] [--quantize] [--layers N]
                                        [--layout hf|dense]

`--layout dense` writes the same model with bf16 experts (x @ W, as fine-tuning tools export
them), which the converter quantizes to MXFP4 itself.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_gptoss.synthetic import (hf_config, write_dense_checkpoint,  # noqa: E402
                                  write_hf_checkpoint)

CHILD = """
import sys, json
from mlx_gptoss.converter import convert, quantization_config
q = quantization_config("affine", 8, 64) if sys.argv[3] == "1" else None
r = convert(sys.argv[1], sys.argv[2], quantization=q, progress=True)
print(json.dumps({"output_bytes": r.output_bytes, "bytes_per_token": r.bytes_per_token,
                  "num_shards": r.num_shards, "seconds": r.seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quantize", action="store_true", help="also quantize affine 8-bit")
    parser.add_argument("--layers", type=int, default=24, help="24 = gpt-oss-20b")
    parser.add_argument("--layout", choices=["hf", "dense"], default="hf")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        src = work / "src"
        t = time.monotonic()
        writer = write_hf_checkpoint if args.layout == "hf" else write_dense_checkpoint
        writer(src, hf_config(num_hidden_layers=args.layers), num_shards=3)
        size = sum(f.stat().st_size for f in src.iterdir())
        print(f"wrote {size / 1e9:.2f} GB source in {time.monotonic() - t:.0f} s", flush=True)
        env = {**os.environ, "MLX_GPTOSS_OFFLINE": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(work / "dst"),
                              "1" if args.quantize else "0"], env=env, check=True,
                             stdout=subprocess.PIPE, text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        if sys.platform == "darwin":
            peak //= 1024  # macOS reports bytes
        result = {"layout": args.layout, "layers": args.layers, "source_bytes": size,
                  "quantize": args.quantize,
                  "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3),
                  **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
