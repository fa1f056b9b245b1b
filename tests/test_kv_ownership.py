"""Every KV block has an owner that frees it on every path (issue #22, finding 2): a KVCacheFull in
decode, a conversation dropped without close(), a bad option, a pool where every waiter holds
blocks."""
import gc
import math
import threading

import pytest

from vila_edge import GenerationConfig, KVCacheFull, KVConfig, Pipeline
from vila_edge.errors import GenerationConfigError, KVSequenceError, VilaEdgeError
from vila_edge.kv_blocks import BlockManager

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4      # the fixture: layers x (K, V) x BS x Hkv x D x fp32


def _pipe(engine, blocks: int, max_context: int = 128, wait_s: float = 0.0) -> Pipeline:
    return Pipeline(engine("vila1.5-3b-downsample"), max_context=max_context,
                    kv=KVConfig(block_size=16, budget=blocks * BLOCK_BYTES, wait_s=wait_s))


def test_kv_full_during_decode_frees_the_sequence(engine):
    """Another request takes the last free blocks between two decode steps: the decode step's append
    raises, and the failing sequence must not keep its blocks (it did: append ran outside the try)."""
    pipe = _pipe(engine, 16)
    blocks, hog = pipe.llm.blocks, []
    real_append = blocks.append_token

    def append_after_a_hog(seq, key, **kw):
        if not hog:
            free = blocks.num_free_blocks
            blocks.allocate("hog", list(range(free * blocks.block_size)))
            hog.append("hog")
        return real_append(seq, key, **kw)

    blocks.append_token = append_after_a_hog     # the scheduler reserves each decode token here
    conv = pipe.conversation(system="S")
    with pytest.raises(KVCacheFull, match="append"):
        # 16 tokens in: the prompt's last block fills after a few steps and the next append needs one more.
        conv.send(None, "a b c d e f", max_new_tokens=40)
    assert conv.seq is None
    blocks.free("hog")
    assert blocks.stats().used == 0


def test_dropped_conversations_give_their_blocks_back(engine):
    """Conversations abandoned without close(): before, 222 of them filled the default pool for
    good; here 12 blocks would be gone after a few."""
    pipe = _pipe(engine, 12)
    for i in range(30):
        conv = pipe.conversation(system="S")
        assert conv.send(None, f"question {i}", max_new_tokens=2) is not None
        del conv                                        # no close()
    assert pipe.llm.blocks.stats().used == 0


def test_abandoned_stream_and_collected_cycle_free_their_blocks(engine):
    pipe = _pipe(engine, 12)
    stream = pipe.stream(None, "tell me more", max_new_tokens=30)
    next(stream, None)                                  # started, never finished
    del stream
    conv = pipe.conversation(system="S")
    conv.send(None, "hello", max_new_tokens=2)
    conv.self_ref = conv                                # a reference cycle: only the collector frees it
    del conv
    with pipe.llm.blocks._locked():                     # collected while this thread holds the lock
        gc.collect()
    assert pipe.llm.blocks.stats().used == 0


def test_float_max_new_tokens_and_grow_change_nothing(engine):
    with pytest.raises(GenerationConfigError, match="max_new_tokens must be an integer"):
        GenerationConfig(max_new_tokens=8.0)
    pipe = _pipe(engine, 12)
    with pytest.raises(GenerationConfigError):
        pipe.chat(None, "hello", max_new_tokens=2.5)
    assert pipe.llm.blocks.stats().used == 0
    # allocate itself: a prefix hit must not be taken before a bad argument is noticed.
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(9)))
    bm.commit("a")
    bm.free("a")
    before = bm.stats()
    with pytest.raises(KVSequenceError, match="grow must be an int"):
        bm.allocate("b", list(range(9)), grow=2.5)
    assert bm.stats() == before and before.used == 0


def test_infinite_wait_where_every_waiter_holds_blocks_raises():
    """Two sequences each hold half the pool and both need more: neither can ever finish. With
    wait_s=inf this hung for ever; now the second waiter raises, its error path frees its blocks
    and the first one proceeds."""
    bm = BlockManager(4, 4, wait_s=math.inf)
    for i, seq in enumerate(("a", "b")):
        bm.allocate(seq, list(range(10 * i, 10 * i + 8)))   # different prompts: no shared blocks
        bm.commit(seq)
    outcome = {}

    def grow(seq):
        try:
            bm.append(seq, [1])
            outcome[seq] = "grew"
        except KVCacheFull as e:
            outcome[seq] = str(e)
            bm.free(seq)

    threads = [threading.Thread(target=grow, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert sorted(v == "grew" for v in outcome.values()) == [False, True]
    assert any("none can finish" in v for v in outcome.values())


def test_next_turn_never_waits_on_its_own_previous_turn(engine):
    """wait_s=inf and a pool of one context: turn 1 holds 4 of 12 blocks, turn 2 needs 12 (3 shared
    with turn 1). It used to wait for turn 1's blocks, which its own conversation held (a
    self-deadlock); the previous turn is now released first and its full blocks come back as hits."""
    pipe = _pipe(engine, 12, max_context=192, wait_s=math.inf)
    done = []

    def talk():
        conv = pipe.conversation()
        conv.send(None, "What is this?", max_new_tokens=4)
        conv.send(None, "And this one, described at length with many words please? " * 3, max_new_tokens=4)
        done.append(conv.last_stats["cached_tokens"])
        conv.close()

    t = threading.Thread(target=talk, daemon=True)
    t.start()
    t.join(timeout=60)
    assert done, "second turn deadlocked on the first turn's blocks"
    assert done[0] == 3 * 16
    assert pipe.llm.blocks.stats().used == 0


def test_kv_config_errors_are_ours(engine):
    for kv in (KVConfig(block_size=0), KVConfig(wait_s=-1.0), KVConfig(wait_s=float("nan")), KVConfig(budget="x")):
        with pytest.raises(VilaEdgeError):
            Pipeline(engine("vila1.5-3b-downsample"), kv=kv)
