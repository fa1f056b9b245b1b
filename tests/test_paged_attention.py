"""vila_edge::PagedAttention (vila_edge/ops) against a numpy oracle, and the paged runner's batched
pass against one pass per sequence.

The oracle is attention written out per token and head from the op's documented contract: new rows
scattered at slot_mapping first, then causal softmax(q k^T / sqrt(D)) v over the positions the
block table names, KV head h // (Hq / Hkv). fp32 agrees to 1e-5 (summation order only); fp16 to
2e-3 (the output is rounded to fp16: a 2^-11 relative step on values of magnitude <= ~3).
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vila_edge import EngineError, Pipeline, ops
from vila_edge.runner import Step, Tokens

HQ, HKV, D, BS, NB = 6, 2, 16, 4, 96
INPUTS = ["qkv", "key_cache", "value_cache"]
META = ["block_tables", "seq_lens", "query_start_loc", "slot_mapping"]
ROPE = ["cos_cache", "sin_cache"]
MAX_POS = 384


def _session(dtype, rotary=False):
    """rotary: q and k are rotated inside, from the cos/sin inputs."""
    t = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[dtype]
    ins = [helper.make_tensor_value_info(n, t, None) for n in INPUTS] + \
          [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in META] + \
          [helper.make_tensor_value_info(n, t, None) for n in (ROPE if rotary else [])]
    node = helper.make_node("PagedAttention", [i.name for i in ins], ["out"], domain=ops.DOMAIN, num_heads=HQ,
                            num_kv_heads=HKV, scale=0.0)
    graph = helper.make_graph([node], "paged", ins, [helper.make_tensor_value_info("out", t, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _batch(rng, past: list, new: list):
    """Sequences with `past` positions in the pool and `new` ones to run, on random distinct blocks."""
    need = [-(-(p + n) // BS) for p, n in zip(past, new)]
    blocks = rng.permutation(NB)[: sum(need)]
    tables = np.full((len(past), max(need)), -1, np.int32)
    at = 0
    for b, k in enumerate(need):
        tables[b, :k], at = blocks[at: at + k], at + k
    slots = [tables[b, p // BS] * BS + p % BS for b in range(len(past)) for p in range(past[b], past[b] + new[b])]
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    return tables, np.array(past, np.int32) + np.array(new, np.int32), qsl, np.array(slots, np.int32)


def _rope(x, heads, positions, cos, sin):
    """x [T, heads * D] rotated at positions: halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) (HF's rotate_half)."""
    x = x.reshape(len(positions), heads, D).astype(np.float64)
    c, s = cos[positions][:, None].astype(np.float64), sin[positions][:, None].astype(np.float64)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(len(positions), heads * D)


def _oracle(q, k, v, kc, vc, tables, seq_lens, qsl, slots):
    kr, vr = kc.reshape(-1, HKV, D).astype(np.float64), vc.reshape(-1, HKV, D).astype(np.float64)
    kr[slots], vr[slots] = k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)
    out = np.zeros((len(slots), HQ, D))
    for b in range(len(seq_lens)):
        n = qsl[b + 1] - qsl[b]
        for i in range(n):
            t, pos = qsl[b] + i, seq_lens[b] - n + i
            rows = tables[b, np.arange(pos + 1) // BS] * BS + np.arange(pos + 1) % BS
            for h in range(HQ):
                kv = h // (HQ // HKV)
                s = kr[rows, kv] @ q.reshape(-1, HQ, D)[t, h].astype(np.float64) / np.sqrt(D)
                p = np.exp(s - s.max())
                out[t, h] = (p / p.sum()) @ vr[rows, kv]
    return out.reshape(len(slots), HQ * D), kr.reshape(kc.shape), vr.reshape(vc.shape)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize("past, new", [([0], [7]),                       # causal prefill of one sequence
                                       ([9], [1]),                       # a decode step
                                       ([300], [1]),                     # a long one: split in parts, merged
                                       ([5, 0, 13, 3], [1, 6, 1, 4])])   # varlen: decode, prefill, extend
def test_op_equals_numpy_oracle(dtype, atol, past, new, rotary):
    rng = np.random.default_rng(len(past) * 10 + sum(new))
    tables, seq_lens, qsl, slots = _batch(rng, past, new)
    t = len(slots)
    q, k, v = (rng.standard_normal((t, h * D)).astype(dtype) for h in (HQ, HKV, HKV))
    kc, vc = (rng.standard_normal((NB, BS, HKV, D)).astype(dtype) for _ in range(2))
    meta = [tables, seq_lens, qsl, slots]
    feeds = dict(zip(INPUTS + META, [np.concatenate([q, k, v], 1), kc, vc, *meta]))
    if rotary:
        positions = np.concatenate([np.arange(s - n, s) for s, n in zip(seq_lens, new)])
        angles = np.arange(MAX_POS)[:, None] / 100.0 ** (np.arange(D // 2) / (D // 2))   # [MAX_POS, D/2]
        cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
        want, want_kc, want_vc = _oracle(_rope(q, HQ, positions, cos, sin), _rope(k, HKV, positions, cos, sin), v,
                                         kc, vc, *meta)
        feeds.update(cos_cache=cos, sin_cache=sin)
        kc_atol = 1e-6 if dtype == np.float32 else 2e-3    # rotated K is rounded to the pool's dtype
    else:
        want, want_kc, want_vc = _oracle(q, k, v, kc, vc, *meta)
        kc_atol = 0
    out = _session(dtype, rotary).run(None, feeds)[0]
    np.testing.assert_allclose(out.astype(np.float64), want, atol=atol, rtol=0)
    # The pools were written in place, at the slots only (the caller's arrays, no copy).
    np.testing.assert_allclose(kc.astype(np.float64), want_kc, atol=kc_atol, rtol=0)
    np.testing.assert_array_equal(vc.astype(np.float64), want_vc)


def test_op_refuses_a_block_outside_the_pool():
    rng = np.random.default_rng(0)
    tables, seq_lens, qsl, slots = _batch(rng, [3], [1])
    tables[0, 0] = NB
    qkv = np.zeros((1, (HQ + 2 * HKV) * D), np.float32)
    kc = np.zeros((NB, BS, HKV, D), np.float32)
    with pytest.raises(Exception, match="block_tables names a block outside the pool"):
        _session(np.float32).run(None, dict(zip(INPUTS + META, [qkv, kc, kc.copy(), tables, seq_lens, qsl, slots])))


def test_missing_library_names_the_build_command(monkeypatch):
    monkeypatch.setattr(ops, "built", lambda: None)
    with pytest.raises(EngineError, match="pip install -e ."):
        ops.library_path()


def test_forward_batch_equals_each_sequence_alone(engine):
    """Mixed steps in one pass (a decode step, an extend of 3, a fresh prefill of 5) give each
    sequence the logits it gets alone (float32: summation order only) and the same greedy pick."""
    eng = engine("vila1.5-3b-downsample", target="cpu")
    rng = np.random.default_rng(5)
    hidden = Pipeline(eng).manifest.llm.hidden
    prompts = {"a": rng.standard_normal((21, hidden)), "b": rng.standard_normal((10, hidden)),
               "c": rng.standard_normal((5, hidden))}
    prompts = {s: e.astype(np.float32) for s, e in prompts.items()}
    past = {"a": 20, "b": 7, "c": 0}                  # positions in the pool before the batched pass

    def prepare(pipe, seq):
        blocks, key = pipe.llm.blocks, 1000 * (ord(seq) - ord("a"))
        keys = list(range(key, key + len(prompts[seq])))
        if past[seq]:
            pipe.llm.prefill(seq, prompts[seq][: past[seq]], np.array(keys[: past[seq]]), grow=8)
            slots = blocks.append(seq, keys[past[seq]:])
        else:
            slots = blocks.allocate(seq, keys, 8).slots
        return Step(Tokens.from_embeds(prompts[seq][past[seq]:]), past[seq], blocks.block_table(seq), slots)

    alone = {}
    for seq in prompts:
        pipe = Pipeline(eng)
        alone[seq] = pipe.llm.runner.forward_batch([prepare(pipe, seq)])[0]
    pipe = Pipeline(eng)
    assert pipe.llm.runner.max_batch > 1
    batched = pipe.llm.runner.forward_batch([prepare(pipe, seq) for seq in prompts])
    assert batched.shape == (3, pipe.manifest.llm.logits_size)
    for row, seq in zip(batched, prompts):
        np.testing.assert_allclose(row, alone[seq], atol=1e-5, rtol=0)
        assert row.argmax() == alone[seq].argmax()
