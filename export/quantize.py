"""Symmetric group-wise int4 weights (docs/contracts.md "Int4 weights") and round-to-nearest (RTN).

W[N, K] is cut into groups of G consecutive input channels per output row. Each group gets
s = absmax / 7 and codes q = clamp(round(w / s), -8, 7), so W ~= codes * scales[:, k // G].
RTN is this quantizer applied to every decoder linear with no search; AWQ (export/awq.py) rescales
and clips the float weights first and then calls the same `quantize_linears`.
"""
import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vila_edge.errors import VilaEdgeError

INT4_MIN, INT4_MAX = -8, 7
DEFAULT_GROUP = 128  # llm-awq --q_group_size 128, ModelOpt INT4_AWQ_CFG block_sizes {-1: 128}
MIN_AUTO_GROUP = 16
# llm-awq's pseudo_quantize_tensor clamps the group range at 1e-5 so all-zero groups get a finite scale.
MIN_ABSMAX = 1e-5
# ONNX and the CUDA kernels store fp16 scales (contracts.md); rounding here makes the torch reference
# dequantize to exactly the weights the engines see.
SCALE_STORAGE_DTYPE = torch.float16


class QuantConfigError(VilaEdgeError):
    """A quantization setting does not fit a layer (e.g. K not a multiple of the group size)."""


class QuantizedWeight(NamedTuple):
    codes: Tensor   # int8 [N, K], values in [-8, 7]
    scales: Tensor  # float32 [N, K // G]

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]


@dataclass
class QuantizedLLM:
    """A decoder LLM with int4 linears. `state_dict` holds every float tensor of the model (folded
    norms, embeddings, lm_head, biases) except the weights of the linears in `linears`."""
    state_dict: dict[str, Tensor]
    linears: dict[str, QuantizedWeight]  # "model.layers.0.self_attn.q_proj" -> (codes, scales)
    method: str                          # "rtn" | "awq"
    group: int                           # requested G; a linear's own G is linears[name].group


def resolve_group(name: str, k: int, group: int, auto_group: bool) -> int:
    """G for a layer with K inputs: `group` if it divides K, else (auto_group only) the largest power
    of two <= group and >= 16 dividing K (SmolLM2: K=576 -> 64)."""
    if k % group == 0:
        return group
    if not auto_group:
        raise QuantConfigError(f"{name}: in_features K={k} is not a multiple of group size G={group}; "
                               f"pass auto_group=True or choose a G that divides {k}")
    g = 1 << (group.bit_length() - 1)
    while g >= MIN_AUTO_GROUP:
        if k % g == 0:
            return g
        g //= 2
    raise QuantConfigError(f"{name}: no power-of-two group size in [{MIN_AUTO_GROUP}, {group}] divides K={k}")


def quantize_symmetric(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (codes int8 [N, K] in [-8, 7], scales float32 [N, K // group])."""
    n, k = w.shape
    if k % group:
        raise QuantConfigError(f"K={k} is not a multiple of group size G={group}")
    wg = w.detach().float().reshape(n, k // group, group)  # (N, K/G, G)
    absmax = wg.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX)  # (N, K/G, 1)
    scales = (absmax / INT4_MAX).to(SCALE_STORAGE_DTYPE).float()
    codes = torch.clamp(torch.round(wg / scales), INT4_MIN, INT4_MAX).to(torch.int8)
    return codes.reshape(n, k), scales.reshape(n, k // group)


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """(codes [N, K], scales [N, K/G]) -> float32 [N, K]."""
    n, k = codes.shape
    groups = scales.shape[1]
    wg = codes.float().reshape(n, groups, k // groups) * scales.float().reshape(n, groups, 1)  # (N, K/G, G)
    return wg.reshape(n, k)


def pseudo_quantize(w: Tensor, group: int) -> Tensor:
    """dequantize(quantize_symmetric(w)), in w's dtype: the weight the engine will compute with."""
    return dequantize(*quantize_symmetric(w, group)).to(w.dtype)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears that get int4 weights: every nn.Linear inside the decoder layers. Embeddings and
    lm_head stay fp16, as in llm-awq (it quantizes only the decoder blocks) and ModelOpt
    (nodes_to_exclude=['/lm_head']): the vocab projection is the most error-sensitive layer and
    SmolLM2/VILA tie it to the embedding table that must stay float anyway."""
    return {f"model.layers.{i}.{name}": m
            for i, layer in enumerate(model.model.layers)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def quantize_linears(model: nn.Module, group: int = DEFAULT_GROUP, auto_group: bool = False,
                     method: str = "rtn") -> QuantizedLLM:
    """Quantize the decoder linears of `model` as they are now (model is not modified)."""
    linears = {}
    for name, lin in decoder_linears(model).items():
        g = resolve_group(name, lin.in_features, group, auto_group)
        linears[name] = QuantizedWeight(*quantize_symmetric(lin.weight, g))
    skip = {f"{name}.weight" for name in linears}
    state, copies = {}, {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        if t.data_ptr() not in copies:  # one copy per storage: tied embeddings / lm_head stay tied
            copies[t.data_ptr()] = t.detach().clone()
        state[key] = copies[t.data_ptr()]
    return QuantizedLLM(state, linears, method, group)


def rtn_quantize(model: nn.Module, group: int = DEFAULT_GROUP, auto_group: bool = False) -> QuantizedLLM:
    """Round-to-nearest baseline: the symmetric quantizer with no scale or clip search."""
    return quantize_linears(model, group, auto_group, method="rtn")


def apply_quantized(model: nn.Module, qllm: QuantizedLLM) -> nn.Module:
    """A copy of `model` carrying qllm's float tensors, whose quantized linears hold the dequantized
    weights: the quantized torch reference that the int4 engines are compared against."""
    out = copy.deepcopy(model)
    missing, unexpected = out.load_state_dict(qllm.state_dict, strict=False)
    expected_missing = {f"{name}.weight" for name in qllm.linears}
    if unexpected or set(missing) - expected_missing:
        raise KeyError(f"QuantizedLLM does not match the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
                       f"unexpected {unexpected[:5]}")
    targets = decoder_linears(out)
    with torch.no_grad():
        for name, qw in qllm.linears.items():
            lin = targets[name]
            lin.weight.copy_(dequantize(qw.codes, qw.scales).to(lin.weight.dtype))
    return out.eval()
