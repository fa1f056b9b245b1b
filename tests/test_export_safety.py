"""Export never deletes what the user owns, and a broken checkpoint is a CheckpointError naming it
(issue #22, findings 1, 5, 6)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from vila_edge_export.build import ExportOptions, export_engine
from vila_edge_export.output_dir import OWNER, TMP_PREFIX, clean_stale
from vila_edge import CheckpointError
from vila_edge.errors import ExportError, ExportOptionError


def _export(ckpt, out, **opts):
    return export_engine(str(ckpt), str(out), ExportOptions.flat(progress=False, **opts))


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


def test_export_into_a_non_engine_directory_is_refused(tmp_path, checkpoint):
    """Before: it deleted everything in the directory and exited 0."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ExportError, match="not empty and is not an engine directory .*nothing was changed"):
        _export(checkpoint("vila1.5-3b-downsample"), photos)
    assert _tree(photos) == {"holiday.jpg": 8}
    (photos / "manifest.json").write_text("{}")           # an engine plus the user's own file
    with pytest.raises(ExportError, match="also holds holiday.jpg"):
        _export(checkpoint("vila1.5-3b-downsample"), photos)
    assert sorted(os.listdir(tmp_path)) == ["photos"]       # no temp dir left behind


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_export_into_its_own_checkpoint_is_refused(tmp_path, checkpoint, where):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("vila1.5-3b-downsample"), ckpt)
    before = _tree(ckpt)
    out = {"itself": ckpt, "inside": ckpt / "llm", "parent": tmp_path}[where]
    with pytest.raises(ExportError, match="overlaps the checkpoint"):
        _export(ckpt, out)
    assert _tree(ckpt) == before


def test_export_over_an_engine_and_into_an_empty_dir(tmp_path, checkpoint, engine):
    out = tmp_path / "eng"
    shutil.copytree(engine("vila1.5-3b-downsample"), out)
    (out / "manifest.json").write_text("{}")              # an old, broken engine: replaced
    m = _export(checkpoint("vila1.5-3b-downsample"), out)
    assert json.loads((out / "manifest.json").read_text())["family"] == m.family
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_stale_temp_dirs_of_killed_exports_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = __import__("socket").gethostname()
    for name, owner in [("dead", {"pid": int(dead), "host": host}), ("alive", {"pid": os.getppid(), "host": host}),
                        ("elsewhere", {"pid": int(dead), "host": host + "-other"}), ("unknown", None)]:
        d = tmp_path / (TMP_PREFIX + name)
        d.mkdir()
        if owner:
            (d / OWNER).write_text(json.dumps(owner))
    (tmp_path / (TMP_PREFIX + "file")).write_text("not a dir")
    assert clean_stale(str(tmp_path)) == [str(tmp_path / (TMP_PREFIX + "dead"))]
    assert sorted(os.listdir(tmp_path)) == [TMP_PREFIX + n for n in ("alive", "elsewhere", "file", "unknown")]


def _broken(tmp_path, checkpoint, edit):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("vila1.5-3b-downsample"), ckpt)
    weights = load_file(ckpt / "llm" / "model.safetensors")
    edit(weights)
    save_file(weights, ckpt / "llm" / "model.safetensors")
    return ckpt


def test_nan_weights_are_refused(tmp_path, checkpoint):
    """Before: the engine exported fine and answered ""."""
    def poison(w):
        w["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    ckpt = _broken(tmp_path, checkpoint, poison)
    with pytest.raises(CheckpointError, match=r"llm: tensor model.layers.1.mlp.down_proj.weight has 1\+ NaN/Inf"):
        _export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_weights_that_do_not_match_the_config(tmp_path, checkpoint, fault):
    def edit(w):
        name = "model.layers.0.self_attn.q_proj.weight"
        if fault == "missing":
            del w[name]
        else:
            w[name] = w[name][:, :-1].clone()
    ckpt = _broken(tmp_path, checkpoint, edit)
    with pytest.raises(CheckpointError, match="weights do not match its config"):
        _export(ckpt, tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n != "ckpt"] == []


def test_bad_export_options_are_ours(tmp_path, checkpoint):
    for opts in ({"dtype": "fp8"}, {"target": "tpu"}, {"quant": "none", "lm_head_bits": 8}):
        with pytest.raises(ExportOptionError):
            _export(checkpoint("vila1.5-3b-downsample"), tmp_path / "out", **opts)


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{not json"), ("tokenizer_config.json", "[1, 2]"),
                                          ("generation_config.json", "{bad")])
def test_broken_tokenizer_files(tmp_path, checkpoint, name, content):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("vila1.5-3b-downsample"), ckpt)
    (ckpt / "llm" / name).write_text(content)
    with pytest.raises(CheckpointError):
        _export(ckpt, tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n != "ckpt"] == []
