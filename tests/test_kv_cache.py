"""KV cache: block bookkeeping (stateful + examples), pool sizing, pool scatter/gather. CPU only."""
import hashlib
import random
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vila_edge.errors import KVCacheFull, KVSequenceError, UnknownSequence
from vila_edge.kv_blocks import BlockManager, block_hash
from vila_edge.kv_budget import (GiB, MiB, TARGETS, KVBudgetError, blocks_for_budget,
                                 kv_budget_bytes, parse_budget, plan_num_blocks)
from vila_edge.kv_cache import KVLayout, KVPool


def chain(keys, bs):
    """Independent re-statement of the contract's block hash: blake2b-64 over (prev, int64 keys)."""
    out, prev = [], 0
    for lo in range(0, len(keys) - bs + 1, bs):
        d = hashlib.blake2b(prev.to_bytes(8, "little") + np.asarray(keys[lo:lo + bs], "<i8").tobytes(),
                            digest_size=8).digest()
        prev = int.from_bytes(d, "little")
        out.append(prev)
    return out


def state_of(bm):
    """Every piece of the manager's state, as plain values, to prove a failed call changed nothing."""
    seqs = {sid: (list(s.keys), list(s.block_table), list(s.hashes), s.num_computed)
            for sid, s in bm._seqs.items()}
    c = bm._counters
    return (list(bm._ref), list(bm._hash), dict(bm._hash_to_block), list(bm._free),
            list(bm._lru), seqs, (c.hits, c.misses, c.evictions))


