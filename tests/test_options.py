"""Export options: one validated dataclass per concern, and the command lines take their defaults from them."""
import pytest

import vila_edge_export.build as build
from vila_edge import cli
from vila_edge_export import stages
from vila_edge_export.options import (DEFAULT_ACT_ORDER, DEFAULT_AWQ_GPTQ, DEFAULT_GROUP, DEFAULT_ZERO_POINT_GROUP,
                                      ExportOptions, QuantOptions)
from vila_edge.errors import ExportOptionError


@pytest.fixture
def captured(monkeypatch):
    seen = []

    class Done:
        family, dtype, quant = "vila1.5", "float32", {"method": "none"}

    def fake_export(checkpoint, out, opts):
        seen.append(opts)
        return Done()
    monkeypatch.setattr(build, "export_engine", fake_export)
    # The CLI reads the checkpoint's configs before exporting (its errors come before any progress bar).
    monkeypatch.setattr("vila_edge_export.checkpoint.read_checkpoint", lambda *a, **k: None)
    return seen


def test_cli_export_defaults_are_the_dataclasses(captured):
    assert cli.main(["export", "ckpt", "out"]) == 0
    assert captured[0] == ExportOptions()
    # the cpu target: zero points at G = 64, int8 outer down_projs within 4.5 bits, the issue-14 gate
    q = captured[0].quant
    assert (q.zero_point, q.group_size, q.max_bpw) == (True, DEFAULT_ZERO_POINT_GROUP, 4.5) and DEFAULT_GROUP == 32
    assert (q.max_ppl_increase_pct, q.min_top1_agreement) == (15.0, 0.85)


@pytest.mark.parametrize("flags, zero_point, group, max_bpw", [
    (["--no-zero-point"], False, 32, 4.5),
    (["--no-zero-point", "--group-size", "128"], False, 128, 4.5),
    (["--zero-point", "--target", "orin"], True, 64, 4.5),
    (["--target", "orin"], False, 32, 4.5),
    (["--max-bpw", "0"], True, 64, None),
    (["--max-bpw", "5"], True, 64, 5.0),
])
def test_cli_zero_point_and_bpw_flags(captured, flags, zero_point, group, max_bpw):
    assert cli.main(["export", "ckpt", "out", "--quant", "rtn", *flags]) == 0
    q = captured[0].quant
    assert (q.zero_point, q.group_size, q.max_bpw) == (zero_point, group, max_bpw)


def test_cli_export_flags_reach_the_options(captured):
    argv = ["export", "ckpt", "out", "--dtype", "fp16", "--quant", "awq", "--group-size", "64", "--lm-head-bits", "4",
            "--eval-tokens", "512", "--no-quality-floor", "--quiet", "--target", "orin", "--int4-accuracy-level", "0",
            "--embed-bits", "8"]
    assert cli.main(argv) == 0
    assert captured[0] == ExportOptions(dtype="fp16", progress=False, target="orin", int4_accuracy_level=0,
                                        quant=QuantOptions("awq", group_size=64, lm_head_bits=4, eval_tokens=512,
                                                           max_ppl_increase_pct=None, embed_bits=8))


def test_stage_flags_default_to_the_dataclasses():
    opts = stages.options(stages.parser().parse_args(["graphs", "ckpt", "out"]))
    assert opts == ExportOptions()
    given = stages.options(stages.parser().parse_args(["graphs", "ckpt", "out", "--zero-point", "false",
                                                       "--max-bpw", "none"]))
    assert (given.quant.zero_point, given.quant.group_size, given.quant.max_bpw) == (False, 32, None)


