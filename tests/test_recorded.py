"""build.options in the manifest and `python -m vila_edge_export.recorded`: an engine says which export options
built it, and the check the Makefile's benchmarks run before reusing one exits 0 only when they are the
ones wanted (every option not named at its default), 1 with one line naming the stale option otherwise.
Real exports of the tiny fixture (conftest `engine`: a second or two each)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from vila_edge.manifest import Manifest
from vila_edge_export.options import DEFAULT_GROUP_PLAN, DEFAULT_LM_HEAD_BITS, DEFAULT_ZERO_POINT_GROUP
from vila_edge_export.recorded import main

NAME = "vila1.5-3b-downsample"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(capsys, engine: str, options: dict | None = None) -> tuple[int, str]:
    capsys.readouterr()                 # what the fixture's export printed is not the check's
    rc = main([engine] + (["--options", json.dumps(options)] if options is not None else []))
    err = capsys.readouterr().err
    return rc, err


def test_default_export_records_its_resolved_options(engine, capsys):
    eng = engine(NAME)
    options = Manifest.load(eng).build["options"]
    # by hand: an fp32 target-cpu export with no option given
    assert {k: options[k] for k in ("dtype", "kv_dtype", "target", "quant", "lm_head_bits", "embed_bits",
                                    "int4_accuracy_level")} == \
        {"dtype": "fp32", "kv_dtype": "fp16", "target": "cpu", "quant": "none", "lm_head_bits": 0, "embed_bits": 0,
         "int4_accuracy_level": 4}
    assert not {"progress", "eval_tokens", "max_ppl_increase_pct", "min_top1_agreement"} & options.keys()
    assert _check(capsys, eng) == (0, "")
    assert _check(capsys, eng, {"kv_dtype": "fp16", "dtype": "fp32", "quant": "none"}) == (0, "")
    assert _check(capsys, eng, {"eval_tokens": 64, "max_ppl_increase_pct": None}) == (0, "")   # report only
    rc, err = _check(capsys, eng, {"kv_dtype": "fp32"})
    assert rc == 1 and err == f"{eng}: option kv_dtype is 'fp16', wanted 'fp32'\n"


def test_an_fp32_kv_engine_is_stale_for_the_defaults(engine, capsys):
    """The case the Makefile had silently reused: an engine of the previous default (an fp32 KV pool)."""
    eng = engine(NAME, kv_dtype="fp32")
    assert _check(capsys, eng, {"kv_dtype": "fp32"}) == (0, "")
    rc, err = _check(capsys, eng, {})
    assert rc == 1 and err == f"{eng}: option kv_dtype is 'fp32', wanted 'fp16'\n"


def test_int4_engine_records_the_quantizer(engine, capsys):
    eng = engine(NAME, quant="rtn", eval_tokens=16, max_ppl_increase_pct=None)
    options = Manifest.load(eng).build["options"]
    assert (options["quant"], options["group_size"], options["group_plan"], options["zero_point"],
            options["lm_head_bits"]) == \
        ("rtn", DEFAULT_ZERO_POINT_GROUP, DEFAULT_GROUP_PLAN, True, DEFAULT_LM_HEAD_BITS)
    assert _check(capsys, eng, {"quant": "rtn"}) == (0, "")
    rc, err = _check(capsys, eng, {"quant": "awq"})
    assert rc == 1 and err == f"{eng}: option quant is 'rtn', wanted 'awq'\n"
    rc, err = _check(capsys, eng, {"quant": "rtn", "max_bpw": None})
    assert rc == 1 and err == f"{eng}: option max_bpw is 4.5, wanted None\n"
    # an int4 head has no screen: the default engine's (K 64 over its int8 head) is the first difference
    rc, err = _check(capsys, eng, {"quant": "rtn", "lm_head_bits": 4})
    assert rc == 1 and err == f"{eng}: option lm_head_screen is 64, wanted 0\n"
    rc, err = _check(capsys, eng, {"quant": "rtn", "lm_head_screen": 32})
    assert rc == 1 and err == f"{eng}: option lm_head_screen is 64, wanted 32\n"
    assert options["gptq_rounding"] is False         # rtn rounds to nearest: resolved, not None
    rc, err = _check(capsys, eng, {"quant": "rtn", "gptq_rounding": True})
    assert rc == 2 and "gptq_rounding rounds on calibration inputs" in err


def test_no_engine_or_no_record_is_stale(engine, tmp_path, capsys):
    rc, err = _check(capsys, str(tmp_path / "nowhere"))
    assert rc == 1 and err == f"{tmp_path / 'nowhere'}: no engine (manifest.json missing)\n"

    old = str(tmp_path / "old")
    shutil.copytree(engine(NAME), old)
    raw = json.load(open(os.path.join(old, "manifest.json")))
    del raw["build"]["options"]
    json.dump(raw, open(os.path.join(old, "manifest.json"), "w"))
    rc, err = _check(capsys, old)
    assert rc == 1 and err == f"{old}: no build.options in its manifest (exported before options were recorded)\n"

    with open(os.path.join(old, "manifest.json"), "w") as f:
        f.write("{not json")
    rc, err = _check(capsys, old)
    assert rc == 1 and err.startswith(f"{old}: unreadable (") and err.count("\n") == 1


def test_bad_options_are_a_user_error(engine, capsys):
    rc, err = _check(capsys, engine(NAME), {"kv_dtype": "bf16"})
    assert rc == 2 and "kv_dtype 'bf16' unknown" in err
    eng = engine(NAME)
    capsys.readouterr()
    assert main([eng, "--options", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_command_line_as_the_makefile_runs_it(engine):
    """A process of its own, exit status and one stderr line: what `make bench-peers` tests."""
    eng = engine(NAME)
    run = lambda opts: subprocess.run([sys.executable, "-m", "vila_edge_export.recorded", eng, "--options", opts],
                                      capture_output=True, text=True, cwd=ROOT)
    same, stale = run('{"kv_dtype": "fp16"}'), run('{"quant": "awq"}')
    assert (same.returncode, same.stdout, same.stderr) == (0, "", "")
    assert (stale.returncode, stale.stdout, stale.stderr) == (1, "", f"{eng}: option quant is 'none', wanted 'awq'\n")


def test_makefile_checks_the_benchmarked_engines_against_their_options():
    """Every engine a peer benchmark reuses goes through the recorded-options check, not a bare manifest load
    or a method-only test (they reused engines of an older default)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    assert "ENGINE_OK" not in text and "INT4_DEFAULT_OK" not in text
    for target in ("bench-peers:", "bench-concurrency:", "bench-3b:", "bench-vila-u:"):
        body = text.split(f"\n{target}", 1)[1].split("\n\n", 1)[0]
        reuses = [line for line in body.splitlines() if "vila-edge export" in line]
        assert reuses and all("$(call RECORDED," in line for line in reuses), target


