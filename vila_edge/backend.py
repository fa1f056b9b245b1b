"""The one small interface every inference backend implements: load a graph, run it on arrays.

ONNX Runtime is the backend: its CPU provider, and its CUDA and TensorRT execution providers through
the device runner (vila_edge/ort_device_runner.py, `run_with_iobinding` on device buffers). The CUDA
kernels (vila_edge/cuda) do not sit behind `run(feeds)`: they take device buffers and a stream.
"""
import os

import numpy as np

from vila_edge.errors import EngineError


# ORT rewrites int4 DequantizeLinear -> MatMul into MatMulNBits; its accuracy level 4 quantizes
# activations to int8 per block (2-4x faster on CPU, measured with ORT 1.31 on 2 cores), 0 keeps
# them float.
INT4_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
ORT_ERRORS = ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "EPFail", "NotImplemented")


class OrtSession:
    def __init__(self, path: str, threads: int | None = None, providers=("CPUExecutionProvider",),
                 int4_accuracy_level: int = 4, optimized_path: str | None = None, ops_library: str | None = None,
                 configure=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry(INT4_ACCURACY_KEY, str(int4_accuracy_level))
        if optimized_path:
            opts.optimized_model_filepath = optimized_path
        if threads:
            opts.intra_op_num_threads = threads
        if ops_library:                  # vila_edge's custom ops (vila_edge/ops), for graphs that use them
            opts.register_custom_ops_library(ops_library)
        if configure:                    # benchmarks: profiling, spinning (benchmarks/ab_paged.py)
            configure(opts)
        if not os.access(path, os.R_OK):
            raise EngineError(f"{path}: permission denied; make the engine directory readable by this user "
                              f"(chmod -R a+rX {os.path.dirname(path) or '.'})")
        try:
            self.session = ort.InferenceSession(path, opts, providers=list(providers))
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"{path}: ONNX Runtime cannot load this graph ({e}); rebuild the engine") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        # ORT's own exception classes derive from Exception, not RuntimeError.
        from onnxruntime.capi import onnxruntime_pybind11_state as state
        self._errors = (RuntimeError,) + tuple(getattr(state, n) for n in ORT_ERRORS if hasattr(state, n))
        self.name = os.path.basename(path)

    def run(self, feeds: dict) -> dict:
        try:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        except self._errors as e:
            raise EngineError(f"{self.name}: ONNX Runtime failed to run this graph ({str(e)[:300]}); the engine "
                              f"file may be corrupt or from another model: rebuild the engine") from e

    def run_with_iobinding(self, io, where: str = "") -> None:
        """Run on buffers bound to `io` (vila_edge/ort_device_runner.py); outputs land where bound."""
        try:
            self.session.run_with_iobinding(io)
        except self._errors as e:
            raise EngineError(f"{self.name}: ONNX Runtime failed to run this graph{where} ({str(e)[:300]}); the "
                              f"engine file may be corrupt or from another model: rebuild the engine") from e

    def input_dtype(self, name: str) -> np.dtype:
        for i in self.session.get_inputs():
            if i.name == name:
                return np.dtype({"tensor(float)": "float32", "tensor(float16)": "float16",
                                 "tensor(int64)": "int64", "tensor(int32)": "int32"}[i.type])
        raise KeyError(name)
