"""Smoke test of `vila-edge bench`: it runs end to end on a tiny engine and writes its three files.

Proves the files and their keys, never a speed (speed lives in benchmarks/).
"""
import json
import os
import subprocess
import sys

import pytest

from vila_edge import bench


def test_bench_writes_json_markdown_and_plot(engine, tmp_path):
    rc = bench.main([engine("vila1.5-3b-downsample"), "--out", str(tmp_path), "--name", "tiny",
                     "--contexts", "32,64", "--images", "1", "--prefill-tokens", "32",
                     "--decode-steps", "2", "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    out = tmp_path / "tiny"
    result = json.loads((out / "bench.json").read_text())
    assert {"machine", "vision", "ttft", "prefill", "decode", "memory", "host_copy_gbs",
            "host_read_gbs", "llm_weight_bytes", "kv_bytes_per_token"} <= result.keys()
    assert {"cpu", "threads_used", "ram_bytes", "onnxruntime"} <= result["machine"].keys()
    assert {"p50_s", "p90_s"} <= result["vision"].keys()
    assert [t["images"] for t in result["ttft"]] == [1]
    assert [d["context"] for d in result["decode"]] == [32, 64]
    # K and V x 2 layers x 2 KV heads x head dim 16 (hidden 64 / 4 heads) x fp32, by hand
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    llm_onnx = os.path.getsize(os.path.join(engine("vila1.5-3b-downsample"), "llm.onnx"))   # no .data: tiny
    assert result["llm_weight_bytes"] == llm_onnx
    for d in result["decode"]:
        assert {"tok_s", "achieved_gbs", "pct_of_host_copy", "pct_of_host_read", "orin_ceiling_tok_s"} <= d.keys()
        assert d["bytes_per_step"] == llm_onnx + 512 * d["context"]
        # the bandwidth reported is the tokens/s reported times the bytes each step reads
        assert d["achieved_gbs"] * 1e9 == pytest.approx(d["tok_s"] * d["bytes_per_step"], rel=1e-6)
    assert result["memory"]["peak_rss_bytes"] > 0 and result["memory"]["device_bytes"] is None
    assert "| context | tok/s |" in (out / "bench.md").read_text()
    assert (out / "decode_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_imports_no_torch():
    code = "import sys, vila_edge.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
