"""Bad input gets a clear error naming the problem."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vila_edge_export.stage_graphs as stage_graphs
from conftest import data
from vila_edge_export.build import ExportOptions, export_engine
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge import CheckpointError, EngineError, ImageError, Pipeline, PromptError
from vila_edge import preprocess


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_corrupt_image_file(tmp_path, engine):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(ImageError, match="broken.png"):
        Pipeline(engine("vila1.5-3b-downsample")).chat(str(bad), "What?")


def test_missing_image_and_bad_array():
    with pytest.raises(ImageError, match="not found"):
        preprocess.load_image("/nonexistent/cam0.jpg")
    with pytest.raises(ImageError, match="uint8"):
        preprocess.load_image(np.zeros((4, 4, 3), np.float32))


def test_huge_image_refused(monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="outside the accepted size"):
        preprocess.load_image(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ImageError, match="robot_scene.png of .* pixels is outside the accepted size"):
        preprocess.load_image(data("robot_scene.png"))


def test_missing_subfolder(tmp_path, checkpoint):
    ck = _copy(checkpoint("vila1.5-3b-downsample"), tmp_path)
    shutil.rmtree(ck / "vision_tower")
    with pytest.raises(CheckpointError, match=r"missing subfolder vision_tower/"):
        read_checkpoint(str(ck))


def test_unknown_projector_type(tmp_path, checkpoint):
    ck = _copy(checkpoint("vila1.5-3b-downsample"), tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mm_projector_cfg"]["mm_projector_type"] = "mlp9x_weird"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mm_projector/config.json: mm_projector_type 'mlp9x_weird' unknown"):
        read_checkpoint(str(ck))


def test_inconsistent_config(tmp_path, checkpoint):
    ck = _copy(checkpoint("vila1.5-3b-downsample"), tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mm_hidden_size"] = 999
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mm_hidden_size 999"):
        read_checkpoint(str(ck))


def test_prompt_beyond_context(engine):
    pipe = Pipeline(engine("vila1.5-3b-downsample"), max_context=64)
    with pytest.raises(PromptError, match="context holds 64"):
        pipe.chat(data("robot_scene.png"), "describe " * 80)
    assert pipe.llm.blocks.stats().used == 0


def test_placeholder_count_mismatch(engine):
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 images"):
        pipe.chat([data("robot_scene.png")], "<image> and <image>?")


def test_engine_from_unknown_exporter_version(tmp_path, engine):
    eng = _copy(engine("vila1.5-3b-downsample"), tmp_path, "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    manifest["exporter_version"] = "9.0.0"
    (eng / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"built by vila_edge 9.0.0.*rebuild it: make engines"):
        Pipeline(str(eng))


def test_engine_missing_file(tmp_path, engine):
    eng = _copy(engine("vila1.5-3b-downsample"), tmp_path, "eng")
    os.remove(eng / "llm.onnx")
    with pytest.raises(EngineError, match="llm.onnx"):
        Pipeline(str(eng))


def test_interrupted_export_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage_graphs, "build_llm", boom)
    monkeypatch.setattr(stage_graphs, "build_llm_fused", boom)
    out = tmp_path / "engines" / "e"
    with pytest.raises(KeyboardInterrupt):
        export_engine(checkpoint("vila1.5-3b-downsample"), str(out), ExportOptions(progress=False))
    assert not out.exists()
    assert os.listdir(tmp_path / "engines") == []


def test_export_publishes_a_readable_directory(engine):
    import stat

    eng = engine("vila1.5-3b-downsample")
    assert stat.S_IMODE(os.stat(eng).st_mode) == 0o755
    modes = {f: stat.S_IMODE(os.stat(os.path.join(eng, f)).st_mode) for f in os.listdir(eng)}
    assert modes and set(modes.values()) == {0o644}, modes


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "chat", str(tmp_path), "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "vila-edge: error:" in r.stderr and "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_fixture_never_overwrites_a_real_checkpoint(tmp_path, checkpoint):
    from vila_edge_export.fixtures import MARKER, write_fixture

    real = _copy(checkpoint("vila1.5-3b-downsample"), tmp_path, "real")
    os.remove(real / MARKER)                     # as a checkpoint from anywhere but the fixture writer
    before = sorted(os.listdir(real))
    with pytest.raises(FileExistsError, match="not a fixture"):
        write_fixture(str(real))
    assert sorted(os.listdir(real)) == before
    again = write_fixture(str(tmp_path / "fixture"))
    assert write_fixture(again, seed=1) == again and os.path.isfile(os.path.join(again, MARKER))
