"""Bits where they buy the most: a greedy allocation of group sizes (and int8) over the decoder linears
under a bits-per-weight budget, from each linear's measured output error on calibration data.

Each choice (bits, G) of a unit (the linears the graph runs as one, which need one G: q/k/v, gate/up;
o_proj; down_proj) is rounded to nearest and scored by the loss increase it would cause to second
order, sum_n F_n * (dW H dW^T)_nn: the output error of row n
on the calibration inputs (H = x^T x / T), weighted by the empirical Fisher F_n = E[(dL/dy_n)^2] of
that output channel (the mean squared gradient of the calibration text's next-token loss), which says
how much an error in that channel moves the loss (the output-Fisher weighting of BRECQ, Li et al.
2021). Starting from every unit's cheapest choice, the choice with the largest loss drop per extra bit
is taken until the next would pass the budget (the greedy of HAWQ-V3-style bit allocation).
Round-to-nearest rather than the export's range search scores the choices: it ranks them alike at a
hundredth of the cost (the search tries 100 ranges per group, for every choice of every unit).
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vila_edge_export.quantize import _bits_per_weight, decoder_linears, dequantize, quantize_group, resolve_group

# The linears of one layer that share a G (options.FUSED_KINDS: one MatMulNBits each), and the others.
UNITS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
INT4_GROUPS = (32, 64, 128)
INT8_GROUP = 128          # int8 choices: symmetric, the largest of these dividing K (int8 needs no small groups)


@dataclass(frozen=True)
class Choice:
    bits: int
    group: int
    n_weights: int
    n_bits: float         # stored bits of the unit's weights, scales and zero points
    loss: float           # Fisher-weighted output error on calibration data


def unit_choices(k: int, zero_point: bool) -> list[tuple[int, int]]:
    """(bits, G) candidates for a unit with K inputs: int4 at every G of INT4_GROUPS dividing K, and int8."""
    out = [(4, g) for g in INT4_GROUPS if k % g == 0] or [(4, resolve_group(f"K={k}", k, INT4_GROUPS[0], True))]
    g8 = next((g for g in (INT8_GROUP, 64, 32) if k % g == 0), None)
    return out + ([(8, g8)] if g8 else [])


def output_fisher(model: nn.Module, id_blocks: list[Tensor]) -> dict[str, Tensor]:
    """{decoder linear: F [N]}: the mean over calibration tokens of the squared gradient of the next-token
    loss with respect to each output channel. id_blocks: int64 [T] token blocks of calibration text."""
    lins = decoder_linears(model)
    sums = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in lins.items()}

    def hook(name):
        def record(module, grad_in, grad_out):
            g = grad_out[0].reshape(-1, grad_out[0].shape[-1]).double()   # (T, N)
            sums[name] += g.pow(2).sum(0)
        return record

    handles = [lin.register_full_backward_hook(hook(name)) for name, lin in lins.items()]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n_tokens = 0
    try:
        for ids in id_blocks:
            x = model.get_input_embeddings()(ids.unsqueeze(0)).detach().requires_grad_(True)   # (1, T, C)
            model(inputs_embeds=x, labels=ids.unsqueeze(0), use_cache=False).loss.backward()
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {name: (s / n_tokens).float() for name, s in sums.items()}


@torch.no_grad()
def unit_table(model: nn.Module, hessians: dict[str, Tensor], fisher: dict[str, Tensor],
               zero_point: bool, layers=None) -> dict[tuple, list[Choice]]:
    """{(layer, unit): [Choice], cheapest first}: every candidate of every unit of `layers` (None: all),
    quantized and scored."""
    lins = decoder_linears(model)
    table = {}
    for i in range(len(model.model.layers)) if layers is None else layers:
        for unit in UNITS:
            names = [f"model.layers.{i}.{u}" for u in unit]
            choices = []
            for bits, g in unit_choices(lins[names[0]].in_features, zero_point):
                loss = n_bits = 0.0
                n_weights = 0
                for name in names:
                    w, h, zp = lins[name].weight.data, hessians[name].float(), zero_point and bits == 4
                    q = quantize_group(w, g, bits, zp)
                    dw = dequantize(q.codes, q.scales, q.zeros) - w                  # (N, K)
                    loss += float((fisher[name] * ((dw @ h) * dw).sum(1)).sum())
                    n_bits += w.numel() * _bits_per_weight(bits, g, zp)
                    n_weights += w.numel()
                choices.append(Choice(bits, g, n_weights, n_bits, loss))
            table[(i, unit)] = sorted(choices, key=lambda c: (c.n_bits, c.loss))
    return table


def allocate(table: dict[tuple, list[Choice]], max_bpw: float) -> tuple[dict[str, tuple[int, int]], float]:
    """Greedy: every unit at its cheapest choice, then the upgrade with the largest loss drop per extra
    bit while the total stays <= max_bpw -> ({decoder linear: (bits, G)}, bits per weight)."""
    n_weights = sum(c[0].n_weights for c in table.values())
    cur = {u: 0 for u in table}
    spent, budget = sum(c[0].n_bits for c in table.values()), max_bpw * n_weights
    while True:
        best = None
        for u, choices in table.items():
            now = choices[cur[u]]
            for j in range(cur[u] + 1, len(choices)):
                extra, gain = choices[j].n_bits - now.n_bits, now.loss - choices[j].loss
                if gain > 0 and spent + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, u, j, extra)
        if best is None:
            break
        _, u, j, extra = best
        cur[u], spent = j, spent + extra
    plan = {f"model.layers.{i}.{name}": (table[(i, unit)][cur[(i, unit)]].bits,
                                         table[(i, unit)][cur[(i, unit)]].group)
            for (i, unit) in table for name in unit}
    return plan, spent / n_weights


def auto_plan(model: nn.Module, calib_embeds: list[Tensor], id_blocks: list[Tensor], zero_point: bool,
              max_bpw: float) -> tuple[dict[str, tuple[int, int]], float]:
    """The allocation of the float model on its calibration data: H from every calibration sample
    (multimodal and text), F from the text blocks (the only ones with next-token labels)
    -> ({decoder linear: (bits, G)}, bits per weight)."""
    from vila_edge_export.awq import layer_hessians
    if not id_blocks:
        raise ValueError("an allocated group plan needs calibration text (n_text > 0) for its Fisher weights")
    fisher, table = output_fisher(model, id_blocks), {}
    for i, hessians in layer_hessians(model, calib_embeds):
        table.update(unit_table(model, hessians, fisher, zero_point, layers=[i]))
    return allocate(table, max_bpw)
