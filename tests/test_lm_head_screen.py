"""The screened lm_head (--lm-head-screen K, onnx_llm_fused.screened_head): an int4 screen over the
vocabulary, TopK K, the K candidates rescored from their int8 rows and scattered into the screen row."""
import json
import os

import numpy as np
import onnx
import pytest

from conftest import data
from vila_edge.errors import ExportOptionError
from vila_edge import Pipeline

V, C, G = 512, 128, 64


def _int8_head(rng) -> tuple:
    codes = rng.integers(-127, 128, (V, C)).astype(np.int8)
    scales = (rng.random((V, C // G)) * 0.01 + 0.001).astype(np.float32)
    return codes, scales


def _session(g):
    import onnxruntime as ort
    return ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])


def _screen_graph(codes, scales, k: int):
    from vila_edge_export.onnx_graph import Graph
    from vila_edge_export.onnx_llm_fused import MS, screened_head
    g = Graph("t", "float32")
    g.output(screened_head(g, g.input("x", "float32", [1, "B", C]), (codes, scales, G, 8), k, level=0),
             "y", "float32", [1, "B", V])
    g.opsets = {MS: 1}
    return _session(g)


def test_screen_codes_requantize_the_int8_head_by_hand():
    """One group of the int8 head, dequantized [-1.27, 0.35, 0, ...] * 1: int4 scale absmax / 7, codes
    round(w / s) clamped to [-8, 7]."""
    from vila_edge_export.onnx_llm_fused import _screen_codes
    codes = np.zeros((1, 64), np.int8)
    codes[0, :3] = [-127, 35, 0]
    c4, s4 = _screen_codes(codes, np.array([[0.01]], np.float32))
    assert s4[0, 0] == pytest.approx(1.27 / 7)
    assert list(c4[0, :3]) == [-7, 2, 0] and not c4[0, 3:].any()      # 0.35 / 0.1814 = 1.93 -> 2


@pytest.mark.parametrize("rows", [1, 3, 0])
def test_screened_head_matches_numpy(rows):
    """Against numpy: the candidates are the screen's top k, their logits x @ ((codes) * scales).T in
    float (the int8 head), every other logit the int4 screen's; greedy is the int8 head's argmax. 0 rows:
    VILA-U's image steps (logits_rows 0) skip the head."""
    from vila_edge_export.onnx_llm_fused import _screen_codes
    rng = np.random.default_rng(rows)
    codes, scales = _int8_head(rng)
    k = 16
    x = rng.standard_normal((1, rows, C)).astype(np.float32)
    y = _screen_graph(codes, scales, k).run(None, {"x": x})[0]
    assert y.shape == (1, rows, V)
    exact = x @ (codes.astype(np.float32) * np.repeat(scales, G, axis=1)).T                      # (1, B, V)
    c4, s4 = _screen_codes(codes, scales)
    screen = x @ (c4.astype(np.float32) * np.repeat(s4, G, axis=1)).T
    for b in range(rows):
        cand = np.argsort(-screen[0, b])[:k]
        rest = np.setdiff1d(np.arange(V), cand)
        np.testing.assert_allclose(y[0, b, cand], exact[0, b, cand], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y[0, b, rest], screen[0, b, rest], rtol=1e-5, atol=1e-5)
        assert not np.allclose(y[0, b, rest], exact[0, b, rest], atol=1e-3)    # really the int4 approximation
        assert y[0, b].argmax() == exact[0, b].argmax()


def test_screen_needs_a_symmetric_int8_head():
    from vila_edge_export.onnx_graph import Graph
    from vila_edge_export.onnx_llm_fused import screened_head
    codes, scales = _int8_head(np.random.default_rng(0))
    g = Graph("t", "float32")
    with pytest.raises(ValueError, match="int8"):
        screened_head(g, g.input("x", "float32", [1, "B", C]), (codes, scales, G, 4), 8, 0)


def test_option_checks_and_cli_round_trip():
    """--lm-head-screen K reaches ExportOptions (CLI, flat dict); it needs the fused fp32 graph and a
    quantized int8 head, and K in 1..MAX_LM_HEAD_SCREEN (0: off). Left out, it is 64 exactly where a screen
    applies (a quantized fused fp32 graph with an int8 head) and 0 everywhere else."""
    from vila_edge.cli import parser
    from vila_edge_export.options import MAX_LM_HEAD_SCREEN, ExportOptions, QuantOptions
    assert ExportOptions(quant=QuantOptions(method="awq")).lm_head_screen == 64
    assert ExportOptions.flat(quant="rtn", lm_head_screen=0).lm_head_screen == 0
    for plain in (dict(), dict(quant="rtn", target="orin"), dict(quant="rtn", dtype="fp16"),
                  dict(quant="rtn", lm_head_bits=4), dict(quant="rtn", lm_head_bits=0)):
        assert ExportOptions.flat(**plain).lm_head_screen == 0, plain
    assert ExportOptions.flat(quant="rtn", lm_head_screen=32).lm_head_screen == 32
    assert parser().parse_args(["export", "ckpt", "out", "--lm-head-screen", "48"]).lm_head_screen == 48
    bad = [dict(quant="rtn", lm_head_screen=32, target="orin"), dict(quant="rtn", lm_head_screen=32, dtype="fp16"),
           dict(quant="rtn", lm_head_screen=32, lm_head_bits=4), dict(lm_head_screen=32),
           dict(quant="rtn", lm_head_screen=-1), dict(quant="rtn", lm_head_screen=MAX_LM_HEAD_SCREEN + 1)]
    for opts in bad:
        with pytest.raises(ExportOptionError, match="lm_head_screen"):
            ExportOptions.flat(**opts)


@pytest.mark.slow      # two int4 exports of the tiny checkpoint
def test_screened_engine_matches_unscreened(engine, tmp_path):
    """The manifest records K; the graph holds TopK / GatherBlockQuantized / ScatterElements and one
    int4 MatMulNBits for the head instead of the int8 one; greedy answers equal the unscreened engine's,
    and at accuracy level 0 the screened prefill logits equal the unscreened ones at their top 5 (the
    candidates the screen keeps: exact int8 rows, float activations, as the unscreened head at level 0)."""
    opts = dict(quant="rtn", max_ppl_increase_pct=None, int4_accuracy_level=0)
    k = 32
    plain, screened = (engine("vila1.5-3b-downsample", lm_head_screen=s, **opts) for s in (0, k))
    manifest = json.load(open(os.path.join(screened, "manifest.json")))
    assert manifest["quant"]["lm_head_screen"] == k
    assert json.load(open(os.path.join(plain, "manifest.json")))["quant"]["lm_head_screen"] == 0
    nodes = onnx.load(os.path.join(screened, "llm.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert {"TopK", "GatherBlockQuantized", "ScatterElements"} <= set(ops)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"]
    assert 8 not in bits
    a, b = Pipeline(plain, int4_accuracy_level=0), Pipeline(screened, int4_accuracy_level=0)
    for image, prompt in [("color.png", "What color is the square?"), ("robot_scene.png", "What is this?")]:
        path = data(image) if image == "robot_scene.png" else os.path.join("models/vila-tiny-shapes/examples", image)
        assert a.chat(path, prompt, max_new_tokens=12) == b.chat(path, prompt, max_new_tokens=12)
    embeds = np.random.default_rng(0).standard_normal((9, a.manifest.llm.hidden)).astype(np.float32) * 0.5
    la, lb = (np.asarray(p.llm.prefill("probe", embeds, np.arange(9))[0]).reshape(-1) for p in (a, b))
    top = np.argsort(-la)[:5]
    np.testing.assert_allclose(lb[top], la[top], atol=1e-4, rtol=0)
    assert lb.argmax() == la.argmax() and not np.allclose(lb, la, atol=1e-4)   # the rest: the screen's
