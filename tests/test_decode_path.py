"""The paged runner's decode fast path (one sequence, one position, buffers bound once per thread)
against its general path (forward_batch's per-step arrays and bindings) on the same engine."""
import numpy as np

from vila_edge import Pipeline
from vila_edge.runner import Tokens


def test_decode_steps_equal_the_general_path_and_own_their_logits(engine):
    eng = engine("vila1.5-3b-downsample", target="cpu")
    rng = np.random.default_rng(11)
    fast, general = Pipeline(eng), Pipeline(eng)
    general.llm.runner._decode_rows = None              # every step through forward_batch's general path
    assert fast.llm.runner._decode_rows                 # the float32 fused graph takes the fast path
    vocab = fast.manifest.llm.vocab_size
    prompt = rng.integers(0, vocab, 19)                 # steps cross a block boundary (block size 16)
    for pipe in (fast, general):
        pipe.llm.prefill("s", Tokens(prompt), prompt, grow=8)
    seen = []
    for tok in rng.integers(0, vocab, 6).tolist():
        a, b = fast.llm.step("s", tok), general.llm.step("s", tok)
        np.testing.assert_array_equal(a, b)             # the same graph on the same inputs: bit-equal
        seen.append((a, a.copy()))
    for logits, before in seen:                         # a later step does not overwrite earlier logits
        np.testing.assert_array_equal(logits, before)
    assert fast.llm.blocks.num_tokens("s") == general.llm.blocks.num_tokens("s") == 25
    assert getattr(fast.llm.runner._local, "decode", None) is not None       # the steps took the fast path
    assert getattr(general.llm.runner._local, "decode", None) is None


def test_fast_path_alternating_sequences_equals_the_general_path(engine):
    """One thread's decode buffers serve sequences in turn: the block table input is rewritten only where
    it changed (_Decode.set_table), the embedding row written in place. Two sequences of different
    lengths (one table shorter than the other's), stepped alternately, against the general path."""
    eng = engine("vila1.5-3b-downsample", target="cpu")
    rng = np.random.default_rng(12)
    fast, general = Pipeline(eng), Pipeline(eng)
    general.llm.runner._decode_rows = None
    vocab = fast.manifest.llm.vocab_size
    prompts = {"a": rng.integers(0, vocab, 40), "b": rng.integers(0, vocab, 7)}
    for pipe in (fast, general):
        for seq, prompt in prompts.items():
            pipe.llm.prefill(seq, Tokens(prompt), prompt, grow=4)
    assert fast.llm.blocks.block_table("a")[0] != fast.llm.blocks.block_table("b")[0]
    for tok in rng.integers(0, vocab, 12).tolist():
        for seq in ("a", "b", "b"):
            np.testing.assert_array_equal(fast.llm.step(seq, tok), general.llm.step(seq, tok))
    assert fast.llm.runner._local.decode._table == fast.llm.blocks.block_table("b")[:2]


def test_fast_path_quantized_table_and_bad_id(engine):
    """A group-quantized embedding table (no float rows to copy) goes through embed, bit-equal to the
    general path; an id outside the table is the general path's EngineError."""
    import pytest
    from vila_edge.errors import EngineError

    eng = engine("vila1.5-3b-downsample", quant="rtn", embed_bits=8, eval_tokens=16, max_ppl_increase_pct=None)
    fast, general = Pipeline(eng), Pipeline(eng)
    general.llm.runner._decode_rows = None
    assert fast.llm.runner.embeddings.table is None and fast.llm.runner._decode_rows
    prompt = np.arange(5, 25)
    for pipe in (fast, general):
        pipe.llm.prefill("s", Tokens(prompt), prompt)
    for tok in (3, 9, 1):
        np.testing.assert_array_equal(fast.llm.step("s", tok), general.llm.step("s", tok))
    fast.llm.prefill("t", Tokens(prompt), prompt)
    with pytest.raises(EngineError, match="outside the"):
        fast.llm.step("t", fast.llm.runner.vocab_rows)


def test_fast_path_hands_over_its_logits_and_reuses_the_buffer_only_when_free(engine):
    """The fast path returns its bound logits buffer, not a copy (_Decode): the next step
    writes into the same buffer when the caller dropped what it got, and into a new one while the
    caller holds it or any view of it, which then keeps its values. Every step equals the general path."""
    eng = engine("vila1.5-3b-downsample", target="cpu")
    rng = np.random.default_rng(13)
    fast, general = Pipeline(eng), Pipeline(eng)
    general.llm.runner._decode_rows = None
    vocab = fast.manifest.llm.vocab_size
    prompt = rng.integers(0, vocab, 9)
    for pipe in (fast, general):
        pipe.llm.prefill("s", Tokens(prompt), prompt, grow=8)
    toks = rng.integers(0, vocab, 8).tolist()

    def step(tok):
        out = fast.llm.step("s", tok)
        np.testing.assert_array_equal(out, general.llm.step("s", tok))
        return out

    address = step(toks[0]).__array_interface__["data"][0]        # dropped at once
    assert step(toks[1]).__array_interface__["data"][0] == address  # so the buffer is reused
    view = step(toks[2])[:7]                                        # a view keeps the buffer the caller's
    held = view.copy()
    nxt = step(toks[3])
    assert not np.shares_memory(nxt, view)
    np.testing.assert_array_equal(view, held)
    del view
    again = nxt.__array_interface__["data"][0]
    del nxt
    assert step(toks[4]).__array_interface__["data"][0] == again
    kept = []
    for tok in toks[5:]:                            # all held: the third writes into a buffer of its own
        kept.append(step(tok))
        kept[-1:] = [(kept[-1], kept[-1].copy())]
    assert not any(np.shares_memory(a, b) for i, (a, _) in enumerate(kept) for b, _ in kept[i + 1:])
    for logits, when_returned in kept:              # and none was overwritten
        np.testing.assert_array_equal(logits, when_returned)
