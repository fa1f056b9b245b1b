"""A float16 KV pool under a float32 fused graph (ExportOptions.kv_dtype "fp16", manifest kv_dtype; the
default of an fp32 target-cpu export, options.FUSED_KV_DTYPE): exported, loaded, sized and run end to end
against the torch reference and the fp32-KV engine (`kv_dtype="fp32"`); the combinations the op cannot
run are refused at export and at load.

Tolerance of the first-step logits: the pool holds K and V rounded to float16 (relative step 2^-11),
the rest of the graph stays float32, so the error is one rounding of each attention input, not the
fp16 engine's rounding of every activation (1% of the largest logit, tests/test_equivalence.py).
Measured on this fixture: 5e-6 from the torch reference (logits up to ~6.4), against ~1e-6 for the
fp32-KV engine. The test allows 1e-4, the fp32 engines' own tolerance there (20x the observed
error), asserts the logits differ from the fp32-KV engine's (the rows really are rounded), and that
the greedy tokens equal the reference's token for token, the property users see.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import reference_inputs, scene_images
from vila_edge import EngineError, Pipeline
from vila_edge.errors import ExportOptionError
from vila_edge.manifest import Manifest
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.options import ExportOptions
from vila_edge_export.reference import ReferenceVLM

NAME = "vila1.5-3b-downsample"


def test_fp16_kv_engine_matches_reference(checkpoint, engine):
    spec = read_checkpoint(checkpoint(NAME))
    ref = ReferenceVLM(spec, torch.float32)
    pipe = Pipeline(engine(NAME, kv_dtype="fp16"))
    assert (pipe.manifest.dtype, pipe.manifest.kv_dtype) == ("float32", "float16")
    assert pipe.llm.runner.pool.data.dtype == np.float16
    images = scene_images()
    prompt = "<image>\nCompare it with <image>\nWhat changed?"
    conv = pipe.conversation()
    conv.send(images, prompt, max_new_tokens=16)
    embeds = reference_inputs(spec, ref, prompt, images, pipe)
    stops = set(pipe.manifest.tokens.stop_ids)
    expected = [i for i in ref.generate(embeds, 16, stops) if i not in stops]
    assert conv.last_ids == expected and expected

    one = reference_inputs(spec, ref, "<image>\nWhat is this?", images[:1], pipe)
    logits, _ = pipe.llm.prefill("probe", one[0].numpy(), np.arange(one.shape[1]))
    np.testing.assert_allclose(logits, ref.logits(one).numpy(), atol=1e-4, rtol=0)
    f32 = Pipeline(engine(NAME, kv_dtype="fp32"))
    assert f32.manifest.kv_dtype == "float32"
    logits32, _ = f32.llm.prefill("probe", one[0].numpy(), np.arange(one.shape[1]))
    assert not np.array_equal(logits, logits32)


def test_fp16_kv_halves_the_pool_in_the_ledger(engine):
    f32, f16 = Pipeline(engine(NAME, kv_dtype="fp32")), Pipeline(engine(NAME, kv_dtype="fp16"))
    pool = lambda p: next(b.nbytes for b in p.llm.runner.buffers() if b.name == "kv pool")
    blocks = lambda p: p.llm.runner.num_blocks
    assert pool(f16) * blocks(f32) * 2 == pool(f32) * blocks(f16)


@pytest.mark.parametrize("given, kv", [(dict(), "fp16"), (dict(kv_dtype="fp32"), "fp32"), (dict(target="orin"), "fp32"),
                                       (dict(dtype="fp16"), "fp16"), (dict(dtype="fp16", target="orin"), "fp16"),
                                       (dict(kv_dtype="fp16", quant="rtn"), "fp16")])
def test_kv_dtype_default_is_fp16_only_under_an_fp32_fused_graph(given, kv):
    assert ExportOptions.flat(progress=False, **given).kv_dtype == kv


def test_default_fp32_export_has_the_fp16_pool(engine):
    """No kv_dtype given: the same engine as kv_dtype="fp16", byte for byte in its graph."""
    default, f16 = engine(NAME), engine(NAME, kv_dtype="fp16")
    assert Manifest.load(default).kv_dtype == "float16"
    assert open(os.path.join(default, "llm.onnx"), "rb").read() == open(os.path.join(f16, "llm.onnx"), "rb").read()


@pytest.mark.parametrize("given", [dict(dtype="fp16", kv_dtype="fp32"), dict(target="orin", kv_dtype="fp16"),
                                   dict(kv_dtype="bf16")])
def test_export_refuses_a_pool_the_graph_cannot_read(given):
    with pytest.raises(ExportOptionError, match="kv_dtype"):
        ExportOptions.flat(progress=False, **given)


def _edited(src: str, tmp_path, kv_dtype: str) -> str:
    out = str(tmp_path / "edited")
    shutil.copytree(src, out)
    raw = json.load(open(os.path.join(out, "manifest.json")))
    raw["kv_dtype"] = kv_dtype
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(raw, f)
    return out


def test_load_refuses_fp16_kv_on_a_standard_graph(engine, tmp_path):
    with pytest.raises(EngineError, match="field kv_dtype is 'float16'"):
        Manifest.load(_edited(engine(NAME, target="orin"), tmp_path, "float16"))


def test_load_refuses_a_manifest_kv_dtype_the_graph_does_not_take(engine, tmp_path):
    """An fp32-KV engine whose manifest says float16 (and the reverse): the graph's pool inputs are checked,
    one line."""
    with pytest.raises(EngineError, match="key_cache_0 is float32 but manifest.json kv_dtype says float16"):
        Pipeline(_edited(engine(NAME, kv_dtype="fp32"), tmp_path, "float16"))
    with pytest.raises(EngineError, match="key_cache_0 is float16 but manifest.json kv_dtype says float32"):
        Pipeline(_edited(engine(NAME), tmp_path / "default", "float32"))
