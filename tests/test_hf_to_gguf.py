"""benchmarks/hf_to_gguf.py: llama.cpp on the converted GGUF computes the same logits as transformers.

Needs llama-cpp-python (the `make bench-peers` setup); skipped without it.
"""
import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from benchmarks.hf_to_gguf import _permute, convert  # noqa: E402


def test_permute_matches_interleaved_rope_pairs():
    # Head of 4 rows [a0, a1, b0, b1] (rotate_half pairs a_i with b_i) -> GGML pairs adjacent rows.
    w = np.arange(8, dtype=np.float32).reshape(8, 1)            # 2 heads x 4 rows
    assert _permute(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_f32_gguf_logits_equal_transformers(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    llm_dir = os.path.join(checkpoint("vila1.5-3b-downsample"), "llm")
    out = str(tmp_path / "llm.gguf")
    convert(llm_dir, out, np.float32)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, 24).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=out, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
