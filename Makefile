# Set-up is idempotent: the venv is (re)built only when pyproject.toml or constraints.txt change.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

# llama.cpp is compiled for one fixed x86 instruction set (AVX2, FMA, F16C; no AVX-512, no AMX), not
# for the building CPU: its AMX kernels crash on Sapphire Rapids CPUs (segfault in
# ggml_backend_amx_mul_mat, llama.cpp issue 20824), and one instruction set on every machine keeps the
# embedded models' answers from depending on which CPU built them. Other architectures build natively.
# The wheel is compiled once (~8-11 min on 2 cores) into WHEELS, named by version and flags, and reused.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
ifeq ($(shell uname -m),x86_64)
LLAMA_BUILD := avx2
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
else
LLAMA_BUILD := native
LLAMA_CMAKE_ARGS :=
endif
WHEELS := $(HOME)/.cache/picaco/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_BUILD)
WHEEL_STAMP := $(WHEELS)/.built

$(WHEEL_STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-cache-dir --no-deps -w $(WHEELS) \
		"llama-cpp-python==$(LLAMA_VERSION)"
	touch $@

$(STAMP): pyproject.toml constraints.txt Makefile $(WHEEL_STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel
	# the llama.cpp runtime from the wheel built above (replacing one built otherwise), then the rest
	$(BIN)/python -m pip install --no-deps --force-reinstall --no-index --find-links $(WHEELS) \
		"llama-cpp-python==$(LLAMA_VERSION)"
	$(BIN)/python -m pip install -e ".[dev]" -c constraints.txt --find-links $(WHEELS)
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
