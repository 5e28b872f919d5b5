#!/usr/bin/env bash
# One prepared device run (issue "Speed", item 4): ours and the reference on one GPU.
# Here, once:  echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_bench.sh --fetch-wheels
# Device run:  bash benchmarks/gpu_bench.sh     (carry .whl; results as JSON lines in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  dl() { python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
           -d "$1" "${@:2}"; }
  dl .whl/ours open_clip_torch==3.3.0 ftfy==6.3.1 timm==1.0.31 safetensors==0.8.0 label-studio-sdk==2.1.2
  dl .whl/ref open_clip_torch==2.23.0 gem-torch==1.0.1 ftfy==6.3.1 timm==1.0.31 einops
  exit 0
fi
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ours .whl/ours/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ref .whl/ref/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=/tmp/site-ours:. python3 benchmarks/gpu_bench.py --impl ours | tee "$OUT/ours.jsonl"
PYTHONPATH=/tmp/site-ref python3 benchmarks/gpu_bench.py --impl reference | tee "$OUT/reference.jsonl"
