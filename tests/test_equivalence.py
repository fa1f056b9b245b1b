"""The runtime (ONNX Runtime engine + numpy pipeline) against the torch reference.

fp32: greedy output equal token for token, first-step logits within 1e-4 (float32 summation order
differs between ORT's and torch's kernels; 1e-4 is ~100x the observed error and far below the top-1
margins of the fixtures' peaky logits). fp16: vision features and first-step logits within 1% of
the reference's largest magnitude (fp16 has a 2^-11 relative step; a few layers of rounding stay
well inside 1%).
"""
import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, reference_inputs, scene_images
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.reference import ReferenceVLM, hf_pixels
from vila_edge import Pipeline
from vila_edge.families import DYNAMIC
from vila_edge.preprocess import dynamic_tiles

MAX_NEW = 16
# Both LLM graph variants (vila_edge_export/build.py TARGETS): contrib ops for ORT ("cpu"), standard ops for
# TensorRT's parser ("orin"; run here by the same ORT runner).
TARGETS = ["cpu", "orin"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_output_equals_reference(name, target, checkpoint, engine):
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    pipe = Pipeline(engine(name, target=target))
    assert pipe.manifest.build["target"] == target
    images = scene_images()
    prompt = "<image>\nCompare it with <image>\nWhat changed?"
    conv = pipe.conversation()
    conv.send(images, prompt, max_new_tokens=MAX_NEW)
    embeds = reference_inputs(spec, ref, prompt, images, pipe)
    stops = set(pipe.manifest.tokens.stop_ids)
    expected = [i for i in ref.generate(embeds, MAX_NEW, stops) if i not in stops]
    assert conv.last_stats["prompt_tokens"] == embeds.shape[1]
    assert conv.last_ids == expected
    assert len(expected) > 0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_first_step_logits_fp32(name, target, checkpoint, engine):
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    pipe = Pipeline(engine(name, target=target))
    assert pipe.llm.runner.embeddings.table.dtype == np.float32   # fp32 engines keep the reference's table
    images = scene_images()[:1]
    embeds = reference_inputs(spec, ref, "<image>\nWhat is this?", images, pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    pipe.llm.release("probe")
    np.testing.assert_allclose(logits, ref.logits(embeds).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_fp16_engine_within_tolerance(name, target, checkpoint, engine):
    spec = read_checkpoint(checkpoint(name))
    ref = ReferenceVLM(spec, torch.float32)
    pipe = Pipeline(engine(name, dtype="fp16", target=target))
    assert pipe.manifest.dtype == "float16"
    img = scene_images()[0]
    feats, _ = pipe.vision.encode(img)
    tiles = (dynamic_tiles(img, spec.vision.image_size, spec.min_tiles, spec.max_tiles)
             if spec.image_mode == DYNAMIC else [img])
    expected = ref.encode_images(np.concatenate([hf_pixels(spec, t) for t in tiles])).numpy()
    assert feats.dtype == np.float16
    scale = np.abs(expected).max()
    assert np.abs(feats.astype(np.float32) - expected).max() <= 1e-2 * scale
    embeds = reference_inputs(spec, ref, "<image>\nWhat is this?", [img], pipe)
    logits, _ = pipe.llm.prefill("probe", embeds[0].numpy(), np.arange(embeds.shape[1]))
    pipe.llm.release("probe")
    expected_logits = ref.logits(embeds).numpy()
    assert np.abs(logits - expected_logits).max() <= 1e-2 * np.abs(expected_logits).max()


@pytest.mark.parametrize("target", TARGETS)
def test_multi_turn_reuses_kv_and_matches_cold_prefill(target, engine):
    """Turn 2 of a conversation computes only its new positions, and answers exactly as a cold
    pipeline (empty cache) prefilling the same two-turn history from scratch."""
    eng = engine("vila1.5-3b-downsample", target=target)
    pipe = Pipeline(eng)
    conv = pipe.conversation()
    conv.send(scene_images()[0], "What is in the image?", max_new_tokens=6)
    state = (list(conv.turns), list(conv.tiles), list(conv.digests), list(conv.tiles_per_image))
    conv.send(None, "Where is the red square?", max_new_tokens=6)
    bs = pipe.llm.blocks.block_size
    assert conv.last_stats["cached_tokens"] >= bs and conv.last_stats["cached_tokens"] % bs == 0
    cold = Pipeline(eng).conversation()
    cold.turns, cold.tiles, cold.digests, cold.tiles_per_image = state
    cold.send(None, "Where is the red square?", max_new_tokens=6)
    assert cold.last_stats["cached_tokens"] == 0
    assert cold.last_ids == conv.last_ids
    conv.close()
    cold.close()


@pytest.mark.parametrize("target", TARGETS)
def test_scattered_blocks_give_the_same_logits_as_consecutive(target, engine):
    """The runtime passes a sequence's past as a view of the pool when its blocks are consecutive and
    as a gathered copy when they are not (a pool fragmented by other sequences): the same numbers
    reach the graph, so prefill and every decode step give identical logits."""
    eng = engine("vila1.5-3b-downsample", target=target)
    rng = np.random.default_rng(3)
    hidden = Pipeline(eng).manifest.llm.hidden
    embeds = rng.standard_normal((40, hidden)).astype(np.float32)

    def run(pipe):
        logits = [pipe.llm.prefill("s", embeds[:37], np.arange(37))[0]]
        for t in range(37, 40):                        # crosses from block 2 into block 3 (BS 16)
            logits.append(pipe.llm.extend("s", embeds[t: t + 1], np.array([t])))
        table = pipe.llm.blocks.block_table("s")
        pipe.llm.release("s")
        return logits, table

    consecutive, table = run(Pipeline(eng))
    assert table == list(range(table[0], table[0] + 3))
    pipe = Pipeline(eng)
    blocks = pipe.llm.blocks
    for i in range(blocks.num_blocks):                 # one unhashed block each, then every other one freed
        blocks.allocate(("filler", i), [100 + i])
    for i in range(0, blocks.num_blocks, 2):
        blocks.free(("filler", i))
    scattered, table = run(pipe)
    assert table == [0, 2, 4]
    for a, b in zip(consecutive, scattered):
        np.testing.assert_array_equal(a, b)
