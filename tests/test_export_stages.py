"""Export as stages with files between them: the three stage commands run one by one give the same
engine directory, byte for byte, as the one-shot export (every stage is deterministic on the CPU)."""
import os

import numpy as np
import pytest

from vila_edge_export import stages
from vila_edge_export.build import ExportOptions, QuantOptions, export_engine
from vila_edge_export.stage_quantize import CONFIG, read_quantized


def _files(root: str) -> dict:
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.parametrize("quant, flags", [
    ("none", ["--dtype", "fp16"]),
    ("rtn", ["--quant", "rtn", "--group-size", "32", "--max-ppl-increase-pct", "none", "--eval-tokens", "256"]),
])
def test_stages_one_by_one_equal_the_one_shot_export(checkpoint, tmp_path, quant, flags):
    ckpt = checkpoint("vila1.5-3b-downsample")
    one_shot = str(tmp_path / "one-shot")
    opts = stages.options(stages.parser().parse_args(["engine", ckpt, "g", "o", "--quiet"] + flags))
    assert opts.quant.method == quant
    export_engine(ckpt, one_shot, opts)

    work, out = tmp_path / "work", str(tmp_path / "staged")
    graph_flags = []
    if quant != "none":
        assert stages.main(["quantize", ckpt, str(work / "quant"), "--quiet"] + flags) == 0
        assert sorted(os.listdir(work / "quant")) == sorted([CONFIG, "llm.safetensors"])
        graph_flags = ["--quantized", str(work / "quant")]
    assert stages.main(["graphs", ckpt, str(work / "graphs"), "--quiet"] + flags + graph_flags) == 0
    # rerunnable: a second run replaces the first with the same files
    first = _files(work / "graphs")
    assert stages.main(["graphs", ckpt, str(work / "graphs"), "--quiet"] + flags + graph_flags) == 0
    assert _files(work / "graphs") == first
    assert stages.main(["engine", ckpt, str(work / "graphs"), out, "--quiet"] + flags) == 0

    staged, reference = _files(out), _files(one_shot)
    assert sorted(staged) == sorted(reference)
    for name in reference:
        assert staged[name] == reference[name], name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no work or temp dirs left


@pytest.mark.slow
def test_quantized_directory_round_trips(checkpoint, tmp_path):
    from vila_edge_export.build import chat_template_source, read_spec
    from vila_edge_export.llm_quant import quantize_llm
    from vila_edge_export.stage_quantize import quantize_stage

    ckpt = checkpoint("vila1.5-3b-downsample")
    opts = ExportOptions(quant=QuantOptions("rtn", group_size=32, max_ppl_increase_pct=None, eval_tokens=256),
                         progress=False)
    spec = read_spec(ckpt, opts)
    weights, quant, _ = quantize_llm(spec, opts.quant, chat_template_source(spec), False)
    got_w, got_q, info = read_quantized(quantize_stage(ckpt, str(tmp_path / "q"), opts))
    assert info["method"] == "rtn" and info["group_size"] == 32 and info["lm_head_bits"] == 8
    assert info["symmetric"] is False and info["int8_linears"] == []       # cpu default: zero points
    assert sorted(got_w) == sorted(weights) and sorted(got_q) == sorted(quant)
    for k in weights:
        np.testing.assert_array_equal(got_w[k], weights[k])
    for k, (codes, scales, group, bits, *zeros) in quant.items():
        np.testing.assert_array_equal(got_q[k][0], codes)
        np.testing.assert_array_equal(got_q[k][1], scales)
        assert got_q[k][2:4] == (group, bits) and len(got_q[k]) == 4 + len(zeros)
        assert len(zeros) == (k != "lm_head")          # zero points on the int4 linears, not on lm_head
        if zeros:
            np.testing.assert_array_equal(got_q[k][4], zeros[0])


def test_graphs_stage_refuses_a_missing_quantize_output(checkpoint, tmp_path, capsys):
    ckpt = checkpoint("vila1.5-3b-downsample")
    argv = ["graphs", ckpt, str(tmp_path / "g"), "--quiet", "--quant", "rtn", "--quantized", str(tmp_path)]
    assert stages.main(argv) == 2
    assert "llm.safetensors: missing; not a quantize stage output" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
