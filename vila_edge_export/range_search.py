"""Per-group range search: the scale (and zero point) of every group of G weights chosen to minimise the
error of that group's contribution to the linear's outputs on calibration inputs.

A linear's output error on inputs x is e = (W - Wq) x; over calibration tokens its mean square is
sum_n dW_n H dW_n^T with H = x^T x / T. Restricted to one group g of G input channels (the part a group's
scale and zero point can change), the error of row n is dW_ng H_gg dW_ng^T, with H_gg the G x G diagonal
block of H: what llm-awq's auto_clip measures by running the sampled tokens through the group
(mit-han-lab/llm-awq@d6e797a:awq/quantize/auto_clip.py), computed here from H once instead of per
candidate. llm-awq shrinks one symmetric clip value; with a zero point the low and the high end of the
range shrink independently, as llama.cpp's make_qkx2_quants searches scale and min per block
(ggml-org/llama.cpp@b4d05a3:ggml/src/ggml-quants.c). Every candidate is stored the way the quantizer
stores it (fp16 scale, integer zero point), so the error measured is the error the engine sees.
"""
import torch
from torch import Tensor

from vila_edge_export.quantize import CODE_RANGE, SCALE_STORAGE_DTYPE, QuantizedWeight, QuantConfigError
from vila_edge.int4 import MIN_ABSMAX

# Candidate ranges: each end of [lo, hi] (or the symmetric absmax) shrunk by i / GRID for i < GRID * MAX_SHRINK
# (llm-awq's auto_clip: n_grid 20, max_shrink 0.5).
GRID = 20
MAX_SHRINK = 0.5
ROWS = 256    # output rows per batch: bounds the [K/G, rows, G] work buffers


def group_blocks(x: Tensor, group: int) -> Tensor:
    """x [T, K] calibration inputs -> the diagonal G x G blocks of H = x^T x / T, float32 [K/G, G, G]."""
    x = x.reshape(-1, x.shape[-1]).float()
    t, k = x.shape
    if k % group:
        raise QuantConfigError(f"K={k} is not a multiple of group size G={group}")
    xg = x.reshape(t, k // group, group).transpose(0, 1)    # (K/G, T, G)
    return torch.bmm(xg.transpose(1, 2), xg) / t            # (K/G, G, G)


def blocks_of_hessian(h: Tensor, group: int) -> Tensor:
    """H [K, K] -> its diagonal G x G blocks [K/G, G, G]."""
    k = h.shape[0]
    hg = h.float().reshape(k // group, group, k // group, group)
    idx = torch.arange(k // group)
    return hg[idx, :, idx, :]                                # (K/G, G, G)


def _candidates(bits: int, zero_point: bool) -> list[tuple[float, float]]:
    steps = [i / GRID for i in range(int(GRID * MAX_SHRINK))]
    if zero_point:
        return [(a, b) for a in steps for b in steps]
    return [(a, a) for a in steps]


def _quantize(wg: Tensor, lo: Tensor, hi: Tensor, bits: int, zero_point: bool) -> tuple:
    """wg (K/G, b, G), range ends (K/G, b, 1) -> (codes, scales, zeros or None, dequantized): the rules of
    quantize.quantize_asymmetric / quantize_symmetric applied to the given range instead of the group's."""
    qmin, qmax = CODE_RANGE[bits]
    if zero_point:
        scales = ((hi - lo).clamp(min=MIN_ABSMAX) / (qmax - qmin)).to(SCALE_STORAGE_DTYPE).float()
        zeros = torch.clamp(qmin - torch.round(lo / scales), qmin, qmax)
        codes = torch.clamp(torch.round(wg / scales) + zeros, qmin, qmax)
        return codes, scales, zeros, (codes - zeros) * scales
    scales = (hi.clamp(min=MIN_ABSMAX) / qmax).to(SCALE_STORAGE_DTYPE).float()
    codes = torch.clamp(torch.round(wg / scales), qmin, qmax)
    return codes, scales, None, codes * scales


@torch.no_grad()
def search_ranges(w: Tensor, blocks: Tensor, group: int, bits: int = 4, zero_point: bool = False) -> QuantizedWeight:
    """w [N, K], blocks [K/G, G, G] (group_blocks) -> the QuantizedWeight (layout of quantize.quantize_group)
    whose every (row, group) range minimises dW H_gg dW^T over the candidates; the unshrunk range (plain
    round-to-nearest) is always a candidate, so no group gets worse than RTN on this measure."""
    n, k = w.shape
    ng = k // group
    if blocks.shape != (ng, group, group):
        raise QuantConfigError(f"blocks {tuple(blocks.shape)} do not match K={k}, G={group}")
    out_codes, out_scales, out_zeros = [], [], []
    for start in range(0, n, ROWS):
        wg = w[start:start + ROWS].detach().float().reshape(-1, ng, group).transpose(0, 1)   # (K/G, b, G)
        if zero_point:
            lo0, hi0 = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        else:
            hi0 = wg.abs().amax(-1, keepdim=True)
            lo0 = -hi0
        best_err = torch.full(hi0.shape, float("inf"))
        best = None
        for a, b in _candidates(bits, zero_point):
            codes, scales, zeros, deq = _quantize(wg, lo0 * (1 - a), hi0 * (1 - b), bits, zero_point)
            dw = deq - wg
            err = (torch.bmm(dw, blocks) * dw).sum(-1, keepdim=True)                        # (K/G, b, 1)
            if best is None:
                best, best_err = [codes, scales, zeros], err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[0] = torch.where(better, codes, best[0])
            best[1] = torch.where(better, scales, best[1])
            if zero_point:
                best[2] = torch.where(better, zeros, best[2])
        out_codes.append(best[0].transpose(0, 1).reshape(-1, k))                            # (b, K)
        out_scales.append(best[1].squeeze(-1).transpose(0, 1))                              # (b, K/G)
        if zero_point:
            out_zeros.append(best[2].squeeze(-1).transpose(0, 1))
    codes = torch.cat(out_codes).to(torch.int8)
    zeros = torch.cat(out_zeros).to(torch.int8) if zero_point else None
    return QuantizedWeight(codes, torch.cat(out_scales), bits, zeros)