def check_invariants(bm):
    NB, BS = bm.num_blocks, bm.block_size
    held = Counter(b for s in bm._seqs.values() for b in s.block_table)
    assert [held.get(b, 0) for b in range(NB)] == bm._ref, "ref counts != tables holding each block"
    free, lru = list(bm._free), list(bm._lru)
    used = [b for b in range(NB) if bm._ref[b] > 0]
    everywhere = Counter(free + lru + used)
    assert sorted(everywhere) == list(range(NB)), "a block is lost or in two places"
    assert all(n == 1 for n in everywhere.values()), "a block is in two of free/cached/used"
    assert all(bm._hash[b] is None for b in free), "a free block keeps a hash"
    assert all(bm._hash[b] is not None for b in lru), "a cached block has no hash"
    registered = {bm._hash[b]: b for b in range(NB) if bm._hash[b] is not None}
    assert registered == bm._hash_to_block, "hash map and per-block hashes disagree"
    for s in bm._seqs.values():
        assert len(s.block_table) == -(-len(s.keys) // BS)
        assert len(set(s.block_table)) == len(s.block_table)
        assert all(0 <= b < NB for b in s.block_table)
        assert s.hashes == chain(s.keys, BS)
        assert 0 <= s.num_computed <= len(s.keys)
        for i, b in enumerate(s.block_table):
            if bm._hash[b] is not None:
                assert bm._hash[b] == s.hashes[i], "a table holds a block hashed for other content"
                assert (i + 1) * BS <= s.num_computed, "an uncomputed block is registered"
            if i >= s.num_computed // BS:
                assert bm._ref[b] == 1, "a block that will be written is shared"


# -- stateful: random admit / next turn / extend / compute / fork / free under pressure ----------

BS, NB = 4, 10
PREFIXES = [list(range(1, 10)), [1, 2, 3, 4, 50, 60, 70, 80], [100 + i for i in range(12)]]
POISON = -1.0  # what a reserved but uncomputed row holds; keys are >= 0


class KVMachine(RuleBasedStateMachine):
    """The pool holds each position's key (as K) so prefix hits are checked against real rows."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NB, BS)
        self.pool = KVPool(KVLayout(1, 1, 1, BS, "float64"), NB)
        self.content = {}   # block -> chain hash of the keys written into it, once full
        self.history = []   # computed keys of freed sequences: the next turn's prefix
        self.next_id = 0

    def _rows(self, keys):
        k = np.asarray(keys, dtype=np.float64).reshape(1, -1, 1, 1)  # (L, T, Hkv, D)
        return k, -k

    def _reserve(self, slots, table, start):
        """Newly reserved rows are garbage until computed; poison them to catch a bad hit."""
        self.pool.write(*self._rows([POISON] * len(slots)), slots)
        for i in range(start // BS, len(table)):
            self.content.pop(table[i], None)

    def _try(self, call):
        before = state_of(self.bm)
        try:
            return call()
        except KVCacheFull as e:
            assert "KV cache full" in str(e)
            assert state_of(self.bm) == before, "a failed call changed the manager's state"
            return None

    def _admit(self, keys, compute):
        sid, self.next_id = self.next_id, self.next_id + 1
        res = self._try(lambda: self.bm.allocate(sid, keys))
        if res is None:
            return
        n, cached = len(keys), res.num_cached_tokens
        assert cached % BS == 0 and 0 <= cached < n
        k, _ = self.pool.gather(res.block_table, cached)
        assert k.ravel().tolist() == keys[:cached], "a prefix hit returned other KV"
        assert res.slots.tolist() == self.bm.slots(sid, cached, n - cached).tolist()
        self._reserve(res.slots, res.block_table, cached)
        if compute:
            self._compute(sid, n)

    def _compute(self, sid, upto):
        s = self.bm._seqs[sid]
        start = s.num_computed
        self.pool.write(*self._rows(s.keys[start:upto]), self.bm.slots(sid, start, upto - start))
        self.bm.commit(sid, upto)
        for i in range(start // BS, upto // BS):
            self.content[s.block_table[i]] = s.hashes[i]

    def _pick(self, data, pred=lambda s: True):
        live = sorted(sid for sid, s in self.bm._seqs.items() if pred(s))
        return data.draw(st.sampled_from(live)) if live else None

    @rule(prefix=st.sampled_from(range(len(PREFIXES))),
          suffix=st.lists(st.integers(0, 5), max_size=6), compute=st.booleans())
    def admit(self, prefix, suffix, compute):
        self._admit(PREFIXES[prefix] + suffix, compute)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=st.lists(st.integers(0, 5), min_size=1, max_size=6),
          compute=st.booleans())
    def next_turn(self, data, suffix, compute):
        self._admit(data.draw(st.sampled_from(self.history)) + suffix, compute)

    @rule(data=st.data(), extra=st.lists(st.integers(0, 5), max_size=6), compute=st.booleans())
    def extend(self, data, extra, compute):
        sid = self._pick(data)
        if sid is None:
            return
        n_old = self.bm.num_tokens(sid)
        slots = self._try(lambda: self.bm.append(sid, extra))
        if slots is None:
            return
        assert slots.tolist() == self.bm.slots(sid, n_old, len(extra)).tolist()
        self._reserve(slots, self.bm.block_table(sid), n_old)
        if compute:
            self._compute(sid, n_old + len(extra))

    @rule(data=st.data(), key=st.integers(0, 5), compute=st.booleans())
    def step(self, data, key, compute):
        """A decode step: append_token's one call, checked against the queries it replaces."""
        sid = self._pick(data)
        if sid is None:
            return
        n_old, table_old = self.bm.num_tokens(sid), self.bm.block_table(sid)
        res = self._try(lambda: self.bm.append_token(sid, key))
        if res is None:
            return
        start, table, slot = res
        assert (start, table) == (n_old, self.bm.block_table(sid)) and table[:len(table_old)] == table_old
        assert type(slot) is int and [slot] == self.bm.slots(sid, n_old, 1).tolist()
        self._reserve([slot], table, n_old)
        if compute:
            self._compute(sid, n_old + 1)

    @rule(data=st.data())
    def compute(self, data):
        sid = self._pick(data, lambda s: s.num_computed < len(s.keys))
        if sid is not None:
            s = self.bm._seqs[sid]
            self._compute(sid, data.draw(st.integers(s.num_computed, len(s.keys))))

    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data, lambda s: s.num_computed == len(s.keys))
        if parent is None:
            return
        child, self.next_id = self.next_id, self.next_id + 1
        copies = self._try(lambda: self.bm.fork(parent, child))
        if copies is None:
            return
        for src, dst in copies:
            self.pool.copy_block(src, dst)
            self.content.pop(dst, None)
        n = self.bm.num_tokens(parent)
        k, _ = self.pool.gather(self.bm.block_table(child), n)
        assert k.ravel().tolist() == self.bm._seqs[parent].keys

    @rule(n=st.integers(1, NB * BS))
    def flood(self, n):
        """A one-off request of unique keys: evicts cached prefixes when nothing is free."""
        sid, self.next_id = self.next_id, self.next_id + 1
        res = self._try(lambda: self.bm.allocate(sid, [1000 + sid] * n))
        if res is not None:
            self._reserve(res.slots, res.block_table, 0)
            self.bm.free(sid)

    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        if sid is None:
            return
        s = self.bm._seqs[sid]
        if s.num_computed:
            self.history.append(s.keys[:s.num_computed])
        self.bm.free(sid)

    @invariant()
    def bookkeeping_holds(self):
        check_invariants(self.bm)
        st_ = self.bm.stats()
        assert st_.free + st_.cached + st_.used == NB

    @invariant()
    def hashes_match_pool_content(self):
        for h, b in self.bm._hash_to_block.items():
            assert self.content.get(b) == h, f"block {b} is registered for content it does not hold"
        for s in self.bm._seqs.values():
            k, v = self.pool.gather(s.block_table, s.num_computed)
            assert k.ravel().tolist() == s.keys[:s.num_computed]


KVMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestKVMachine = KVMachine.TestCase


# -- block manager examples -------------------------------------------------------------------

def test_block_hash_is_the_contract_chain():
    keys = [5, 2**62 + 7, -200, 3]
    assert [block_hash(0, keys[:2]), block_hash(block_hash(0, keys[:2]), keys[2:])] == chain(keys, 2)


def test_prefix_hit_on_same_keys():
    bm = BlockManager(16, 4)
    keys = list(range(10))
    first = bm.allocate("a", keys)
    assert first.num_cached_tokens == 0 and first.slots.tolist() == [
        first.block_table[t // 4] * 4 + t % 4 for t in range(10)]
    bm.commit("a")
    again = bm.allocate("b", keys)  # while "a" is live: the full blocks are shared
    assert again.num_cached_tokens == 8
    assert again.block_table[:2] == first.block_table[:2] and again.block_table[2] != first.block_table[2]
    assert again.slots.tolist() == [again.block_table[2] * 4 + r for r in (0, 1)]
    assert bm._ref[first.block_table[0]] == 2
    bm.free("a")
    bm.free("b")
    # A whole-block prompt still computes its last block, so the forward pass yields logits.
    assert bm.allocate("c", keys[:8]).num_cached_tokens == 4
    s = bm.stats()
    assert (s.hits, s.misses) == (3, 3 + 1 + 1)
    check_invariants(bm)


def test_next_turn_reuses_finished_conversation():
    bm = BlockManager(16, 4)
    bm.allocate("turn1", [1, 2, 3, 4, 5, 6])
    bm.commit("turn1")
    bm.append("turn1", [7, 8, 9])    # decode steps
    bm.commit("turn1")
    bm.free("turn1")
    assert bm.allocate("turn2", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).num_cached_tokens == 8


def test_miss_on_different_image_key():
    def image_keys(digest: bytes, n):  # 63-bit keys of (image digest, feature index)
        return [int.from_bytes(hashlib.blake2b(digest + i.to_bytes(4, "little"),
                                               digest_size=8).digest(), "little") >> 1
                for i in range(n)]
    text = [1, 319, 1967, 29901]
    bm = BlockManager(16, 4)
    bm.allocate("cat", text + image_keys(b"cat", 8) + [13, 14])
    bm.commit("cat")
    res = bm.allocate("dog", text + image_keys(b"dog", 8) + [13, 14])
    assert res.num_cached_tokens == 4  # only the text block before the image matches


def test_uncommitted_blocks_are_never_reused():
    bm = BlockManager(8, 4)
    bm.allocate("a", list(range(9)))  # freed before its forward pass wrote KV (error, cancel)
    bm.free("a")
    assert bm.allocate("b", list(range(9))).num_cached_tokens == 0
    assert bm.stats().cached == 0


def test_eviction_keeps_tables_consecutive_then_lru_and_tail_first():
    bm = BlockManager(4, 2)
    for sid, keys in (("a", [1, 2, 3]), ("b", [5, 6, 7])):
        bm.allocate(sid, keys)
        bm.commit(sid)
        bm.free(sid)              # full block cached, partial block free
    assert bm.stats().cached == 2 and bm._lru == {0: None, 1: None}   # a's block 0, then b's block 1
    # 3 blocks: the only runs are [0, 1, 2] (evicts a's and b's) and [1, 2, 3] (evicts b's only):
    # the fewest evictions win over LRU order, so the table is consecutive.
    assert bm.allocate("c", [9, 9, 9, 9, 9, 9]).block_table == [1, 2, 3]
    assert bm.stats().evictions == 1
    bm.free("c")
    assert bm.allocate("a2", [1, 2, 3]).num_cached_tokens == 2
    assert bm.allocate("b2", [5, 6, 7]).num_cached_tokens == 0

    bm = BlockManager(4, 2)      # equal evictions: the least recently cached goes, as plain LRU
    for sid, keys in (("a", [1, 2]), ("b", [5, 6])):
        bm.allocate(sid, keys)
        bm.commit(sid)
        bm.free(sid)
    assert bm._lru == {0: None, 1: None}
    bm.allocate("hold", [9, 9, 9, 9])                              # the free run [2, 3]
    assert bm.allocate("c", [8]).block_table == [0] and bm.stats().evictions == 1
    assert bm._lru == {1: None}                                    # b's block is still cached

    bm = BlockManager(3, 2)
    bm.allocate("long", [1, 2, 3, 4, 5, 6])
    bm.commit("long")
    bm.free("long")
    bm.allocate("x", [8, 8])     # evicts the prefix's last block, not its first
    bm.free("x")
    assert bm.allocate("long2", [1, 2, 3, 4, 5, 6]).num_cached_tokens == 4


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, 4)
    p = bm.allocate("p", list(range(6)))
    with pytest.raises(ValueError, match="commit the parent first"):
        bm.fork("p", "c")
    bm.commit("p")
    copies = bm.fork("p", "c")
    child = bm.block_table("c")
    assert child[0] == p.block_table[0] and copies == [(p.block_table[1], child[1])]
    assert bm._ref[child[0]] == 2
    assert bm.append("c", [7]).tolist() == [child[1] * 4 + 2]
    bm.allocate("q", list(range(8)))
    bm.commit("q")
    assert bm.fork("q", "r") == []
    check_invariants(bm)


def test_exhaustion_raises_with_the_numbers():
    bm = BlockManager(2, 4)
    bm.allocate("a", list(range(8)))
    with pytest.raises(KVCacheFull, match=r"needs 1 more blocks of 4 tokens, 0 are free or "
                                          r"evictable of 2 in the pool.*raise the KV budget"):
        bm.allocate("b", [1])
    with pytest.raises(KVCacheFull, match="needs 1 more blocks"):
        bm.append("a", [9])
    bm.free("a")
    before = state_of(bm)
    with pytest.raises(KVCacheFull, match="even an empty pool is too small"):
        bm.allocate("huge", list(range(9)))
    assert state_of(bm) == before
    assert bm.can_allocate(8) and not bm.can_allocate(9)


def test_bad_keys_and_ids_are_rejected():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="int64"):
        bm.allocate("a", [1, 2.5])
    with pytest.raises(ValueError, match="int64"):
        bm.allocate("a", [2**63])
    bm.allocate("a", [1])
    with pytest.raises(ValueError, match="already exists"):
        bm.allocate("a", [1])
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.free("zz")


