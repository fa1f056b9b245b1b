"""mlp_downsample token order and padding, against hand-written tokens.

The order is DownSampleBlock's in llava/model/multimodal_projector/base_projector.py: column-major at
NVlabs/VILA@1c88211, row-major from NVlabs/VILA@36f6adc on.
"""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from vila_edge_export.onnx_graph import Graph
from vila_edge_export.onnx_vision import _downsample
from vila_edge_export.projector import DownSample
from vila_edge import Pipeline
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR

# 3x3 grid, C=1, x[r, c] = 10 r + c + 1; padded to 4x4 with zeros at the bottom row / right column.
GRID3 = np.array([[1, 2, 3], [11, 12, 13], [21, 22, 23]], np.float32)
# merged (i, j) -> channels (dy, dx): x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]
T00, T01, T10, T11 = [1, 2, 11, 12], [3, 0, 13, 0], [21, 22, 0, 0], [23, 0, 0, 0]
EXPECTED_2X2 = {ROW_MAJOR: [T00, T01, T10, T11], COLUMN_MAJOR: [T00, T10, T01, T11]}
# 4x4 grid padded to 6x6 for 3x3 merges (NVILA-Lite pads 32 -> 33 the same way)
GRID4 = np.array([[1, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]], np.float32)
EXPECTED_3X3_ROW = [[1, 2, 3, 11, 12, 13, 21, 22, 23], [4, 0, 0, 14, 0, 0, 24, 0, 0],
                    [31, 32, 33, 0, 0, 0, 0, 0, 0], [34, 0, 0, 0, 0, 0, 0, 0, 0]]


def _onnx_downsample(x: np.ndarray, merge: int, order: str) -> np.ndarray:
    g = Graph("ds", "float32")
    grid = int(round(x.shape[1] ** 0.5))
    inp = g.input("x", "float32", [1, x.shape[1], 1])
    g.output(_downsample(g, inp, grid, merge, order, 1), "y", "float32", None)
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("order", [ROW_MAJOR, COLUMN_MAJOR])
def test_2x2_order_and_padding(order):
    x = GRID3.reshape(1, 9, 1)
    expected = np.array(EXPECTED_2X2[order], np.float32)[None]
    np.testing.assert_array_equal(DownSample(2, order)(torch.from_numpy(x)).numpy(), expected)
    np.testing.assert_array_equal(_onnx_downsample(x, 2, order), expected)


def test_3x3_row_major_with_padding():
    x = GRID4.reshape(1, 16, 1)
    expected = np.array(EXPECTED_3X3_ROW, np.float32)[None]
    np.testing.assert_array_equal(DownSample(3, ROW_MAJOR)(torch.from_numpy(x)).numpy(), expected)
    np.testing.assert_array_equal(_onnx_downsample(x, 3, ROW_MAJOR), expected)


def test_order_is_overridable_and_transposes_the_grid(engine):
    """The same checkpoint exported with both orders: the token grids are transposes."""
    col = Pipeline(engine("vila1.5-3b-downsample"))
    row = Pipeline(engine("vila1.5-3b-downsample", token_order=ROW_MAJOR))
    assert (col.manifest.vision.token_order, row.manifest.vision.token_order) == (COLUMN_MAJOR, ROW_MAJOR)
    img = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    fc, _ = col.vision.encode(img)
    fr, _ = row.vision.encode(img)
    n, t, h = fc.shape
    s2 = int(round(t ** 0.5))
    transposed = fc.reshape(n, s2, s2, h).transpose(0, 2, 1, 3).reshape(n, t, h)
    np.testing.assert_allclose(fr, transposed, atol=1e-6)
