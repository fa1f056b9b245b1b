"""Engine targets `vila-edge export --target` builds: each names the LLM graph variant it writes.

cpu:  ONNX Runtime's contrib ops (MatMulNBits, SkipSimplifiedLayerNormalization, RotaryEmbedding),
      the fused graph ONNX Runtime runs fastest (vila_edge_export/onnx_llm_fused.py).
orin: standard ONNX ops only, the form TensorRT's ONNX parser takes (vila_edge_export/onnx_llm.py). This
      version runs it under ONNX Runtime; the TensorRT engine itself is not built here.
"""

TARGETS = {"cpu": "fused", "orin": "standard"}
# Said once when an engine of that target is exported (one line on stderr).
NOTICES = {
    "orin": "target orin: standard-op ONNX graphs for TensorRT's parser; this version runs them under "
            "ONNX Runtime and does not build TensorRT engines",
}
UNSUPPORTED: dict = {}
