"""Sampler semantics against hand-computed values; streaming and stop strings."""
import numpy as np
import pytest

from conftest import data
from vila_edge import GenerationConfig, Pipeline
from vila_edge.sampling import Sampler


def test_greedy_is_argmax_within_the_original_vocabulary():
    logits = np.array([0.1, 0.5, 0.2, 9.0], np.float32)       # id 3 is outside a 3-id vocabulary
    assert Sampler(GenerationConfig(), vocab_size=3, never_sample=[])(logits, np.array([])) == 1


def test_never_sample_media_tokens():
    logits = np.array([0.1, 5.0, 0.2], np.float32)
    assert Sampler(GenerationConfig(), 3, never_sample=[1])(logits, np.array([])) == 2
    hot = Sampler(GenerationConfig(temperature=5.0, seed=0), 3, never_sample=[1])
    assert 1 not in {hot(logits, np.array([])) for _ in range(200)}


def test_repetition_penalty_hand_computed():
    # HF rule: seen positive logits are divided by the penalty, seen negative ones multiplied.
    # [2.0, 1.5, -1.0] with ids 0 and 2 seen, penalty 2 -> [1.0, 1.5, -2.0] -> argmax 1.
    s = Sampler(GenerationConfig(repetition_penalty=2.0), 3, [])
    assert s(np.array([2.0, 1.5, -1.0], np.float32), np.array([0, 2, 0])) == 1
    assert Sampler(GenerationConfig(), 3, [])(np.array([2.0, 1.5, -1.0], np.float32), np.array([0])) == 0


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        for cfg in (GenerationConfig(temperature=1.0, top_k=1, seed=1),
                    GenerationConfig(temperature=1.0, top_p=1e-6, seed=1)):
            assert Sampler(cfg, 50, [])(logits, np.array([])) == int(np.argmax(logits))


def test_top_p_keeps_the_smallest_sufficient_set():
    # probs 0.5, 0.3, 0.2: top_p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), never id 2.
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.7, seed=3), 3, [])
    draws = [s(logits, np.array([])) for _ in range(400)]
    assert set(draws) == {0, 1}
    assert 0.5 < draws.count(0) / 400 < 0.75                    # 0.5 / 0.8 = 0.625 expected


def test_seed_reproducible():
    logits = np.random.default_rng(0).normal(size=30).astype(np.float32)
    a = Sampler(GenerationConfig(temperature=1.0, seed=42), 30, [])
    b = Sampler(GenerationConfig(temperature=1.0, seed=42), 30, [])
    assert [a(logits, np.array([])) for _ in range(20)] == [b(logits, np.array([])) for _ in range(20)]


def test_bad_generation_options():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_stream_equals_chat_and_stop_strings(engine):
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    img = data("robot_scene.png")
    full = pipe.chat(img, "What is this?", max_new_tokens=12)
    assert "".join(pipe.stream(img, "What is this?", max_new_tokens=12)) == full
    stop = full[3:5]
    assert len(stop) == 2 and full.find(stop) >= 1
    cut = pipe.chat(img, "What is this?", max_new_tokens=12, stop=[stop])
    assert cut == full[: full.find(stop)]
    sampled = pipe.chat(img, "What is this?", max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    assert sampled == pipe.chat(img, "What is this?", max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=5)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_without_a_copy_equals_the_masked_argmax(seed):
    """Plain greedy reads the logits in place (no masked copy): the same id as the argmax of the masked
    copy, computed here by hand, including a maximum on a never-sampled id, ties, -inf and ids past the
    vocabulary; the logits are left untouched."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(50).astype(np.float32)
    never = rng.choice(40, 5, replace=False).tolist()
    cases = [logits, logits.copy(), logits.copy(), np.full(50, -np.inf, np.float32), logits.copy()]
    cases[1][never[0]] = 100.0                      # the maximum is never sampled: the next one wins
    cases[2][[3, 17]] = 50.0                        # a tie: the first
    cases[4][45] = 1e9                              # past the 40-id vocabulary
    for x in cases:
        before = x.copy()
        masked = x[:40].astype(np.float64)
        masked[never] = -np.inf
        assert Sampler(GenerationConfig(), 40, never)(x, np.array([])) == int(np.argmax(masked))
        np.testing.assert_array_equal(x, before)


def test_nan_logits_raise_on_the_greedy_path_too():
    from vila_edge.errors import EngineError
    for where in (0, 7, 39):
        x = np.arange(50, dtype=np.float32)
        x[where] = np.nan
        with pytest.raises(EngineError, match="NaN logits"):
            Sampler(GenerationConfig(), 40, [])(x, np.array([]))
    x = np.arange(50, dtype=np.float32)
    x[45] = np.nan                                  # past the vocabulary: never read, as before
    assert Sampler(GenerationConfig(), 40, [])(x, np.array([])) == 39
