"""bench_peers' rounds: medians over rounds and per-round ratios, against hand-computed figures."""
import pytest

from benchmarks.bench_peers import combine_rounds, markdown, ratios


def _rows(tok128, tok512, ttft=None):
    r = {"decode": [{"context": 128, "tok_s": tok128, "step_s": 1 / tok128, "steps": 96},
                    {"context": 512, "tok_s": tok512, "step_s": 1 / tok512, "steps": 96}]}
    if ttft is not None:
        r["ttft_1_image"] = {"images": 1, "median_s": ttft, "runs": 3, "prompt_tokens": 80}
    return r


def test_combine_rounds_takes_medians_and_keeps_each_round():
    ours = combine_rounds([_rows(100, 80, 0.10), _rows(140, 90, 0.30), _rows(120, 70, 0.20)])
    assert [d["tok_s"] for d in ours["decode"]] == [120, 80]
    assert ours["decode"][0]["rounds_tok_s"] == [100, 140, 120]
    assert ours["decode"][1]["step_s"] == pytest.approx(1 / 80)
    assert ours["decode"][0]["steps"] == 3 * 96
    assert ours["ttft_1_image"]["median_s"] == 0.20 and ours["ttft_1_image"]["rounds_s"] == [0.10, 0.30, 0.20]
    assert ours["rounds"] == 3


def test_ratios_per_round_pair_the_systems_of_one_round():
    ours = combine_rounds([_rows(100, 80), _rows(140, 90), _rows(120, 70)])
    peer = combine_rounds([_rows(100, 40), _rows(100, 60), _rows(150, 70)])
    r = ratios(ours, peer)
    assert r["decode_tok_s"] == {128: pytest.approx(120 / 100), 512: pytest.approx(80 / 60)}
    assert r["decode_tok_s_rounds"][128] == pytest.approx([1.0, 1.4, 0.8])
    assert r["decode_tok_s_rounds"][512] == pytest.approx([2.0, 1.5, 1.0])
    report = {"name": "x", "note": "", "rounds": 3, "vila_edge_int4": {**ours, "kind": "int4"},
              "ort_genai": {**peer, "onnxruntime_genai": "0.0"}, "ratio_ort_genai": r,
              "machine": {"cpu": "cpu", "threads_used": 2, "loadavg_start": [0.0], "loadavg_end": [0.0]}}
    text = markdown(report)
    assert "| 120.0 | 100.0 | 1.20 (rounds 0.80-1.40) |" in text
    assert "| 80.0 | 60.0 | 1.33 (rounds 1.00-2.00) |" in text


def test_one_round_has_no_round_ratios():
    r = ratios(_rows(100, 80), _rows(50, 40))
    assert "decode_tok_s_rounds" not in r and r["decode_tok_s"] == {128: 2.0, 512: 2.0}
