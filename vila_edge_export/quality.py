"""How much a quantized causal LM lost against its float reference, on held-out token ids.

Perplexity uses sliding windows of `window` tokens advancing by `stride`: each target is scored
once, with at least window - stride tokens of context after the first window. Top-1 agreement
compares the argmax next-token prediction at every scored position. Per-layer relative error is
||h - h_ref|| / ||h_ref|| of each decoder layer's output on the first window. Sizes count the
deployed form: codes at their bits (int4 linears, int8/int4 lm_head), scales and every other tensor
at fp16, tied tensors once.
"""
import json
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from vila_edge_export.options import DEFAULT_MAX_PPL_INCREASE_PCT, DEFAULT_MIN_TOP1
from vila_edge_export.quantize import LM_HEAD, QuantizedLLM
from vila_edge.errors import QualityError  # noqa: F401 (re-exported)

FP16_BYTES = 2
# Held-out evaluation: windows of EVAL_WINDOW tokens advancing by half of it (export and benchmarks).
EVAL_WINDOW = 256


@dataclass
class WindowPass:
    nll: Tensor           # float64 [n_scored]: -log p(token) at every scored position
    top1: Tensor          # int64 [n_scored]: argmax prediction for the same positions
    hidden: list[Tensor]  # per decoder layer, its output on the first window [T, C]


@dataclass
class QualityReport:
    label: str
    ppl: float
    ppl_ref: float
    ppl_increase_pct: float
    top1_agreement: float
    layer_rel_err: list[float]
    size_bytes: int
    size_ref_bytes: int
    n_eval_tokens: int
    window: int
    stride: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class QualityFloor:
    max_ppl_increase_pct: float  # e.g. 10.0: ppl may rise at most 10 % over the reference
    min_top1_agreement: float    # e.g. 0.85: fraction of positions with the reference's argmax

    def check(self, report: QualityReport) -> None:
        problems = []
        if not report.ppl_increase_pct <= self.max_ppl_increase_pct:
            problems.append(f"perplexity {report.ppl:.4f} is {report.ppl_increase_pct:.2f} % above the reference "
                            f"{report.ppl_ref:.4f} (allowed {self.max_ppl_increase_pct} %)")
        if not report.top1_agreement >= self.min_top1_agreement:
            problems.append(f"top-1 agreement {report.top1_agreement:.4f} < floor {self.min_top1_agreement}")
        if problems:
            raise QualityError(f"{report.label}: " + "; ".join(problems) + ". Nothing was written; to accept this "
                               "quality pass --max-ppl-increase / --min-top1 (or --no-quality-floor), or try "
                               "--quant awq or a smaller --group-size")


