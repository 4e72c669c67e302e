#!/usr/bin/env bash
# Issue 16's GPU check, on an H100 or H200 (the CPU figures come from `make bench-engine`):
#   1. bench: benchmarks/bench_engine.py --sd15, the arms (a)-(e) on an SD-1.5-sized UNet at 512x512 in float16
#      (compiled pipeline one at a time and as a static batch of 16, the engine with 16 identical and with 16
#      and 32 mixed requests in flight, the bare compiled UNet at 32 rows), with the compile warm-up times
#      and the VAE decode's share; one JSON line, each arm also printed as it ends. Most of its time is
#      compiling, on cold caches: the engine's dynamic-batch UNet and VAE decode, and the pipeline's UNet twice
#      (a 1-row graph, then a dynamic one at 2 rows); at most 450 s;
#   2. tests: tests/gpu (compiled vs eager engine, batch invariance with buckets, the deferred NaN check,
#      float16 and bfloat16 against diffusers' pipeline (and exact float32), SDXL/SD3/Flux in bfloat16, the samplers
#      that draw noise or correct in exact float32 and then float16, a real CUDA out-of-memory stepping the row cap
#      down), each printing its figure; at most 200 s;
#   3. restart: the engine's warm-up alone in a new process on the compile caches stage 1 left (a worker
#      restarted on a kept LATENTD_COMPILE_CACHE_DIR), against the goal of a worker ready within 2 minutes;
#      at most 100 s.
# Logs land in $OUT. Stages: `all` (default; up to 750 s, more than one device-tool call may run), `measure` (1 then
# 3), `bench`, `tests`, `restart`, or `train` (the old training-recipe run).
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [all|measure|bench|tests|restart|train] [bench-requests]
#
# With the device tool (a call runs at most 600 s, a session has 900 s of device time, the machine's start
# included): diffusers is not in the GPU image, so carry it as wheels (made here, once), and run the stages as
# two calls back to back (the machine stays warm 30 s between them, and keeps the caches in /tmp):
#     bash benchmarks/gpu_wheels.sh          # -> .whl/ (ignored by git)
#     run(command="bash benchmarks/gpu_session.sh measure", carry=[".whl"], timeout_s=580)
#     run(command="bash benchmarks/gpu_session.sh tests", carry=[".whl"], timeout_s=250)
set -u
OUT=${OUT:-/tmp/latentd-gpu}
STAGE=${1:-all}
BENCH_REQUESTS=${2:-16}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
# Inductor's and Triton's caches in one place for both stages (LATENTD_COMPILE_CACHE_DIR does this for a worker)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/latentd-inductor} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/latentd-inductor/triton}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
started=$(date +%s)

if [ "$STAGE" = all ] || [ "$STAGE" = measure ] || [ "$STAGE" = bench ]; then
  echo "== 1. SD-1.5-sized arms (a)-(e) (at most 450 s)"
  timeout 450 python3 -m benchmarks.bench_engine --sd15 --requests "$BENCH_REQUESTS" 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_sd15.log" | grep -E "^# arm|^\{|Error|error"
  echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - started )) s"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  echo "== 2. CUDA tests (at most 200 s)"
  timeout 200 python3 -m pytest tests/gpu -s -q --noconftest -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | grep -E "PSNR|levels|warm in|passed|failed|Error"
  echo "tests done after $(( $(date +%s) - started )) s"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = measure ] || [ "$STAGE" = restart ]; then
  echo "== 3. a worker's warm-up again, on the caches above (at most 100 s)"
  timeout 100 python3 -m benchmarks.bench_engine --sd15 --warm-up-only 2>&1 | grep -v "Loading weights" | tee "$OUT/restart.log" | grep -E "^# arm|^\{|Error|error"
  echo "restart done after $(( $(date +%s) - started )) s"
fi

if [ "$STAGE" = train ]; then
  MODEL=/tmp/shapes-ldm-gpu
  echo "== training recipe on CUDA (at most 270 s), then its evaluation"
  timeout 270 python3 -m training.train --device cuda --out "$MODEL" --runs-dir "$OUT/runs" > "$OUT/train.log" 2>&1
  echo "train exit $?"; tail -n 2 "$OUT/runs/vae.log" "$OUT/runs/unet.log" 2>/dev/null
  if [ -f "$MODEL/model_index.json" ]; then
    timeout 120 python3 -m training.evaluate --device cuda --model "$MODEL" --captions full --no-docs 2>&1 | grep -v "Loading weights" | tee "$OUT/eval.log"
    tar -C /tmp -cf "$OUT/shapes-ldm-gpu.tar" shapes-ldm-gpu
  fi
fi
