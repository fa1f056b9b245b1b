"""4-bit engines: ORT runs every quantized linear as one MatMulNBits, and the int4 engine (int8
lm_head by default) computes what the quantized torch reference computes."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import data, reference_inputs, scene_images
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.onnx_graph import int4_tensor
from vila_edge_export.options import DEFAULT_GROUP_PLAN, parse_group_plan
from vila_edge_export.quantize import apply_quantized, rtn_quantize
from vila_edge_export.reference import ReferenceVLM
from vila_edge import Pipeline
from vila_edge import ops as vila_ops
from vila_edge.backend import OrtSession
from vila_edge.int4 import pack_onnx

LINEARS_PER_LAYER = 7   # q, k, v, o, gate, up, down
MATMULS_PER_LAYER = 4   # in the graph: qkv (fused), o, gate_up (fused), down
# input and post-attention RMSNorm. ORT 1.31's CPU fusions give SimplifiedLayerNormalization; they
# never form SkipSimplifiedLayerNormalization (its SkipLayerNormFusion matches LayerNormalization only).
NORMS_PER_LAYER = 2
# The standard-op graph TensorRT takes: symmetric int4 at G = 32, every decoder linear int4.
SYMMETRIC = dict(zero_point=False, max_bpw=None)


def _optimized_ops(eng, tmp_path) -> list:
    optimized = str(tmp_path / "llm.opt.onnx")
    OrtSession(os.path.join(eng, "llm.onnx"), optimized_path=optimized, ops_library=vila_ops.library_path())
    return list(onnx.load(optimized, load_external_data=False).graph.node)


@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", pytest.param("nvila-lite-3x3", marks=pytest.mark.slow)])
def test_matmulnbits_per_fused_linear(name, engine, tmp_path):
    """The standard-op graph (--target orin): ORT fuses each DequantizeLinear -> MatMul at load."""
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, target="orin", **SYMMETRIC)
    layers = Pipeline(eng).manifest.llm.layers
    nodes = _optimized_ops(eng, tmp_path)
    ops = [n.op_type for n in nodes]
    bits = [next((a.i for a in n.attribute if a.name == "bits"), 4) for n in nodes if n.op_type == "MatMulNBits"]
    assert bits.count(4) == MATMULS_PER_LAYER * layers and bits.count(8) == 1     # + the int8 lm_head
    assert "DequantizeLinear" not in ops                   # no per-run dequantisation left
    assert ops.count("SimplifiedLayerNormalization") == NORMS_PER_LAYER * layers + 1   # + the final norm
    source = onnx.load(os.path.join(eng, "llm.onnx"))
    int4 = [t for t in source.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    int8 = [t.name for t in source.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int4) == MATMULS_PER_LAYER * layers and int8 == ["lm_head.qweight"]
    assert not any(n.domain for n in source.graph.node)    # standard ops only (TensorRT parses the file)


@pytest.mark.slow   # its own int4 export (G = 32)
def test_fused_graph_ops(engine, tmp_path):
    """--target cpu: the file itself holds MatMulNBits (bits and block size of each quantized
    tensor), Skip/SimplifiedLayerNormalization, our PagedAttention (RoPE inside) and SwiGLU; ORT adds nothing
    to undo. The int8 lm_head is read through its default screen: a 4-bit MatMulNBits over the vocabulary,
    TopK, the candidates' int8 rows (GatherBlockQuantized) times the hidden state, scattered back."""
    eng = engine("vila1.5-3b-downsample", quant="rtn", max_ppl_increase_pct=None, group_size=32)
    layers = Pipeline(eng).manifest.llm.layers
    assert Pipeline(eng).manifest.quant["lm_head_screen"] == 64
    source = onnx.load(os.path.join(eng, "llm.onnx"), load_external_data=False)
    nbits = [n for n in source.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert [a["bits"] for a in attrs] == [4] * (MATMULS_PER_LAYER * layers + 1)      # + the screen
    assert {a["block_size"] for a in attrs} == {32} and {a["accuracy_level"] for a in attrs} == {4}
    assert nbits[-1].output[0] in {i for n in source.graph.node if n.op_type == "TopK" for i in n.input}
    ops = [n.op_type for n in _optimized_ops(eng, tmp_path)]
    assert ops.count("SkipSimplifiedLayerNormalization") == NORMS_PER_LAYER * layers   # + final, - first
    assert ops.count("SimplifiedLayerNormalization") == 1
    assert ops.count("PagedAttention") == layers and "RotaryEmbedding" not in ops   # RoPE, KV write, attention
    assert ops.count("SwiGLU") == layers                           # on the packed gate | up: no Split
    assert not {"Split", "Sigmoid", "QuickGelu"} & set(ops)          # qkv goes in packed too
    assert [ops.count(op) for op in ("TopK", "GatherBlockQuantized", "Mul", "ScatterElements")] == [1] * 4
    assert "DequantizeLinear" not in ops


def test_fp32_graph_fuses_norms(engine, tmp_path):
    eng = engine("vila1.5-3b-downsample", target="orin")
    layers = Pipeline(eng).manifest.llm.layers
    ops = [n.op_type for n in _optimized_ops(eng, tmp_path)]
    assert ops.count("SimplifiedLayerNormalization") == NORMS_PER_LAYER * layers + 1
    assert not {"ReduceMean", "Sqrt", "Div", "Pow", "Neg"} & set(ops)
    assert ops.count("Identity") <= 1                     # k_new/v_new come straight from their Splits
    assert ops.count("Gather") == layers + 2              # per layer: RoPE's half swap; T and P from shapes (no past copy)


def test_int4_packing_matches_onnx():
    """Two codes per byte, low nibble first, odd count padded: byte for byte what onnx itself packs."""
    codes = np.random.default_rng(0).integers(-8, 8, (5, 7)).astype(np.int8)     # 35 codes: odd
    ours = int4_tensor("w", codes)
    theirs = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, codes.shape, codes.ravel().tolist())
    theirs_raw = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, codes.shape, codes, raw=True)
    assert ours.raw_data == pack_onnx(codes) == theirs_raw.raw_data and len(ours.raw_data) == 18
    assert bytes(theirs.int32_data) == ours.raw_data       # the list path stores the same bytes, one per int32
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ours), codes)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ours), onnx.numpy_helper.to_array(theirs))
    assert pack_onnx(np.array([1, -1, -8], np.int8)) == bytes([0xF1, 0x08])


