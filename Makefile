# Every target sets up what it needs first: `make run` and `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format venv proto bench-engine bench-samplers bench-service bench-gateway bench-soak bench-failover family-parity img2img-parity train-model eval-model clean

$(STAMP): requirements/*.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m scripts.gen_proto

## The whole service on the default model: redis (REDIS_URL or a local one), worker, REST and gRPC gateway.
run: $(STAMP) proto
	$(BIN)/python -m scripts.run_stack

## The test suite (CI runs exactly this).
test: $(STAMP) proto
	$(BIN)/python -m pytest -q tests

## Lint and format check (CI runs this before the tests).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-engine: $(STAMP)
	$(BIN)/python -m benchmarks.bench_engine

## Images/s through the engine (16 in flight) for DDIM 50, DPM-Solver++ 2M 20 and 10, Euler ancestral 30.
bench-samplers: $(STAMP)
	$(BIN)/python -m benchmarks.bench_samplers

bench-service: $(STAMP) proto
	$(BIN)/python -m benchmarks.bench_service

## The gateway under load and abuse (SSE fan-out, reads, OpenAI waiters, a flooding key, huge bodies); needs wrk.
bench-gateway: $(STAMP) proto
	$(BIN)/python -m benchmarks.bench_gateway

## Memory over time: 600 jobs (previews, every trajectory kind) through the real stack, worker and gateway RSS
## sampled as they go; SOAK_ARGS=--long for 3000 jobs.
bench-soak: $(STAMP) proto
	$(BIN)/python -m benchmarks.bench_soak $(SOAK_ARGS)

## Failover (SIGKILL one of two workers) and drain (SIGTERM) with the deploy settings: seconds until the jobs run again,
## until the worker exits (about 6 minutes on 2 cores).
bench-failover: $(STAMP) proto
	$(BIN)/python -m benchmarks.bench_failover

## SDXL, SD3 and Flux (tiny fixtures built from config): the engine against each pipeline, batched against alone.
family-parity: $(STAMP)
	$(BIN)/python -m benchmarks.family_parity

## Image to image and inpainting against diffusers' img2img and inpaint pipelines, alone and batched (1.5 to 6 min
## on a 2-core CPU), then the README's example strip docs/img2img.png.
img2img-parity: $(STAMP)
	$(BIN)/python -m benchmarks.img2img_parity
	$(BIN)/python -m benchmarks.img2img_parity --examples docs/

# The shipped model: 7000 UNet steps, then 3000 more on fresh pictures (seed 1) from a lower learning rate,
# then 6000 more on fresh pictures again (seed 2). About 2.5 hours on a 2-core CPU; add DEVICE=cuda to go faster.
DEVICE ?= cpu
train-model: $(STAMP)
	$(BIN)/python -m training.train --out models/shapes-ldm --device $(DEVICE)
	$(BIN)/python -m training.train --init-from models/shapes-ldm --out models/shapes-ldm --device $(DEVICE) \
		--seed 1 --unet-steps 3000 --unet-lr 3e-4 --runs-dir training/runs/go-on
	$(BIN)/python -m training.train --init-from models/shapes-ldm --out models/shapes-ldm --device $(DEVICE) \
		--seed 2 --unet-steps 6000 --unet-lr 3e-4 --checkpoint-every 1000 --runs-dir training/runs/go-on-2

## Accuracy by guidance (DDIM 50) and by sampler, and images/s per sampler through the engine, on held-out
## noise seeds; rewrites the tables in README.md and docs/model.md (19 and 25 minutes on the shared 2-core CPU).
eval-model: $(STAMP)
	$(BIN)/python -m training.evaluate --model models/shapes-ldm

clean:
	rm -rf $(VENV) var
