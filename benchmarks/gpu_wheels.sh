#!/usr/bin/env bash
# The Python packages benchmarks/gpu_session.sh needs that the device machine's image lacks (diffusers and
# importlib_metadata; torch, transformers, safetensors, numpy, Pillow, prometheus-client and pytest are there),
# as wheels in .whl/ (ignored by .gitignore), for the device tool's `carry`; diffusers at the version
# requirements/worker.txt pins.
set -eu
cd "$(git rev-parse --show-toplevel)"
DIFFUSERS=$(grep -rhoE "^diffusers==[0-9.]+" requirements/ | head -n 1)
IMPORTLIB_METADATA=${IMPORTLIB_METADATA:-importlib_metadata}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "$DIFFUSERS" "$IMPORTLIB_METADATA"
ls -l .whl