def test_wait_mode_unblocks_when_another_thread_frees():
    bm = BlockManager(2, 4, wait_s=10.0)
    bm.allocate("a", list(range(8)))
    threading.Timer(0.2, bm.free, args=("a",)).start()
    t0 = time.monotonic()
    assert bm.allocate("b", [1, 2, 3]).num_cached_tokens == 0
    assert 0.1 < time.monotonic() - t0 < 5.0


def test_wait_mode_times_out_and_never_waits_for_the_impossible():
    bm = BlockManager(1, 4, wait_s=0.2)
    bm.allocate("a", [1])
    t0 = time.monotonic()
    with pytest.raises(KVCacheFull, match="after waiting 0.2 s"):
        bm.allocate("b", [1])
    assert time.monotonic() - t0 >= 0.19
    t0 = time.monotonic()
    with pytest.raises(KVCacheFull, match="empty pool is too small"):
        bm.allocate("huge", list(range(5)))
    assert time.monotonic() - t0 < 0.1


@pytest.mark.parametrize("wait_s", [0.0, 2.0])
def test_threads_do_not_corrupt_state(wait_s):
    bm = BlockManager(24, 4, wait_s=wait_s)
    errors, start = [], threading.Barrier(8)

    def worker(w):
        rng = random.Random(w)
        try:
            start.wait()
            for i in range(150):
                sid, keys = (w, i), PREFIXES[rng.randrange(3)] + [rng.randrange(4)] * rng.randrange(5)
                try:
                    bm.allocate(sid, keys)
                    bm.commit(sid)
                    bm.append(sid, [rng.randrange(4)] * rng.randrange(1, 4))
                    bm.commit(sid)
                    if rng.random() < 0.3:
                        bm.fork(sid, (w, i, "fork"))
                        bm.free((w, i, "fork"))
                except KVCacheFull:
                    pass
                if sid in bm._seqs:
                    bm.free(sid)
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often so races would show
    try:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    check_invariants(bm)
    s = bm.stats()
    assert s.used == 0 and s.free + s.cached == 24 and s.hits > 0


