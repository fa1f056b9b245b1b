"""A new user's first hour: Pipeline() runs the shipped engine, which is current; Pipeline(checkpoint)
exports once into a content-keyed cache; the README's Python example runs as pasted."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from vila_edge_export.bundle import build_bundled
from trainers.tiny_shapes.evaluate import heldout
from trainers.tiny_shapes import scenes
from vila_edge import EngineError, MissingExtraError, Pipeline, cache
from vila_edge.manifest import FORMAT_VERSION, Manifest
from vila_edge.version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(cache.BUNDLED_CHECKPOINT, "examples")
# models/vila-tiny-shapes/examples/README.md: image, question, expected answer.
EXAMPLE_QA = [("color.png", "What color is the square?", "green"), ("count.png", "How many stars are there?", "1"),
              ("where.png", "Where is the circle?", "bottom"), ("shape.png", "What shape is the blue object?", "star")]
HELDOUT = 40


@pytest.fixture(scope="module")
def bundled(bundled_pipeline):
    return bundled_pipeline


def _answers(pipe) -> list:
    out = [pipe.chat(os.path.join(EXAMPLES, f), q, max_new_tokens=8) for f, q, _ in EXAMPLE_QA]
    for s in heldout(HELDOUT):
        (question, _), = s.turns
        out.append(pipe.chat([scenes.render(sc) for sc in s.scenes], question, max_new_tokens=8))
    return out


def test_default_pipeline_answers_the_bundled_questions(bundled):
    assert bundled.engine_dir == cache.BUNDLED_ENGINE
    for image, question, expected in EXAMPLE_QA:
        assert bundled.chat(os.path.join(EXAMPLES, image), question) == expected


def test_shipped_engine_is_current():
    """Format and exporter version match this runtime (the cheap half; the slow half compares it with a
    fresh export). If this fails after an engine format or exporter change: make bundled-engine."""
    try:
        shipped = Manifest.load(cache.BUNDLED_ENGINE)
    except EngineError as e:
        pytest.fail(f"the shipped engine is stale ({e}): run `make bundled-engine` and commit vila_edge/bundled/")
    assert (shipped.format_version, shipped.exporter_version) == (FORMAT_VERSION, __version__), \
        "run `make bundled-engine` and commit vila_edge/bundled/"
    assert shipped.build["checkpoint"] == "models/vila-tiny-shapes"      # no build-machine path in the wheel


@pytest.mark.slow   # a full export of the bundled checkpoint
def test_shipped_engine_equals_a_fresh_export(bundled, tmp_path):
    """Its manifest and answers equal a fresh export's.
    If this fails after an engine format or exporter change: make bundled-engine."""
    shipped = Manifest.load(cache.BUNDLED_ENGINE)
    fresh_dir = build_bundled(str(tmp_path / "fresh"), progress=False)
    fresh = Manifest.load(fresh_dir)
    strip = lambda m: {k: v for k, v in json.loads(json.dumps(m.__dict__, default=vars)).items() if k != "build"}
    assert strip(shipped) == strip(fresh), "run `make bundled-engine` and commit vila_edge/bundled/"
    assert _answers(bundled) == _answers(Pipeline(fresh_dir)), "run `make bundled-engine` and commit vila_edge/bundled/"


def test_one_liner_from_the_issue():
    code = ("from vila_edge import Pipeline; print(Pipeline().chat("
            "'models/vila-tiny-shapes/examples/color.png', 'What color is the square?'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == "green\n", r.stderr


def test_readme_python_example_runs_as_pasted():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.findall(r"```python\n(.*?)```", f.read(), re.S)[0]
    r = subprocess.run([sys.executable, "-"], input=block, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # The answers the README's comments promise, in order.
    assert lines[:5] == ["green", "bottom", "star", "1", "green"], lines
    assert "'ttft_s'" in lines[5]


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cache.BUNDLED_CHECKPOINT, ckpt, ignore=shutil.ignore_patterns("examples"))
    return str(ckpt)


@pytest.mark.slow   # an export in a child process with torch
def test_checkpoint_is_exported_once_into_the_cache(own_cache, monkeypatch, capsys):
    pipe = Pipeline(own_cache, progress=False, export_options={"dtype": "fp16"})
    assert pipe.engine_dir.startswith(os.path.join(os.environ["XDG_CACHE_HOME"], "vila_edge", "engines"))
    assert pipe.chat(os.path.join(EXAMPLES, "color.png"), "What color is the square?") == "green"
    monkeypatch.setattr(cache, "run_export", lambda *a, **k: pytest.fail("exported twice"))
    assert Pipeline(own_cache, export_options={"dtype": "fp16"}).engine_dir == pipe.engine_dir


def test_cached_engine_is_reused_and_keyed_by_options_and_content(own_cache, monkeypatch):
    """The fast half of the cache contract: an engine under the checkpoint's key is used without an export
    (the slow test above makes that engine by exporting); other options, or other content, are another key."""
    key = cache.cache_key(own_cache, {"dtype": "fp16"})
    engines = os.path.join(os.environ["XDG_CACHE_HOME"], "vila_edge", "engines")
    shutil.copytree(cache.BUNDLED_ENGINE, os.path.join(engines, key))
    monkeypatch.setattr(cache, "run_export", lambda *a, **k: pytest.fail("exported although cached"))
    pipe = Pipeline(own_cache, progress=False, export_options={"dtype": "fp16"})
    assert pipe.engine_dir == os.path.join(engines, key)
    assert pipe.chat(os.path.join(EXAMPLES, "color.png"), "What color is the square?") == "green"
    assert cache.cache_key(own_cache, {"dtype": "fp32"}) != key
    with open(os.path.join(own_cache, "llm", "generation_config.json"), "a") as f:
        f.write("\n")
    assert cache.cache_key(own_cache, {"dtype": "fp16"}) != key
    with pytest.raises(pytest.fail.Exception, match="exported although cached"):
        Pipeline(own_cache, progress=False, export_options={"dtype": "fp16"})    # new content: not the cached one


def test_checkpoint_without_the_export_extra(own_cache, monkeypatch):
    from vila_edge import extras
    monkeypatch.setattr(extras, "EXTRAS", {**extras.EXTRAS, "export": ("no_such_module_torch",)})
    with pytest.raises(MissingExtraError, match=r"pip install 'vila-edge\[export\]'"):
        Pipeline(own_cache)
    assert not os.path.exists(os.path.join(os.environ["XDG_CACHE_HOME"], "vila_edge", "engines"))


def test_model_argument_errors(tmp_path):
    with pytest.raises(EngineError, match="no such engine or checkpoint"):
        Pipeline(str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="neither an engine directory"):
        Pipeline(str(tmp_path))
    with pytest.raises(EngineError, match="already exported"):
        Pipeline(cache.BUNDLED_ENGINE, export_options={"dtype": "fp32"})


@pytest.mark.slow   # a full export of the bundled checkpoint
def test_stale_shipped_engine_falls_back_to_the_bundled_checkpoint(own_cache, tmp_path, monkeypatch):
    """After an engine format bump, a source checkout still runs Pipeline() (exported into the cache)."""
    stale = tmp_path / "stale"
    shutil.copytree(cache.BUNDLED_ENGINE, stale)
    m = json.loads((stale / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION - 1
    (stale / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(cache, "BUNDLED_ENGINE", str(stale))
    monkeypatch.setattr(cache, "BUNDLED_CHECKPOINT", own_cache)
    path = cache.bundled_engine(progress=False)
    assert path != str(stale) and Manifest.load(path).dtype == "float16"


def test_decode_speed_of_short_answers(bundled):
    conv = bundled.conversation()
    assert conv.send(os.path.join(EXAMPLES, "color.png"), "What color is the square?") == "green"
    assert conv.last_stats["new_tokens"] == 1 and conv.last_stats["decode_tok_s"] > 0   # the stop token's step
    conv.close()
    conv = bundled.conversation()
    conv.send(os.path.join(EXAMPLES, "color.png"), "What color is the square?", max_new_tokens=1)
    assert conv.last_stats["decode_tok_s"] is None                                      # no decode step ran
    conv.close()


@pytest.mark.slow   # two processes, one export with torch
def test_two_processes_export_a_new_checkpoint_once(own_cache):
    code = ("import sys; from vila_edge import Pipeline; "
            "print(Pipeline(sys.argv[1], export_options={'dtype': 'fp16'}).engine_dir, 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code, own_cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and outs[0][0].split()[1] == "False"     # the export ran in a child: no torch here
    assert sum(err.count("vila_edge: exporting") for _, err in outs) == 1, outs


def test_export_errors_come_back_as_the_same_error(own_cache):
    """The export's child process reports a user error; Pipeline raises the same class and message."""
    from vila_edge.errors import CheckpointError, ExportOptionError
    with pytest.raises(ExportOptionError, match="fp8"):
        Pipeline(own_cache, progress=False, export_options={"dtype": "fp8"})
    _no_engine_left()


@pytest.mark.slow   # two more export child processes, each importing torch
def test_more_export_errors_come_back_as_the_same_error(own_cache):
    """An unknown option and a bad checkpoint config, reported by the child, raised here as the same error."""
    from vila_edge.errors import CheckpointError, ExportOptionError
    with pytest.raises(ExportOptionError, match="colour"):
        Pipeline(own_cache, progress=False, export_options={"colour": 1})
    cfg = os.path.join(own_cache, "config.json")
    with open(cfg) as f:
        broken = dict(json.load(f), image_aspect_ratio="stretch")
    with open(cfg, "w") as f:
        json.dump(broken, f)
    with pytest.raises(CheckpointError, match=r"config.json: image_aspect_ratio 'stretch' not supported"):
        Pipeline(own_cache, progress=False)
    _no_engine_left()


def _no_engine_left():
    """A failed export leaves no engine in the cache (a lock file at most)."""
    assert not os.listdir(os.path.join(os.environ["XDG_CACHE_HOME"], "vila_edge", "engines")) or all(
        n.endswith(".lock") for n in os.listdir(os.path.join(os.environ["XDG_CACHE_HOME"], "vila_edge", "engines")))
