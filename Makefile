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

# The whole test suite (pulls the small test model and the embedding model once; installs Debian's
# chromium for the report's browser test when it is missing and apt-get is usable).
test: install
	$(BIN)/picaco models pull smollm2-135m minilm-l6
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "warning: could not install chromium; the browser test will be skipped"
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