# -- budget ------------------------------------------------------------------------------------

VILA15_3B = KVLayout(num_layers=32, num_kv_heads=32, head_dim=80, block_size=16)   # MHA
LLAMA3_8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)   # GQA


def test_bytes_per_block_by_hand():
    assert VILA15_3B.bytes_per_token == 2 * 32 * 32 * 80 * 2 == 320 * 1024
    assert VILA15_3B.bytes_per_block == 5 * MiB
    assert LLAMA3_8B.bytes_per_block == 2 * 32 * 16 * 8 * 128 * 2 == 2 * MiB
    assert KVLayout(2, 2, 4, 8, "float32").bytes_per_block == 2 * 2 * 8 * 2 * 4 * 4


@pytest.mark.parametrize("layout, target, weights, blocks", [
    (VILA15_3B, "orin-nano", 2 * GiB, 819),            # (8192 - 2048 - 2048) MiB / 5 MiB = 819.2
    (LLAMA3_8B, "orin-nx-16gb", 4608 * MiB, 4813),     # (16384 - 4608 - 2150) MiB / 2 MiB
    (LLAMA3_8B, "agx-orin-32gb", 7 * GiB, 11520),      # (32768 - 7168 - 2560) MiB / 2 MiB
    (LLAMA3_8B, "agx-orin-64gb", 5 * GiB, 28773),      # (65536 - 5120 - 2870) MiB / 2 MiB
    (VILA15_3B, "512MiB", 10 * GiB, 102),              # explicit bytes ignore the weights
])
def test_presets_by_hand(layout, target, weights, blocks):
    assert plan_num_blocks(layout, target, weights, max_context_tokens=1024) == blocks


def test_budget_errors_name_the_problem():
    with pytest.raises(KVBudgetError, match="exceed orin-nano-8gb's 8.00 GiB DRAM: no room"):
        kv_budget_bytes("orin-nano", weights_bytes=6 * GiB)
    with pytest.raises(KVBudgetError, match=r"buys 12 blocks .* 4096-token context needs 256 blocks"):
        plan_num_blocks(VILA15_3B, "64MiB", 0, max_context_tokens=4096)
    with pytest.raises(KVBudgetError, match="neither a size"):
        parse_budget("12 parsecs")
    with pytest.raises(KVBudgetError, match="positive"):
        kv_budget_bytes(0, 0)


