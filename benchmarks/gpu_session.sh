#!/usr/bin/env bash
# The GPU figures in one go, for a machine with a CUDA card and PyTorch (the CPU figures come from
# `make bench-engine` and `make eval-model`):
#   1. tests/gpu: the engine in float16 and bfloat16 against diffusers' pipeline, against float32 on
#      the CPU, and alone vs batched (each prints its PSNR);
#   2. the default model's training recipe (training/train.py's defaults) on CUDA, then its
#      evaluation: does the recipe reach the quality goal, and how long does it take on a GPU;
#   3. benchmarks/bench_engine.py --sd15: an SD-1.5-sized UNet at 512x512 in float16.
# Logs and the GPU-trained model (a tar) land in $OUT.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [train-seconds (0 skips 2.)] [bench-requests]
set -u
OUT=${OUT:-/tmp/latentd-gpu}
TRAIN_S=${1:-270}
BENCH_REQUESTS=${2:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"

echo "== 1. CUDA tests"
timeout 150 python3 -m pytest tests/gpu -s -q --noconftest -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | grep -E "PSNR|passed|failed|Error"

MODEL=/tmp/shapes-ldm-gpu
if [ "$TRAIN_S" -gt 0 ]; then
  echo "== 2. training recipe on CUDA (at most ${TRAIN_S} s; checkpoints every 500 UNet steps)"
  timeout "$TRAIN_S" python3 -m training.train --device cuda --out "$MODEL" --runs-dir "$OUT/runs" > "$OUT/train.log" 2>&1
  echo "train exit $?"; tail -n 2 "$OUT/runs/vae.log" "$OUT/runs/unet.log" 2>/dev/null
  if [ -f "$MODEL/model_index.json" ]; then
    timeout 120 python3 -m training.evaluate --device cuda --model "$MODEL" --captions full --no-docs 2>&1 | grep -v "Loading weights" | tee "$OUT/eval.log"
    tar -C /tmp -cf "$OUT/shapes-ldm-gpu.tar" shapes-ldm-gpu
  fi
fi

echo "== 3. SD-1.5-sized engine benchmark"
timeout 200 python3 -m benchmarks.bench_engine --sd15 --requests "$BENCH_REQUESTS" 2>&1 | grep -v "Loading weights" | tail -n 3 | tee "$OUT/bench_sd15.log"
