"""ONNX Runtime runner of the paged, batched LLM graph (build.graph "fused", target cpu).

The graph (vila_edge_export/onnx_llm_fused.py) takes B sequences' new positions flattened into T rows
and vLLM's paged-attention metadata; its PagedAttention nodes (vila_edge/ops) write each layer's new
K/V rows into the pool IN PLACE and attend over the pool blocks the block tables name. So the pool
is bound once, per thread, as OrtValues over the numpy pool (no copy: ORT's CPU provider reads and
writes the caller's memory), and a step binds only its small inputs: no past views, no staging
buffer, no scatter after the run. A decode step of one sequence (the common case) binds nothing: it
writes its values into per-thread buffers bound once (_Decode; two logits buffers [1, V'] float32,
~200 KB each at a 49k vocabulary, handed to the caller without a copy, outside the ledger like the
general path's per-call outputs), which takes ~0.2 ms of Python and binding off each step
(benchmarks/profile_decode.py). `decode` is that step without forward's argument objects (Tokens,
Step): ~160 us a step less than copying the logits and building them (benchmarks/results/kvstep).
"""
import contextlib
import os
import sys
import threading

import numpy as np

from vila_edge import engine_check, ops
from vila_edge.backend import OrtSession
from vila_edge.kv_cache import KVPool
from vila_edge.manifest import REBUILD
from vila_edge.ort_runner import OrtLLMRunner, _accuracy_level, kv_layout
from vila_edge.runner import Buffer, LLMRunner, RunnerOptions, Step

# Sequences per pass: the graph takes any B; this bounds what one forward_batch call may ask.
MAX_BATCH = 64


def paged_llm_buffers(manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions) -> list:
    """Only the pool: the graph reads and writes it in place (the ledger, vila_edge/memory.py)."""
    return [Buffer("kv pool", kv_layout(manifest, block_size).bytes_per_block * num_blocks)]


