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
