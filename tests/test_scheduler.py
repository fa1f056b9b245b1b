"""The scheduler batches concurrent requests' decode steps: every request gets exactly the answer it
gets alone, and the KV pool stays consistent after every engine step, whatever fails or is cancelled.

Expectations are independent of the scheduler's batching: each request is first run alone, one
after another, on its own Pipeline; the BlockManager invariants are test_kv_cache's re-statement.
"""
import threading

import numpy as np
import pytest

from test_kv_cache import check_invariants
from vila_edge import KVCacheFull, KVConfig, Pipeline, scheduler
from vila_edge.errors import EngineError

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4      # the fixture: layers x (K, V) x BS x Hkv x D x fp32
FIXTURE = "vila1.5-3b-downsample"


class Recorder:
    """Wraps the runner's forward_batch and decode (a lone sequence's step): checks the pool's
    invariants before every engine step, records each batch's size, can hold the first step until
    every request is queued (so they batch deterministically) and can make chosen sequences fail."""

    def __init__(self, pipe, max_batch: int, hold: threading.Event | None = None, fail=None):
        self.pipe, self.sizes, self.hold, self.fail = pipe, [], hold, fail
        runner = pipe.llm.runner
        self.inner, self.inner_decode = runner.forward_batch, runner.decode
        runner.max_batch = max_batch              # the default forward_batch loops: any size is exact
        runner.forward_batch, runner.decode = self, self.decode
        self._depth = 0                           # decode may run through forward_batch: one step, once

    def __call__(self, steps):
        return self._step(steps, lambda: self.inner(steps))

    def decode(self, token, start, table, slot):
        return self._step([scheduler._step(token, start, table, slot)],
                          lambda: self.inner_decode(token, start, table, slot))

    def _step(self, steps, run):
        if self._depth:
            return run()
        if self.hold is not None:
            assert self.hold.wait(60)
        bm = self.pipe.llm.blocks
        with bm._locked():
            check_invariants(bm)
        self.sizes.append(len(steps))
        if self.fail is not None and any(self.fail(s) for s in steps):
            raise EngineError("injected failure")
        self._depth += 1
        try:
            return run()
        finally:
            self._depth -= 1


def _images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (30 + 20 * i, 50, 3), dtype=np.uint8) for i in range(3)]


def _requests():
    """(images, prompt, options, second turn or None): mixed prompt lengths, with and without
    images, different sampling per request, one two-turn conversation (prefix reuse)."""
    a, b, c = _images()
    return [
        (a, "What is here?", dict(max_new_tokens=12), None),
        (None, "Tell me a long story about a robot that sorts parts on a conveyor " * 2,
         dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=3), None),
        ([b, c], "<image>\n<image>\nWhich one is brighter?", dict(max_new_tokens=9, top_p=0.9, temperature=1.0,
                                                                   seed=11, repetition_penalty=1.3), None),
        (a, "Describe it.", dict(max_new_tokens=8), ("And the colors?", dict(max_new_tokens=6))),
        (None, "Pick one.", dict(choices=["red", "green", "blue"], max_new_tokens=8), None),
    ]


def _run(pipe, images, prompt, opts, second):
    conv = pipe.conversation()
    try:
        out = [conv.send(images, prompt, **opts)]
        if second is not None:
            out.append(conv.send(None, second[0], **second[1]))
            out.append(conv.last_stats["cached_tokens"])
        return out
    finally:
        conv.close()


def _prompt_tokens(pipe, prompt: str) -> int:
    conv = pipe.conversation()
    conv.send(None, prompt, max_new_tokens=1)
    conv.close()
    return conv.last_stats["prompt_tokens"]


def _concurrently(fn, n: int) -> list:
    results = [None] * n

    def work(i):
        try:
            results[i] = fn(i)
        except Exception as e:          # compared by the test
            results[i] = e
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _join(threads):
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung"


def test_batched_requests_equal_each_alone(engine, monkeypatch):
    # Prompts prefill in chunks of 16 (alone too: the same chunks), so the long ones interleave
    # their chunks with the decode steps of the others.
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 16)
    eng = engine(FIXTURE)
    reqs = _requests()
    alone = Pipeline(eng)
    expected = [_run(alone, *r) for r in reqs]
    assert expected[3][2] > 0                              # the second turn reused the first's blocks
    shared = Pipeline(eng)
    hold = threading.Event()
    rec = Recorder(shared, max_batch=3, hold=hold)
    threads, results = _concurrently(lambda i: _run(shared, *reqs[i]), len(reqs))
    while shared.scheduler.stats()["waiting"] + shared.scheduler.stats()["prefilling"] < len(reqs):
        threading.Event().wait(0.01)                       # every request queued before the first step
    hold.set()
    _join(threads)
    assert results == expected
    c = shared.scheduler.counters
    assert max(rec.sizes) == 3 and c["decode_rows"] > c["decode_steps"] and c["prefill_steps"] > 2 * len(reqs)
    assert shared.llm.blocks.stats().used == 0


def test_cancelled_stream_frees_its_blocks_and_others_go_on(engine):
    eng = engine(FIXTURE)
    img = _images()[0]
    expected = Pipeline(eng).chat(img, "What is here?", max_new_tokens=14)
    pipe = Pipeline(eng)
    Recorder(pipe, max_batch=4)
    started = threading.Event()

    def quitter(_):
        stream = pipe.stream(None, "Say something long and winding " * 3, max_new_tokens=200)
        next(stream)
        started.set()
        stream.close()                                     # the client went away

    def steady(_):
        started.wait(60)
        return pipe.chat(img, "What is here?", max_new_tokens=14)

    threads, results = _concurrently(lambda i: (quitter, steady)[i](i), 2)
    _join(threads)
    assert results == [None, expected]
    assert pipe.llm.blocks.stats().used == 0              # the quitter's blocks went at a later step


