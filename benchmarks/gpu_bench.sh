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
  dl .whl/ours open_clip_torch==3.3.0 ftfy==6.3.1 timm==1.0.31 safetensors==0.8.0 label-studio-sdk==2.1.2 \
     Flask==3.1.3 Werkzeug==3.1.9 itsdangerous==2.2.0 blinker==1.9.0 click==8.5.1 prometheus_client==0.26.0
  dl .whl/ref open_clip_torch==2.23.0 gem-torch==1.0.1 ftfy==6.3.1 timm==1.0.31 einops
  # the sam2 extra's files as pinned (sdists included: the device has no index)
  python3 -m pip download --no-deps --require-hashes -d .whl/sam2 -r requirements-sam2.txt
  exit 0
fi
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ours .whl/ours/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ref .whl/ref/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=/tmp/site-ours:. python3 benchmarks/gpu_bench.py --impl ours | tee "$OUT/ours.jsonl"
PYTHONPATH=/tmp/site-ref python3 benchmarks/gpu_bench.py --impl reference | tee "$OUT/reference.jsonl"
# issue "Speed, round two": the request path on the GPU (decision on the device, prefetch overlapping
# the forward): /predict end to end (12 MP, 20 labels), FLOPs and % of the fp16/fp32 GEMM peak,
# 60 mixed tasks through predict_tasks and prelabel (batches of 8 on CUDA)
PYTHONPATH=/tmp/site-ours:. HF_HUB_OFFLINE=1 timeout 420 python3 -m gem_backend.cli bench --device cuda \
  --precision fp32,fp16 --sections e2e,limit,throughput --runs 5 --json | tee "$OUT/round2.jsonl"
# round three: SC-CLIP/SFP, the official per-image protocol, CorrCLIP with DINO S/8 and B/8, SAM 2.1 tiny/large
# regions and the vote, on CUDA in fp16 and fp32 (needs the sam2 extra: requirements-sam2.txt, pure Python)
SAM2_BUILD_CUDA=0 python3 -m pip install -q --no-index --find-links .whl/sam2 --no-build-isolation --no-deps \
  --target /tmp/site-ours --require-hashes -r requirements-sam2.txt || echo "sam2 extra not installed: the sam2 rows will say so"
for p in fp16 fp32; do
  PYTHONPATH=/tmp/site-ours:. HF_HUB_OFFLINE=1 timeout 300 python3 benchmarks/methods_cost.py --device cuda \
    --precision $p --rows method,protocol,corrclip,sam2,vote --runs 5 | tee -a "$OUT/round3.jsonl"
done
