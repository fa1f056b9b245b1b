"""The command line: every user error is one line on stderr and exit status 2, never a traceback;
defaults equal the API's; stats are real JSON; interactive commands never reach the model."""
import json
import os
import subprocess
import sys

import pytest

from conftest import env_without
from vila_edge import cli
from vila_edge.cache import BUNDLED_CHECKPOINT
from vila_edge.llm import KVConfig
from vila_edge.sampling import GenerationConfig

EXAMPLES = os.path.join(BUNDLED_CHECKPOINT, "examples")
COLOR = os.path.join(EXAMPLES, "color.png")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "vila_edge.cli", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, env=env, timeout=120)


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def run_here(capsys, *args):
    """cli.main in this process (argparse errors exit through SystemExit)."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    return Result(code, capsys.readouterr().err)


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vila-edge: error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


ERRORS = [
    (["chat", "bundled", "q", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["chat", "bundled", "q", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["chat", "bundled", "q", "--temperature", "-1"], ["--temperature", "[0, inf)"]),
    (["chat", "bundled", "q", "--max-new-tokens", "0"], ["--max-new-tokens", "[1, inf)"]),
    (["chat", "bundled", "q", "--top-k", "-3"], ["--top-k"]),
    (["chat", "bundled", "q", "--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["chat", "bundled", "q", "--temperature", "nan"], ["--temperature"]),
    (["chat", "bundled", "q", "--max-new-tokens", "many"], ["--max-new-tokens", "integer"]),
    (["chat", "bundled", "q", "--kv-budget", "lots"], ["--kv-budget", "lots"]),
    (["chat", "bundled", "q", "--image", "nope.png"], ["nope.png", "not found"]),
    (["chat", "bundled", "q", "--video", "nope.mp4"], ["nope.mp4", "not found"]),
    (["chat", "no/such/engine", "q"], ["no/such/engine"]),
    (["chat", "bundled"], ["prompt"]),
    (["export", "models/vila-tiny-shapes", "/tmp/never-written", "--target", "tpu"], ["--target", "tpu", "cpu, orin"]),
    (["export", "models/vila-tiny-shapes", "/tmp/never-written", "--dtype", "int3"], ["--dtype", "int3"]),
    (["export", "no/such/checkpoint", "/tmp/never-written"], ["no/such/checkpoint", "not a directory"]),
    (["export", "models/vila-tiny-shapes", "/tmp/never-written", "--lm-head-bits", "8"], ["--quant rtn or awq"]),
    (["export", "models/vila-tiny-shapes", "/tmp/never-written", "--quant", "awq", "--calib-dir", "no/dir"],
     ["--calib-dir no/dir"]),
    (["fixture", "/tmp/never-written", "--shape", "huge"], ["--shape", "huge"]),
    (["bench"], ["engine"]),
    (["bench", "vila_edge/bundled/vila-tiny-shapes", "--repeats", "0"], ["--repeats", ">= 1"]),
    (["bench", "vila_edge/bundled/vila-tiny-shapes", "--contexts", "128,x"], ["--contexts", "'x'"]),
    ([], ["COMMAND"]),
    (["frobnicate"], ["frobnicate"]),
]


@pytest.mark.parametrize("args,words", ERRORS, ids=[" ".join(a) or "no-args" for a, _ in ERRORS])
def test_user_errors_are_one_line_and_status_2(args, words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert_user_error(run_here(capsys, *args), *words)


def test_no_traceback_from_the_installed_entry_point():
    """The same path end to end in a fresh interpreter: one line, status 2."""
    assert_user_error(run("chat", "bundled", "q", "--top-p", "0"), "--top-p")
    assert_user_error(run("chat", "bundled", "q", "--image", "nope.png"), "nope.png")


def test_missing_extras_name_the_pip_command(tmp_path, monkeypatch, capsys):
    from vila_edge import extras
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))      # no engine cached from elsewhere
    monkeypatch.setattr(extras, "EXTRAS", {**extras.EXTRAS, "export": ("no_such_module_torch",)})
    for argv, extra in ((["export", "models/vila-tiny-shapes", str(tmp_path / "e")], "export"),
                        (["fixture", str(tmp_path / "f")], "export"),
                        (["chat", "models/vila-tiny-shapes", "What?"], "export")):     # a checkpoint to export
        assert_user_error(run_here(capsys, *argv), f"pip install 'vila-edge[{extra}]'")
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_missing_video_extra_is_one_line(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    assert_user_error(run("chat", "bundled", "What happens?", "--video", str(clip), env=env_without(tmp_path, "av")),
                      "pip install 'vila-edge[video]'")


def test_version_and_help_on_every_flag():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vila-edge {cli.__version__}"
    ap = cli.parser()
    assert all(a.help for a in ap._actions), "a top-level flag has no help"
    subs = next(a for a in ap._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"vila-edge {name} {action.option_strings or action.dest} has no help"
    text = subs["export"].format_help()
    assert "{fp32,fp16}" in text and "{none,rtn,awq,gptq}" in text and "choices: cpu" in text
    assert "orin-nano" in subs["chat"].format_help()


def test_cli_defaults_are_the_api_defaults():
    args = cli.parser().parse_args(["chat", "bundled", "q"])
    g = GenerationConfig()
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(args, name) == getattr(g, name), name
    assert args.block_size == KVConfig().block_size and args.kv_budget == KVConfig().budget


def test_answer_stats_json_and_stop():
    r = run("chat", "bundled", "What color is the square?", "--image", COLOR, "--json", "--stats")
    assert r.returncode == 0, r.stderr
    turn = json.loads(r.stdout)
    assert turn["answer"] == "green" and turn["stats"]["new_tokens"] == 1
    assert turn["stats"]["decode_tok_s"] > 0        # "green" then the stop token: one decode step
    assert json.loads(r.stderr.strip().splitlines()[-1])["finish_reason"] == "stop"
    r = run("chat", "bundled", "What color is the square?", "--image", COLOR, "--stop", "ee", "--json")
    assert json.loads(r.stdout)["answer"] == "gr"


def test_interactive_commands_never_reach_the_model():
    """Blank lines are skipped, /image adds an image after the first turn, a bad /image is one
    error line and the session goes on, /clear forgets, exit leaves."""
    where = os.path.join(EXAMPLES, "where.png")
    script = "\n".join(["", "   ", f"/image {COLOR}", "What color is the square?", "/image nope.png", "/bogus",
                        f"/image {where}", "Where is the circle?", "/clear", "", f"/image {where}",
                        "Where is the circle?", "exit", "never asked"]) + "\n"
    r = run("chat", "bundled", "-i", "--json", stdin=script)
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 3 and turns[0]["answer"] == "green" and turns[2]["answer"] == "bottom"
    per_image = 9                                   # vila-tiny-shapes: tokens_per_image in its manifest
    # The second turn holds both turns' text and both images; after /clear only one image again.
    assert turns[1]["stats"]["prompt_tokens"] > turns[0]["stats"]["prompt_tokens"] + per_image
    assert abs(turns[2]["stats"]["prompt_tokens"] - turns[0]["stats"]["prompt_tokens"]) <= 2
    assert "nope.png: image file not found" in r.stderr and "unknown command /bogus" in r.stderr
    assert "Traceback" not in r.stderr


def test_building_the_parser_imports_no_torch():
    code = "import sys, vila_edge.cli as c; c.parser(); print(sorted({'torch', 'transformers', 'av'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr
