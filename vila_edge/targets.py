"""Engine targets `vila-edge export --target` builds: each names the LLM graph variant it writes.

cpu:  ONNX Runtime's contrib ops (MatMulNBits, SkipSimplifiedLayerNormalization, RotaryEmbedding),
      the fused graph ONNX Runtime runs fastest (vila_edge_export/onnx_llm_fused.py).
orin: standard ONNX ops only, the form TensorRT's ONNX parser takes (vila_edge_export/onnx_llm.py),
      and the TensorRT optimisation profile in the manifest (vila_edge/trt_profile.py). It runs on
      ONNX Runtime's CPU provider too; `--device tensorrt` runs it on TensorRT (experimental), whose
      engine cache is built at export where TensorRT is installed, else on first load.
"""

TARGETS = {"cpu": "fused", "orin": "standard"}
UNSUPPORTED: dict = {}


def notice(target: str) -> str | None:
    """The one line said when an engine of `target` is exported (None: nothing to say)."""
    if target != "orin":
        return None
    from vila_edge.devices import trt_builder_missing
    missing = trt_builder_missing()
    if missing is None:
        return "target orin: building the TensorRT engine cache into the engine directory after export"
    return (f"target orin: {missing}, so the TensorRT engine cache is built on first load on the device "
            f"(--device tensorrt)")
