"""vila_edge: VILA vision-language models on the edge (ONNX Runtime today; TensorRT on Orin next)."""
from vila_edge.errors import (CheckpointError, EngineError, GrammarError, ImageError, IncompleteOutput,
                              KVCacheFull, MissingExtraError, PromptError, UsageError, VilaEdgeError)
from vila_edge.llm import KVConfig
from vila_edge.parts import Image, Text
from vila_edge.pipeline import Conversation, Pipeline
from vila_edge.sampling import GenerationConfig
from vila_edge.sources import Camera
from vila_edge.version import __version__
from vila_edge.watch import WatchAnswer

__all__ = ["Pipeline", "Conversation", "GenerationConfig", "KVConfig", "Text", "Image", "Camera", "WatchAnswer",
           "VilaEdgeError", "CheckpointError", "EngineError", "ImageError", "PromptError", "KVCacheFull",
           "MissingExtraError", "UsageError", "GrammarError", "IncompleteOutput", "__version__"]