def test_kv_exhaustion_under_concurrency(engine):
    """A pool of 12 blocks (one 192-token context): of four long requests at once, those that do not
    fit fail with KVCacheFull (admission or a decode step); those that run give their solo text."""
    eng = engine(FIXTURE)
    kv = KVConfig(block_size=16, budget=12 * BLOCK_BYTES)
    prompts = [f"Question {i}: describe the whole scene in great detail, please. " * 2 for i in range(4)]
    solo = Pipeline(eng, max_context=192, kv=kv)
    expected = [solo.chat(None, p, max_new_tokens=60) for p in prompts]
    pipe = Pipeline(eng, max_context=192, kv=kv)
    Recorder(pipe, max_batch=4)
    threads, results = _concurrently(lambda i: pipe.chat(None, prompts[i], max_new_tokens=60), 4)
    _join(threads)
    ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert all(isinstance(results[i], KVCacheFull) for i in set(range(4)) - set(ok))
    assert ok and len(ok) < 4 and all(results[i] == expected[i] for i in ok)
    assert pipe.llm.blocks.stats().used == 0


def test_a_request_waits_for_blocks_then_runs(engine):
    """wait_s: the second request waits while the first holds the pool, then gets its solo answer."""
    eng = engine(FIXTURE)
    kv = KVConfig(block_size=16, budget=8 * BLOCK_BYTES, wait_s=60.0)
    prompts = ["First: what is on the table? " * 3, "Second: where is the robot going? " * 3]
    expected = [Pipeline(eng, max_context=128, kv=kv).chat(None, p, max_new_tokens=40) for p in prompts]
    pipe = Pipeline(eng, max_context=128, kv=kv)
    Recorder(pipe, max_batch=2)
    threads, results = _concurrently(lambda i: pipe.chat(None, prompts[i], max_new_tokens=40), 2)
    _join(threads)
    assert results == expected
    assert pipe.llm.blocks.stats().used == 0


def test_an_error_in_one_request_leaves_the_others_alone(engine):
    """The victim's steps raise inside a batched forward pass: the batch is rerun one by one, the
    victim alone fails, the others' answers are their solo ones."""
    eng = engine(FIXTURE)
    victim = "A much longer question that nobody else asks, repeated to be long. " * 4
    others = ["Short one?", "Another short question here?"]
    alone = Pipeline(eng)
    expected = [alone.chat(None, p, max_new_tokens=12) for p in others]
    n_victim = _prompt_tokens(alone, victim)
    assert all(_prompt_tokens(alone, p) + 12 < n_victim for p in others)   # only the victim gets this far
    pipe = Pipeline(eng)
    Recorder(pipe, max_batch=3, fail=lambda s: s.start >= n_victim + 2)   # its 3rd decode step
    prompts = others + [victim]
    threads, results = _concurrently(lambda i: pipe.chat(None, prompts[i], max_new_tokens=12), 3)
    _join(threads)
    assert results[:2] == expected
    assert isinstance(results[2], EngineError) and "injected" in str(results[2])
    assert pipe.llm.blocks.stats().used == 0


def test_sampler_error_fails_only_its_request(engine):
    """NaN logits for one sequence (its Sampler raises): the other request in the batch completes."""
    eng = engine(FIXTURE)
    prompts = ["Short one?", "A much longer question, repeated so it is long enough to tell apart. " * 3]
    alone = Pipeline(eng)
    expected = alone.chat(None, prompts[0], max_new_tokens=10)
    n_long = _prompt_tokens(alone, prompts[1])
    assert _prompt_tokens(alone, prompts[0]) + 10 < n_long
    pipe = Pipeline(eng)
    rec = Recorder(pipe, max_batch=2)
    inner = rec.inner

    def nan_for_long(steps):
        out = inner(steps)
        for i, s in enumerate(steps):
            if s.start >= n_long:                         # the long request's decode steps
                out[i] = np.nan
        return out
    rec.inner = nan_for_long
    threads, results = _concurrently(lambda i: pipe.chat(None, prompts[i], max_new_tokens=10), 2)
    _join(threads)
    assert results[0] == expected
    assert isinstance(results[1], EngineError) and "NaN" in str(results[1])
    assert pipe.llm.blocks.stats().used == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bug_in_the_engine_thread_fails_requests_instead_of_hanging(engine):
    """An unexpected error in the scheduler itself reaches every caller; the next request starts a
    fresh engine thread and runs normally."""
    eng = engine(FIXTURE)
    expected = Pipeline(eng).chat(None, "Short one?", max_new_tokens=6)
    pipe = Pipeline(eng)
    real_admit, broken = pipe.scheduler._admit, []

    def admit_once_broken():
        if not broken:
            broken.append(True)
            real_admit()
            raise RuntimeError("scheduler bug")
        real_admit()
    pipe.scheduler._admit = admit_once_broken
    threads, results = _concurrently(lambda i: pipe.chat(None, "Short one?", max_new_tokens=6), 1)
    _join(threads)
    assert isinstance(results[0], RuntimeError) and pipe.llm.blocks.stats().used == 0
    assert pipe.chat(None, "Short one?", max_new_tokens=6) == expected
    assert pipe.llm.blocks.stats().used == 0
