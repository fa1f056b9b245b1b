"""vila_edge: VILA vision-language models on the edge (ONNX Runtime on CPU, CUDA and TensorRT).

The public names load on first use (PEP 562), so `import vila_edge.cuda` (the kernels' loader and
oracles) and `vila_edge.int4` work on a machine with numpy and cuda-python alone: make device-check's
bare GPU machine has no ONNX Runtime or tokenizers.
"""
from vila_edge.errors import (CheckpointError, EngineError, GrammarError, ImageError, IncompleteOutput,
                              KVCacheFull, MissingExtraError, PromptError, UsageError, VilaEdgeError)
from vila_edge.version import __version__

_LAZY = {"KVConfig": "vila_edge.llm", "Image": "vila_edge.parts", "Text": "vila_edge.parts",
         "Conversation": "vila_edge.pipeline", "Pipeline": "vila_edge.pipeline",
         "GenerationConfig": "vila_edge.sampling", "Camera": "vila_edge.sources", "WatchAnswer": "vila_edge.watch"}

__all__ = ["Pipeline", "Conversation", "GenerationConfig", "KVConfig", "Text", "Image", "Camera", "WatchAnswer",
           "VilaEdgeError", "CheckpointError", "EngineError", "ImageError", "PromptError", "KVCacheFull",
           "MissingExtraError", "UsageError", "GrammarError", "IncompleteOutput", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vila_edge' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value            # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