# (checkpoint, target, zero points): both graph variants with and without zero points on one fixture,
# the other fixture (3x3 downsample, NVILA-Lite) on its default per target. make test-fast keeps the
# CPU default (zero points); each other case is an export of its own (slow).
SLOW = pytest.mark.slow
REFERENCE_CASES = [pytest.param("vila1.5-3b-downsample", "cpu", False, marks=SLOW),
                   ("vila1.5-3b-downsample", "cpu", True),
                   pytest.param("vila1.5-3b-downsample", "orin", False, marks=SLOW),
                   pytest.param("vila1.5-3b-downsample", "orin", True, marks=SLOW),
                   pytest.param("nvila-lite-3x3", "cpu", True, marks=SLOW),
                   pytest.param("nvila-lite-3x3", "orin", False, marks=SLOW)]


@pytest.mark.parametrize("name, target, zero_point", REFERENCE_CASES)
def test_int4_engine_matches_quantized_reference(name, target, zero_point, checkpoint, engine):
    """Greedy tokens equal, first-step logits within 1e-4 (activations kept float: accuracy level 0), on
    the fused (cpu: MatMulNBits with zero_points) and standard (orin: DequantizeLinear with an int4
    zero point) graphs. The cpu engine without its default lm_head screen, so every logit is the int8
    head's (tests/test_lm_head_screen.py holds the screened one to this one)."""
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, target=target, int4_accuracy_level=0,
                 zero_point=zero_point, max_bpw=None, lm_head_screen=0)      # every logit from the int8 head
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    manifest = json.load(open(os.path.join(eng, "manifest.json")))
    assert manifest["quant"]["lm_head_bits"] == 8 and manifest["quant"]["symmetric"] is not zero_point
    ref.llm = apply_quantized(ref.llm, _manifest_quantization(ref.llm, manifest["quant"]))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    images = scene_images()
    prompt = "<image>\nCompare it with <image>\nWhat changed?"
    conv = pipe.conversation()
    conv.send(images, prompt, max_new_tokens=12)
    embeds = reference_inputs(spec, ref, prompt, images, pipe)
    stops = set(pipe.manifest.tokens.stop_ids)
    assert conv.last_ids == [i for i in ref.generate(embeds, 12, stops) if i not in stops]
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("lm_head_bits", [4, 0])
def test_lm_head_bits_option(lm_head_bits, checkpoint, engine, tmp_path):
    """--lm-head-bits 4 runs lm_head as a 4-bit MatMulNBits, 0 keeps it a float MatMul; both compute
    what the quantized reference with the same lm_head computes."""
    name = "vila1.5-3b-downsample"
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, lm_head_bits=lm_head_bits, int4_accuracy_level=0,
                 **SYMMETRIC)
    layers = Pipeline(eng).manifest.llm.layers
    nodes = _optimized_ops(eng, tmp_path)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in nodes)
    assert n_nbits == MATMULS_PER_LAYER * layers + (1 if lm_head_bits else 0)
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    group = json.load(open(os.path.join(eng, "manifest.json")))["quant"]["group_size"]
    ref.llm = apply_quantized(ref.llm, rtn_quantize(ref.llm, group, auto_group=True, lm_head_bits=lm_head_bits))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    embeds = reference_inputs(spec, ref, "<image>\nWhat is this?", scene_images()[:1], pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow      # two int4 exports of their own; test-fast keeps the default cpu case above
@pytest.mark.parametrize("target", ["cpu", "orin"])
def test_zero_points_and_int8_linears_match_reference(target, checkpoint, engine, tmp_path):
    """Zero points at G = 64 on every int4 linear and (budget 5.0 bits here: the fixture's linears are
    small) layer 0's down_proj as symmetric int8, on both graphs: cpu writes MatMulNBits with a
    zero_points input on the int4 ones; orin writes DequantizeLinear with an int4 zero point, which ORT
    fuses into MatMulNBits. Both compute what the quantized reference built from the manifest computes."""
    name = "vila1.5-3b-downsample"
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, target=target, zero_point=True, max_bpw=5.0,
                 int4_accuracy_level=0, lm_head_screen=0)
    layers = Pipeline(eng).manifest.llm.layers
    q = json.load(open(os.path.join(eng, "manifest.json")))["quant"]
    assert (q["symmetric"], q["group_size"], q["int8_linears"]) == (False, 64, ["model.layers.0.mlp.down_proj"])
    nodes = _optimized_ops(eng, tmp_path)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    bits = [next((a.i for a in n.attribute if a.name == "bits"), 4) for n in nbits]
    assert bits.count(4) == MATMULS_PER_LAYER * layers - 1 and bits.count(8) == 2       # + lm_head
    assert "DequantizeLinear" not in [n.op_type for n in nodes]
    # a zero_points input (the 4th) on exactly the int4 ones
    assert [len(n.input) > 3 and n.input[3] != "" for n in nbits] == [b == 4 for b in bits]
    source = onnx.load(os.path.join(eng, "llm.onnx"), load_external_data=False).graph.node
    if target == "orin":
        dql = [n for n in source if n.op_type == "DequantizeLinear"]
        assert sum(len(n.input) == 3 for n in dql) == MATMULS_PER_LAYER * layers - 1   # int8 ones: symmetric
    else:
        assert sum(n.op_type == "MatMulNBits" for n in source) == MATMULS_PER_LAYER * layers + 1
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    ref.llm = apply_quantized(ref.llm, _manifest_quantization(ref.llm, q))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    embeds = reference_inputs(spec, ref, "<image>\nWhat is this?", scene_images()[:1], pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


def _manifest_quantization(llm, q: dict):
    """RTN with the settings an engine's manifest records."""
    qllm = rtn_quantize(llm, q["group_size"], auto_group=True, lm_head_bits=q["lm_head_bits"],
                        zero_point=not q["symmetric"], int8=tuple(q["int8_linears"]),
                        plan=parse_group_plan(q.get("group_plan")))
    assert all((w.zeros is None) == (w.bits == 8 or q["symmetric"]) for w in qllm.linears.values())
    return qllm


@pytest.mark.slow   # two int4 exports with the 4096-token quality report
def test_int4_report_and_sizes(engine):
    eng = engine("vila1.5-3b-downsample", quant="rtn", max_ppl_increase_pct=None)
    report = json.load(open(os.path.join(eng, "export_report.json")))
    q = report["quant"]
    assert q["method"] == "rtn" and q["bits"] == 4 and not q["symmetric"] and q["lm_head_bits"] == 8
    r = q["report"]
    assert r["quantized_linears"] == 2 * LINEARS_PER_LAYER + 1 and r["lm_head_bits"] == 8
    embed = np.load(os.path.join(eng, "embed_tokens.npy"), mmap_mode="r")
    assert embed.dtype == np.float16 and report["embeddings_dtype"] == "float16"
    assert report["file_bytes"]["embed_tokens.npy"] < embed.size * 2 + 4096
    assert r["size_bytes"] < r["size_ref_bytes"]
    # CPU default: the mixed group plan (options.DEFAULT_GROUP_PLAN) with zero points. Per layer of the fixture
    # (hidden 64, 2 KV heads of 16, intermediate 128): q 4,096 + k, v 2,048 each + gate, up 8,192 each at
    # G = 32 (4 + 20/32 bits), o 4,096 at 64 (4 + 20/64), down 8,192 at 128 (4 + 20/128): 165,376 bits over
    # 36,864 weights; int8 lm_head at G = 64: codes + an fp16 scale. No int8 down_proj fits 4.5 bits.
    assert r["groups"] == [32, 64, 128] and r["group_plan"] == DEFAULT_GROUP_PLAN
    assert r["bits_per_weight"] == {"decoder": 165376 / 36864, "lm_head": 8 + 16 / 64}
    assert r["int8_linears"] == [] == q["int8_linears"]
    # int4 barely moves a 2-layer random model (measured: top-1 0.998, ppl +0.05 %); 4096 tokens give
    # 4095 next-token predictions
    assert r["top1_agreement"] >= 0.95 and r["ppl_increase_pct"] < 5.0 and r["n_eval_tokens"] == 4095
    on_disk = {f: os.path.getsize(os.path.join(eng, f)) for f in os.listdir(eng) if f != "export_report.json"}
    assert report["file_bytes"] == on_disk and report["engine_bytes"] == sum(on_disk.values())
    # default accuracy level 4 (int8 activations) picks the same greedy token as level 0 (float
    # activations); a fused (cpu) graph fixes its level at export, so level 0 is its own engine
    ask = (data("robot_scene.png"), "What is this?")
    level4 = Pipeline(eng).chat(*ask, max_new_tokens=1)
    level0 = engine("vila1.5-3b-downsample", quant="rtn", max_ppl_increase_pct=None, int4_accuracy_level=0)
    assert level4 == Pipeline(level0).chat(*ask, max_new_tokens=1)


def test_default_gate_is_issue_14s():
    """The export (API and CLI) stops below 0.85 top-1 agreement or above +15 % perplexity; CPU engines
    default to zero points at G = 64 and the 4.5 bits-per-weight budget, other targets to symmetric G = 32."""
    from vila_edge.cli import parser
    from vila_edge_export.options import ExportOptions, QuantOptions, quant_defaults
    from vila_edge_export.quality import DEFAULT_FLOOR
    cli = parser().parse_args(["export", "ckpt", "out"])
    api = ExportOptions(quant=QuantOptions(method="awq"))
    assert (DEFAULT_FLOOR.min_top1_agreement, DEFAULT_FLOOR.max_ppl_increase_pct) == (0.85, 15.0)
    assert (api.quant.min_top1_agreement, api.quant.max_ppl_increase_pct) == (0.85, 15.0)
    assert cli.group_size is None and cli.zero_point is None and cli.max_bpw is None   # only flags given
    assert (api.quant.zero_point, api.quant.group_size, api.quant.max_bpw) == (True, 64, 4.5)
    orin = ExportOptions(target="orin", quant=QuantOptions(method="awq")).quant
    assert (orin.zero_point, orin.group_size) == (False, 32)
    assert quant_defaults("cpu", None, None) == (True, 64) and quant_defaults("cpu", False, None) == (False, 32)
    assert quant_defaults("cpu", True, 128) == (True, 128)


@pytest.mark.slow
def test_quality_floor_stops_the_export(checkpoint, tmp_path):
    from vila_edge_export.build import ExportOptions, QuantOptions, export_engine
    from vila_edge_export.quality import QualityError
    out = tmp_path / "eng"
    with pytest.raises(QualityError, match="perplexity"):
        export_engine(checkpoint("vila1.5-3b-downsample"), str(out),
                      ExportOptions(quant=QuantOptions("rtn", group_size=64, max_ppl_increase_pct=-1.0),
                                    progress=False))
    assert not out.exists()


@pytest.mark.parametrize("bits, group, k, zero_point", [(4, 32, 256, False), (4, 64, 256, False),
                                                     (4, 128, 256, False), (8, 16, 256, False),
                                                     (8, 64, 256, False), (4, 32, 256, True),
                                                     (4, 64, 256, True), (4, 32, 224, True)])
def test_fused_linear_takes_bits_and_group_from_each_tensor(bits, group, k, zero_point):
    """vila_edge_export/onnx_llm_fused.linear: MatMulNBits with the tensor's own bits and block size computes
    x @ W.T, W = (codes - zeros) * scales (zeros packed as MatMulNBits' uint4 zero_points, an odd block
    count (224 / 32 = 7) padding each row to a whole byte), at accuracy level 0 (float activations)."""
    import onnxruntime as ort

    from vila_edge_export.onnx_graph import Graph
    from vila_edge_export.onnx_llm_fused import MS, linear
    rng = np.random.default_rng(bits * group + k + zero_point)
    n = 48
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    codes = rng.integers(lo, hi, (n, k)).astype(np.int8)
    scales = (rng.random((n, k // group)) * 0.01 + 0.001).astype(np.float32)
    zeros = rng.integers(-8, 8, (n, k // group)).astype(np.int8) if zero_point else np.zeros_like(scales, np.int8)
    g = Graph("t", "float32")
    quant = (codes, scales, group, bits) + ((zeros,) if zero_point else ())
    g.output(linear(g, g.input("x", "float32", [1, "T", k]), "w", None, None, quant,
                    accuracy_level=0), "y", "float32", [1, "T", n])
    g.opsets = {MS: 1}
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    w = (codes.astype(np.float32) - np.repeat(zeros, group, axis=1)) * np.repeat(scales, group, axis=1)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T, atol=1e-4, rtol=1e-4)
