"""A faulty engine directory fails at load with an EngineError naming the file, the field and the
fix (issue #22, findings 5 and 6): manifest fields that disagree with the graphs, wrong types,
swapped graphs, a corrupt tokenizer, a corrupt or pickled embedding table, unreadable files."""
import json
import os
import shutil

import numpy as np
import pytest

from vila_edge import EngineError, Pipeline


@pytest.fixture
def eng(tmp_path, engine):
    dst = tmp_path / "eng"
    shutil.copytree(engine("vila1.5-3b-downsample"), dst)
    return dst


def _edit(eng, section, key, value):
    m = json.loads((eng / "manifest.json").read_text())
    (m[section] if section else m)[key] = value
    (eng / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("section,key,value,match", [
    ("vision", "tokens_per_image", 12, r"image_features has shape \[None, 16, 64\].*tokens_per_image"),
    ("vision", "image_size", 96, r"pixel_values has shape \[None, 3, 104, 104\].*image_size"),
    ("llm", "vocab_size", 500, r"llm.vocab_size 500 exceeds llm.logits_size 400"),
    ("llm", "logits_size", 300, r"logits have 400 rows but manifest.json llm.logits_size says 300"),
    ("llm", "hidden", 32, r"image_features has shape \[None, 16, 64\] .* implies \[None, 16, 32\]"),
    ("llm", "layers", 3, r"2 layers of (key_cache|past_k)_\* inputs .* llm.layers says 3"),
    (None, "dtype", "float16", r"is float32 but manifest.json dtype says float16"),
    ("tokens", "stop_ids", [123456], r"stop_ids \[123456\] are outside"),
])
def test_manifest_disagreeing_with_graphs(eng, section, key, value, match):
    """Before: a wrong tokens_per_image fed overwritten or np.empty rows to the model, silently."""
    _edit(eng, section, key, value)
    with pytest.raises(EngineError, match=match):
        Pipeline(str(eng))


@pytest.mark.parametrize("section,key,value", [
    ("vision", "tokens_per_image", "16"), ("llm", "layers", 2.0), ("llm", "hidden", True),
    ("tokens", "stop_ids", "2"), ("vision", "mean", [0.5, "x", 0.5]), (None, "family", 7),
    ("vision", "std", [0, 1, 1]), (None, "files", {"llm": "../../etc/passwd"}), (None, "dtype", "int8"),
])
def test_manifest_field_of_the_wrong_type(eng, section, key, value):
    _edit(eng, section, key, value)
    with pytest.raises(EngineError, match=f"{key}|files"):
        Pipeline(str(eng))


def test_swapped_graphs(eng):
    os.rename(eng / "vision.onnx", eng / "tmp.onnx")
    os.rename(eng / "llm.onnx", eng / "vision.onnx")
    os.rename(eng / "tmp.onnx", eng / "llm.onnx")
    with pytest.raises(EngineError, match="vision.onnx has no 'pixel_values'.*not the engine's vision.onnx"):
        Pipeline(str(eng))


def test_corrupt_tokenizer(eng):
    (eng / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(EngineError, match="tokenizer.json: not a tokenizer"):
        Pipeline(str(eng))


def test_corrupt_embedding_table(eng):
    (eng / "embed_tokens.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(EngineError, match="embed_tokens.npy: not a numpy array file"):
        Pipeline(str(eng))


def test_pickled_embedding_table_is_never_unpickled(eng, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(eng / "embed_tokens.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(EngineError, match="embed_tokens.npy"):
        Pipeline(str(eng))
    assert not marker.exists()


def test_embedding_table_of_the_wrong_shape(eng):
    np.save(eng / "embed_tokens.npy", np.zeros((400, 32), np.float32))
    with pytest.raises(EngineError, match=r"table is \[400, 32\] but manifest.json says at least 400 rows .* of 64"):
        Pipeline(str(eng))


def test_unknown_family_and_template(eng):
    _edit(eng, None, "template", "mystery")
    with pytest.raises(EngineError, match="unknown chat template 'mystery'"):
        Pipeline(str(eng))
    _edit(eng, None, "family", "vila-9")
    with pytest.raises(EngineError, match="family 'vila-9' unknown"):
        Pipeline(str(eng))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_blames_permissions_not_the_build(eng):
    os.chmod(eng / "llm.onnx", 0)
    with pytest.raises(EngineError, match="permission denied") as e:
        Pipeline(str(eng))
    assert "rebuild" not in str(e.value)
