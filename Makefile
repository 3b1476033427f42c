# Set-up is idempotent: the venv is (re)built only when pyproject.toml or constraints.txt change.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel
	# llama-cpp-python compiles once (~8-11 min on 2 cores); pip caches the wheel afterwards
	$(BIN)/python -m pip install -e ".[dev]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: pull the models, optimize a meta-instruction for helpfulness-4.
demo: install
	$(BIN)/picaco models pull qwen2.5-coder-0.5b qwen2.5-coder-1.5b minilm-l6
	$(BIN)/picaco optimize --preset cpu --values helpfulness-4 --run-dir runs/demo

# The whole test suite (pulls the small test model and the embedding model once).
test: install
	$(BIN)/picaco models pull smollm2-135m minilm-l6
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
