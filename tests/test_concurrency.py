"""Several conversations share one pipeline: same text as alone, a full pool fails cleanly."""
import threading

import numpy as np
import pytest

from conftest import data
from vila_edge import KVCacheFull, KVConfig, Pipeline


def _images():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8) for i in range(4)]


def test_threads_produce_the_same_text_as_alone(engine):
    eng = engine("vila1.5-3b-downsample")
    alone = Pipeline(eng)
    questions = [(img, f"Question {i}: what is here?") for i, img in enumerate(_images())]
    expected = [alone.chat(img, q, max_new_tokens=10) for img, q in questions]
    shared = Pipeline(eng, threads=1)
    results = [None] * len(questions)

    def worker(i):
        conv = shared.conversation()
        results[i] = conv.send(*questions[i], max_new_tokens=10)
        results[i] = (results[i], conv.send(None, "And then?", max_new_tokens=4))
        conv.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == expected
    assert shared.llm.blocks.stats().used == 0


def test_full_pool_raises_and_leaves_others_intact(engine):
    eng = engine("vila1.5-3b-downsample")
    block_bytes = 2 * 2 * 16 * 2 * 16 * 2          # layers x (K, V) x BS x Hkv x D x fp16 (the default pool)
    pipe = Pipeline(eng, max_context=192, kv=KVConfig(block_size=16, budget=13 * block_bytes))
    assert pipe.llm.blocks.num_blocks == 13      # 12 hold one context; the first chat takes 11
    img = data("robot_scene.png")
    first = pipe.conversation()
    reference = Pipeline(eng).chat(img, "What is this?", max_new_tokens=4)
    assert first.send(img, "What is this?", max_new_tokens=4) == reference
    other = pipe.conversation()
    with pytest.raises(KVCacheFull, match="KV cache full"):
        other.send(_images()[0], "Something else entirely, with a long question " * 3, max_new_tokens=4)
    first.close()
    assert pipe.chat(img, "What is this?", max_new_tokens=4) == reference


def test_budget_string_and_bad_budget(engine):
    eng = engine("vila1.5-3b-downsample")
    pipe = Pipeline(eng, max_context=1024, kv=KVConfig(budget="1MiB"))
    assert pipe.llm.blocks.num_blocks == (1 << 20) // (2 * 2 * 16 * 2 * 16 * 2)      # fp16 rows
    assert pipe.llm.pool.nbytes <= 1 << 20
    with pytest.raises(ValueError, match="budget"):
        Pipeline(eng, kv=KVConfig(budget="12 bananas"))
