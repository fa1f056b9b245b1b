"""Paged KV bookkeeping: which pool blocks each sequence holds, and prefix reuse between them.

Plain Python over integers (nano-vllm's block_manager.py is the model), one lock for all state.
Every block is in exactly one of three places:
  free     no hash, ref 0: taken first;
  cached   hash registered, ref 0, in LRU order: still reusable by a prefix hit, evicted (hash
           dropped) when a block is needed and none is free, or when it lies where a sequence's
           run of consecutive blocks continues (below);
  in use   ref > 0: held by that many block tables (a hashed block may be shared by several).
New blocks are placed so a sequence's table stays consecutive where the pool allows: the CPU
runtime then hands the graph its past as a view of the pool, where scattered blocks cost a copy
per step (vila_edge/llm.py). A sequence grows into the block after its last one when that block is
unreferenced (evicting it if cached); otherwise, and for a new sequence, its blocks go to the run of
unreferenced blocks that evicts the fewest cached blocks (the least recently cached among equals;
a run of free blocks evicts none), else anywhere: free blocks first, then LRU evictions.
A full block's hash chains the previous block's hash with its BS keys (docs/contracts.md). A hash
is registered only at `commit`, once the block's KV rows are really in the pool, so a sequence that
is freed before its forward pass ran (error, cancel) can never hand out garbage to a later hit.
A sequence's last, partial block is always its own (hits and forks share full blocks only), so
the slots it is given never alias KV another sequence reads.
"""
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from vila_edge.errors import KVCacheFull, KVConfigError, KVSequenceError, UnknownSequence

ROOT_HASH = 0  # the "previous hash" of a sequence's first block


def block_hash(prev_hash: int, keys: Sequence[int]) -> int:
    """Stable 64-bit hash of one full block: blake2b over (prev hash, keys as little-endian int64).

    Not Python's hash(): it is salted per process for str/bytes and its tuple hash is built for
    dict spread, not collision resistance, and a collision here silently serves another prompt's
    KV. blake2b is in the standard library and costs a few microseconds per block.
    """
    h = hashlib.blake2b(prev_hash.to_bytes(8, "little"), digest_size=8)
    h.update(np.asarray(keys, dtype="<i8").tobytes())
    return int.from_bytes(h.digest(), "little")


def chain_hashes(keys: Sequence[int], block_size: int, prev_hash: int = ROOT_HASH,
                 start: int = 0) -> list:
    """Hashes of the full blocks of keys[start:], chained from prev_hash (start % BS == 0)."""
    out = []
    for lo in range(start, len(keys) - block_size + 1, block_size):
        prev_hash = block_hash(prev_hash, keys[lo:lo + block_size])
        out.append(prev_hash)
    return out


@dataclass(frozen=True)
class AllocResult:
    block_table: list        # pool block ids, in position order (a copy)
    num_cached_tokens: int   # leading positions whose KV is already in the pool: a multiple of
                             # BS, < len(keys) so the forward pass always yields logits
    slots: np.ndarray        # int64 [len(keys) - num_cached_tokens]: where the new rows go


@dataclass(frozen=True)
class KVStats:
    num_blocks: int
    free: int        # no hash, unreferenced
    cached: int      # hashed, unreferenced (LRU, evictable)
    used: int        # referenced by at least one sequence
    hits: int        # blocks reused by allocate
    misses: int      # blocks allocate had to give fresh
    evictions: int   # cached blocks whose hash was dropped to make room


