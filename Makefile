# Two commands on a fresh machine:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seer-setup-done

.PHONY: setup demo test test-fast test-e2e test-gpu lint clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)

# SmolLM2 + the distilled gates (prepare-model is idempotent: converts once, ~1 min); if it cannot be
# prepared, `demo` says so and serves the tiny random model instead
demo: $(STAMP)
	$(PY) -m vllm_seer.cli prepare-model || echo "demo: SmolLM2 could not be prepared (see above)"
	$(PY) -m vllm_seer.cli demo

test: $(STAMP)
	$(PY) -m ruff check vllm_seer kernels tests benchmarks scripts
	$(PY) -m pytest -q -m "not gpu" -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not e2e" -p no:cacheprovider

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e -p no:cacheprovider

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check vllm_seer kernels tests benchmarks scripts

clean:
	rm -rf $(VENV) .cache build *.egg-info
