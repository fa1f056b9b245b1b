"""A small ONNX graph builder: named nodes, numpy initializers, one dtype for activations.

Graphs are written op by op (not traced) so the exported form is exactly what we choose: standard
opset-21 ops that TensorRT's parser takes, int4 weights as DequantizeLinear(block_size) -> MatMul
(onnx/onnx-tensorrt@10.1-GA:docs/operators.md).
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vila_edge.int4 import pack_onnx

OPSET = 21
# ORT 1.31 reads IR <= 13 ("max supported IR version: 13") and onnx 1.23 writes 14 by default;
# ModelOpt uses 10.
IR_VERSION = 10
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
               "bool": TensorProto.BOOL}
# Weights stored outside the .onnx file once a graph is this large (protobuf caps files at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class Graph:
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.np_dtype = np.dtype(dtype)
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._count = 0
        self._consts = {}
        self.opsets = {}          # extra operator domains the graph uses: {domain: version}

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], shape))
        return name

    def output(self, value: str, name: str, dtype: str, shape: list) -> None:
        """Expose `value` as graph output `name` (through an Identity unless value already is `name`)."""
        if value != name:
            self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], shape))

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, array) -> str:
        """An initializer in the graph's activation dtype."""
        return self.init(name, np.asarray(array, dtype=self.np_dtype))

    def const(self, values, dtype="int64") -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self._fresh("const"), arr)
        return self._consts[key]

    def scalar(self, value: float) -> str:
        return self.const(value, self.dtype)

    def op(self, op_type: str, inputs: list, out=None, n_out: int = 1, domain: str = "", **attrs):
        """Add a node; `out`: its output name, or a list of names where None asks for a fresh one."""
        outs = [out] if isinstance(out, str) else [o or self._fresh(op_type.lower()) for o in out or [None] * n_out]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._fresh(op_type), domain=domain or None,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def to_float32(self, x: str) -> str:
        return x if self.dtype == "float32" else self.op("Cast", [x], to=TensorProto.FLOAT)

    def from_float32(self, x: str) -> str:
        return x if self.dtype == "float32" else self.op("Cast", [x], to=ONNX_DTYPES[self.dtype])

    def reshape(self, x: str, shape: list) -> str:
        return self.op("Reshape", [x, self.const(shape)])

    def linear(self, x: str, name: str, weight: np.ndarray, bias=None, quant=None) -> str:
        """x @ W.T (+ b). `weight` is [N, K] (nn.Linear); `quant` = (codes int8 [N,K], scales [N,K/G], G,
        bits[, zeros int8 [N,K/G]]) stores it as int4/int8 DequantizeLinear(block_size=G) -> MatMul
        instead: symmetric, or with a zero point of the codes' type when `zeros` is given (not None)."""
        if quant is None:
            w = self.weight(name + ".weight", np.asarray(weight).T)                 # (K, N)
        else:
            codes, scales, group, bits = quant[:4]
            zeros = quant[4] if len(quant) > 4 else None
            q = name + ".qweight"
            self.inits.append(QUANT_TENSORS[bits](q, np.asarray(codes).T))          # (K, N) int4 / int8
            inputs = [q, self.weight(name + ".scales", np.asarray(scales).T)]       # (K/G, N)
            if zeros is not None:
                inputs.append(name + ".zeros")
                self.inits.append(QUANT_TENSORS[bits](inputs[-1], np.asarray(zeros).T))   # (K/G, N)
            w = self.op("DequantizeLinear", inputs, axis=0, block_size=group)
        y = self.op("MatMul", [x, w])
        return y if bias is None else self.op("Add", [y, self.weight(name + ".bias", bias)])

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets,
                                  producer_name="vila_edge")
        model.ir_version = IR_VERSION
        return model


def int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer from int8 codes in [-8, 7]."""
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, pack_onnx(codes), raw=True)


def int8_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An INT8 initializer from codes in [-127, 127] (symmetric int8, vila_edge_export/quantize.py)."""
    if codes.min() < -127 or codes.max() > 127:
        raise ValueError("symmetric int8 codes must lie in [-127, 127]")
    return numpy_helper.from_array(np.ascontiguousarray(codes, dtype=np.int8), name)


QUANT_TENSORS = {4: int4_tensor, 8: int8_tensor}


def save(model: onnx.ModelProto, path: str) -> None:
    """Write a model, moving weights to `<file>.data` beside it when the graph is large."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        import os
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
