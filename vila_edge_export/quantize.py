"""Symmetric group-wise int4/int8 weights (docs/contracts.md "Int4 weights") and round-to-nearest (RTN).

W[N, K] is cut into groups of G consecutive input channels per output row. Each group gets
s = absmax / qmax and codes q = clamp(round(w / s), qmin, qmax) (int4: s = absmax / 7, q in [-8, 7];
int8: s = absmax / 127, q in [-127, 127]), so W ~= codes * scales[:, k // G].
RTN is this quantizer applied to every decoder linear (int4) and to lm_head (int8 by default) with no
search; AWQ (vila_edge_export/awq.py) rescales and clips the float weights first and then calls the same
`quantize_linears`.
"""
import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vila_edge_export.options import DEFAULT_GROUP, DEFAULT_LM_HEAD_BITS, LM_HEAD_BITS  # noqa: F401
from vila_edge.errors import QuantConfigError  # noqa: F401 (re-exported)
from vila_edge.int4 import INT4_MAX, INT4_MIN, MIN_ABSMAX

# Symmetric int8 leaves -128 out, so the code range is symmetric about zero (absmax maps to +-127).
INT8_MIN, INT8_MAX = -127, 127
CODE_RANGE = {4: (INT4_MIN, INT4_MAX), 8: (INT8_MIN, INT8_MAX)}
LM_HEAD = "lm_head"
MIN_AUTO_GROUP = 16
# ONNX and the CUDA kernels store fp16 scales (contracts.md); rounding here makes the torch reference
# dequantize to exactly the weights the engines see.
SCALE_STORAGE_DTYPE = torch.float16
# Quantized engines store the embedding table in fp16 (contracts.md); the reference rounds it the same way.
EMBED_STORAGE_DTYPE = torch.float16
EMBED_KEY = "model.embed_tokens.weight"


class QuantizedWeight(NamedTuple):
    codes: Tensor   # int8 [N, K], values in CODE_RANGE[bits]
    scales: Tensor  # float32 [N, K // G]
    bits: int = 4
    zeros: Tensor | None = None   # int8 [N, K // G] in CODE_RANGE[bits] (zero point); None: symmetric

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]


@dataclass
class QuantizedLLM:
    """A decoder LLM with int4 linears (and an int8/int4 lm_head unless lm_head_bits is 0).
    `state_dict` holds every float tensor of the model (folded norms, the fp16-rounded embeddings,
    biases, a float lm_head) except the weights of the linears in `linears`."""
    state_dict: dict[str, Tensor]
    linears: dict[str, QuantizedWeight]  # "model.layers.0.self_attn.q_proj" / "lm_head" -> (codes, scales, bits)
    method: str                          # "rtn" | "awq" | "gptq" | "awq+gptq" | "range" (range search alone)
    group: int                           # requested G; a linear's own G is linears[name].group
    lm_head_bits: int = DEFAULT_LM_HEAD_BITS
    zero_point: bool = False             # int4 decoder linears with a zero point per group


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


