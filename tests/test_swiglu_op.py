"""vila_edge::SwiGLU (vila_edge/ops/csrc/swiglu.h) against silu(gate) * up in float64 numpy.

Rows of 1 (a decode step: inline), 40 (prefill: chunks over the intra-op threads), widths with and
without an 8-lane tail, and gates from -200 to 200 (sigmoid's saturated tails: no overflow, no NaN).
float32 to 2e-6 relative plus 1e-6 absolute (the product rounded once or twice, expf to ~1 ulp).
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vila_edge import ops


def _session(threads=2):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    node = helper.make_node("SwiGLU", ["x"], ["y"], domain=ops.DOMAIN)
    graph = helper.make_graph([node], "swiglu", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _oracle(x):
    x = x.astype(np.float64)
    gate, up = np.split(x, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


@pytest.mark.parametrize("shape", [(1, 1, 3072), (1, 40, 3072), (3, 5, 2 * 13), (2, 2)])
def test_swiglu_equals_oracle(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    x.reshape(-1, shape[-1])[0, : shape[-1] // 2] = np.linspace(-200, 200, shape[-1] // 2)   # saturated gates
    y = _session().run(None, {"x": x})[0]
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == np.float32
    np.testing.assert_allclose(y, _oracle(x), rtol=2e-6, atol=1e-6)


def test_swiglu_matches_the_standard_ops_it_replaces():
    """Split + Sigmoid + Mul + Mul in ORT (the fused graph's float MLP before this op): within 1e-5, and no
    farther from the float64 oracle than they are (ORT's Sigmoid is MLAS' rational approximation, ~3e-4
    relative near zero; ours ~1 ulp)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 7, 2 * 64)) * 4).astype(np.float32)
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Split", ["x"], ["g", "u"], axis=-1, num_outputs=2),
             helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["a"]),
             helper.make_node("Mul", ["a", "u"], ["y"])]
    graph = helper.make_graph(nodes, "std", [xi], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = _session(1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got - _oracle(x)).max() <= np.abs(want - _oracle(x)).max()


def test_swiglu_refuses_an_odd_width():
    with pytest.raises(Exception, match=r"SwiGLU: x must be \[.., 2 \* inter\]"):
        _session().run(None, {"x": np.zeros((1, 5), np.float32)})