# The export's default gate against the float model on the held-out text: at most +15 % perplexity
# and at least 0.85 top-1 agreement (issue 14's figures; vila_edge_export/options.py). The default 4-bit
# export of SmolLM2-135M (AWQ scales, searched ranges, act-order GPTQ codes, allocated plan) measures 0.873 / +6.3 %
# at 4.499 bits per decoder weight over the export's 4,095 tokens.
DEFAULT_FLOOR = QualityFloor(DEFAULT_MAX_PPL_INCREASE_PCT, DEFAULT_MIN_TOP1)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over n tokens: the model reads ids[begin:end] and scores the
    targets [first, end). The first window scores all it can; each later one scores the next `stride`
    targets with a full `window` of input, so every target gets >= window - stride tokens of context."""
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride={stride}, window={window}")
    end = min(window, n)
    out = [(0, end, 1)]
    while end < n:
        first, end = end, min(end + stride, n)
        out.append((end - window, end, first))
    return out


def score_windows(logits_of: Callable[[Tensor], Tensor], ids: Tensor, window: int, stride: int) -> tuple:
    """The evaluation protocol every system is measured with (the export's gate and
    benchmarks/quality_peers.py): logits_of(ids[begin:end]) -> logits [end - begin, V] of a fresh
    sequence (no cache between windows) -> (nll float64 [n_scored], argmax int64 [n_scored])."""
    nll, top1 = [], []
    for begin, end, first in windows(ids.numel(), window, stride):
        logits = torch.as_tensor(logits_of(ids[begin:end]))
        pred = logits[first - 1 - begin:end - 1 - begin].float()  # positions predicting targets
        nll.append(torch.nn.functional.cross_entropy(pred, ids[first:end], reduction="none").double())
        top1.append(pred.argmax(-1))
    return torch.cat(nll), torch.cat(top1)


@torch.no_grad()
def forward_windows(model: nn.Module, ids: Tensor, window: int, stride: int) -> WindowPass:
    """ids: int64 [N] -> per-token nll and argmax over all windows, layer outputs of the first."""
    model.eval()
    hidden: list[Tensor] = []
    hooks = [layer.register_forward_hook(
                 lambda m, args, out: hidden.append((out[0] if isinstance(out, tuple) else out)[0].clone()))
             for layer in model.model.layers]

    def logits_of(x: Tensor) -> Tensor:
        logits = model(input_ids=x.unsqueeze(0), use_cache=False).logits[0]  # [T, V]
        for h in hooks:          # layer outputs of the first window only
            h.remove()
        return logits

    try:
        nll, top1 = score_windows(logits_of, ids, window, stride)
    finally:
        for h in hooks:
            h.remove()
    return WindowPass(nll, top1, hidden)


def compare(label: str, cand: WindowPass, ref: WindowPass, size_bytes: int, size_ref_bytes: int,
            window: int, stride: int) -> QualityReport:
    ppl, ppl_ref = math.exp(cand.nll.mean().item()), math.exp(ref.nll.mean().item())
    rel = [((h - r).float().norm() / r.float().norm()).item() for h, r in zip(cand.hidden, ref.hidden)]
    return QualityReport(label=label, ppl=ppl, ppl_ref=ppl_ref, ppl_increase_pct=100.0 * (ppl / ppl_ref - 1.0),
                         top1_agreement=(cand.top1 == ref.top1).double().mean().item(), layer_rel_err=rel,
                         size_bytes=size_bytes, size_ref_bytes=size_ref_bytes, n_eval_tokens=cand.nll.numel(),
                         window=window, stride=stride)


def _unique(tensors: dict[str, Tensor]) -> list[Tensor]:
    seen = {}
    for t in tensors.values():
        seen.setdefault((t.data_ptr(), t.shape), t)
    return list(seen.values())


def float_size_bytes(model: nn.Module) -> int:
    """Every tensor at fp16, tied tensors once."""
    return sum(t.numel() * FP16_BYTES for t in _unique(model.state_dict()))


def quantized_size_bytes(qllm: QuantizedLLM) -> int:
    floats = sum(t.numel() * FP16_BYTES for t in _unique(qllm.state_dict))
    codes = sum(q.codes.numel() * q.bits // 8 + q.scales.numel() * FP16_BYTES
                + (0 if q.zeros is None else q.zeros.numel() * q.bits // 8) for q in qllm.linears.values())
    return floats + codes


def bits_per_weight(qllm: QuantizedLLM) -> dict:
    """Stored bits per weight of the quantized matrices: codes at their bits plus the fp16 scales of
    every group plus its zero point at the codes' bits if any, over the matrix's weights (16/G, +4/G,
    per weight at group size G). "decoder": the linears of the decoder layers together; "lm_head": the
    vocab projection (None when it stays float)."""
    acc = {"decoder": [0, 0], "lm_head": [0, 0]}
    for name, q in qllm.linears.items():
        part = acc["lm_head" if name == LM_HEAD else "decoder"]
        part[0] += (q.codes.numel() * q.bits + q.scales.numel() * 8 * FP16_BYTES
                    + (0 if q.zeros is None else q.zeros.numel() * q.bits))
        part[1] += q.codes.numel()
    return {k: (b / n if n else None) for k, (b, n) in acc.items()}
