#!/usr/bin/env bash
# The CUDA tables in benchmarks/README.md, on a Linux machine with an NVIDIA GPU whose Python
# lacks MLX. SITE: a tarball of the unpacked wheels mlx==0.32.4, mlx-cuda-13==0.32.4 and
# mlx-lm==0.32.2 (the GPU image already has their other requirements). OUT: results folder.
set -euo pipefail
SITE=${SITE:-mlx-cuda-site.tar.xz}
OUT=${OUT:-benchmarks/results}
LAYERS=${LAYERS:-24}
CACHE=${CACHE:-/tmp/bench-cache}
mkdir -p /tmp/site "$OUT"
tar -xJf "$SITE" -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.device_info())"
# A tiny-width run first: fails in seconds if an op is missing on this backend.
python3 - <<'PY'
from pathlib import Path
from mlx_gptoss.benchmark import Settings, run
from mlx_gptoss.synthetic import TINY
widths = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}
run(Settings(layers=2, prompt_sizes=(8, 20), decode_tokens=2, repeats=1, widths=widths,
             second_turn_tokens=4, cache_dir=Path("/tmp/bench-tiny")), log=lambda _: None)
print("smoke ok")
PY
python3 benchmarks/run.py --layers "$LAYERS" --sizes 128,1024,4096 --decode 64 --repeats 5 \
    --cache-dir "$CACHE" --out "$OUT/cuda-L$LAYERS.json" 2>&1 | tee "$OUT/cuda-L$LAYERS.log"
if [ "${ABLATIONS:-1}" = 1 ]; then
    python3 benchmarks/ablations.py --layers "$LAYERS" --size 4096 --decode 64 --repeats 3 \
        --dtypes bfloat16,float32 --cache-dir "$CACHE" \
        --out "$OUT/ablations-cuda-L$LAYERS.json" 2>&1 | tee "$OUT/ablations-cuda-L$LAYERS.log"
fi
