"""llm.onnx: a Llama/Qwen2 decoder on input embeddings with a paged KV cache (docs/contracts.md).

Per step the graph takes the sequence's past K/V rows (`past_k_l`, `past_v_l` [P, Hkv, D]: zero-copy
views of the paged pool when the sequence's blocks are consecutive, vila_edge/llm.py), attends over
[past ; new] with a mask built from `past_len`, and returns the new K/V rows for the runtime to write
into the pool. Only standard ops, so TensorRT 10.3's parser takes it
(onnx/onnx-tensorrt@10.1-GA:docs/operators.md). Precision follows transformers' eager Llama: RMSNorm variance
and softmax in fp32, everything else in the graph dtype.
"""
from typing import NamedTuple

import numpy as np

from vila_edge_export.checkpoint import LLMSpec
from vila_edge_export.onnx_graph import Graph
from vila_edge_export.quantize import LM_HEAD
from vila_edge_export.onnx_vila_u import head_rows

# Additive mask value for excluded keys: finite, so a fully masked row could never produce NaN.
MASK_VALUE = float(np.finfo(np.float32).min)
# A Slice end past any axis: "to the end" (ONNX clamps it to the axis length).
SLICE_END = np.iinfo(np.int64).max


class _Shared(NamedTuple):
    """Values computed once per forward pass, before the layer loop, and read by every layer."""
    cos: str         # (T, 1, D) graph dtype
    signed_sin: str  # (T, 1, D) graph dtype, rotate_half's sign folded in
    mask: str        # (rep*T, P+T) fp32 additive; row r*T + t
    n_past: str      # [P] int64: past rows given per layer (the key axis is [P past rows ; T new rows])


