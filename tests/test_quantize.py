"""Symmetric int4 quantizer, AWQ scale folding and AWQ vs RTN on tiny random decoders (CPU, seconds)."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vila_edge_export.awq import awq_quantize, awq_transform
from vila_edge_export.quality import QualityError, QualityFloor, QualityReport, windows
from vila_edge_export.quantize import (LM_HEAD, QuantConfigError, apply_quantized, decoder_linears, dequantize,
                                       int8_linears, quantize_asymmetric, quantize_symmetric, resolve_group,
                                       rtn_quantize)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=128, max_position_embeddings=256)
GROUP = 32  # divides both K=64 (attention, gate/up) and K=128 (down_proj)
OUTLIER_CHANNELS = [5, 20, 47]
OUTLIER_GAIN = 30.0  # LLM activations carry a few channels ~10-100x the rest (AWQ paper §3)


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":  # MHA: v_proj -> o_proj scale group is searched
        cfg = LlamaConfig(**TINY, num_key_value_heads=4)
        model = LlamaForCausalLM(cfg)
    else:  # GQA with q/k/v biases: v_proj -> o_proj is skipped
        cfg = Qwen2Config(**TINY, num_key_value_heads=2)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model.eval()


def outlier_embeds(seed: int, n: int, t: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        e = torch.randn(1, t, TINY["hidden_size"], generator=g)  # [1, T, C]
        e[..., OUTLIER_CHANNELS] *= OUTLIER_GAIN
        out.append(e)
    return out


def test_quantize_hand_computed():
    w = torch.tensor([[3.5, -1.0, 0.25, -0.875],
                      [0.0, 0.0, -14.0, 6.5]])
    codes, scales = quantize_symmetric(w, group=2)
    # Groups: absmax 3.5 -> s 0.5; 0.875 -> 0.125; all zero -> the 1e-5 floor; 14 -> 2 (6.5/2 = 3.25 -> 3).
    zero_scale = torch.tensor(1e-5 / 7, dtype=torch.float16).item()
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert codes.tolist() == [[7, -2, 2, -7], [0, 0, -7, 3]]
    torch.testing.assert_close(scales, torch.tensor([[0.5, 0.125], [zero_scale, 2.0]]), rtol=0, atol=0)
    assert dequantize(codes, scales).tolist() == [[3.5, -1.0, 0.25, -0.875], [0.0, 0.0, -14.0, 6.0]]


def test_zero_point_hand_computed():
    """The group's range, widened to include 0, onto the 16 codes: s = (hi - lo) / 15, z = -8 - round(lo / s)."""
    w = torch.tensor([[-1.0, 2.0, 0.5, 1.0],
                      [0.0, 7.5, -3.0, -3.0]])
    codes, scales, zeros = quantize_asymmetric(w, group=2)
    # [-1, 2]: s 0.2, z -3; [0.5, 1] -> [0, 1]: s 1/15, z -8; [0, 7.5]: s 0.5, z -8; [-3, -3] -> [-3, 0]: s 0.2, z 7
    s0, s1 = (torch.tensor(v, dtype=torch.float16).item() for v in (0.2, 1 / 15))   # fp16-rounded scales
    torch.testing.assert_close(scales, torch.tensor([[s0, s1], [0.5, s0]]), rtol=0, atol=0)
    assert zeros.tolist() == [[-3, -8], [-8, 7]]
    assert codes.tolist() == [[-8, 7, 0, 7], [-8, 7, -8, -8]]
    expected = torch.tensor([[-5 * s0, 10 * s0, 8 * s1, 15 * s1], [0.0, 7.5, -15 * s0, -15 * s0]])
    torch.testing.assert_close(dequantize(codes, scales, zeros), expected, rtol=0, atol=0)


def test_int8_linears_fill_the_bit_budget():
    """Tiny Llama, G = 32: 2 layers x 40,960 weights (q, k, v, o 4,096; gate, up, down 8,192) at
    4 + 16/32 = 4.5 bits; each int8 down_proj (8.5 bits) adds 8,192 * 4 / 81,920 = 0.4 bits per weight."""
    model = tiny_model("llama")
    down = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert int8_linears(model, GROUP, False, False, None) == [] == int8_linears(model, GROUP, False, False, 4.89)
    assert int8_linears(model, GROUP, False, False, 4.9) == down[:1]
    assert int8_linears(model, GROUP, False, False, 5.3) == down            # outermost first: 0, then L-1
    # zero points: 4 + 20/32 = 4.625 per int4 weight, int8 (symmetric) adds 8192 * 3.875 / 81920
    assert int8_linears(model, GROUP, False, True, 4.625 + 0.3875) == down[:1]
    qllm = rtn_quantize(model, GROUP, int8=tuple(down[:1]), zero_point=True)
    assert qllm.linears[down[0]].bits == 8 and qllm.linears[down[0]].zeros is None
    assert qllm.linears[down[1]].bits == 4 and qllm.linears[down[1]].zeros is not None