def quantize_symmetric(w: Tensor, group: int, bits: int = 4) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (codes int8 [N, K] in CODE_RANGE[bits], scales float32 [N, K // group])."""
    n, k = w.shape
    if k % group:
        raise QuantConfigError(f"K={k} is not a multiple of group size G={group}")
    if bits not in CODE_RANGE:
        raise QuantConfigError(f"bits={bits} unsupported; expected one of {sorted(CODE_RANGE)}")
    qmin, qmax = CODE_RANGE[bits]
    wg = w.detach().float().reshape(n, k // group, group)  # (N, K/G, G)
    absmax = wg.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX)  # (N, K/G, 1)
    scales = (absmax / qmax).to(SCALE_STORAGE_DTYPE).float()
    codes = torch.clamp(torch.round(wg / scales), qmin, qmax).to(torch.int8)
    return codes.reshape(n, k), scales.reshape(n, k // group)


def quantize_asymmetric(w: Tensor, group: int, bits: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (codes, scales, zeros): W ~= (codes - zeros[:, k // G]) * scales[:, k // G], the
    group's range mapped onto all 2^bits codes (llm-awq's zero-point quantizer), codes and zeros stored
    signed in CODE_RANGE[bits] (the unsigned code is signed + 2^(bits-1)). The range always includes 0,
    as ORT's MatMul4BitsQuantizer does, so the zero point is a code: a group of one sign is not
    crushed onto the code range's end."""
    n, k = w.shape
    if k % group:
        raise QuantConfigError(f"K={k} is not a multiple of group size G={group}")
    qmin, qmax = CODE_RANGE[bits]
    wg = w.detach().float().reshape(n, k // group, group)
    lo, hi = wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scales = ((hi - lo).clamp(min=MIN_ABSMAX) / (qmax - qmin)).to(SCALE_STORAGE_DTYPE).float()
    zeros = torch.clamp(qmin - torch.round(lo / scales), qmin, qmax)
    codes = torch.clamp(torch.round(wg / scales) + zeros, qmin, qmax).to(torch.int8)
    return codes.reshape(n, k), scales.reshape(n, k // group), zeros.to(torch.int8).reshape(n, k // group)


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """(codes [N, K], scales [N, K/G], zeros [N, K/G] or None) -> float32 [N, K]."""
    n, k = codes.shape
    groups = scales.shape[1]
    wg = codes.float().reshape(n, groups, k // groups)
    if zeros is not None:
        wg = wg - zeros.float().reshape(n, groups, 1)
    return (wg * scales.float().reshape(n, groups, 1)).reshape(n, k)  # (N, K/G, G) -> (N, K)


def quantize_group(w: Tensor, group: int, bits: int = 4, zero_point: bool = False) -> QuantizedWeight:
    if zero_point:
        codes, scales, zeros = quantize_asymmetric(w, group, bits)
        return QuantizedWeight(codes, scales, bits, zeros)
    return QuantizedWeight(*quantize_symmetric(w, group, bits), bits)


def pseudo_quantize(w: Tensor, group: int, zero_point: bool = False) -> Tensor:
    """The int4 weight the engine will compute with, in w's dtype."""
    q = quantize_group(w, group, 4, zero_point)
    return dequantize(q.codes, q.scales, q.zeros).to(w.dtype)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears that get int4 weights: every nn.Linear inside the decoder layers. lm_head is
    quantized on its own (`lm_head_bits`), int8 by default where llm-awq and ModelOpt
    (nodes_to_exclude=['/lm_head']) keep it fp16: the vocab projection is the most error-sensitive
    layer, and int8 group-wise keeps it close to float (the quality report measures it)."""
    return {f"model.layers.{i}.{name}": m
            for i, layer in enumerate(model.model.layers)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def linear_groups(model: nn.Module, group: int, auto_group: bool, plan: dict | None = None) -> dict[str, int]:
    """G of every decoder linear: plan's G for its name ("model.layers.3.mlp.down_proj", an allocated plan,
    bit_alloc.py) or its kind (the last part of its name, "down_proj"), else `group`, resolved against
    its K (resolve_group). The graphs read G per linear (MatMulNBits block_size per node), so they may differ."""
    plan = plan or {}
    return {name: resolve_group(name, lin.in_features, plan.get(name, plan.get(name.rsplit(".", 1)[-1], group)),
                                auto_group)
            for name, lin in decoder_linears(model).items()}


def _bits_per_weight(bits: int, group: int, zero_point: bool) -> float:
    return bits + (16 + (bits if zero_point else 0)) / group     # codes + fp16 scale (+ zero point)


def int8_linears(model: nn.Module, group: int, auto_group: bool, zero_point: bool, max_bpw: float | None,
                 plan: dict | None = None) -> list:
    """Decoder linears that get int8 (symmetric) instead of int4 so that the decoder's bits per weight
    stay <= max_bpw: mlp.down_proj of the layers at both ends of the stack, outermost first (0, L-1,
    1, L-2, ...), as many as the budget holds. The first and last layers are the most sensitive to
    quantization (llama.cpp's Q4_K_M gives ffn_down of the outer layers 6 bits, use_more_bits), and
    down_proj is not fused with another linear in the graph. None or a budget the int4 weights already
    exceed: no int8 linears. plan: G per linear kind (linear_groups)."""
    if max_bpw is None:
        return []
    lins = decoder_linears(model)
    groups = linear_groups(model, group, auto_group, plan)
    sizes = {n: lin.weight.numel() for n, lin in lins.items()}
    total = sum(sizes.values())
    bits = sum(sizes[n] * _bits_per_weight(4, groups[n], zero_point) for n in lins)
    n_layers = len(model.model.layers)
    order = [i for pair in zip(range(n_layers), reversed(range(n_layers))) for i in pair][:n_layers]
    chosen = []
    for i in dict.fromkeys(order):
        name = f"model.layers.{i}.mlp.down_proj"
        g = groups[name]
        extra = sizes[name] * (_bits_per_weight(8, g, False) - _bits_per_weight(4, g, zero_point))
        if (bits + extra) / total > max_bpw:
            break
        bits += extra
        chosen.append(name)
    return chosen


def quantized_targets(model: nn.Module, lm_head_bits: int, int8: tuple = ()) -> dict[str, tuple[nn.Linear, int]]:
    """name -> (linear, bits): the decoder linears at 4 bits (8 for those in `int8`), plus lm_head
    unless lm_head_bits is 0."""
    if lm_head_bits not in LM_HEAD_BITS:
        raise QuantConfigError(f"lm_head_bits={lm_head_bits} unsupported; expected one of {LM_HEAD_BITS}")
    targets = {name: (lin, 8 if name in int8 else 4) for name, lin in decoder_linears(model).items()}
    if lm_head_bits:
        targets[LM_HEAD] = (model.lm_head, lm_head_bits)
    return targets


def quantize_linears(model: nn.Module, group: int = DEFAULT_GROUP, auto_group: bool = False,
                     method: str = "rtn", lm_head_bits: int = DEFAULT_LM_HEAD_BITS,
                     zero_point: bool = False, int8: tuple = (), rounded: dict | None = None,
                     plan: dict | None = None) -> QuantizedLLM:
    """Quantize the decoder linears (and lm_head) of `model` as they are now (model is not modified).
    A tied lm_head is quantized from the float embedding table; the table itself stays float, rounded
    to EMBED_STORAGE_DTYPE. `rounded`: linears already quantized (GPTQ), taken as they are. plan: G per
    decoder linear kind (linear_groups); lm_head takes `group`."""
    linears = dict(rounded or {})
    groups = linear_groups(model, group, auto_group, plan)
    for name, (lin, bits) in quantized_targets(model, lm_head_bits, tuple(int8)).items():
        if name in linears:
            continue
        g = groups.get(name) or resolve_group(name, lin.in_features, group, auto_group)
        # int8 (lm_head, the int8 decoder linears) stays symmetric: it needs no zero point to stay close to float
        linears[name] = quantize_group(lin.weight, g, bits, zero_point and bits == 4)
    skip = {f"{name}.weight" for name in linears}
    state, copies = {}, {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        if t.data_ptr() not in copies:  # one copy per storage: tied embeddings / float lm_head stay tied
            copies[t.data_ptr()] = t.detach().clone()
        state[key] = copies[t.data_ptr()]
    with torch.no_grad():               # in place: a float lm_head tied to the table is rounded with it
        state[EMBED_KEY].copy_(state[EMBED_KEY].to(EMBED_STORAGE_DTYPE))
    return QuantizedLLM(state, linears, method, group, lm_head_bits, zero_point)


def rtn_quantize(model: nn.Module, group: int = DEFAULT_GROUP, auto_group: bool = False,
                 lm_head_bits: int = DEFAULT_LM_HEAD_BITS, zero_point: bool = False, int8: tuple = (),
                 plan: dict | None = None) -> QuantizedLLM:
    """Round-to-nearest baseline: the quantizer with no scale or clip search."""
    return quantize_linears(model, group, auto_group, method="rtn", lm_head_bits=lm_head_bits, zero_point=zero_point,
                            int8=int8, plan=plan)


def apply_quantized(model: nn.Module, qllm: QuantizedLLM, in_place: bool = False) -> nn.Module:
    """A copy of `model` carrying qllm's float tensors, whose quantized linears hold the dequantized
    weights: the quantized torch reference that the int4 engines are compared against. in_place:
    `model` itself becomes that reference (no second copy of a multi-GB model)."""
    out = model if in_place else copy.deepcopy(model)
    missing, unexpected = out.load_state_dict(qllm.state_dict, strict=False)
    expected_missing = {f"{name}.weight" for name in qllm.linears}
    if unexpected or set(missing) - expected_missing:
        raise KeyError(f"QuantizedLLM does not match the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
                       f"unexpected {unexpected[:5]}")
    targets = quantized_targets(out, qllm.lm_head_bits)
    with torch.no_grad():
        for name, qw in qllm.linears.items():
            lin = targets[name][0]
            # A new Parameter, not copy_: a tied lm_head would otherwise overwrite the embedding table.
            lin.weight = nn.Parameter(dequantize(qw.codes, qw.scales, qw.zeros).to(lin.weight.dtype),
                                      requires_grad=False)
    return out.eval()
