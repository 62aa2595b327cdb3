#!/usr/bin/env bash
# The GPU checks of README "Operations > Speed" (GPU settings) in one device call, about 8
# minutes on one H100/H200 with 16 cores:
#   1. the demo on the GPU, fp32 (open_sesemi -cn demo run.gpus=1): val top-1 and seconds
#   2. the demo with bf16-mixed + torch.compile (channels_last left to sesemi: off when compiled
#      on a GPU), 60 steps: that a compiled model trains (it failed with channels_last on, torch
#      2.11), and that its checkpoint validates with CUDA hidden (a CPU-only machine)
#   3. benchmarks/gpu_throughput.py rows full, no-compile, constant (ResNet-50, 224 px): the
#      compiled rows were not measured yet (benchmarks/results/gpu_throughput_h200.md)
# Usage (repo root, python3 = one with torch; Hydra/OmegaConf/torchdata on PYTHONPATH where the
# machine lacks them, e.g. wheels carried in .whl/ and installed to /tmp/site first):
#   OUT=/some/dir bash benchmarks/gpu_checks.sh [SECONDS]   (SECONDS: the whole budget, 540)
# Each stage's log goes to $OUT; the throughput table to $OUT/gpu_throughput.md.
set -u
BUDGET=${1:-540}
OUT=${OUT:?set OUT to a folder for the logs}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/sesemi_gpu_checks && cd /tmp/sesemi_gpu_checks || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, \
'timm', timm.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name(0))" || exit 1

stage() {  # $1 = name, $2 = seconds, rest = the command; prints rc, seconds and the summary
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  grep -A3 "finished in" "$OUT/$name.log"
  grep -m3 "Error\|WARNING.*channels_last" "$OUT/$name.log"
}

stage demo_fp32 110 python3 -m sesemi -cn demo run.gpus=1 run.dir=runs_fp32
stage demo_bf16_compile 130 python3 -m sesemi -cn demo run.gpus=1 run.dir=runs_compile \
  run.num_iterations=60 trainer.val_check_interval=60 +trainer.precision=bf16-mixed \
  learner.hparams.compile=true
ckpt=$(ls runs_compile/demo/*/checkpoints/last.ckpt 2>/dev/null | head -n 1)
if [ -n "$ckpt" ]; then
  CUDA_VISIBLE_DEVICES= stage validate_on_cpu 60 python3 -m sesemi -cn demo run.mode=VALIDATE \
    "run.pretrained_checkpoint_path=\"$ckpt\"" run.dir=runs_cpu
fi
left=$((BUDGET - SECONDS))
echo "== throughput: $left s left"
cd "$REPO" || exit 1
timeout "$left" python3 benchmarks/gpu_throughput.py --steps 120 --warmup-steps 20 \
  --images-per-class 100 --timeout 150 --rows full,no-compile,constant \
  --out "$OUT/gpu_throughput.md" >"$OUT/throughput.log" 2>&1
echo "== throughput: rc $?"
grep "images/s\|FAILED\|^| " "$OUT/throughput.log"
