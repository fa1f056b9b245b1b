"""GPTQ rounding: quantize a linear's weights column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of its calibration inputs
(IST-DASLab/gptq@9f2abd3:gptq.py `GPTQ.fasterquant`, Frantar et al. 2022).

Round-to-nearest picks each code alone; GPTQ picks them so that W_q x stays close to W x on the
calibration activations x. The result is stored exactly as round-to-nearest's (quantize.py
`QuantizedWeight`: codes, fp16-rounded scales and zero points per group of G input channels), so the
graphs and kernels are unchanged. A group's scale and zero point are taken from its weights as they
stand when its first column is reached (already carrying the earlier columns' error), as gptq.py
does with `groupsize`; no activation reordering (its groups would no longer be contiguous).
"""
from contextlib import contextmanager

import torch
from torch import Tensor

from vila_edge_export.quantize import CODE_RANGE, QuantizedWeight, quantize_group

# gptq.py: `percdamp=.01` of the mean diagonal keeps H invertible; `blocksize=128` columns per lazy update.
DAMP = 0.01
BLOCK = 128


def hessian(x: Tensor) -> Tensor:
    """x [T, K] calibration inputs of a linear -> H = 2/T x^T x, float64 [K, K] (gptq.py `add_batch`)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double() * (2.0 / x.shape[0])


def inverse_hessian(h: Tensor) -> tuple[Tensor, Tensor]:
    """H [K, K] -> (upper Cholesky factor of the damped H^-1 (gptq.py), float64 [K, K]; dead inputs
    bool [K]), what gptq_quantize needs of H: linears reading the same input share it."""
    h = h.double().clone()
    dead = h.diagonal() == 0                       # inputs never active: H made invertible there
    h[dead, dead] = 1
    diag = torch.arange(h.shape[0])
    h[diag, diag] += DAMP * h.diagonal().mean()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


def ordered_inverse_hessian(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """H [K, K] -> (inverse_hessian of H with rows and columns in `order`, dead inputs bool [K] (input order),
    order [K]): act-order (gptq.py `actorder`), the inputs of largest H_kk (most activation energy) rounded first,
    while the most columns are still left to absorb their error."""
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    hinv, _ = inverse_hessian(h[order][:, order])
    return hinv, h.diagonal() == 0, order


@contextmanager
def _one_thread():
    """The column loop is thousands of small ops, where OpenMP's fork/join costs more than it saves:
    a 1536 x 576 linear took 0.85 s on one thread and 6-8 s on two (2-core host under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor | tuple, group: int, bits: int = 4, zero_point: bool = False,
                  block: int = BLOCK, ranges: QuantizedWeight | None = None) -> QuantizedWeight:
    """w [N, K] float, h [K, K] the Hessian of its inputs (or inverse_hessian(h)) -> QuantizedWeight
    (codes [N, K], scales [N, K/G], zeros [N, K/G] or None) in the layout of quantize.quantize_group. Float64 throughout
    (the error feedback sums K updates per weight); `block`: columns per lazy update, rounded to whole
    groups so that a group's scale sees every update of its own columns. ranges: scales (and zeros)
    chosen beforehand (range_search.search_ranges on the unrounded weights), kept as they are: GPTQ then
    picks only the codes (AutoGPTQ's static_groups)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group size G={group}")
    w = w.detach().double().clone()
    codes = torch.zeros(n, k, dtype=torch.int8)
    scales = torch.zeros(n, k // group)
    zeros = torch.zeros(n, k // group, dtype=torch.int8) if zero_point else None
    if ranges is not None:
        if ranges.scales.shape != scales.shape or (ranges.zeros is None) == zero_point:
            raise ValueError(f"ranges: scales {tuple(ranges.scales.shape)} / zeros {ranges.zeros is not None} do not "
                             f"match w {tuple(w.shape)} at G={group}, zero_point={zero_point}")
        scales, zeros = ranges.scales.float().clone(), None if ranges.zeros is None else ranges.zeros.clone()
    with _one_thread():
        hinv, dead, *order = inverse_hessian(h) if isinstance(h, Tensor) else h
        w[:, dead] = 0                             # inputs never active: any code will do
        if order:
            _ordered_columns(w, hinv, order[0], codes, scales, zeros, group, bits, ranges, block)
        else:
            _columns(w, hinv, codes, scales, zeros, group, bits, group * max(1, block // group), ranges is not None)
    return QuantizedWeight(codes, scales, bits, zeros)


def _ordered_columns(w: Tensor, hinv: Tensor, order: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None,
                     group: int, bits: int, ranges: QuantizedWeight | None, block: int = BLOCK) -> None:
    """Act-order: the columns in `order` (hinv: ordered_inverse_hessian's, in that order). Groups stay the
    contiguous input channels the graphs read, so their scales / zeros must be fixed first (ranges; AutoGPTQ's
    static_groups): each column rounds with its own group's. In lazy blocks of `block` ordered columns as gptq.py
    does (the error of a block reaches the later columns in one product): a rank-1 update of every later column
    per column cost O(N K^2) memory passes, minutes per model."""
    if ranges is None:
        raise ValueError("act-order rounds columns out of group order: it needs the groups' ranges fixed first")
    (n, k), (qmin, qmax), wp = w.shape, CODE_RANGE[bits], w[:, order].clone()
    s = scales.double()[:, order // group]                          # (N, K): each column's group scale
    z = zeros.double()[:, order // group] if zeros is not None else torch.zeros_like(s)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err, hb = wp[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=torch.float64), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            c = torch.clamp(torch.round(wb[:, i] / s[:, j]) + z[:, j], qmin, qmax)
            codes[:, order[j]] = c.to(torch.int8)
            e = (wb[:, i] - (c - z[:, j]) * s[:, j]) / hb[i, i]
            wb[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err[:, i] = e
        wp[:, b1:] -= err @ hinv[b0:b1, b1:]


def _columns(w: Tensor, hinv: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None, group: int, bits: int,
             block: int, fixed: bool = False) -> None:
    """gptq.py's loop: fills codes (and, unless fixed, scales / zeros) in place, w [N, K] float64 takes the
    error feedback."""
    (n, k), zero_point, (qmin, qmax) = w.shape, zeros is not None, CODE_RANGE[bits]
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=torch.float64)   # (N, block)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if i % group == 0 and fixed:
                g = (b0 + i) // group
                s, z = scales[:, g].double(), (zeros[:, g].double() if zero_point else 0.0)
            elif i % group == 0:                    # the group's scale (and zero) from its current weights
                g = (b0 + i) // group
                q = quantize_group(wb[:, i:i + group], group, bits, zero_point)
                s, z = q.scales[:, 0].double(), (q.zeros[:, 0].double() if zero_point else 0.0)
                scales[:, g] = s
                if zero_point:
                    zeros[:, g] = q.zeros[:, 0]
            c = torch.clamp(torch.round(wb[:, i] / s) + z, qmin, qmax)
            codes[:, b0 + i] = c.to(torch.int8)
            e = (wb[:, i] - (c - z) * s) / hb[i, i]
            wb[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
