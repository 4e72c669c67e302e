#!/usr/bin/env bash
# The Python packages benchmarks/gpu_session.sh needs that the device machine's image lacks (diffusers, and
# torchsde with trampoline for the dpmpp_sde test; torch, transformers, safetensors, numpy, scipy, Pillow,
# prometheus-client and pytest are there), as wheels in .whl/ (ignored by .gitignore), for the device tool's
# `carry`; at the versions requirements/worker.txt pins. Not importlib_metadata: diffusers reads the standard
# library's on Python 3.12, and its 10.x wheel needs lazy-importer, which the image lacks.
set -eu
cd "$(git rev-parse --show-toplevel)"
pin() { grep -rhoE "^$1==[0-9.]+" requirements/ | head -n 1; }
rm -f .whl/*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "$(pin diffusers)" "$(pin torchsde)" trampoline
ls -l .whl