def test_parse_budget():
    assert parse_budget("512MiB") == 512 * MiB
    assert parse_budget("2GB") == 2 * 10**9
    assert parse_budget(" 1.5 GiB ") == 1536 * MiB
    assert parse_budget("1048576") == MiB
    assert parse_budget("orin-nano") is TARGETS["orin-nano-8gb"]
    assert parse_budget("AGX-Orin-64GB") is TARGETS["agx-orin-64gb"]
    assert kv_budget_bytes(np.int64(MiB), 0) == MiB
    assert blocks_for_budget(LLAMA3_8B, 5 * MiB - 1) == 2


# -- pool ----------------------------------------------------------------------------------------

def test_pool_write_gather_round_trip():
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=3, block_size=4, dtype="float32")
    pool, bm = KVPool(layout, 5), BlockManager(5, 4)
    assert pool.data.shape == (2, 2, 5, 4, 2, 3) and not pool.data.any()
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 2, 10, 2, 3), dtype=np.float32)   # (L, T, Hkv, D) each
    res = bm.allocate("a", list(range(10)))
    pool.write(k, v, res.slots)
    gk, gv = pool.gather(res.block_table, 10)
    assert np.array_equal(gk, k) and np.array_equal(gv, v)
    k1, v1 = rng.standard_normal((2, 2, 1, 2, 3), dtype=np.float32)
    pool.write(list(k1), list(v1), bm.append("a", [10]))  # per-layer outputs, as the graph gives
    gk, gv = pool.gather(bm.block_table("a"), 11)
    assert np.array_equal(gk[:, 10:], k1) and np.array_equal(gv[:, :10], v)
    table = bm.block_table("a")
    assert np.array_equal(pool.layer(1)[0][table[2], :3], k[1, 8:10].tolist() + [k1[1, 0]])
    pool.copy_block(table[2], 4)
    assert np.array_equal(pool.data[:, :, 4], pool.data[:, :, table[2]])
    with pytest.raises(ValueError, match="expected"):
        pool.write(k[:, :3], v[:, :3], res.slots[:2])
    with pytest.raises(ValueError, match="slots"):
        pool.write(k[:, :1], v[:, :1], [20])


def test_tables_stay_consecutive_through_growth_and_turns():
    """Decode growth takes the block after the table's last one, and a next turn's new blocks
    follow its prefix hits: the runtime can then pass the past as a view of the pool."""
    bm = BlockManager(16, 4)
    assert bm.allocate("t1", list(range(10))).block_table == [0, 1, 2]
    bm.commit("t1")
    bm.append("t1", [50, 51, 52])                    # 13 tokens: grows into block 3
    bm.commit("t1")
    assert bm.block_table("t1") == [0, 1, 2, 3]
    bm.free("t1")                                    # 0..2 cached, 3 (partial) free
    turn2 = bm.allocate("t2", list(range(10)) + [50, 51, 52] + [60] * 8)
    assert turn2.num_cached_tokens == 12 and turn2.block_table == [0, 1, 2, 3, 4, 5]
    bm.commit("t2")
    bm.free("t2")                                    # 0..4 cached, 5 (partial) free
    held = bm.allocate("held", [1] * 8)              # a new prompt: the free run 5, 6 evicts nothing
    assert held.block_table == [5, 6] and bm.stats().evictions == 0


def test_a_generation_budget_places_the_table_where_it_can_grow():
    """With `grow`, a new table goes where that many positions still fit after it, so decode
    extends it in place; without room anywhere it is placed as without `grow`."""
    bm = BlockManager(10, 4)
    for i in range(10):
        bm.allocate(("f", i), [i])
    for i in (0, 1, 2, 5, 6, 7, 8, 9):                 # free: 0-2 (3 blocks) and 5-9 (5 blocks)
        bm.free(("f", i))
    assert bm.allocate("plain", [1] * 8).block_table == [0, 1]   # first cheapest run
    bm.free("plain")
    seq = bm.allocate("s", [1] * 8, grow=12)           # 2 blocks + room for 3: only 5-9 has it
    assert seq.block_table == [5, 6]
    bm.append("s", list(range(12)))
    assert bm.block_table("s") == [5, 6, 7, 8, 9]
    assert bm.allocate("t", [1] * 8, grow=100).block_table == [0, 1]   # no room anywhere: as plain


