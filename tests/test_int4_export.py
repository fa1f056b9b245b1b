"""4-bit engines: ORT runs every quantized linear as one MatMulNBits, and the int4 engine (int8
lm_head by default) computes what the quantized torch reference computes."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import data
from export.checkpoint import read_checkpoint
from export.onnx_graph import int4_tensor, pack_int4
from export.quantize import apply_quantized, rtn_quantize
from export.reference import ReferenceVLM
from test_equivalence import _images, _reference_inputs
from vila_edge import Pipeline
from vila_edge.backend import OrtSession

LINEARS_PER_LAYER = 7   # q, k, v, o, gate, up, down
MATMULS_PER_LAYER = 4   # in the graph: qkv (fused), o, gate_up (fused), down
# input and post-attention RMSNorm. ORT 1.31's CPU fusions give SimplifiedLayerNormalization; they
# never form SkipSimplifiedLayerNormalization (its SkipLayerNormFusion matches LayerNormalization only).
NORMS_PER_LAYER = 2
# The standard-op graph TensorRT takes: symmetric int4 at G = 32, every decoder linear int4.
SYMMETRIC = dict(zero_point=False, max_bpw=None)


def _optimized_ops(eng, tmp_path) -> list:
    optimized = str(tmp_path / "llm.opt.onnx")
    OrtSession(os.path.join(eng, "llm.onnx"), optimized_path=optimized)
    return list(onnx.load(optimized, load_external_data=False).graph.node)


@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_matmulnbits_per_fused_linear(name, engine, tmp_path):
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, **SYMMETRIC)
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


def test_fp32_graph_fuses_norms(engine, tmp_path):
    eng = engine("vila1.5-3b-downsample")
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
    assert ours.raw_data == pack_int4(codes) == theirs_raw.raw_data and len(ours.raw_data) == 18
    assert bytes(theirs.int32_data) == ours.raw_data       # the list path stores the same bytes, one per int32
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ours), codes)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ours), onnx.numpy_helper.to_array(theirs))
    assert pack_int4(np.array([1, -1, -8], np.int8)) == bytes([0xF1, 0x08])


@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_int4_engine_matches_quantized_reference(name, checkpoint, engine):
    """Greedy tokens equal, first-step logits within 1e-4 (activations kept float: accuracy level 0)."""
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, **SYMMETRIC)
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    manifest = json.load(open(os.path.join(eng, "manifest.json")))
    assert manifest["quant"]["lm_head_bits"] == 8
    ref.llm = apply_quantized(ref.llm, rtn_quantize(ref.llm, manifest["quant"]["group_size"], auto_group=True,
                                                    lm_head_bits=8))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    images = _images()
    prompt = "<image>\nCompare it with <image>\nWhat changed?"
    conv = pipe.conversation()
    conv.send(images, prompt, max_new_tokens=12)
    embeds = _reference_inputs(spec, ref, prompt, images, pipe)
    stops = set(pipe.manifest.tokens.stop_ids)
    assert conv.last_ids == [i for i in ref.generate(embeds, 12, stops) if i not in stops]
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("lm_head_bits", [4, 0])
def test_lm_head_bits_option(lm_head_bits, checkpoint, engine, tmp_path):
    """--lm-head-bits 4 runs lm_head as a 4-bit MatMulNBits, 0 keeps it a float MatMul; both compute
    what the quantized reference with the same lm_head computes."""
    name = "vila1.5-3b-downsample"
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, lm_head_bits=lm_head_bits, **SYMMETRIC)
    layers = Pipeline(eng).manifest.llm.layers
    nodes = _optimized_ops(eng, tmp_path)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in nodes)
    assert n_nbits == MATMULS_PER_LAYER * layers + (1 if lm_head_bits else 0)
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    group = json.load(open(os.path.join(eng, "manifest.json")))["quant"]["group_size"]
    ref.llm = apply_quantized(ref.llm, rtn_quantize(ref.llm, group, auto_group=True, lm_head_bits=lm_head_bits))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    embeds = _reference_inputs(spec, ref, "<image>\nWhat is this?", _images()[:1], pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


def test_default_cpu_engine_zero_points_and_int8_matches_reference(checkpoint, engine, tmp_path):
    """The CPU default: int4 with an INT4 zero point [K/G, N] on every int4 DequantizeLinear, G = 64, and
    (budget 5.0 bits here: the fixture's linears are small) layer 0's down_proj as symmetric int8. ORT
    fuses all of them into MatMulNBits, and the engine computes what the quantized reference built from
    the manifest's quant fields computes."""
    name = "vila1.5-3b-downsample"
    eng = engine(name, quant="rtn", max_ppl_increase_pct=None, max_bpw=5.0)
    layers = Pipeline(eng).manifest.llm.layers
    q = json.load(open(os.path.join(eng, "manifest.json")))["quant"]
    assert (q["symmetric"], q["group_size"], q["int8_linears"]) == (False, 64, ["model.layers.0.mlp.down_proj"])
    nodes = _optimized_ops(eng, tmp_path)
    bits = [next((a.i for a in n.attribute if a.name == "bits"), 4) for n in nodes if n.op_type == "MatMulNBits"]
    assert bits.count(4) == MATMULS_PER_LAYER * layers - 1 and bits.count(8) == 2       # + lm_head
    assert "DequantizeLinear" not in [n.op_type for n in nodes]
    dql = [n for n in onnx.load(os.path.join(eng, "llm.onnx")).graph.node if n.op_type == "DequantizeLinear"]
    assert sum(len(n.input) == 3 for n in dql) == MATMULS_PER_LAYER * layers - 1       # int8 ones: symmetric
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    ref.llm = apply_quantized(ref.llm, _manifest_quantization(ref.llm, q))
    pipe = Pipeline(eng, int4_accuracy_level=0)
    embeds = _reference_inputs(spec, ref, "<image>\nWhat is this?", _images()[:1], pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


def _manifest_quantization(llm, q: dict):
    """RTN with the settings an engine's manifest records."""
    qllm = rtn_quantize(llm, q["group_size"], auto_group=True, lm_head_bits=q["lm_head_bits"],
                        zero_point=not q["symmetric"], int8=tuple(q["int8_linears"]))
    assert all((w.zeros is None) == (w.bits == 8) for w in qllm.linears.values())
    return qllm


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
    # CPU default: G = 64 divides every K of the fixture; int4 codes + an fp16 scale and an int4 zero point
    # per 64 weights; int8 lm_head: codes + an fp16 scale. No int8 down_proj fits 4.5 bits at this size.
    assert r["groups"] == [64] and r["bits_per_weight"] == {"decoder": 4 + 20 / 64, "lm_head": 8 + 16 / 64}
    assert r["int8_linears"] == [] == q["int8_linears"]
    assert 0.0 <= r["top1_agreement"] <= 1.0 and r["n_eval_tokens"] > 0
    assert report["engine_bytes"] > 0
    # default accuracy level 4 (int8 activations) still answers
    assert isinstance(Pipeline(eng).chat(data("robot_scene.png"), "What is this?", max_new_tokens=4), str)


def test_default_gate_is_issue_14s():
    """The export (API and CLI) stops below 0.80 top-1 agreement or above +15 % perplexity; CPU engines
    default to zero points at G = 64 and the 4.5 bits-per-weight budget."""
    from export.build import ExportOptions, quant_defaults
    from export.llm_quant import QuantOptions
    from export.quality import DEFAULT_FLOOR
    from vila_edge.cli import parser
    cli = parser().parse_args(["export", "ckpt", "out"])
    api = ExportOptions()
    assert (DEFAULT_FLOOR.min_top1_agreement, DEFAULT_FLOOR.max_ppl_increase_pct) == (0.80, 15.0)
    assert (api.min_top1_agreement, api.max_ppl_increase_pct) == (cli.min_top1, cli.max_ppl_increase) == (0.80, 15.0)
    assert api.group_size is None is cli.group_size and api.zero_point is None is cli.zero_point
    assert quant_defaults("cpu", None, None) == (True, 64) and quant_defaults("cpu", False, None) == (False, 32)
    assert api.max_bpw == cli.max_bpw == 4.5
    assert QuantOptions().floor == DEFAULT_FLOOR


def test_quality_floor_stops_the_export(checkpoint, tmp_path):
    from export.build import ExportOptions, export_engine
    from export.quality import QualityError
    out = tmp_path / "eng"
    with pytest.raises(QualityError, match="perplexity"):
        export_engine(checkpoint("vila1.5-3b-downsample"), str(out),
                      ExportOptions(quant="rtn", group_size=64, max_ppl_increase_pct=-1.0, progress=False))
    assert not out.exists()