@pytest.mark.parametrize("make, words", [
    (lambda: QuantOptions("gptq2"), "quant 'gptq2' unknown"),
    (lambda: QuantOptions("none", lm_head_bits=8), "needs quant rtn or awq"),
    (lambda: QuantOptions("rtn", lm_head_bits=3), "lm_head_bits 3 unknown"),
    (lambda: QuantOptions("rtn", group_size=0), "group_size"),
    (lambda: QuantOptions("rtn", max_bpw=0), "max_bpw"),
    (lambda: ExportOptions(dtype="bf16"), "dtype 'bf16' unknown"),
    (lambda: ExportOptions(target="tpu"), "target 'tpu' unknown"),
    (lambda: ExportOptions(int4_accuracy_level=5), "int4_accuracy_level 5 unknown"),
    (lambda: QuantOptions("none", embed_bits=8), "embed_bits 8"),
    (lambda: QuantOptions("rtn", embed_bits=2), "embed_bits 2"),
    (lambda: QuantOptions("none", depth_bits=4), "depth_bits 4"),
    (lambda: QuantOptions("rtn", depth_bits=3), "depth_bits 3"),
    (lambda: QuantOptions("rtn", gptq_rounding=True), "gptq_rounding rounds on calibration inputs"),
    (lambda: QuantOptions("none", gptq_rounding=True), "it needs quant awq or gptq"),
    (lambda: QuantOptions("gptq", gptq_rounding=False), "quant gptq is GPTQ rounding"),
    (lambda: QuantOptions("awq", gptq_rounding="yes"), "gptq_rounding 'yes'"),
    (lambda: QuantOptions("awq", gptq_rounding=False, act_order=True), "act_order orders GPTQ's columns"),
    (lambda: QuantOptions("awq", range_search=False, act_order=True), "it needs gptq_rounding and range_search"),
    (lambda: QuantOptions("rtn", act_order=True), "act_order orders"),
    (lambda: QuantOptions("awq", act_order=1.5), "act_order 1.5"),
])
def test_options_refuse_bad_values(make, words):
    with pytest.raises(ExportOptionError, match=words):
        make()


def test_flat_options_nest_the_quant_fields():
    opts = ExportOptions.flat(quant="rtn", group_size=64, embed_bits=8, dtype="fp16", progress=False)
    assert opts == ExportOptions(dtype="fp16", progress=False, quant=QuantOptions("rtn", group_size=64, embed_bits=8))
    assert ExportOptions.flat(dtype="fp16") == ExportOptions(dtype="fp16")
    with pytest.raises(ExportOptionError, match="colour"):
        ExportOptions.flat(colour="red")


def test_lm_head_bits_follow_the_method():
    assert QuantOptions("none").lm_head_bits == 0
    assert QuantOptions("rtn").lm_head_bits == 8
    assert QuantOptions("awq", lm_head_bits=0).lm_head_bits == 0


def test_depth_bits_follow_the_method():
    assert QuantOptions("none").depth_bits == 0
    assert QuantOptions("awq").depth_bits == 8
    assert QuantOptions("rtn", depth_bits=4).depth_bits == 4


def test_group_plan_default_and_overrides(captured):
    """Mixed groups are the default of a zero-point export whose G is not given; an explicit G (or a
    symmetric target) means one G for every linear unless a plan is given too."""
    from vila_edge_export.options import DEFAULT_GROUP_PLAN, parse_group_plan
    assert ExportOptions(quant=QuantOptions("rtn")).quant.group_plan == DEFAULT_GROUP_PLAN
    for method in ("awq", "gptq"):       # calibrated: the plan allocated on calibration data (bit_alloc.py)
        assert ExportOptions(quant=QuantOptions(method)).quant.group_plan == "auto"
    assert ExportOptions(quant=QuantOptions("awq", max_bpw=None)).quant.group_plan == DEFAULT_GROUP_PLAN
    assert parse_group_plan(DEFAULT_GROUP_PLAN) == {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 64,
                                                    "gate_proj": 32, "up_proj": 32, "down_proj": 128}
    assert ExportOptions(quant=QuantOptions("awq", group_size=64)).quant.group_plan == ""
    assert ExportOptions(target="orin", quant=QuantOptions("awq")).quant.group_plan == ""
    given = ExportOptions(quant=QuantOptions("rtn", group_size=128, group_plan="o_proj=32")).quant
    assert (given.group_size, given.group_plan) == (128, "o_proj=32")
    flags = stages.options(stages.parser().parse_args(["graphs", "ckpt", "out", "--group-plan", "down_proj=64"]))
    assert flags.quant.group_plan == "down_proj=64"
    for plan in ("", "o_proj=32"):       # '' turns the default plan off: every linear at G = 64
        assert cli.main(["export", "ckpt", "out", "--quant", "rtn", "--group-plan", plan]) == 0
        assert (captured[-1].quant.group_size, captured[-1].quant.group_plan) == (64, plan)
    for bad in ("q_proj", "q_proj=0", "=32", "q_proj=x"):
        with pytest.raises(ExportOptionError, match="group_plan item"):
            QuantOptions("rtn", group_plan=bad)
    with pytest.raises(ExportOptionError, match="gate_proj, up_proj run as one fused linear"):
        ExportOptions(quant=QuantOptions("rtn", group_size=64, group_plan="gate_proj=32"))