@pytest.mark.parametrize("pieces", [[1] * 23, [3, 1, 5, 1, 1, 9, 2, 1], [4, 4, 1, 7, 7]])
def test_append_in_pieces_equals_one_allocation(pieces):
    """append hashes only the new keys and the last partial block's (O(new keys)): a sequence grown piece
    by piece has the keys, chain hashes (the contract's, by hand) and slots of one allocated whole."""
    rng = random.Random(len(pieces))
    keys = [rng.randrange(-2**40, 2**40) for _ in range(5 + sum(pieces))]
    grown, whole = BlockManager(32, 4), BlockManager(32, 4)
    alloc = grown.allocate("s", keys[:5])
    slots, at = list(alloc.slots), 5
    for n in pieces:
        got = grown.append("s", keys[at: at + n])
        assert got.dtype == np.int64 and got.tolist() == grown.slots("s", at, n).tolist()
        slots += got.tolist()
        at += n
    one = whole.allocate("s", keys)
    seq = grown._seqs["s"]
    assert seq.keys == keys and seq.hashes == chain(keys, 4) == whole._seqs["s"].hashes
    assert grown.block_table("s") == one.block_table and slots == one.slots.tolist()
    assert slots == [one.block_table[t // 4] * 4 + t % 4 for t in range(len(keys))]
    grown.commit("s")
    grown.free("s")
    assert grown.allocate("t", keys + [1]).num_cached_tokens == len(keys) // 4 * 4   # its hashes were registered
    check_invariants(grown)


# -- append_token: one decode step's bookkeeping in one call -----------------------------------

def _twins(num_blocks, block_size, setup):
    """Two managers brought to the same state by `setup(bm)`."""
    a, b = BlockManager(num_blocks, block_size), BlockManager(num_blocks, block_size)
    setup(a)
    setup(b)
    assert state_of(a) == state_of(b)
    return a, b


def _old_step(bm, sid, key):
    """What a decode step did before append_token: four calls (num_tokens, append, block_table)."""
    start = bm.num_tokens(sid)
    slots = bm.append(sid, [key])
    return start, bm.block_table(sid), int(slots[0])


def test_append_token_across_a_block_boundary_by_hand():
    bm = BlockManager(8, 4)
    alloc = bm.allocate("s", [7, 8, 9])
    assert alloc.block_table == [0]
    assert bm.append_token("s", 10) == (3, [0], 3)               # fills block 0: its hash is chained
    assert bm._seqs["s"].hashes == chain([7, 8, 9, 10], 4)
    start, table, slot = bm.append_token("s", 11)                 # position 4 opens block 1
    assert (start, table, slot) == (4, [0, 1], 4)
    table.append(99)                                               # the caller's copy, not the manager's
    assert bm.block_table("s") == [0, 1] and bm._ref[:3] == [1, 1, 0]
    assert bm._hash[0] is None                                     # not computed yet: not reusable
    bm.commit("s")
    assert bm._hash[0] == chain([7, 8, 9, 10], 4)[0]
    assert bm.allocate("t", [7, 8, 9, 10, 1]).num_cached_tokens == 4
    check_invariants(bm)


def test_append_token_equals_the_four_calls_it_replaces():
    """Random decode steps, turns and frees on twin managers: the same results and the same state
    after every step, where the next block is free, cached (evicted), or held by another sequence."""
    rng = random.Random(3)
    a, b = _twins(12, 4, lambda bm: [bm.allocate(s, list(range(n))) for s, n in (("x", 6), ("y", 3))])
    for i in range(400):
        sid = rng.choice(sorted(a.sequences())) if a.sequences() else None
        op = rng.random()
        if sid is None or op < 0.06:
            sid, n = f"s{i}", rng.randrange(1, 9)
            keys = [rng.randrange(4) for _ in range(n)]
            for bm in (a, b):
                try:
                    bm.allocate(sid, keys)
                except KVCacheFull:
                    pass
        elif op < 0.12:
            for bm in (a, b):
                bm.commit(sid)
                bm.free(sid)
        else:
            key = rng.randrange(4)
            got, want = [], []
            for bm, call, out in ((a, lambda: a.append_token(sid, key), got),
                                  (b, lambda: _old_step(b, sid, key), want)):
                try:
                    out.append(call())
                    bm.commit(sid)
                except KVCacheFull as e:
                    out.append(str(e))
            assert got == want
        assert state_of(a) == state_of(b)
        check_invariants(a)


def test_append_token_on_a_fork_writes_only_blocks_of_its_own():
    """A forked child shares the parent's full blocks; its partial block is a copy it owns. Decode
    steps of either sequence write only blocks of their own (ref 1), never a shared one."""
    bm = BlockManager(8, 4)
    bm.allocate("p", list(range(6)))
    bm.commit("p")
    copies = bm.fork("p", "c")
    shared, p_tail = bm.block_table("p")
    c_tail = bm.block_table("c")[1]
    assert copies == [(p_tail, c_tail)] and bm._ref[shared] == 2
    assert bm.append_token("c", 50) == (6, [shared, c_tail], c_tail * 4 + 2)
    assert bm.append_token("p", 60) == (6, [shared, p_tail], p_tail * 4 + 2)
    for sid in ("p", "c"):
        bm.append_token(sid, 1)
        start, table, slot = bm.append_token(sid, 2)                 # position 8: a new block each
        assert start == 8 and slot == table[2] * 4 and bm._ref[table[2]] == 1
    assert bm._ref[shared] == 2 and bm.block_table("p")[2] != bm.block_table("c")[2]
    # a child forked on a block boundary shares every block; its next token opens one of its own
    for key in (3, 4, 5):                                            # p: 12 positions, 3 full blocks
        bm.append_token("p", key)
    bm.commit("p")
    assert bm.fork("p", "d") == []
    start, table, slot = bm.append_token("d", 3)
    assert table[:3] == bm.block_table("p") and table[3] not in bm.block_table("p") and slot == table[3] * 4
    check_invariants(bm)


def test_append_token_on_a_full_pool_raises_and_changes_nothing():
    bm = BlockManager(3, 4)
    bm.allocate("a", list(range(8)))
    bm.allocate("b", list(range(100, 104)))
    bm.commit("b")
    bm.free("b")                                   # cached: evictable, so a step can still take it
    assert bm.append_token("a", 1) == (8, [0, 1, 2], 8)
    assert bm.stats().evictions == 1
    for _ in range(3):
        bm.append_token("a", 1)
    before = state_of(bm)
    with pytest.raises(KVCacheFull, match=r"append for sequence 'a' needs 1 more blocks of 4 tokens, 0 are free"):
        bm.append_token("a", 2)
    assert state_of(bm) == before
    with pytest.raises(UnknownSequence, match="'zz'"):
        bm.append_token("zz", 2)
    for bad in (1.5, "3", 2**63, None):
        with pytest.raises(KVSequenceError, match="int64 integers"):
            bm.append_token("a", bad)
    assert state_of(bm) == before
    check_invariants(bm)


def test_append_token_waits_for_a_free_like_append():
    bm = BlockManager(2, 2, wait_s=5.0)
    bm.allocate("a", [1, 2])
    bm.allocate("b", [3, 4])
    threading.Timer(0.2, bm.free, ("b",)).start()
    t = time.monotonic()
    assert bm.append_token("a", 5) == (2, [0, 1], 2)
    assert 0.1 < time.monotonic() - t < 4.0
    with pytest.raises(KVCacheFull):                 # wait_s=0 overrides the manager's: no wait
        bm.append_token("a", 6), bm.append_token("a", 7, wait_s=0)
