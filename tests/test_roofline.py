"""benchmarks/roofline.py: the work counts behind the peer comparison's roofline, against hand-computed values."""
import glob
import os
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import roofline as rl
from benchmarks.bench_peers import roofline, roofline_markdown
from vila_edge_export.checkpoint import read_checkpoint
from benchmarks.common import llm_weight_bytes
from vila_edge.manifest import Manifest

LLM = SimpleNamespace(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab_size=10)


def test_prefill_flops_by_hand():
    # q, o: 4x4 each; k, v: 4x2 each; gate, up, down: 4x8 each -> 16+16+8+8+96 = 144 MACs per token.
    # 3 tokens: 432. Causal attention: QK^T and PV over (1+2+3) pairs x 4 query channels = 2*4*6 = 48.
    # Vocab projection on the last position: 4*10 = 40. (432 + 48 + 40) * 2 FLOPs.
    assert rl.prefill_flops(LLM, 3) == 1040


def test_vision_flops_by_hand():
    # 8x8 image, 4x4 patches: 4 tokens. select_layer -2 of 2 layers: 1 layer runs.
    # Patch conv: 4 tokens x 48 inputs x 4 channels = 768. Layer: 4 x (4*4*4 + 2*4*8) + 2*4*4*4 = 640.
    # mlp_downsample 2x2 (in 4, out 6): 1 merged token x (16*6 + 6*6) = 132.
    spec = SimpleNamespace(
        vision=SimpleNamespace(image_size=8, patch=4, hidden=4, layers=2, intermediate=8, select_layer=-2),
        projector=SimpleNamespace(kind="mlp_downsample", merge=2, in_channels=4, out_channels=6),
        image_mode="resize", llm=LLM)
    assert rl.vision_flops(spec) == 2 * (768 + 640 + 132)
    assert rl.prompt_flops(spec, 3) == 2 * (768 + 640 + 132) + 1040
    assert rl.prompt_flops(SimpleNamespace(**{**vars(spec), "image_mode": "dynamic"}), 3) is None
    with pytest.raises(ValueError, match="unknown projector type 'qformer'"):
        rl.vision_flops(SimpleNamespace(**{**vars(spec), "projector": SimpleNamespace(
            kind="qformer", merge=1, in_channels=4, out_channels=6)}))


@pytest.mark.slow
def test_decode_roofline_counts_the_bytes_each_system_reads(checkpoint, engine, tmp_path):
    from benchmarks.hf_to_gguf import convert
    from safetensors.numpy import load_file

    ckpt = checkpoint("vila1.5-3b-downsample")
    spec = read_checkpoint(ckpt)
    gguf = str(tmp_path / "llm.gguf")
    convert(os.path.join(ckpt, "llm"), gguf, np.float32)
    # Independent count: every llm/ tensor at 4 bytes, the embedding table only when it is also the head.
    tensors = {}
    for f in glob.glob(os.path.join(ckpt, "llm", "*.safetensors")):
        tensors.update(load_file(f))
    untied = "lm_head.weight" in tensors
    peer_w = sum(4 * t.size for name, t in tensors.items() if not (untied and name == "model.embed_tokens.weight"))
    assert rl.gguf_step_bytes(gguf) == peer_w

    eng = engine("vila1.5-3b-downsample", quant="rtn", max_ppl_increase_pct=None)
    ours_w = llm_weight_bytes(eng, Manifest.load(eng))
    l = spec.llm
    r = {"vila_edge_fp32": {}, "vila_edge_int4": {"decode": [{"context": 8, "step_s": 0.5}]},
         "llama_cpp": {"gguf": gguf, "decode": [{"context": 8, "step_s": 0.25}]}}
    ceil = {"read_gbs": 2e-9, "int4_gemv_gbs": 1e-9,             # 2 and 1 bytes/s: the bound in whole seconds
            "threads": 2, "int4_group": 128, "ort_fp32_gemm_gflops": 1.0, "torch_fp32_gemm_gflops": 1.0,
            "ort_int8_gemm_gops": 1.0}
    rf = roofline(r, spec, eng, ceil)
    (row,) = rf["decode"]
    assert rf["ttft"] == []                                       # no time to first token measured: none reported
    assert "| 8 |" in "\n".join(roofline_markdown(rf))
    # both KV caches fp16 (the engine's: the fp32 fused graph's default pool, manifest kv_dtype)
    ours_kv = peer_kv = l.layers * 2 * l.kv_heads * l.head_dim * 2
    assert Manifest.load(eng).kv_dtype == "float16"
    assert row["vila_edge_bytes"] == ours_w + 8 * ours_kv and row["llama_cpp_bytes"] == peer_w + 8 * peer_kv
    assert row["vila_edge_gbs"] == pytest.approx(row["vila_edge_bytes"] / 0.5 / 1e9)
    best_s = ours_w / 1 + 8 * ours_kv / 2
    assert row["vila_edge_bound_tok_s"] == pytest.approx(1 / best_s)
    assert row["best_ratio_vs_llama_cpp"] == pytest.approx(0.25 / best_s)


def test_ttft_roofline_against_the_gemm_ceilings(checkpoint):
    spec = read_checkpoint(checkpoint("vila1.5-3b-downsample"))
    flops = rl.prompt_flops(spec, 10)
    r = {"vila_edge_fp32": {"ttft_1_image": {"prompt_tokens": 10, "median_s": 2.0}},
         "hf": {"ttft_1_image": {"prompt_tokens": 10, "median_s": 4.0}}}
    ceil = {"threads": 2, "read_gbs": 1.0, "ort_fp32_gemm_gflops": 1e-9, "torch_fp32_gemm_gflops": 2e-9,
            "ort_int8_gemm_gops": 4e-9}                         # 1, 2 and 4 FLOP/s
    rf = roofline(r, spec, None, ceil)
    assert rf["prompt_flops"] == flops and rf["decode"] == []
    ours, hf = rf["ttft"]
    assert ours["system"] == "vila_edge_fp32" and ours["gflops"] == pytest.approx(flops / 2 / 1e9)
    assert ours["pct_of_ceiling"] == pytest.approx(100 * flops / 2)
    assert hf["system"] == "hf" and hf["pct_of_ceiling"] == pytest.approx(100 * flops / 4 / 2)
    assert rf["ttft_int8_bound_s"] == pytest.approx(flops / 4)
    assert rf["ttft_best_ratio_vs_hf"] == pytest.approx(flops / 4 / 4.0)
    assert "at best" in "\n".join(roofline_markdown(rf))
