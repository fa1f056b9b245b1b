"""Continuous batching: every request's LLM work runs on one engine thread, decode steps batched.

nano-vllm's engine/scheduler.py is the model. Requests come from any thread (Pipeline.chat, stream,
conversations, the HTTP server's workers) and queue here. Each engine step is ONE call to
`runner.forward_batch`: either the next prefill chunk of one request, or the decode step of every
running sequence (in groups of `runner.max_batch`; a lone sequence's through `runner.decode`).
Prefill chunks and decode steps alternate while
both are pending, so a long prompt never stalls the streams already running, and a new request
joins the decode batch as soon as its prompt is in. Mixed prefill + decode batches are not built:
with a runner that loops over sequences they cost the same, and the batched graph decides later.

Admission (FIFO) reserves a request's prompt blocks (BlockManager.allocate, prefix reuse kept);
one that does not fit waits up to KVConfig.wait_s for blocks, then fails with KVCacheFull. A decode
step that finds no block for its token waits the same way, and fails at once when every running
sequence is stuck (none could free). A cancelled request (a stream closed, a client gone) is
dropped, its blocks freed, at the next step. An error in one sequence (its sampler, its grammar, its
forward pass) fails that request alone. The engine thread exits when idle and starts on the next
submit: a Pipeline leaves no thread behind.
"""
import threading
import time
from collections import deque

import numpy as np

from vila_edge.errors import KVCacheFull, UnknownSequence
from vila_edge.generation import Request
from vila_edge.llm import PREFILL_CHUNK
from vila_edge.runner import Step, Tokens

POLL_S = 0.005   # how often a request waiting for KV blocks that other threads hold looks again


