"""`vila-edge bench` (the runtime's measures) and `python -m benchmarks.engine` (the full report):
both run end to end on tiny engines and write what they promise.

Proves the files, their keys and the arithmetic between figures, never a speed (speed lives in
benchmarks/).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import env_without
from vila_edge.cache import BUNDLED_ENGINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--contexts", "32,64", "--images", "1", "--prefill-tokens", "32", "--decode-steps", "2", "--repeats", "1",
         "--warmup", "0"]


@pytest.mark.slow   # 256 MiB bandwidth probes; test_vila_edge_bench_needs_only_the_runtime stays fast
def test_engine_report_writes_json_markdown_and_plot(engine, tmp_path):
    from benchmarks import engine as report

    eng = engine("vila1.5-3b-downsample")
    assert report.main([eng, "--out", str(tmp_path), "--name", "tiny", *SMALL]) == 0
    out = tmp_path / "tiny"
    result = json.loads((out / "bench.json").read_text())
    assert {"machine", "vision", "ttft", "prefill", "decode", "memory", "host_copy_gbs",
            "host_read_gbs", "llm_weight_bytes", "kv_bytes_per_token"} <= result.keys()
    assert {"cpu", "threads_used", "ram_bytes", "onnxruntime", "loadavg_end"} <= result["machine"].keys()
    assert {"p50_s", "p90_s"} <= result["vision"].keys()
    assert [t["images"] for t in result["ttft"]] == [1]
    assert [d["context"] for d in result["decode"]] == [32, 64]
    # K and V x 2 layers x 2 KV heads x head dim 16 (hidden 64 / 4 heads) x fp16 (the fp32 fused graph's pool), by hand
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    llm_onnx = os.path.getsize(os.path.join(eng, "llm.onnx"))   # no .data: tiny
    assert result["llm_weight_bytes"] == llm_onnx
    for d in result["decode"]:
        assert d["bytes_per_step"] == llm_onnx + 256 * d["context"]
        # the bandwidth reported is the tokens/s reported times the bytes each step reads
        assert d["achieved_gbs"] * 1e9 == pytest.approx(d["tok_s"] * d["bytes_per_step"], rel=1e-6)
        assert d["pct_of_host_read"] == pytest.approx(100 * d["achieved_gbs"] / result["host_read_gbs"], rel=1e-9)
        # Orin Nano's datasheet 68 GB/s over the bytes of one step
        assert d["orin_ceiling_tok_s"]["orin-nano"] == pytest.approx(68e9 / d["bytes_per_step"], rel=1e-9)
    assert result["memory"]["device_bytes"] is None
    assert "| context | tok/s |" in (out / "bench.md").read_text()
    assert (out / "decode_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vila_edge_bench_needs_only_the_runtime(tmp_path):
    """`pip install vila-edge` then `vila-edge bench ENGINE`: no torch, no matplotlib, no exporter and
    no benchmarks/ folder importable; the figures a robot developer reads, and memory that is the
    engine's (the bundled 7.7 MB engine: ~65 MiB with ORT's arenas)."""
    env = env_without(tmp_path, "torch", "matplotlib", "vila_edge_export", "benchmarks", "transformers")
    r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "bench", BUNDLED_ENGINE, "--json",
                        str(tmp_path / "b.json"), *SMALL], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert [d["context"] for d in result["decode"]] == [32, 64] and [t["images"] for t in result["ttft"]] == [1]
    for d in result["decode"]:
        assert f"decode at context {d['context']:<7} {d['tok_s']:.1f} tok/s" in r.stdout
    assert f"time to first token       {result['ttft'][0]['median_s'] * 1e3:.1f} ms" in r.stdout
    mem = result["memory"]
    assert mem["engine_peak_bytes"] == mem["peak_rss_bytes"] - mem["rss_before_load_bytes"]
    assert 0 < mem["engine_peak_bytes"] < 256 * 2**20, mem


def test_bench_imports_no_torch():
    code = "import sys, vila_edge.measure, vila_edge.cli; vila_edge.cli.parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"
