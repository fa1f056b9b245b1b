"""Greedy bit allocation (vila_edge_export/bit_alloc.py): the greedy on a hand-made table, the output
Fisher against autograd on the outputs themselves, a unit's loss against the formula on the tokens."""
import pytest
import torch

from vila_edge_export.bit_alloc import Choice, allocate, output_fisher, unit_choices, unit_table
from vila_edge_export.quantize import dequantize, decoder_linears, quantize_group


def _table():
    """Two single-linear units of 100 weights each: int4 + zero point at G 64 (4.3125 bits per weight) and
    32 (4.625), symmetric int8 at G 64 (8.25); losses written by hand."""
    a = [Choice(4, 64, 100, 431.25, 10.0), Choice(4, 32, 100, 462.5, 4.0), Choice(8, 64, 100, 825.0, 0.5)]
    b = [Choice(4, 64, 100, 431.25, 3.0), Choice(4, 32, 100, 462.5, 2.5)]
    return {(0, ("a",)): a, (1, ("b",)): b}


def test_greedy_takes_the_best_loss_drop_per_bit_within_the_budget():
    # From 862.5 bits: a 64 -> 32 gains 6.0 for 31.25 bits (0.192 / bit), b 64 -> 32 0.5 for 31.25 (0.016),
    # a 32 -> int8 3.5 for 362.5 (0.0097)
    plan, bpw = allocate(_table(), 4.625)          # 925 bits: both G32 upgrades, exactly
    assert plan == {"model.layers.0.a": (4, 32), "model.layers.1.b": (4, 32)} and bpw == 4.625
    plan, bpw = allocate(_table(), 4.5)            # 900 bits: a's upgrade only (893.75)
    assert plan == {"model.layers.0.a": (4, 32), "model.layers.1.b": (4, 64)} and bpw == 4.46875
    plan, _ = allocate(_table(), 4.3)              # 860 bits, below the cheapest: the cheapest choices
    assert plan == {"model.layers.0.a": (4, 64), "model.layers.1.b": (4, 64)}
    plan, _ = allocate(_table(), 8.25)             # 1650 bits: a int8 too, after both G32s
    assert plan == {"model.layers.0.a": (8, 64), "model.layers.1.b": (4, 32)}


def test_unit_choices():
    assert unit_choices(576, True) == [(4, 32), (4, 64), (8, 64)]
    assert unit_choices(1536, True) == [(4, 32), (4, 64), (4, 128), (8, 128)]


def _tiny():
    from test_quantize import tiny_model
    return tiny_model("llama")


def test_output_fisher_is_the_mean_squared_gradient_of_each_output():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 128, (16,), generator=g) for _ in range(2)]
    got = output_fisher(model, blocks)
    name = "model.layers.1.mlp.down_proj"
    lin = decoder_linears(model)[name]
    want = 0
    for ids in blocks:                      # the gradient of the loss w.r.t. the output tensor itself
        outs = []

        def keep(module, args, out):
            out.retain_grad()
            outs.append(out)
        h = lin.register_forward_hook(keep)
        model.zero_grad()
        model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0), use_cache=False).loss.backward()
        h.remove()
        want = want + outs[0].grad[0].double().pow(2).sum(0)
    torch.testing.assert_close(got[name], (want / 32).float(), rtol=1e-5, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())          # left as it was


def test_unit_loss_is_the_fisher_weighted_output_error_on_the_tokens():
    model = _tiny()
    lins = decoder_linears(model)
    g = torch.Generator().manual_seed(1)
    xs = {n: torch.randn(40, lin.in_features, generator=g) for n, lin in lins.items()}
    hessians = {n: x.T @ x / 40 for n, x in xs.items()}
    fisher = {n: torch.rand(lin.out_features, generator=g) for n, lin in lins.items()}
    table = unit_table(model, hessians, fisher, zero_point=True)
    choice = next(c for c in table[(0, ("mlp.down_proj",))] if (c.bits, c.group) == (4, 32))
    name = "model.layers.0.mlp.down_proj"
    w, x = lins[name].weight.data, xs[name]
    q = quantize_group(w, 32, 4, True)
    err = ((x @ (dequantize(q.codes, q.scales, q.zeros) - w).T) ** 2).mean(0)      # (N,) on the tokens
    assert choice.loss == pytest.approx(float((fisher[name] * err).sum()), rel=1e-4)
    assert choice.n_bits == w.numel() * (4 + 20 / 32)
    assert [(c.bits, c.group) for c in table[(0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]] \
        == [(4, 64), (4, 32), (8, 64)]


def test_auto_plan_stays_in_budget_and_the_quantizer_follows_it():
    """An allocated plan on a tiny decoder: within max_bpw, one (bits, G) per fused unit, and
    awq_quantize stores every linear at its allocated bits and G (int8 symmetric)."""
    from test_quantize import outlier_embeds
    from vila_edge_export.awq import awq_quantize
    from vila_edge_export.bit_alloc import UNITS, auto_plan
    from vila_edge_export.quality import bits_per_weight
    model = _tiny()
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 128, (32,), generator=g) for _ in range(2)]
    embeds = outlier_embeds(seed=4, n=2) + [model.get_input_embeddings()(i.unsqueeze(0)).detach() for i in ids]
    alloc, bpw = auto_plan(model, embeds, ids, True, 5.0)
    assert 4.3125 <= bpw <= 5.0
    for i in range(2):
        for unit in UNITS:
            assert len({alloc[f"model.layers.{i}.{u}"] for u in unit}) == 1
    q = awq_quantize(model, embeds, 32, progress=False, zero_point=True, search=False, ranges=True,
                     plan={n: gs for n, (b, gs) in alloc.items()},
                     int8=tuple(n for n, (b, gs) in alloc.items() if b == 8))
    assert {n: (w.bits, w.group, w.zeros is None) for n, w in q.linears.items() if n != "lm_head"} == \
        {n: (b, gs, b == 8) for n, (b, gs) in alloc.items()}
    assert bits_per_weight(q)["decoder"] == pytest.approx(bpw)


def test_auto_plan_needs_calibration_and_a_budget():
    from vila_edge.errors import ExportOptionError
    from vila_edge_export.options import QuantOptions
    for bad in (dict(method="rtn"), dict(method="awq", max_bpw=None)):
        with pytest.raises(ExportOptionError, match="auto"):
            QuantOptions(group_plan="auto", **bad)
    assert QuantOptions(method="gptq", group_plan="auto").group_plan == "auto"
