"""vila_edge: VILA vision-language models on the edge (ONNX Runtime today; TensorRT on Orin next)."""
from vila_edge.errors import (CheckpointError, EngineError, GrammarError, ImageError, IncompleteOutput,
                              KVCacheFull, PromptError, VilaEdgeError)
from vila_edge.llm import KVConfig
from vila_edge.pipeline import Conversation, Pipeline
from vila_edge.sampling import GenerationConfig
from vila_edge.version import __version__

__all__ = ["Pipeline", "Conversation", "GenerationConfig", "KVConfig", "VilaEdgeError", "CheckpointError",
           "EngineError", "ImageError", "PromptError", "KVCacheFull", "GrammarError", "IncompleteOutput",
           "__version__"]
