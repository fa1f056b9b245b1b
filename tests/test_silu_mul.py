"""vila_edge::SiluMul (vila_edge/ops/csrc/silu_mul.cc) against silu(gate) * up written out in float64,
and the float32 fused graph using it in place of Split -> Sigmoid -> Mul -> Mul."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vila_edge import ops


def _session(threads: int = 2):
    node = helper.make_node("SiluMul", ["gate_up"], ["out"], domain=ops.DOMAIN)
    graph = helper.make_graph([node], "silu_mul", [helper.make_tensor_value_info("gate_up", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# (1, 1, 2I): a decode row (inline); (1, 37, 2I): a prefill chunk over the thread pool (8 rows a task,
# the last task partial); (5, 2I): another rank
@pytest.mark.parametrize("shape", [(1, 1, 2 * 48), (1, 37, 2 * 48), (5, 2 * 6)])
def test_op_equals_silu_gate_times_up(shape):
    x = (np.random.default_rng(3).standard_normal(shape) * 6).astype(np.float32)     # sigmoid's tails included
    x.reshape(-1)[:4] = [-100.0, 100.0, 0.0, -0.0]          # exp overflow and underflow, zero
    out = _session().run(None, {"gate_up": x})[0]
    g, u = x[..., : shape[-1] // 2].astype(np.float64), x[..., shape[-1] // 2:].astype(np.float64)
    expected = g / (1 + np.exp(-g)) * u
    assert out.shape == shape[:-1] + (shape[-1] // 2,)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_op_refuses_an_odd_width():
    with pytest.raises(Exception, match="gate_up must be"):
        _session().run(None, {"gate_up": np.zeros((1, 1, 7), np.float32)})


def test_fused_float32_graph_uses_the_op(engine):
    """The float32 engine's MLPs: one SiluMul per layer and no Split or Sigmoid left (the equivalence
    tests check its numbers against the torch reference)."""
    import os

    import onnx

    from vila_edge.manifest import Manifest

    eng = engine("vila1.5-3b-downsample", target="cpu")
    m = Manifest.load(eng)
    graph = onnx.load(os.path.join(eng, m.files["llm"]), load_external_data=False).graph
    kinds = [n.op_type for n in graph.node]
    assert kinds.count("SiluMul") == m.llm.layers
    assert "Split" not in kinds and "Sigmoid" not in kinds
