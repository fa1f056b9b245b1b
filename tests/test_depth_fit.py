"""benchmarks/depth_fit.py and bench_3b_report.estimates against hand-computed values."""
import pytest

from benchmarks.bench_3b_report import estimates
from benchmarks.depth_fit import estimate_rows, fit_depth, lever


def test_two_depths_fit_exactly_and_keep_the_fixed_part():
    # 30 ms at 4 layers, 50 ms at 8: b = 20 / 4 = 5 ms per layer, a = 30 - 4 * 5 = 10 ms;
    # at 32 layers 10 + 160 = 170 ms (scaling 50 ms by 32/8 would say 200 ms).
    f = fit_depth([(4, 0.030), (8, 0.050)])
    assert f.a == pytest.approx(0.010) and f.b == pytest.approx(0.005)
    assert f.at(32) == pytest.approx(0.170)
    assert f.layers == (4, 8)


def test_three_depths_least_squares():
    # x = 2, 4, 6; y = 1, 2, 4: mean x 4, mean y 7/3, Sxx = 8, Sxy = (-2)(-4/3) + 0 + 2(5/3) = 6
    # -> b = 0.75, a = 7/3 - 3 = -2/3.
    f = fit_depth([(2, 1.0), (4, 2.0), (6, 4.0)])
    assert f.b == pytest.approx(0.75) and f.a == pytest.approx(-2 / 3)


def test_one_depth_is_refused():
    with pytest.raises(ValueError, match="two distinct depths"):
        fit_depth([(8, 0.05), (8, 0.06)])


def test_lever():
    # From depths 4 and 8 to 32: an error in the L8 time moves the estimate by (32-4)/(8-4) = 7 times.
    assert lever((4, 8), 32) == pytest.approx(7.0)
    assert lever((2, 8), 32) == pytest.approx(5.0)


def test_estimate_rows_and_a_nonsense_extrapolation():
    rows = estimate_rows({"sys": {128: {4: 0.030, 8: 0.050}}}, 32)["sys"][128]
    assert rows["est_s"] == pytest.approx(0.170) and rows["est_tok_s"] == pytest.approx(1 / 0.170)
    assert rows["a_s"] == pytest.approx(0.010) and rows["b_s"] == pytest.approx(0.005)
    # Slower at 4 than at 8 layers: a = 0.07, b = -0.005, so -0.09 s at 32 -- no estimate, and why.
    bad = estimate_rows({"sys": {128: {4: 0.050, 8: 0.030}}}, 32)["sys"][128]
    assert bad["est_s"] is None and bad["est_tok_s"] is None and "too noisy" in bad["error"]


def _depth(layers, ours_s, peer_s, ours_ttft, hf_ttft):
    row = lambda s: {"decode": [{"context": 128, "step_s": s}]}   # noqa: E731
    d = {"layers": layers, "vila_edge_int4": row(ours_s), "ort_genai": row(peer_s), "llama_cpp": row(peer_s),
         "hf": row(peer_s)}
    d["vila_edge_int4"]["ttft_1_image"] = {"median_s": ours_ttft}
    d["hf"]["ttft_1_image"] = {"median_s": hf_ttft}
    return d


def test_report_ratios_point_the_right_way():
    # ours: 20 ms + 5 ms/layer -> 180 ms at 32; peer: 40 ms + 5 ms/layer -> 200 ms: 200/180 faster.
    # TTFT ours 4 s + 0.25 s/layer -> 12 s; transformers 6 s + 0.5 s/layer -> 22 s: 12/22 (< 1 is faster).
    r = {"target_layers": 32, "depths": [_depth(4, 0.040, 0.060, 5.0, 8.0), _depth(8, 0.060, 0.080, 6.0, 10.0)]}
    e = estimates(r)
    assert e["fits"]["vila_edge_int4"][128]["est_s"] == pytest.approx(0.180)
    assert e["ratios"]["ort_genai"][128] == pytest.approx(0.200 / 0.180)
    assert e["ratios"]["hf"]["ttft"] == pytest.approx(12.0 / 22.0)
    assert "ttft" not in e["ratios"]["llama_cpp"]
    assert e["lever"] == pytest.approx(7.0)