class Scheduler:
    def __init__(self, llm):
        self.llm, self.runner, self.blocks = llm, llm.runner, llm.blocks
        self._cond = threading.Condition()
        self._incoming = deque()        # submitted, not yet seen by the engine thread
        self._thread = None
        self._waiting = deque()         # [request, deadline]: not admitted yet (engine thread only)
        self._prefilling = deque()      # [request, next position, table, slots]
        self._running = []              # requests with a token to decode
        self._stalled = {}              # seq id -> when its decode first found no block
        self._last_prefill = False
        self.counters = {"prefill_steps": 0, "decode_steps": 0, "decode_rows": 0}

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue a request; its events arrive on req.gen.events."""
        with self._cond:
            self._incoming.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vila-edge-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> bool:
        """Stop a request; the engine frees its blocks at its next step. Never waits (a stream the
        garbage collector closes may call this anywhere, even inside a BlockManager call). Returns
        True when the request had already finished: its sequence is then the caller's to keep or free."""
        with self._cond:    # against _end: a request is either handed over or freed, never neither
            req.cancelled = True
            self._cond.notify()
            return req.outcome == "done"

    def stats(self) -> dict:
        return {"waiting": len(self._incoming) + len(self._waiting), "prefilling": len(self._prefilling),
                "running": len(self._running), **self.counters}

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._take_incoming():
                self._drop_cancelled()
                self._admit()
                if self._prefilling and (not self._running or not self._last_prefill):
                    self._prefill_chunk()
                elif not (self._running and self._decode()):
                    with self._cond:   # every request waits for blocks: other threads or wait_s free them
                        if not self._incoming:
                            self._cond.wait(POLL_S)
        except BaseException as e:     # a bug here must not leave callers waiting for ever
            with self._cond:
                self._thread = None
                self._take_incoming()
            for req in [e_[0] for e_ in self._waiting] + [e_[0] for e_ in self._prefilling] + self._running:
                self._end(req, "error", e, free=req.seq_id in self.blocks.sequences())
            self._waiting.clear()
            self._prefilling.clear()
            self._running.clear()
            raise

    def _take_incoming(self) -> bool:
        """Move submitted requests to the waiting queue; False (and the thread ends) when idle."""
        with self._cond:
            while self._incoming:
                req = self._incoming.popleft()
                self._waiting.append([req, time.monotonic() + self.blocks.wait_s])
            if not (self._waiting or self._prefilling or self._running):
                self._thread = None
                return False
            return True

    def _drop_cancelled(self) -> None:
        for queue_ in (self._waiting, self._prefilling):
            for entry in [e for e in queue_ if e[0].cancelled]:
                queue_.remove(entry)
                self._end(entry[0], "cancelled", free=queue_ is self._prefilling)
        for req in [r for r in self._running if r.cancelled]:
            self._running.remove(req)
            self._end(req, "cancelled", free=True)

    def _admit(self) -> None:
        """Reserve the prompt blocks of waiting requests, oldest first, while they fit."""
        while self._waiting:
            req, deadline = self._waiting[0]
            try:
                alloc = self.blocks.allocate(req.seq_id, req.keys.tolist(), req.budget, wait_s=0)
            except KVCacheFull as e:
                if time.monotonic() < deadline and -(-len(req.keys) // self.blocks.block_size) <= self.blocks.num_blocks:
                    return
                self._waiting.popleft()
                self._end(req, "error", e)
                continue
            except Exception as e:
                self._waiting.popleft()
                self._end(req, "error", e)
                continue
            self._waiting.popleft()
            req.cached = alloc.num_cached_tokens
            self._prefilling.append([req, alloc.num_cached_tokens, alloc.block_table, alloc.slots])

    def _prefill_chunk(self) -> None:
        entry = self._prefilling[0]
        req, lo, table, slots = entry
        hi = min(lo + PREFILL_CHUNK, len(req.tokens))
        step = Step(req.tokens.slice(lo, hi), lo, table, slots[lo - req.cached: hi - req.cached])
        self._last_prefill = True
        self.counters["prefill_steps"] += 1
        try:
            out = self.runner.forward_batch([step])[0]
        except Exception as e:
            out = e
        if isinstance(out, BaseException):
            self._prefilling.popleft()
            return self._end(req, "error", out, free=True)
        self.blocks.commit(req.seq_id, hi)
        entry[1] = hi
        if hi == len(req.tokens):
            self._prefilling.popleft()
            req.gen.events.put(("admitted", req.cached))
            if self._sample(req, out):
                self._running.append(req)

    def _decode(self) -> bool:
        """One decode step of every running sequence that has a block for its token; False when
        none had one."""
        self._last_prefill = False
        steps, reqs, stalled = [], [], []
        for req in list(self._running):
            tok = req.gen.ids[-1]
            try:
                start, table, slot = self.blocks.append_token(req.seq_id, tok, wait_s=0)
            except KVCacheFull as e:
                stalled.append((req, e))
                continue
            if self._stalled:
                self._stalled.pop(req.seq_id, None)
            steps.append((tok, start, table, slot))
            reqs.append(req)
        if stalled:
            self._stall(stalled, stuck=not steps and not self._prefilling
                        and self.blocks.sequences() <= {r.seq_id for r in self._running})
        group = max(1, self.runner.max_batch)
        for lo in range(0, len(steps), group):
            self.counters["decode_steps"] += 1
            self.counters["decode_rows"] += len(steps[lo:lo + group])
            for req, out in zip(reqs[lo:lo + group], self._forward(steps[lo:lo + group])):
                self._running.remove(req)
                if isinstance(out, BaseException):
                    self._end(req, "error", out, free=True)
                    continue
                self.blocks.commit(req.seq_id)
                if self._sample(req, out):
                    self._running.append(req)
        return bool(steps)

    def _stall(self, stalled: list, stuck: bool) -> None:
        """[(request, KVCacheFull)] without a block for their next token wait up to wait_s for one.
        `stuck`: no sequence ran and only ours hold blocks, so none would ever come: the most
        recently admitted one fails now (its blocks let the others go on)."""
        now = time.monotonic()
        for i, (req, error) in enumerate(stalled):
            since = self._stalled.setdefault(req.seq_id, now)
            if now - since >= self.blocks.wait_s or (stuck and i == len(stalled) - 1):
                self._stalled.pop(req.seq_id, None)
                self._running.remove(req)
                self._end(req, "error", error, free=True)

    def _forward(self, steps: list) -> list:
        """Each decode step's (token, start, table, slot) logits row, or the exception its sequence
        alone raised: a batch that fails is run again one sequence at a time (rewriting the same
        slots), so an error stays with the request that caused it. A lone sequence takes the
        runner's decode (no batch arrays)."""
        if len(steps) == 1:
            try:
                return [self.runner.decode(*steps[0])]
            except Exception as e:
                return [e]
        try:
            return list(self.runner.forward_batch([_step(*s) for s in steps]))
        except Exception:
            pass
        out = []
        for s in steps:
            try:
                out.append(self.runner.decode(*s))
            except Exception as e:
                out.append(e)
        return out

    def _sample(self, req: Request, logits) -> bool:
        """The request's next token from its logits; True while it needs more decode steps."""
        try:
            more = req.gen.accept(logits, req.budget)
        except Exception as e:
            self._end(req, "error", e, free=True)
            return False
        if not more:
            self._end(req, "done")
        return more

    def _end(self, req: Request, outcome: str, error: BaseException | None = None, free: bool = False) -> None:
        """Hand the request back: "done" gives its sequence to the caller (a conversation keeps
        it), "error" and "cancelled" free it."""
        self._stalled.pop(req.seq_id, None)
        with self._cond:
            if outcome == "done" and req.cancelled:     # nobody would take the sequence
                outcome, free = "cancelled", True
            req.outcome = outcome
        if free:
            try:
                self.blocks.free(req.seq_id)
            except UnknownSequence:
                pass
        req.gen.events.put(("error", error) if outcome == "error" else (outcome, None))


def _step(token: int, start: int, table: list, slot: int) -> Step:
    """A decode step's part of a batched forward pass."""
    return Step(Tokens(np.array([token], np.int64)), start, table, np.array([slot], np.int64))