def _rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32, written as Pow -> ReduceMean(last axis)
    -> Add -> Sqrt -> Div -> Mul(1-D weight): the pattern ORT's SimplifiedLayerNormFusion turns into one
    SimplifiedLayerNormalization (fp32 on CPU; onnxruntime/core/optimizer/layer_norm_fusion.cc), while
    the file keeps standard ops for TensorRT."""
    xf = g.to_float32(x)
    var = g.op("ReduceMean", [g.op("Pow", [xf, g.const(2.0, "float32")]), g.const([-1])], keepdims=1)
    normed = g.op("Div", [xf, g.op("Sqrt", [g.op("Add", [var, g.const(eps, "float32")])])])
    return g.op("Mul", [g.from_float32(normed), g.weight(name, weight)])


def _rope_tables(g: Graph, spec: LLMSpec, position_ids: str) -> tuple:
    """cos and signed sin [T, 1, D] in the graph dtype, computed in fp32 as HF's rotary embedding does,
    once per step for every layer. sin carries rotate_half's sign: rotate_half(x) * sin = [-x2, x1] *
    [s, s] = [x2, x1] * [-s, s], exactly (a sign flip rounds nothing)."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv_freq = inv_freq / np.float32(spec.rope_scale)           # linear scaling: (pos / s) * f
    pos = g.op("Cast", [g.reshape(position_ids, [-1, 1])], to=1)              # (T, 1) fp32
    freqs = g.op("Mul", [pos, g.const(inv_freq[None, :], "float32")])         # (T, D/2)
    emb = g.reshape(g.op("Concat", [freqs, freqs], axis=-1), [-1, 1, d])      # (T, 1, D)
    sign = np.concatenate([-np.ones(d // 2), np.ones(d // 2)])                 # (D,)
    sin = g.op("Mul", [g.op("Sin", [emb]), g.const(sign, "float32")])
    return g.from_float32(g.op("Cos", [emb])), g.from_float32(sin)


def _rotate(g: Graph, x: str, cos: str, signed_sin: str, d: int) -> str:
    """x * cos + rotate_half(x) * sin, x: [T, heads, D]: the halves swapped by one Gather, the sign in sin."""
    swapped = g.op("Gather", [x, g.const(np.roll(np.arange(d), d // 2))], axis=-1)   # [x2, x1]
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [swapped, signed_sin])])


def _mask(g: Graph, past_len: str, n_past_rows: str, n_new: str) -> str:
    """Additive fp32 mask [T, P + T]: past rows valid below past_len, new rows causal."""
    past_idx = g.op("Range", [g.const(0), n_past_rows, g.const(1)])                      # (P,)
    past_ok = g.op("Less", [past_idx, past_len])                                          # (P,)
    new_idx = g.op("Range", [g.const(0), n_new, g.const(1)])                              # (T,)
    causal = g.op("LessOrEqual", [g.reshape(new_idx, [1, -1]), g.reshape(new_idx, [-1, 1])])  # (T, T)
    shape = g.op("Concat", [g.reshape(n_new, [1]), g.reshape(n_past_rows, [1])], axis=0)
    past_ok = g.op("Expand", [g.reshape(past_ok, [1, -1]), shape])                        # (T, P)
    ok = g.op("Concat", [past_ok, causal], axis=1)                                        # (T, P+T)
    return g.op("Where", [ok, g.const(0.0, "float32"), g.const(MASK_VALUE, "float32")])


def _concat_linears(w: dict, quant: dict, names: list) -> tuple:
    """(weight, bias, quant) of one linear computing the linears `names` (same input) side by side:
    rows concatenated along N. int4 codes and scales concatenate exactly since groups run along K."""
    qs = [quant.get(n) for n in names]
    if any(q is not None for q in qs):
        zeros = [q[4] if len(q) > 4 else None for q in qs if q is not None]
        if (any(q is None for q in qs) or len({q[2:4] for q in qs}) != 1
                or len({z is None for z in zeros}) != 1):
            raise ValueError(f"{names}: fused linears need the same quantization (group size, bits, zero point)")
        fused_q = (np.concatenate([q[0] for q in qs]), np.concatenate([q[1] for q in qs])) + qs[0][2:4]
        if zeros[0] is not None:                                        # zero points run along N too
            fused_q += (np.concatenate(zeros),)
        weight = None
    else:
        fused_q, weight = None, np.concatenate([w[n + ".weight"] for n in names])
    biases = [w.get(n + ".bias") for n in names]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError(f"{names}: fused linears need a bias on all or none of them")
    bias = None if biases[0] is None else np.concatenate(biases)
    return weight, bias, fused_q


def _fused_linear(g: Graph, x: str, w: dict, quant: dict, prefix: str, names: list) -> str:
    """The linears prefix+names on the same x as one MatMul (one MatMulNBits in ORT); output [..., sum N]."""
    weight, bias, q = _concat_linears(w, quant, [prefix + n for n in names])
    return g.linear(x, prefix + "_".join(n.removesuffix("_proj") for n in names) + "_proj", weight, bias, q)


def _attention(g: Graph, spec: LLMSpec, h: str, w: dict, l: int, shared: _Shared, io: dict, quant):
    hq, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
    p = f"model.layers.{l}.self_attn."
    qkv = g.reshape(_fused_linear(g, h, w, quant, p, ["q_proj", "k_proj", "v_proj"]), [-1, hq + 2 * hkv, d])
    qk, v = g.op("Split", [qkv, g.const([hq + hkv, hkv])], axis=1, out=[None, f"v_new_{l}"])  # (T, Hq+Hkv | Hkv, D)
    q, k = g.op("Split", [_rotate(g, qk, shared.cos, shared.signed_sin, d), g.const([hq, hkv])], axis=1,
                out=[None, f"k_new_{l}"])                                  # RoPE on q and k at once: (T, Hq | Hkv, D)
    g.output(k, k, g.dtype, ["T", hkv, d])
    g.output(v, v, g.dtype, ["T", hkv, d])
    past_k, past_v = io[f"past_k_{l}"], io[f"past_v_{l}"]                       # (P, Hkv, D)
    q = g.reshape(g.op("Transpose", [q], perm=[1, 0, 2]), [hkv, -1, d])          # (Hkv, rep*T, D): head = kv*rep + r
    # Pool rows and new rows are attended by two MatMuls, not one over their Concat: no per-layer copy
    # of the whole past (it grows with the context). ORT folds the Transposes and the scale into
    # FusedMatMul.
    keys = lambda x: g.op("Transpose", [x], perm=[1, 2, 0])                       # (S', Hkv, D) -> (Hkv, D, S')
    vals = lambda x: g.op("Transpose", [x], perm=[1, 0, 2])                       # (S', Hkv, D) -> (Hkv, S', D)
    scaled = lambda x: g.op("Mul", [g.op("MatMul", [q, keys(x)]), g.scalar(d ** -0.5)])
    scores = g.op("Concat", [scaled(past_k), scaled(k)], axis=-1)                 # (Hkv, rep*T, P+T)
    probs = g.from_float32(g.op("Softmax", [g.op("Add", [g.to_float32(scores), shared.mask])], axis=-1))
    probs_past = g.op("Slice", [probs, g.const([0]), shared.n_past, g.const([-1])])            # (Hkv, rep*T, P)
    probs_new = g.op("Slice", [probs, shared.n_past, g.const([SLICE_END]), g.const([-1])])     # (Hkv, rep*T, T)
    ctx = g.op("Add", [g.op("MatMul", [probs_past, vals(past_v)]), g.op("MatMul", [probs_new, vals(v)])])
    ctx = g.reshape(g.op("Transpose", [g.reshape(ctx, [hq, -1, d])], perm=[1, 0, 2]), [1, -1, hq * d])
    return g.linear(ctx, p + "o_proj", w.get(p + "o_proj.weight"), None, quant.get(p + "o_proj"))


def _mlp(g: Graph, spec: LLMSpec, h: str, w: dict, l: int, quant) -> str:
    p = f"model.layers.{l}.mlp."
    gate, up = g.op("Split", [_fused_linear(g, h, w, quant, p, ["gate_proj", "up_proj"]),
                              g.const([spec.intermediate] * 2)], axis=-1, n_out=2)     # (1, T, I) each
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])                            # SiLU
    return g.linear(g.op("Mul", [act, up]), p + "down_proj", w.get(p + "down_proj.weight"), None,
                    quant.get(p + "down_proj"))


def lm_head_rows(weights: dict, quant: dict) -> int:
    """Rows of the vocab projection (the logits size): lm_head's own, else the tied embedding table's."""
    if LM_HEAD in quant:
        return quant[LM_HEAD][0].shape[0]
    return weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).shape[0]


def llm_inputs(g: Graph, spec: LLMSpec, dtype: str) -> dict:
    """The LLM graph's inputs, the same in every variant (docs/contracts.md): embeddings [1, T, C],
    positions, the past length and per layer the past K/V rows [P, Hkv, D]."""
    io = {"inputs_embeds": g.input("inputs_embeds", dtype, [1, "T", spec.hidden]),
          "position_ids": g.input("position_ids", "int64", [1, "T"]),
          "past_len": g.input("past_len", "int64", [])}
    for l in range(spec.layers):
        for kv in "kv":
            io[f"past_{kv}_{l}"] = g.input(f"past_{kv}_{l}", dtype, ["P", spec.kv_heads, spec.head_dim])
    return io


def build_llm(spec: LLMSpec, weights: dict, dtype: str, quant: dict | None = None, hidden_output: bool = False) -> Graph:
    """`weights`: HF state dict as numpy fp32; `quant`: linear name -> (codes, scales, group, bits),
    "lm_head" included when the vocab projection is quantized (its float weight is then absent)."""
    quant = quant or {}
    g = Graph("vila_edge_llm", dtype)
    hkv = spec.kv_heads
    io = llm_inputs(g, spec, dtype)
    x = io["inputs_embeds"]
    n_new = g.op("Gather", [g.op("Shape", [x]), g.const(1)], axis=0)                     # scalar T
    n_past = g.op("Gather", [g.op("Shape", [io["past_k_0"]]), g.const(0)], axis=0)         # scalar P
    mask = _mask(g, io["past_len"], n_past, n_new)                                        # (T, S)
    mask = g.op("Tile", [mask, g.const([spec.heads // hkv, 1])])                          # (rep*T, S): row r*T + t
    shared = _Shared(*_rope_tables(g, spec, io["position_ids"]), mask, g.reshape(n_past, [1]))
    for l in range(spec.layers):
        p = f"model.layers.{l}."
        h = _rms_norm(g, x, weights[p + "input_layernorm.weight"], spec.rms_eps, p + "input_layernorm.weight")
        x = g.op("Add", [x, _attention(g, spec, h, weights, l, shared, io, quant)])
        h = _rms_norm(g, x, weights[p + "post_attention_layernorm.weight"], spec.rms_eps,
                      p + "post_attention_layernorm.weight")
        x = g.op("Add", [x, _mlp(g, spec, h, weights, l, quant)])
    last = g.op("Slice", [x, g.const([-1]), g.const([SLICE_END]), g.const([1])])       # (1, 1, C)
    h = _rms_norm(g, last, weights["model.norm.weight"], spec.rms_eps, "model.norm.weight")
    head = None if LM_HEAD in quant else weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    head_in = head_rows(g, h) if hidden_output else h    # VILA-U: lm_head skippable (onnx_vila_u.head_rows)
    logits = g.linear(head_in, LM_HEAD, head, None, quant.get(LM_HEAD))      # (1, r, V)
    g.output(g.to_float32(g.reshape(logits, [-1, lm_head_rows(weights, quant)])), "logits", "float32",
             ["R" if hidden_output else 1, lm_head_rows(weights, quant)])
    if hidden_output:     # VILA-U: the depth transformer reads the final-norm hidden state
        g.output(g.to_float32(g.reshape(h, [1, -1])), "hidden", "float32", [1, spec.hidden])
    return g
