"""The int4 format (vila_edge/int4.py): the engine's ONNX layout, the kernels' MatMulNBits layout, the
repacker between them, and one quantizer (numpy here, torch in export) with one zero floor."""
import numpy as np
import onnx
import pytest
import torch

from vila_edge import int4
from vila_edge.cuda import reference as ref
from vila_edge_export.onnx_graph import Graph
from vila_edge_export.quantize import quantize_symmetric

# N=2, K=4, G=4. Hand-packed from the contracts (docs/contracts.md "Int4 weights"):
CODES = np.array([[1, -1, -8, 7], [0, 2, -3, 4]], np.int8)
# ONNX: codes.T [K, N] row-major = 1, 0, -1, 2, -8, -3, 7, 4; pairs (low, high) as signed nibbles
ONNX_BYTES = bytes([0x01, 0x2F, 0xD8, 0x47])
# MatMulNBits: per row, q + 8 = [9, 7, 0, 15] and [8, 10, 5, 12]; even k in the low nibble
MATMULNBITS = np.array([[[0x79, 0xF0]], [[0xA8, 0xC5]]], np.uint8)


def test_hand_packed_layouts():
    assert int4.pack_onnx(CODES.T) == ONNX_BYTES
    np.testing.assert_array_equal(int4.unpack_onnx(ONNX_BYTES, (4, 2)), CODES.T)
    packed, _ = int4.pack_matmulnbits(CODES, np.ones((2, 1), np.float32), 4)
    np.testing.assert_array_equal(packed, MATMULNBITS)
    packed, scales = int4.onnx_to_matmulnbits(ONNX_BYTES, np.array([[0.5, 0.25]], np.float32), K=4, N=2)
    np.testing.assert_array_equal(packed, MATMULNBITS)
    np.testing.assert_array_equal(scales, np.array([[0.5], [0.25]], np.float16))


@pytest.mark.parametrize("N, K, G", [(37, 256, 32), (8, 384, 128), (3, 64, 64)])
def test_repack_engine_weights_for_the_kernels(N, K, G):
    """An int4 linear as the exporter writes it (Graph.linear -> INT4 initializer + scales) repacks to
    what the kernels read, and the kernels' oracle computes the dequantized MatMul with it."""
    rng = np.random.default_rng(N)
    w = rng.standard_normal((N, K)).astype(np.float32)
    codes, scales = int4.quantize(w, G)
    g = Graph("one_linear", "float32")
    g.linear(g.input("x", "float32", [1, K]), "w", None, quant=(codes, scales, G, 4))
    inits = {t.name: t for t in g.inits}
    raw = inits["w.qweight"].raw_data
    scales_kn = onnx.numpy_helper.to_array(inits["w.scales"])
    packed, scales16 = int4.onnx_to_matmulnbits(raw, scales_kn, K, N)
    want_packed, want_scales = int4.pack_matmulnbits(codes, scales, G)
    np.testing.assert_array_equal(packed, want_packed)
    np.testing.assert_array_equal(scales16, want_scales)
    x = rng.standard_normal((2, K)).astype(np.float32)
    dequantized = codes.astype(np.float64) * np.repeat(scales16.astype(np.float64), G, axis=1)
    np.testing.assert_allclose(ref.int4_gemv(x, packed, scales16), x @ dequantized.T, rtol=1e-5, atol=1e-5)


def test_repack_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="expected 4 bytes"):
        int4.onnx_to_matmulnbits(ONNX_BYTES + b"\0", np.ones((1, 2), np.float32), K=4, N=2)
    with pytest.raises(ValueError, match="do not fit"):
        int4.onnx_to_matmulnbits(ONNX_BYTES, np.ones((1, 3), np.float32), K=4, N=2)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4.pack_onnx(np.array([8], np.int8))


def test_one_quantizer_numpy_equals_export():
    """Same codes and scales as export's torch quantizer, zero groups included (the shared floor)."""
    w = np.random.default_rng(3).standard_normal((6, 128)).astype(np.float32)
    w[2, :32] = 0.0                      # an all-zero group: scale = MIN_ABSMAX / 7, codes 0
    w[4, 64:96] *= 1e-7                  # a group below the floor
    codes, scales = int4.quantize(w, 32)
    t_codes, t_scales = quantize_symmetric(torch.from_numpy(w), 32, bits=4)
    np.testing.assert_array_equal(codes, t_codes.numpy())
    np.testing.assert_array_equal(scales, t_scales.numpy())
    assert scales[2, 0] == np.float32(np.float16(int4.MIN_ABSMAX / 7)) and not codes[2, :32].any()