class OrtPagedLLMRunner(LLMRunner):
    max_batch = MAX_BATCH
    # The same as the numpy-pool runner's: tables, another runner over one session, pool block copies.
    _tables, share, copy_block = OrtLLMRunner._tables, OrtLLMRunner.share, OrtLLMRunner.copy_block
    embed = OrtLLMRunner.embed      # table rows for ids, span rows at their offsets: the same checks

    def __init__(self, engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int,
                 opts: RunnerOptions, session: OrtSession | None = None):
        m = manifest
        path = os.path.join(engine_dir, m.files["llm"])
        self.session = session or OrtSession(path, opts.threads, int4_accuracy_level=_accuracy_level(engine_dir, m, opts),
                                             ops_library=ops.library_path())
        if session is None:
            engine_check.check_paged_llm(self.session.session, m, path, REBUILD.format(out=engine_dir))
        self._tables(engine_dir, m, opts, num_blocks, block_size, max_context)
        self.pool = KVPool(self.layout, num_blocks)
        self._max_blocks, self._block_size = -(-max_context // block_size), block_size
        self._outputs = ["logits"] + (["hidden"] if "hidden" in self.session.output_names else [])
        self._local = threading.local()      # per thread: its IOBinding and last hidden state
        # VILA-U graphs take `logits_rows` (B: logits of every row, 0: hidden state only; hidden_only())
        self._head_switch = "logits_rows" in {i.name for i in self.session.session.get_inputs()}
        rows = next((o.shape[-1] for o in self.session.session.get_outputs() if o.name == "logits"), None)
        # One sequence, one position, logits only: the decode step's buffers, bound once (_Decode).
        self._decode_rows = rows if isinstance(rows, int) and self._outputs == ["logits"] and not self._head_switch else None

    @property
    def last_hidden(self):
        """Final-norm hidden state of this thread's last pass: [C] after forward, [B, C] after
        forward_batch (None: the graph has none)."""
        return getattr(self._local, "hidden", None)

    def buffers(self) -> list:
        return paged_llm_buffers(self.manifest, self.num_blocks, self.layout.block_size, self.max_context, self.opts)

    def _binding(self):
        """This thread's IOBinding, the pool's layers bound once (an IOBinding is not thread-safe)."""
        io = getattr(self._local, "io", None)
        if io is None:
            io = self._local.io = self._pool_binding()
        return io

    def _pool_binding(self):
        """A new IOBinding with every layer's pool blocks bound as OrtValues over the numpy pool."""
        import onnxruntime as ort
        io = self.session.session.io_binding()
        for layer in range(self.layout.num_layers):
            for name, blocks in zip(("key_cache", "value_cache"), self.pool.layer(layer)):
                io.bind_ortvalue_input(f"{name}_{layer}", ort.OrtValue.ortvalue_from_numpy(blocks))
        return io

    @contextlib.contextmanager
    def hidden_only(self):
        """VILA-U image steps on this thread: the graph skips its lm_head (`logits_rows` 0) and
        forward_batch returns logits [0, V']; graphs without that input run as usual."""
        self._local.skip_head = True
        try:
            yield self
        finally:
            self._local.skip_head = False

    def forward(self, tokens, start: int, table: list, slots: np.ndarray) -> np.ndarray:
        logits = self.forward_batch([Step(tokens, start, table, slots)])
        if self.last_hidden is not None:
            self._local.hidden = self._local.hidden[0]
        return logits.reshape(-1)

    def decode(self, token: int, start: int, table: list, slot: int) -> np.ndarray:
        """_decode_step without the objects forward builds (Tokens, Step, arrays, the [V'] view): a
        text id's float row straight into the bound input. Anything else (the thread's first step, a
        quantized table, an id out of range, a position past the bound table) goes through forward,
        which builds the buffers or reports the error."""
        d, table_rows = getattr(self._local, "decode", None), self.embeddings.table
        need = start // self._block_size + 1
        if d is None or not self._decode_rows or table_rows is None or not 0 <= token < self.vocab_rows \
                or not need <= self._max_blocks or len(table) < need:
            return super().decode(token, start, table, slot)
        d.embeds[0] = table_rows[token]
        d.set_table(table, need)
        d.position[0], d.seq_len[0], d.slot[0] = start, start + 1, slot
        o = d.out()
        self.session.run_with_iobinding(o.io)
        return o.flat

    def forward_batch(self, steps: list) -> np.ndarray:
        if not 1 <= len(steps) <= self.max_batch:
            raise ValueError(f"forward_batch takes 1..{self.max_batch} steps, got {len(steps)}")
        s = steps[0]
        if (self._decode_rows and len(steps) == 1 and len(s.tokens) == 1 and len(s.slots) == 1
                and s.start < self._max_blocks * self.layout.block_size):
            return self._decode_step(s)
        return self._batch(steps)

    def _batch(self, steps: list) -> np.ndarray:
        lens = np.array([len(s.tokens) for s in steps], np.int32)
        starts = np.array([s.start for s in steps], np.int32)
        qsl = np.zeros(len(steps) + 1, np.int32)
        np.cumsum(lens, out=qsl[1:])
        if len(steps) == 1:
            s = steps[0]
            embeds, slots = self.embed(s.tokens), np.asarray(s.slots, np.int32)
            positions = np.arange(s.start, s.start + lens[0], dtype=np.int64)
        else:
            embeds = np.concatenate([self.embed(s.tokens) for s in steps])
            slots = np.concatenate([np.asarray(s.slots, np.int32) for s in steps])
            positions = np.concatenate([np.arange(s.start, s.start + n, dtype=np.int64) for s, n in zip(steps, lens)])
        seq_lens = starts + lens
        need = -(-seq_lens // self.layout.block_size)                 # blocks each sequence reads
        tables = np.zeros((len(steps), int(need.max())), np.int32)
        for b, s in enumerate(steps):
            if len(s.table) < need[b]:
                raise ValueError(f"step {b}: {seq_lens[b]} positions need {need[b]} blocks, its table has {len(s.table)}")
            tables[b, : need[b]] = s.table[: need[b]]
        if len(slots) != len(embeds):
            raise ValueError(f"forward_batch: {len(embeds)} positions but {len(slots)} slots")
        feeds = {"inputs_embeds": embeds, "position_ids": positions, "block_tables": tables, "seq_lens": seq_lens,
                 "query_start_loc": qsl, "slot_mapping": slots, "logits_indices": (qsl[1:] - 1).astype(np.int64)}
        if self._head_switch:     # VILA-U graphs: logits for all B rows, or none (hidden_only)
            feeds["logits_rows"] = np.array([0 if getattr(self._local, "skip_head", False) else len(steps)], np.int64)
        io = self._binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name in self._outputs:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        out = io.copy_outputs_to_cpu()
        self._local.hidden = out[1] if len(out) > 1 else None
        return out[0]

    def _decode_step(self, s: Step) -> np.ndarray:
        """forward_batch of one sequence's one new position: its values written into this thread's
        bound buffers (no per-step OrtValues, no output allocation in ORT); logits [1, V'] handed over,
        not copied (_Decode)."""
        d = getattr(self._local, "decode", None)
        if d is None:
            d = self._local.decode = _Decode([self._pool_binding() for _ in range(2)], self._max_blocks,
                                             self.embeds_dtype, self.embeddings.width, self._decode_rows)
        need = s.start // self.layout.block_size + 1           # <= max_blocks (forward_batch checked)
        if len(s.table) < need:
            raise ValueError(f"step 0: {s.start + 1} positions need {need} blocks, its table has {len(s.table)}")
        if not self._embed_into(s.tokens, d.embeds):   # the general path's binding reports the shape error
            return self._batch([s])
        d.set_table(s.table, need)
        d.position[0], d.seq_len[0], d.slot[0] = s.start, s.start + 1, s.slots[0]
        o = d.out()
        self.session.run_with_iobinding(o.io)
        self._local.hidden = None
        return o.logits


    def _embed_into(self, tokens, out: np.ndarray) -> bool:
        """The one position's input row written into `out` [1, C]: a text id's table row straight from
        the (float) table, no gather array and no min/max pass (embed's range check, on one int here);
        anything else through embed. False: rows of another shape."""
        table = self.embeddings.table
        if not tokens.spans and table is not None:
            tok = int(tokens.ids[0])
            if 0 <= tok < self.vocab_rows:
                out[0] = table[tok]
                return True
        row = self.embed(tokens)          # feature rows, a quantized table, or the out-of-range error
        if row.shape != out.shape:
            return False
        out[...] = row
        return True


class _Decode:
    """One thread's IOBindings for decode steps of one sequence: the pool and [1]-row input buffers
    bound once as OrtValues over numpy memory (ORT's CPU provider reads them in place at run time),
    and the logits written into a buffer of ours. Block table entries past the sequence's length
    are never read (the op reads ceil(seq_len / BS) of them).

    A step returns its logits buffer itself, not a copy (a 49k-vocabulary copy read ~200 KB that the
    run had just written: 13-40 us a step once the weights have streamed through the caches). A
    caller may keep what it was given, so a buffer is written again only while nothing else
    references it (a held array or any numpy view of it adds to its reference count: views keep
    their base alive). Two bindings with a logits buffer each, the inputs shared, serve the two
    usual callers without rebinding: the scheduler drops each step's logits after sampling (one
    buffer, reused), a loop `logits = step(...)` holds the last while it asks for the next (the two
    alternate). A caller that holds both gets a new buffer bound (`_Out.renew`)."""

    def __init__(self, bindings: list, max_blocks: int, dtype, width: int, rows: int):
        import onnxruntime as ort
        self.embeds, self.position = np.zeros((1, width), dtype), np.zeros(1, np.int64)
        self.tables, self.seq_len = np.zeros((1, max_blocks), np.int32), np.zeros(1, np.int32)
        self.slot = np.zeros(1, np.int32)
        inputs = {"inputs_embeds": self.embeds, "position_ids": self.position, "block_tables": self.tables,
                  "seq_lens": self.seq_len, "query_start_loc": np.array([0, 1], np.int32),
                  "slot_mapping": self.slot, "logits_indices": np.zeros(1, np.int64)}
        self._values = [ort.OrtValue.ortvalue_from_numpy(v) for v in inputs.values()]   # alive while bound
        for io in bindings:                   # the pool already bound (OrtPagedLLMRunner._pool_binding)
            for name, value in zip(inputs, self._values):
                io.bind_ortvalue_input(name, value)
        self._outs = [_Out(io, rows, ort.OrtValue.ortvalue_from_numpy) for io in bindings]
        self._at = 0
        self._table = []                      # the block ids in self.tables[0] now (a prefix is read)

    def out(self) -> "_Out":
        """The binding to run next: the last one if its logits are free, else the other, else the
        last one with a new buffer."""
        o = self._outs[self._at]
        if o.held():
            self._at = (self._at + 1) % len(self._outs)
            o = self._outs[self._at]
            if o.held():
                o.renew()
        return o

    def set_table(self, table, need: int) -> None:
        """tables[0, :need] = table[:need], writing only what changed: a decode step of the same
        sequence adds a block every BS steps, so most steps write nothing (a list compare, not a
        list -> array conversion of the whole table)."""
        table = table[:need] if isinstance(table, list) else [int(b) for b in table[:need]]
        have = self._table
        n = len(have)
        if n <= need and table[:n] == have:
            if n < need:
                self.tables[0, n:need] = table[n:]
        else:
            self.tables[0, :need] = table
        self._table = table


class _Out:
    """One decode binding's output: logits [1, V'] bound as the graph's `logits`, and `flat`, its
    [V'] view (what forward returns), made once."""
    __slots__ = ("io", "logits", "flat", "_value", "_ortvalue", "_refs")

    def __init__(self, io, rows: int, ortvalue):
        self.io, self._ortvalue = io, ortvalue
        self.logits = np.empty((1, rows), np.float32)
        self.renew()
        # References while no caller holds them: logits' (ours, the OrtValue's, flat's base) and flat's
        # (ours), each + 1 for sys.getrefcount's argument.
        self._refs = (sys.getrefcount(self.logits), sys.getrefcount(self.flat))

    def held(self) -> bool:
        """Whether anything besides this binding references the buffer (a caller kept its logits)."""
        return (sys.getrefcount(self.logits), sys.getrefcount(self.flat)) != self._refs

    def renew(self) -> None:
        """Bind a new buffer: the old one belongs to the caller that holds it."""
        self.logits = np.empty_like(self.logits)
        self.flat = self.logits.reshape(-1)
        self._value = self._ortvalue(self.logits)    # alive while bound (it references self.logits)
        self.io.bind_ortvalue_output("logits", self._value)


def llm(engine_dir: str, manifest, num_blocks: int, block_size: int, max_context: int, opts: RunnerOptions):
    return OrtPagedLLMRunner(engine_dir, manifest, num_blocks, block_size, max_context, opts)
