"""benchmarks/paired.py: systems side by side in long-lived processes, ratios per block of steps."""
import pytest

from benchmarks.paired import markdown, paired_decode


def test_ratio_is_the_peers_step_over_ours_block_by_block():
    """Steps of known length (2 ms ours, 6 ms and 3 ms peers): the ratios are 3 and 1.5, every block is
    measured, tokens/s follow the step lengths, the contexts come back in order."""
    r = paired_decode({"ours": ("sleep", "0.002"), "slow": ("sleep", "0.006"), "near": ("sleep", "0.003")},
                      threads=1, contexts=[16, 32], steps=5, blocks=4)
    assert [row["context"] for row in r["contexts"]] == [16, 32]
    for row in r["contexts"]:
        assert set(row["ratio"]) == {"slow", "near"} and all(len(v) == 4 for v in row["block_step_s"].values())
        assert row["ratio"]["slow"]["median"] == pytest.approx(3.0, rel=0.15)
        assert row["ratio"]["near"]["median"] == pytest.approx(1.5, rel=0.15)
        assert row["tok_s"]["ours"] == pytest.approx(500, rel=0.15)
        assert row["ratio"]["slow"]["p10"] <= row["ratio"]["slow"]["median"] <= row["ratio"]["slow"]["p90"]


def test_a_system_that_cannot_load_is_named_and_the_others_stop(tmp_path):
    missing = str(tmp_path / "no-engine")
    with pytest.raises(RuntimeError, match=r"vila_edge_int4 \(.*no-engine\)"):
        paired_decode({"ours": ("sleep", "0.001"), "broken": ("vila_edge_int4", missing)},
                      threads=1, contexts=[16], steps=2, blocks=1)


def test_markdown_rows():
    r = {"steps": 32, "blocks": 15, "contexts": [
        {"context": 128, "tok_s": {"vila_edge_int4": 180.0, "llama_cpp": 110.0},
         "ratio": {"llama_cpp": {"median": 1.64, "p10": 1.5, "p90": 1.8}}}]}
    text = "\n".join(markdown(r, {"llama_cpp": "llama.cpp x.gguf"}))
    assert "| 128 | vila_edge_int4 | 180.0 |  |" in text
    assert "| 128 | llama.cpp x.gguf | 110.0 | 1.64 (1.50-1.80) |" in text
