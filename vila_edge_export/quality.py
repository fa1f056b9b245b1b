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

import torch
from torch import Tensor, nn

from vila_edge_export.quantize import QuantizedLLM
from vila_edge.errors import QualityError  # noqa: F401 (re-exported)

FP16_BYTES = 2


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


@torch.no_grad()
def forward_windows(model: nn.Module, ids: Tensor, window: int, stride: int) -> WindowPass:
    """ids: int64 [N] -> per-token nll and argmax over all windows, layer outputs of the first."""
    model.eval()
    hidden: list[Tensor] = []
    hooks = [layer.register_forward_hook(
                 lambda m, args, out: hidden.append((out[0] if isinstance(out, tuple) else out)[0].clone()))
             for layer in model.model.layers]
    nll, top1 = [], []
    try:
        for i, (begin, end, first) in enumerate(windows(ids.numel(), window, stride)):
            logits = model(input_ids=ids[begin:end].unsqueeze(0), use_cache=False).logits[0]  # [T, V]
            if i == 0:
                for h in hooks:
                    h.remove()
            pred = logits[first - 1 - begin:end - 1 - begin].float()  # positions predicting targets
            nll.append(torch.nn.functional.cross_entropy(pred, ids[first:end], reduction="none").double())
            top1.append(pred.argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    return WindowPass(torch.cat(nll), torch.cat(top1), hidden)


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
    codes = sum(q.codes.numel() * q.bits // 8 + q.scales.numel() * FP16_BYTES for q in qllm.linears.values())
    return floats + codes