def _without(tmp_path, eng: str, name: str, *keys, **set_options) -> str:
    """A copy of eng whose manifest records the options as an export before `keys` existed did."""
    old = str(tmp_path / name)
    shutil.copytree(eng, old)
    raw = json.load(open(os.path.join(old, "manifest.json")))
    for k in keys:
        del raw["build"]["options"][k]
    raw["build"]["options"].update(set_options)
    json.dump(raw, open(os.path.join(old, "manifest.json"), "w"))
    return old


def test_options_added_later_read_as_what_older_exports_did(engine, tmp_path, capsys):
    """An engine from before gptq_rounding / act_order existed was built without them (awq rounded to nearest):
    still the wanted engine where that is what is wanted, stale where the default moved past it."""
    rtn = _without(tmp_path, engine(NAME, quant="rtn", eval_tokens=16, max_ppl_increase_pct=None), "rtn",
                   "gptq_rounding", "act_order", "depth_bits")
    assert _check(capsys, rtn, {"quant": "rtn"}) == (0, "")      # a Llama: depth_bits changes nothing in it
    plain = _without(tmp_path, engine(NAME), "plain", "gptq_rounding", "act_order", "depth_bits")
    assert _check(capsys, plain, {}) == (0, "")
    # a quantized VILA-U engine from before depth_bits: its depth transformer int4 throughout, which no
    # depth_bits builds now
    raw = json.load(open(os.path.join(rtn, "manifest.json")))
    raw["family"] = "vila-u"
    json.dump(raw, open(os.path.join(rtn, "manifest.json"), "w"))
    rc, err = _check(capsys, rtn, {"quant": "rtn", "depth_bits": 4})
    assert rc == 1 and err == f"{rtn}: option depth_bits not recorded (built before it existed: 'int4 throughout'), wanted 4\n"
    # an awq engine of the previous default: the same recorded options, but rounded to nearest
    awq = _without(tmp_path, engine(NAME, quant="rtn", eval_tokens=16, max_ppl_increase_pct=None), "awq",
                   "gptq_rounding", "act_order", quant="awq", group_plan="auto")
    rc, err = _check(capsys, awq, {"quant": "awq"})
    assert rc == 1 and err == f"{awq}: option gptq_rounding not recorded (built before it existed: False), wanted True\n"
    rc, err = _check(capsys, awq, {"quant": "awq", "gptq_rounding": False})
    assert rc == 0, err
    # an option without a legacy reading stays stale when unrecorded
    kv = _without(tmp_path, engine(NAME), "kv", "kv_dtype")
    rc, err = _check(capsys, kv, {})
    assert rc == 1 and err == f"{kv}: option kv_dtype not recorded, wanted 'fp16'\n"