def test_codes_in_range_and_error_within_half_step():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.logspace(-4, 2, 256)  # magnitudes over six decades across groups
    codes, scales = quantize_symmetric(w, group=32)
    assert codes.shape == (64, 256) and scales.shape == (64, 8)
    assert codes.min() >= -8 and codes.max() <= 7
    err = (dequantize(codes, scales) - w).abs()
    bound = scales.repeat_interleave(32, dim=1) / 2  # [N, K]: s of each element's group
    assert (err <= bound * (1 + 1e-6)).all()


def test_group_size_resolution():
    assert resolve_group("x", 1536, 128, auto_group=False) == 128
    with pytest.raises(QuantConfigError, match=r"model.layers.0.self_attn.q_proj.*K=576.*G=128"):
        resolve_group("model.layers.0.self_attn.q_proj", 576, 128, auto_group=False)
    assert resolve_group("q", 576, 128, auto_group=True) == 64  # SmolLM2: 576 = 9 * 64
    assert resolve_group("q", 1536, 128, auto_group=True) == 128
    with pytest.raises(QuantConfigError, match="K=24"):
        resolve_group("q", 24, 128, auto_group=True)  # only 8 divides 24, below the floor of 16


def test_int8_codes_symmetric_and_error_within_half_step():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * torch.logspace(-3, 1, 128)
    codes, scales = quantize_symmetric(w, group=64, bits=8)
    assert codes.min() >= -127 and codes.max() <= 127 and codes.abs().max() == 127
    err = (dequantize(codes, scales) - w).abs()
    assert (err <= scales.repeat_interleave(64, dim=1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(scales, scales.half().float())          # fp16-representable, as stored


def test_rtn_and_apply_quantized():
    model = tiny_model("llama")
    qllm = rtn_quantize(model, GROUP)
    assert set(qllm.linears) == set(decoder_linears(model)) | {LM_HEAD} and len(qllm.linears) == 15
    assert qllm.lm_head_bits == 8 and qllm.linears[LM_HEAD].bits == 8
    assert all(q.bits == 4 for name, q in qllm.linears.items() if name != LM_HEAD)
    assert "model.embed_tokens.weight" in qllm.state_dict
    assert not any(f"{n}.weight" in qllm.state_dict for n in qllm.linears)
    ref = apply_quantized(model, qllm)
    for name, lin in decoder_linears(ref).items():
        q = qllm.linears[name]
        assert q.group == GROUP and q.zeros is None
        assert torch.equal(lin.weight, dequantize(q.codes, q.scales))
    head = qllm.linears[LM_HEAD]
    assert torch.equal(head.codes, quantize_symmetric(model.lm_head.weight, GROUP, bits=8)[0])
    assert torch.equal(ref.lm_head.weight, dequantize(head.codes, head.scales))
    # the engines store the embedding table in fp16: the reference reads the same rows
    assert torch.equal(ref.model.embed_tokens.weight, model.model.embed_tokens.weight.half().float())
    with pytest.raises(QuantConfigError, match="K=64"):
        rtn_quantize(model, 48)
    with pytest.raises(QuantConfigError, match="lm_head_bits=3"):
        rtn_quantize(model, GROUP, lm_head_bits=3)


def test_float_lm_head_keeps_its_weight():
    model = tiny_model("llama")
    qllm = rtn_quantize(model, GROUP, lm_head_bits=0)
    assert LM_HEAD not in qllm.linears and qllm.lm_head_bits == 0
    assert torch.equal(apply_quantized(model, qllm).lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_lm_head_gets_its_own_quantized_copy(bits):
    """SmolLM2 and VILA tie lm_head to the embedding table: the table must stay float (fp16)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    qllm = rtn_quantize(model, GROUP, lm_head_bits=bits)
    head = qllm.linears[LM_HEAD]
    assert head.bits == bits and torch.equal(head.codes, quantize_symmetric(table, GROUP, bits)[0])
    ref = apply_quantized(model, qllm)
    assert ref.lm_head.weight is not ref.model.embed_tokens.weight
    assert torch.equal(ref.model.embed_tokens.weight, table.half().float())
    assert torch.equal(ref.lm_head.weight, dequantize(head.codes, head.scales))
    assert torch.equal(model.model.embed_tokens.weight, table)            # the float model is untouched


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_awq_scale_folding_is_exact(kind):
    model = tiny_model(kind)
    calib = outlier_embeds(seed=2, n=2)
    folded = awq_transform(copy.deepcopy(model), calib, GROUP, clip=False, progress=False)
    norm0, norm1 = model.model.layers[0].input_layernorm.weight, folded.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm0, norm1)  # the search chose s != 1, so the check below is not vacuous
    with torch.no_grad():
        for e in outlier_embeds(seed=3, n=2):
            torch.testing.assert_close(folded(inputs_embeds=e).logits, model(inputs_embeds=e).logits,
                                       rtol=1e-5, atol=1e-5)


def _logit_error(model, qllm, embeds) -> float:
    qmodel = apply_quantized(model, qllm)
    with torch.no_grad():
        return sum((qmodel(inputs_embeds=e).logits - model(inputs_embeds=e).logits).pow(2).mean().item()
                   for e in embeds)


@pytest.mark.slow
def test_awq_beats_rtn_with_activation_outliers():
    model = tiny_model("llama")
    awq = awq_quantize(model, outlier_embeds(seed=4, n=4), GROUP, progress=False)
    rtn = rtn_quantize(model, GROUP)
    held_out = outlier_embeds(seed=5, n=4)
    err_awq, err_rtn = _logit_error(model, awq, held_out), _logit_error(model, rtn, held_out)
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_sliding_windows_score_each_target_once():
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (9, 16, 8), (2, 4, 2), (4, 4, 1)]:
        spans = windows(n, window, stride)
        targets = [t for begin, end, first in spans for t in range(first, end)]
        assert targets == list(range(1, n))
        assert all(end - begin <= window and begin < first for begin, end, first in spans)


def test_quality_floor():
    report = QualityReport(label="awq", ppl=11.0, ppl_ref=10.0, ppl_increase_pct=10.0, top1_agreement=0.9,
                           layer_rel_err=[0.01], size_bytes=1, size_ref_bytes=4, n_eval_tokens=100,
                           window=8, stride=4)
    QualityFloor(max_ppl_increase_pct=10.0, min_top1_agreement=0.9).check(report)
    with pytest.raises(QualityError, match=r"awq: perplexity 11.0000 is 10.00 % .*top-1 agreement 0.9000"):
        QualityFloor(max_ppl_increase_pct=5.0, min_top1_agreement=0.95).check(report)
    assert '"ppl_increase_pct": 10.0' in report.to_json()


def test_calibration_and_eval_text_are_disjoint():
    from pydoc_data.topics import topics

    from vila_edge_export.calib_text import split_of, split_texts
    calib, evals = split_texts("calib"), split_texts("eval")
    assert len(calib) + len(evals) == len(topics) and min(len(calib), len(evals)) > len(topics) // 4
    assert (split_of("assert"), split_of("if")) == ("calib", "eval")  # sha256 of the key: stable across runs
    assert sum(map(len, calib)) > 100_000 and sum(map(len, evals)) > 100_000


def test_apply_quantized_in_place_is_the_same_reference():
    model = tiny_model("llama")
    qllm = rtn_quantize(model, 32)
    copy_ = apply_quantized(model, qllm)
    same = apply_quantized(model, qllm, in_place=True)
    assert same is model and copy_ is not model
    for (k, a), (_, b) in zip(copy_.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k


def test_group_plan_sets_each_linears_group_and_the_bit_budget():
    """Tiny Llama, base G = 32 with zero points, plan q_proj=16, down_proj=128. Per layer: q 4,096 weights
    at 4 + 20/16 = 5.25 bits, k/v/o 3 x 4,096 and gate/up 2 x 8,192 at 4.625, down 8,192 at 4 + 20/128 =
    4.15625: 188,160 bits over 40,960 weights = 4.59375. An int8 down_proj (symmetric, 8 + 16/128) adds
    8,192 x 3.96875 = 32,512 bits: 0.396875 bits per weight over both layers."""
    from vila_edge_export.options import parse_group_plan
    from vila_edge_export.quality import bits_per_weight
    from vila_edge_export.quantize import linear_groups
    model = tiny_model("llama")
    plan = parse_group_plan("q_proj=16, down_proj=128")
    assert plan == {"q_proj": 16, "down_proj": 128}
    groups = linear_groups(model, GROUP, False, plan)
    kinds = {n.rsplit(".", 1)[1]: g for n, g in groups.items() if n.startswith("model.layers.1.")}
    assert kinds == {"q_proj": 16, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32,
                     "down_proj": 128}
    down = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert int8_linears(model, GROUP, False, True, 4.9905, plan) == []
    assert int8_linears(model, GROUP, False, True, 4.9907, plan) == down[:1]
    qllm = rtn_quantize(model, GROUP, zero_point=True, plan=plan)
    assert {n: q.group for n, q in qllm.linears.items() if n != LM_HEAD} == groups
    assert qllm.linears[LM_HEAD].group == GROUP              # lm_head keeps the base G
    assert bits_per_weight(qllm)["decoder"] == 4.59375
    awq = awq_quantize(model, outlier_embeds(3, 1, 32), GROUP, progress=False, zero_point=True, plan=plan)
    assert {n: q.group for n, q in awq.linears.items() if n != LM_HEAD} == groups
