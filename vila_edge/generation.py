"""One request's decode state, stepped by the scheduler: ids in, ids out, text beside.

A Generation holds everything that is per sequence besides its KV: its Sampler (temperature,
top-k/p, seed, grammar), the ids it has seen (repetition penalty), its stop ids, the text streamer
(stop strings, UTF-8 hold-back) and its timings. The scheduler's thread calls `accept` with each
row of logits; the request's own thread reads the events it produces from `events`.
"""
import queue
import time
from dataclasses import dataclass

import numpy as np

from vila_edge.runner import Tokens
from vila_edge.sampling import Sampler, SeenIds
from vila_edge.streamer import TextStreamer


@dataclass
class Request:
    """What a caller hands the scheduler: a new sequence's positions and its generation."""
    seq_id: object
    tokens: Tokens           # the whole prompt (the scheduler skips the cached prefix)
    keys: np.ndarray         # int64 [T]: one block key per position (docs/contracts.md)
    budget: int              # sampled tokens at most (>= 1)
    gen: "Generation"
    # Filled by the scheduler; read by the caller once the events say so.
    cached: int = 0          # prompt positions whose KV came from the prefix cache
    cancelled: bool = False  # set by the caller (Scheduler.cancel): free at the next step
    outcome: str = ""        # "done" (the caller owns the sequence now), "error", "cancelled"


class Generation:
    """Sampling, stop conditions and text of one sequence; events go to the caller's queue:
    ("text", piece)..., then ("done", None) or ("error", exception)."""

    def __init__(self, sampler: Sampler, stop_ids, streamer: TextStreamer, seen: SeenIds):
        self.sampler, self.stops, self.text, self.seen = sampler, set(stop_ids), streamer, seen
        self.events = queue.SimpleQueue()
        self.ids = []                      # generated ids, a final stop token excluded
        self.times = []                    # perf_counter of each sampled token
        self.reason = "length"

    def accept(self, logits: np.ndarray, budget: int) -> bool:
        """Sample the next id from this sequence's logits [V']; emit its text. Returns whether the
        sequence needs another decode step (the id is then `self.ids[-1]`)."""
        nxt = self.sampler(logits, self.seen)
        self.times.append(time.perf_counter())
        if nxt in self.stops:
            self.reason = "stop"
            return self._finish()
        self.ids.append(nxt)
        self.seen.add(nxt)
        piece = self.text.push(nxt)
        if piece:
            self.events.put(("text", piece))
        if self.text.stopped:
            self.reason = "stop"
            return self._finish()
        if len(self.times) >= budget:
            return self._finish()
        return True

    def _finish(self) -> bool:
        rest = self.text.finish()
        if rest:
            self.events.put(("text", rest))
        return False

    def stats(self) -> dict:
        """Decode speed: tokens sampled after the first (a final stop token included, since
        computing it took a decode step) per second between the first and the last; None when no
        decode step ran (max_new_tokens=1)."""
        n = len(self.times)
        span = self.times[-1] - self.times[0] if n > 1 else 0.0
        return {"finish_reason": self.reason, "new_tokens": len(self.ids),
                "decode_tok_s": (n - 1) / span if span > 0 else None}
