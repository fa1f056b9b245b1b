"""VILA-U's conditional and unconditional rows: sequences in the paged KV cache that run as one batch.

Every forward pass goes through the runner seam's `forward_batch([Step, ...])` (vila_edge/runner.py),
one Step per row, and reads `runner.last_hidden` [rows, hidden] after it: a runner whose graph takes
several sequences per pass runs both rows in one pass; the default runner loops. The prompts'
blocks are allocated through the BlockManager, so the unconditional prompt -- the same for every
request -- is found in the prefix cache after the first request (`cached` reports it per row).
Image steps need no text logits: runners that offer `hidden_only()` skip their lm_head.
"""
import contextlib

import numpy as np

from vila_edge.llm import PREFILL_CHUNK
from vila_edge.runner import Step, Tokens


class Rows:
    """Prefilled rows of one image (or video); `hidden` [rows, hidden] after every pass. Released by close()."""

    def __init__(self, pipe, id_lists: list, grow: int):
        self.runner, self.blocks = pipe.llm.runner, pipe.llm.blocks
        self.seqs, self.cached = [], []
        try:
            allocs = []
            for ids in id_lists:
                sid = pipe.new_seq_id()
                allocs.append(self.blocks.allocate(sid, list(ids), grow))
                self.seqs.append(sid)
                self.cached.append(allocs[-1].num_cached_tokens)
            self.hidden = self._prefill([np.asarray(ids, np.int64) for ids in id_lists], allocs)
        except BaseException:
            self.close()
            raise

    def _head_off(self):
        skip = getattr(self.runner, "hidden_only", None)
        return skip() if skip else contextlib.nullcontext()

    def _prefill(self, ids: list, allocs: list) -> np.ndarray:
        """The uncached part of every row, PREFILL_CHUNK positions per row and pass."""
        hidden = [None] * len(ids)
        for lo in range(0, max(len(t) - a.num_cached_tokens for t, a in zip(ids, allocs)), PREFILL_CHUNK):
            steps, rows = [], []
            for j, (t, a) in enumerate(zip(ids, allocs)):
                start = a.num_cached_tokens + lo
                if start < len(t):
                    hi = min(start + PREFILL_CHUNK, len(t))
                    steps.append(Step(Tokens(t[start:hi]), start, a.block_table, a.slots[lo: lo + hi - start]))
                    rows.append((j, hi))
            out = self._run(steps)
            for k, (j, hi) in enumerate(rows):
                self.blocks.commit(self.seqs[j], hi)
                hidden[j] = out[k]
        return np.stack(hidden)

    def _run(self, steps: list) -> np.ndarray:
        with self._head_off():
            self.runner.forward_batch(steps)
        return np.array(self.runner.last_hidden, np.float32).reshape(len(steps), -1)

    def feed(self, row: np.ndarray, key: int) -> None:
        """One image position: the same input row (1, hidden) appended to every row, one pass."""
        steps = []
        for sid in self.seqs:
            start = self.blocks.num_tokens(sid)
            slots = self.blocks.append(sid, [key])
            steps.append(Step(Tokens.from_embeds(row), start, self.blocks.block_table(sid), slots))
        self.hidden = self._run(steps)
        for sid in self.seqs:
            self.blocks.commit(sid)

    def close(self) -> None:
        for sid in self.seqs:
            self.blocks.free(sid)
        self.seqs = []