@dataclass
class _Seq:
    keys: list           # one key per reserved position
    block_table: list    # ceil(len(keys) / BS) block ids
    hashes: list         # chain hash of each full block, in order
    num_computed: int    # positions whose KV is in the pool (committed)


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class BlockManager:
    """Block tables, ref counts and prefix reuse over a pool of `num_blocks` blocks of `block_size`.

    wait_s: how long allocate/append/fork wait for another sequence to free blocks before raising
    KVCacheFull; 0 raises at once, math.inf waits for ever (only sound when other threads free).
    """

    def __init__(self, num_blocks: int, block_size: int, wait_s: float = 0.0):
        if not _is_int(num_blocks) or not _is_int(block_size) or num_blocks < 1 or block_size < 1:
            raise KVConfigError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not wait_s >= 0:
            raise KVConfigError(f"BlockManager wait_s must be a number of seconds >= 0 (math.inf: wait for "
                                f"ever), got {wait_s!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.wait_s = wait_s
        self._ref = [0] * num_blocks
        self._hash = [None] * num_blocks          # registered hash of each block, or None
        self._hash_to_block = {}
        self._free = dict.fromkeys(range(num_blocks))   # insertion-ordered set: taken oldest first
        self._lru = OrderedDict()                 # cached block ids, least recently freed first
        self._seqs = {}
        self._waiting = {}                        # seq id -> threads waiting while holding it
        self._counters = _Counters()
        self._cond = threading.Condition()       # an RLock: see _locked
        self._local = threading.local()
        self._orphans = deque()                   # sequences to free at the next call (release_later)
        self._lock = _Locked(self)

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        with self._locked():
            return len(self._free) + len(self._lru)

    def can_allocate(self, n_tokens: int) -> bool:
        """Whether a new sequence of n_tokens fits now, counting no prefix hits."""
        return self._blocks_for(n_tokens) <= self.num_free_blocks

    def block_table(self, seq_id: Hashable) -> list:
        with self._locked():
            return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id: Hashable) -> int:
        with self._locked():
            return len(self._seq(seq_id).keys)

    def slots(self, seq_id: Hashable, start: int, count: int) -> np.ndarray:
        """int64 [count]: slot ids (block * BS + row) of positions start..start+count-1."""
        with self._locked():
            seq = self._seq(seq_id)
            if start < 0 or count < 0 or start + count > len(seq.keys):
                raise KVSequenceError(f"slots({seq_id!r}, {start}, {count}): sequence has only "
                                 f"{len(seq.keys)} reserved positions")
            return self._slots(seq.block_table, start, count)

    def sequences(self) -> set:
        """Ids of the sequences that hold blocks now."""
        with self._locked():
            return set(self._seqs)

    def stats(self) -> KVStats:
        with self._locked():
            c = self._counters
            return KVStats(self.num_blocks, len(self._free), len(self._lru),
                           self.num_blocks - len(self._free) - len(self._lru),
                           c.hits, c.misses, c.evictions)

    # -- state changes: each checks everything first, then mutates, so a failure changes nothing

    def allocate(self, seq_id: Hashable, keys: Sequence[int], grow: int = 0,
                 wait_s: float | None = None) -> AllocResult:
        """Reserve positions 0..len(keys)-1 for a new sequence, reusing cached full blocks. `grow`:
        positions the sequence expects to append (a generation budget); its blocks are placed,
        where the pool allows, with that much unreferenced room after them, so that decode grows
        the table in place. Nothing is reserved: the room stays available to others. `wait_s`
        overrides the manager's (the scheduler's thread passes 0: it is the one that frees)."""
        keys = _checked_keys(keys)
        if not keys:
            raise KVSequenceError(f"allocate({seq_id!r}): a sequence needs at least one key")
        if not _is_int(grow):   # checked before any block changes hands: allocate is all or nothing
            raise KVSequenceError(f"allocate({seq_id!r}): grow must be an int number of positions, got {grow!r}")
        hashes = chain_hashes(keys, self.block_size)  # outside the lock: pure
        max_hits = (len(keys) - 1) // self.block_size
        with self._locked():
            total = self._blocks_for(len(keys))
            deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
            while True:
                if seq_id in self._seqs:
                    raise KVSequenceError(f"allocate: sequence {seq_id!r} already exists")
                hits = self._lookup(hashes[:max_hits])
                revived = sum(1 for b in hits if self._ref[b] == 0)
                if total - len(hits) <= len(self._free) + len(self._lru) - revived:
                    break
                self._wait_or_raise(seq_id, total - len(hits), total, "allocate", deadline)
            room = self._blocks_for(len(keys) + max(0, int(grow))) - total
            for b in hits:
                if self._ref[b] == 0:
                    del self._lru[b]
                self._ref[b] += 1
            table = hits + self._take_run(total - len(hits), hits[-1] if hits else None, room)
            self._counters.hits += len(hits)
            self._counters.misses += total - len(hits)
            cached = len(hits) * self.block_size
            self._seqs[seq_id] = _Seq(keys, table, hashes, cached)
            return AllocResult(list(table), cached, self._slots(table, cached, len(keys) - cached))

    def append(self, seq_id: Hashable, keys: Sequence[int], wait_s: float | None = None) -> np.ndarray:
        """Reserve len(keys) more positions (decode steps, a next turn); returns their slots.
        `wait_s` overrides the manager's, as in allocate."""
        return self.reserve(seq_id, keys, wait_s)[2]

    def reserve(self, seq_id: Hashable, keys: Sequence[int], wait_s: float | None = None) -> tuple:
        """append under the lock once, with what a forward pass of the new positions needs besides:
        (start, block table (a copy), slots), start being the sequence's length before the call."""
        keys = _checked_keys(keys)
        with self._locked():
            seq, need = self._room(seq_id, len(keys), wait_s)
            n_old = len(seq.keys)
            # O(new keys) per call, not O(sequence): only the last partial block's keys and the new
            # ones are hashed, and the key list grows in place (a decode step appends one key).
            hashed = len(seq.hashes) * self.block_size
            prev = seq.hashes[-1] if seq.hashes else ROOT_HASH
            tail = seq.keys[hashed:] + keys
            seq.hashes += chain_hashes(tail, self.block_size, prev)
            if need:
                seq.block_table += self._take_run(need, seq.block_table[-1])
            seq.keys += keys
            return n_old, list(seq.block_table), self._slots(seq.block_table, n_old, len(keys))

    def append_token(self, seq_id: Hashable, key: int, wait_s: float | None = None) -> tuple:
        """One decode step's bookkeeping in one call under one lock entry: reserve position n (the
        sequence's length) for `key`, taking a block when n starts one. Returns (n, block table (a
        copy), slot id of position n as an int). The same state change and errors as
        `reserve(seq_id, [key])` (tests/test_kv_cache.py checks them against each other), so a full
        pool raises KVCacheFull with the manager unchanged."""
        if not isinstance(key, (int, np.integer)) or not -2**63 <= key < 2**63:   # as _checked_keys
            raise KVSequenceError(f"KV block keys must be int64 integers, got {key!r}")
        key = int(key)
        BS = self.block_size
        with self._locked():
            seq, need = self._room(seq_id, 1, wait_s)
            keys, table = seq.keys, seq.block_table
            n = len(keys)
            keys.append(key)
            if (n + 1) % BS == 0:    # the key completes a block: chain its hash
                seq.hashes.append(block_hash(seq.hashes[-1] if seq.hashes else ROOT_HASH, keys[n + 1 - BS:]))
            if need:
                last = table[-1]
                # The next block when it is unreferenced (what _take_run picks first), without its
                # scan of the whole pool; anything else through it.
                table.append(self._take_block(last + 1) if last + 1 < self.num_blocks and not self._ref[last + 1]
                             else self._take_run(1, last)[0])
            return n, table[:], table[n // BS] * BS + n % BS

    def _room(self, seq_id: Hashable, count: int, wait_s: float | None) -> tuple:
        """(sequence, blocks it must take) for `count` more positions, once the pool has them: waits
        up to wait_s (the manager's when None) for a free(), else raises KVCacheFull. Lock held."""
        deadline = None
        while True:  # re-read the sequence after a wait: another thread may have freed it
            seq = self._seq(seq_id)
            n_new = len(seq.keys) + count
            need = -(-n_new // self.block_size) - len(seq.block_table)
            if need <= 0 or need <= len(self._free) + len(self._lru):
                return seq, max(need, 0)
            if deadline is None:
                deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
            self._wait_or_raise(seq_id, need, self._blocks_for(n_new), "append", deadline, holds=seq_id)

    def commit(self, seq_id: Hashable, num_tokens: int | None = None) -> None:
        """Positions 0..num_tokens-1 (default: all reserved) now have their KV in the pool.

        Full blocks that became computed get their hash registered, so later allocations (other
        requests, this conversation's next turn) can reuse them. A block whose hash is already
        registered elsewhere (two requests computed the same prefix) stays unhashed.
        """
        with self._locked():
            seq = self._seq(seq_id)
            n = len(seq.keys) if num_tokens is None else num_tokens
            if not seq.num_computed <= n <= len(seq.keys):
                raise KVSequenceError(f"commit({seq_id!r}, {n}): must lie between the {seq.num_computed} "
                                 f"computed and {len(seq.keys)} reserved positions")
            for i in range(seq.num_computed // self.block_size, n // self.block_size):
                b, h = seq.block_table[i], seq.hashes[i]
                if self._hash[b] is None and h not in self._hash_to_block:
                    self._hash[b] = h
                    self._hash_to_block[h] = b
            seq.num_computed = n

    def fork(self, parent: Hashable, child: Hashable) -> list:
        """Start `child` as a copy of a fully committed `parent`; returns [(src, dst)] block copies.

        Full blocks are shared (ref + 1). A partial last block is not shared: the child gets a new
        block, and the caller must copy src into dst (KVPool.copy_block) before the child's next
        forward pass. The list is empty when the parent ends on a block boundary.
        """
        with self._locked():
            deadline = time.monotonic() + self.wait_s
            while True:  # re-checked after a wait: another thread may have changed either
                seq = self._seq(parent)
                if child in self._seqs:
                    raise KVSequenceError(f"fork: sequence {child!r} already exists")
                if seq.num_computed != len(seq.keys):
                    raise KVSequenceError(f"fork({parent!r}): commit the parent first ("
                                     f"{seq.num_computed} of {len(seq.keys)} positions computed)")
                n_full = len(seq.keys) // self.block_size
                partial = len(seq.block_table) - n_full
                if partial <= len(self._free) + len(self._lru):
                    break
                self._wait_or_raise(child, partial, len(seq.block_table), "fork", deadline, holds=parent)
            shared = seq.block_table[:n_full]
            for b in shared:
                self._ref[b] += 1
            table = shared + [self._take_block() for _ in range(partial)]
            self._seqs[child] = _Seq(list(seq.keys), table, list(seq.hashes), seq.num_computed)
            return [(seq.block_table[-1], table[-1])] if partial else []

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence: hashed blocks it held last go to the cached LRU, the rest to free."""
        with self._locked():
            if self._local.depth > 1:
                # Re-entered from a garbage-collector callback (a Conversation or stream collected
                # while this thread is inside another call): finish that call first.
                self._orphans.append(seq_id)
                return
            self._free_now(seq_id)

    def release_later(self, seq_id: Hashable) -> None:
        """Free `seq_id` at the next call into this manager (unknown ids are ignored). Takes no lock:
        safe from any thread and from weakref.finalize callbacks, which run wherever the garbage
        collector happens to run, possibly inside a call here that holds the lock."""
        self._orphans.append(seq_id)

    def _free_now(self, seq_id: Hashable) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise UnknownSequence(f"free: unknown sequence {seq_id!r}")
        # Tail first, so a prefix's later blocks are evicted before its earlier ones: a chain
        # is only reachable from its start, and the start is what other prompts share.
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    self._free[b] = None
                else:
                    self._lru[b] = None
        self._cond.notify_all()

    # -- internals (called with the lock held) -----------------------------------------------

    def _locked(self) -> "_Locked":
        """The lock, with this thread's nesting depth; the outermost entry first frees sequences
        whose owners were garbage-collected (release_later). One object per manager, entered by
        `with`: no generator and no context object per call (a decode step enters it twice)."""
        return self._lock

    def _free_orphans(self) -> None:
        while self._orphans:
            seq_id = self._orphans.popleft()
            if seq_id in self._seqs:
                self._free_now(seq_id)

    def _seq(self, seq_id):
        if seq_id not in self._seqs:
            raise UnknownSequence(f"unknown sequence {seq_id!r}")
        return self._seqs[seq_id]

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _lookup(self, hashes: list) -> list:
        """Blocks of the longest registered prefix of `hashes`."""
        hits = []
        for h in hashes:
            b = self._hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _take_block(self, b: int | None = None) -> int:
        """Block b (unreferenced), or else a free one, else the least recently cached one, with
        ref 1 for the caller."""
        if b is None:
            b = next(iter(self._free)) if self._free else next(iter(self._lru))
        if b in self._free:
            del self._free[b]
        else:
            del self._lru[b]
            del self._hash_to_block[self._hash[b]]
            self._hash[b] = None
            self._counters.evictions += 1
        self._ref[b] = 1
        return b

    def _take_run(self, need: int, after: int | None, room: int = 0) -> list:
        """`need` blocks for the end of a table whose last block is `after` (None: a new table),
        consecutive where possible, preferably followed by `room` unreferenced blocks to grow into
        (module docstring). The caller has checked that `need` blocks exist."""
        if need == 0:
            return []
        unused = np.asarray(self._ref) == 0
        sizes = (need + room, need) if room else (need,)
        start = None
        for n in sizes:
            if after is not None and after + n < self.num_blocks and unused[after + 1: after + 1 + n].all():
                start = after + 1
                break
        if start is None:
            # Eviction cost of a block: 0 if free, else 1 + its LRU rank (0 = least recently cached).
            cost = np.zeros(self.num_blocks, np.int64)
            cost[list(self._lru)] = 1 + np.arange(len(self._lru))
            for n in sizes:
                start = _cheapest_run(unused, cost, n)
                if start is not None:
                    break
        if start is None:
            return [self._take_block() for _ in range(need)]
        return [self._take_block(b) for b in range(start, start + need)]

    def _slots(self, table: list, start: int, count: int) -> np.ndarray:
        if count == 1:          # a decode step: no conversion of the whole table
            return np.array([table[start // self.block_size] * self.block_size + start % self.block_size], np.int64)
        pos = np.arange(start, start + count)
        return np.asarray(table, dtype=np.int64)[pos // self.block_size] * self.block_size \
            + pos % self.block_size

    def _wait_or_raise(self, seq_id, need: int, total: int, op: str, deadline: float,
                       holds: Hashable | None = None) -> None:
        """Wait for a free() if this manager waits and the request could ever fit; else raise.
        `holds`: the sequence the waiting caller keeps while it waits (append, fork). When every
        sequence in the pool is held by a waiter, no free() can come: the caller raises at once, and
        its error path frees what it holds, which wakes the others (no deadlock, even at wait_s=inf)."""
        remaining = deadline - time.monotonic()
        stuck = holds is not None and all(s == holds or s in self._waiting for s in self._seqs)
        if total <= self.num_blocks and remaining > 0 and not stuck:
            if holds is not None:
                self._waiting[holds] = self._waiting.get(holds, 0) + 1
            try:
                self._cond.wait(None if math.isinf(remaining) else remaining)
            finally:
                if holds is not None:
                    self._waiting[holds] -= 1
                    if not self._waiting[holds]:
                        del self._waiting[holds]
            return
        raise KVCacheFull(
            f"KV cache full: {op} for sequence {seq_id!r} needs {need} more blocks of "
            f"{self.block_size} tokens, {len(self._free) + len(self._lru)} are free or evictable "
            f"of {self.num_blocks} in the pool ({len(self._seqs)} sequences hold the rest)"
            + (f" and even an empty pool is too small ({total} blocks)" if total > self.num_blocks
               else " while every sequence holding blocks waits for more (none can finish)" if stuck
               else f" after waiting {self.wait_s} s" if self.wait_s > 0 else "")
            + "; raise the KV budget (a larger target or byte count) or free finished sequences")


class _Locked:
    """BlockManager._locked: its Condition (an RLock) with this thread's nesting depth; the outermost
    entry first frees the sequences release_later queued (their owners were garbage-collected)."""
    __slots__ = ("_bm", "_cond", "_local")

    def __init__(self, bm: BlockManager):
        self._bm, self._cond, self._local = bm, bm._cond, bm._local

    def __enter__(self):
        self._cond.acquire()
        local = self._local
        depth = local.depth = getattr(local, "depth", 0) + 1
        if depth == 1 and self._bm._orphans:
            try:
                self._bm._free_orphans()
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self._local.depth -= 1
        self._cond.release()


def _cheapest_run(unused: np.ndarray, cost: np.ndarray, n: int) -> int | None:
    """Start of the run of n unused blocks that evicts the fewest cached blocks, the least recently
    cached ones among equals (cost: 0 free, 1 + LRU rank cached); None if no run is long enough."""
    if n > len(unused):
        return None
    windows = lambda x: (lambda c: c[n:] - c[:-n])(np.concatenate([[0], np.cumsum(x)]))
    ok = windows(unused) == n
    if not ok.any():
        return None
    # Lexicographic (evictions, rank sum): the rank sum of one window is below len(unused)**2.
    score = windows(cost > 0) * len(unused) ** 2 + windows(cost)
    return int(np.argmin(np.where(ok, score, np.iinfo(np.int64).max)))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _checked_keys(keys: Sequence[int]) -> list:
    """Keys are token ids or 63-bit image keys; they must be ints that fit int64 for hashing."""
    out = list(keys)
    for k in out:
        if not isinstance(k, (int, np.integer)) or not -2**63 <= k < 2**63:
            raise KVSequenceError(f"KV block keys must be int64 integers, got {k!r}")
    return [int(k) for k in out]