def test_gptq_rounding_follows_the_method(captured):
    """Resolved in QuantOptions (build.options records the value): awq rounds by DEFAULT_AWQ_GPTQ unless told,
    gptq always by GPTQ, rtn / none never; `--gptq-rounding` / `--no-gptq-rounding` and the stage flag set it."""
    assert [QuantOptions(m).gptq_rounding for m in ("none", "rtn", "awq", "gptq")] == \
        [False, False, DEFAULT_AWQ_GPTQ, True]
    assert QuantOptions("awq", gptq_rounding=True).gptq_rounding is True
    assert QuantOptions("awq", gptq_rounding=False).gptq_rounding is False
    assert ExportOptions(quant=QuantOptions("awq", gptq_rounding=not DEFAULT_AWQ_GPTQ)).quant.gptq_rounding is \
        (not DEFAULT_AWQ_GPTQ)                       # quant_options keeps it
    for flags, want in (([], DEFAULT_AWQ_GPTQ), (["--gptq-rounding"], True), (["--no-gptq-rounding"], False)):
        assert cli.main(["export", "ckpt", "out", "--quant", "awq", *flags]) == 0
        assert captured[-1].quant.gptq_rounding is want
    assert cli.main(["export", "ckpt", "out", "--quant", "gptq"]) == 0
    assert captured[-1].quant.gptq_rounding is True
    for word, want in (("true", True), ("false", False), ("none", DEFAULT_AWQ_GPTQ)):
        flags = stages.options(stages.parser().parse_args(["graphs", "ckpt", "out", "--quant", "awq",
                                                           "--gptq-rounding", word]))
        assert flags.quant.gptq_rounding is want


def test_cli_refuses_gptq_rounding_without_calibration(captured, capsys):
    assert cli.main(["export", "ckpt", "out", "--quant", "rtn", "--gptq-rounding"]) == 2 and not captured
    assert capsys.readouterr().err == ("vila-edge: error: gptq_rounding rounds on calibration inputs: it needs quant "
                                       "awq or gptq (got 'rtn')\n")


def test_act_order_follows_gptq_rounding_and_range_search(captured):
    """Act-order needs fixed ranges (the groups stay contiguous): on by DEFAULT_ACT_ORDER for awq with GPTQ codes
    and searched ranges, off when either is off, off for gptq unless asked; --act-order / --no-act-order."""
    assert QuantOptions("awq").act_order is (DEFAULT_ACT_ORDER and DEFAULT_AWQ_GPTQ)
    assert QuantOptions("awq", gptq_rounding=False).act_order is False
    assert QuantOptions("awq", range_search=False).act_order is False
    assert [QuantOptions(m).act_order for m in ("none", "rtn", "gptq")] == [False, False, False]
    assert QuantOptions("gptq", act_order=True).act_order is True
    for flags, want in (([], DEFAULT_ACT_ORDER), (["--act-order"], True), (["--no-act-order"], False),
                        (["--no-gptq-rounding"], False)):
        assert cli.main(["export", "ckpt", "out", "--quant", "awq", *flags]) == 0
        assert captured[-1].quant.act_order is want
    assert stages.options(stages.parser().parse_args(["graphs", "ckpt", "out", "--quant", "awq", "--act-order",
                                                      "false"])).quant.act_order is False
