"""vila_edge's ONNX Runtime custom ops (csrc/), compiled into the package at install (setup.py).

Domain "vila_edge", op "PagedAttention" (csrc/paged_attention.cc documents its inputs): the fused
LLM graph's attention over the paged KV pool; op "SwiGLU" (csrc/swiglu.h): its float MLP activation.
A graph that uses them loads with `register(options)`.
"""
import glob
import os

from vila_edge.errors import EngineError

DOMAIN = "vila_edge"
BUILD = ("build it with `pip install -e .` in the source tree (or `python setup.py build_ext --inplace`); "
         "an installed wheel carries it")


def built() -> str | None:
    """The compiled op library's path, None when it is not built."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_vila_edge_ops*.so")))
    return found[-1] if found else None


def library_path() -> str:
    """The compiled op library, or EngineError saying how to build it."""
    found = built()
    if not found:
        raise EngineError(f"this engine's LLM graph needs vila_edge's ONNX Runtime op library "
                          f"(vila_edge/ops/_vila_edge_ops*.so), which is not built: {BUILD}")
    return found


def register(options) -> None:
    """Make the ops loadable by sessions created with these onnxruntime.SessionOptions."""
    options.register_custom_ops_library(library_path())
