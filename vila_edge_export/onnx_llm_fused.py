"""llm.onnx for ONNX Runtime targets: the decoder of onnx_llm.py written with ORT's contrib ops.

Same inputs and outputs as the standard-op graph (docs/contracts.md: inputs_embeds, position_ids,
past_len, past_k_l/past_v_l [P, Hkv, D] rows of the paged pool; logits, k_new_l/v_new_l), so the
runtime's paged KV cache, prefix reuse and image-content keys are unchanged. What changes is the op
count per layer, which bounds decode speed on small models (per-op dispatch, not bandwidth):
  MatMulNBits                        int4/int8 weights, one per fused linear (q|k|v, gate|up, o, down,
                                     lm_head), block size and bits taken from each quantized tensor;
  SimplifiedLayerNormalization,      RMSNorm, and the residual add folded into the next RMSNorm
  SkipSimplifiedLayerNormalization   (as ORT GenAI's builder writes Llama: onnxruntime-genai@v0.18.0:
                                     src/python/py/models/builder.py make_layernorm);
  RotaryEmbedding                    on q and k at once, from cos/sin caches of max_positions rows.
fp16 graphs keep the standard-op RMSNorm and RoPE (HF's fp16 roundings; see _skip_norm).
Attention stays standard ops over the pool's rows: ORT's fused attention ops on CPU
(GroupQueryAttention, MultiHeadAttention) read the past as one [B, Hkv, P, D] tensor, which the
paged pool [NB, BS, Hkv, D] only yields by a copy of the whole context per layer and step, and
PagedAttention, which reads our pool layout, is CUDA-only in ORT 1.32.
"""
import numpy as np

from vila_edge_export.checkpoint import LLMSpec
from vila_edge_export.onnx_graph import Graph
from vila_edge_export.onnx_llm import SLICE_END, _concat_linears, _mask, _rms_norm, _rope_tables, _rotate, llm_inputs, lm_head_rows
from vila_edge_export.quantize import LM_HEAD
from vila_edge_export.onnx_vila_u import head_rows

MS = "com.microsoft"
# MatMulNBits activations quantized to int8 per block (onnxruntime contrib_defs MatMulNBits:
# accuracy_level 4), the fastest CPU path, is the default; the session option in vila_edge/backend.py
# sets the same level for the standard graph's DequantizeLinear -> MatMul, so both variants compute
# the same thing. 0 keeps activations float (tests compare against the torch reference at 1e-4).
DEFAULT_ACCURACY_LEVEL = 4


def _pack_nbits(codes: np.ndarray, group: int, bits: int) -> tuple:
    """Codes int8 [N, K] (signed code range) -> MatMulNBits' B uint8 [N, K/G, G*bits/8] with the default zero
    point 2^(bits-1) added (unsigned codes), int4 two per byte, the even k in the low nibble."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // group, group)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(u)


def _pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points int8 [N, K/G] (in the signed code range, W = (codes - zeros) * scales) -> MatMulNBits'
    zero_points uint8 [N * ceil(K/G * bits / 8)]: shifted by 2^(bits-1) like the codes (B - zp is then
    codes - zeros), int4 two blocks per byte, the even block in the low nibble, each row padded to a
    whole byte (onnxruntime contrib_defs MatMulNBits; onnxruntime.quantization matmul_nbits_quantizer
    packs its zero points the same way)."""
    u = (zeros.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        if u.shape[1] % 2:
            u = np.pad(u, ((0, 0), (0, 1)), constant_values=8)         # the pad nibble: no block reads it
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return np.ascontiguousarray(u).reshape(-1)


def linear(g: Graph, x: str, name: str, weight, bias=None, quant=None, accuracy_level=DEFAULT_ACCURACY_LEVEL) -> str:
    """x @ W.T (+ b): MatMulNBits for a quantized weight (codes [N, K], scales [N, K/G], G, bits[, zeros
    int8 [N, K/G]]: W = (codes - zeros) * scales, symmetric without), a MatMul on [K, N] otherwise."""
    if quant is None:
        y = g.op("MatMul", [x, g.weight(name + ".weight", np.asarray(weight).T)])
    else:
        codes, scales, group, bits = quant[:4]
        zeros = quant[4] if len(quant) > 4 else None
        n, k = codes.shape
        inputs = [x, g.init(name + ".qweight", _pack_nbits(np.asarray(codes), group, bits)),
                  g.weight(name + ".scales", np.asarray(scales).reshape(-1))]       # (N * K/G,)
        if zeros is not None:
            inputs.append(g.init(name + ".zero_points", _pack_zero_points(np.asarray(zeros), bits)))
        y = g.op("MatMulNBits", inputs, domain=MS, K=k, N=n, bits=bits, block_size=group,
                 accuracy_level=accuracy_level)
    return y if bias is None else g.op("Add", [y, g.weight(name + ".bias", bias)])


def _fused_linear(g: Graph, x: str, w: dict, quant: dict, prefix: str, names: list, level: int) -> str:
    weight, bias, q = _concat_linears(w, quant, [prefix + n for n in names])
    return linear(g, x, prefix + "_".join(n.removesuffix("_proj") for n in names) + "_proj", weight, bias, q, level)


def _rope_caches(g: Graph, spec: LLMSpec) -> tuple:
    """cos, sin [max_positions, D/2] in the graph dtype: HF's rotary frequencies, computed in fp32."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv_freq = inv_freq / np.float32(spec.rope_scale)           # linear scaling: (pos / s) * f
    freqs = np.arange(spec.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]   # (Pmax, D/2) fp32
    return g.weight("rope.cos", np.cos(freqs)), g.weight("rope.sin", np.sin(freqs))


def _attention(g: Graph, spec: LLMSpec, h: str, w: dict, l: int, shared: dict, io: dict, quant, level: int) -> str:
    hq, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
    p = f"model.layers.{l}.self_attn."
    qkv = _fused_linear(g, h, w, quant, p, ["q_proj", "k_proj", "v_proj"], level)          # (1, T, (Hq+2Hkv)*D)
    qk, v = g.op("Split", [qkv, g.const([(hq + hkv) * d, hkv * d])], axis=-1, n_out=2)
    if shared["hf_rounding"]:
        qk = _rotate(g, g.reshape(qk, [-1, hq + hkv, d]), shared["cos"], shared["sin"], d)
    else:
        qk = g.op("RotaryEmbedding", [qk, io["position_ids"], shared["cos"], shared["sin"]], domain=MS,
                  num_heads=hq + hkv, interleaved=0)                                # RoPE on q and k at once
        qk = g.reshape(qk, [-1, hq + hkv, d])                                       # (T, Hq+Hkv, D)
    q, k = g.op("Split", [qk, g.const([hq, hkv])], axis=1, out=[None, f"k_new_{l}"])
    v = g.op("Reshape", [v, g.const([-1, hkv, d])], out=f"v_new_{l}")              # (T, Hkv, D)
    g.output(k, k, g.dtype, ["T", hkv, d])
    g.output(v, v, g.dtype, ["T", hkv, d])
    past_k, past_v = io[f"past_k_{l}"], io[f"past_v_{l}"]                           # (P, Hkv, D)
    q = g.reshape(g.op("Transpose", [q], perm=[1, 0, 2]), [hkv, -1, d])              # (Hkv, rep*T, D)
    keys = lambda x: g.op("Transpose", [x], perm=[1, 2, 0])                           # (Hkv, D, S')
    vals = lambda x: g.op("Transpose", [x], perm=[1, 0, 2])                           # (Hkv, S', D)
    scaled = lambda x: g.op("Mul", [g.op("MatMul", [q, keys(x)]), g.scalar(d ** -0.5)])
    scores = g.op("Concat", [scaled(past_k), scaled(k)], axis=-1)                     # (Hkv, rep*T, P+T)
    probs = g.from_float32(g.op("Softmax", [g.op("Add", [g.to_float32(scores), shared["mask"]])], axis=-1))
    probs_past = g.op("Slice", [probs, g.const([0]), shared["n_past"], g.const([-1])])
    probs_new = g.op("Slice", [probs, shared["n_past"], g.const([SLICE_END]), g.const([-1])])
    ctx = g.op("Add", [g.op("MatMul", [probs_past, vals(past_v)]), g.op("MatMul", [probs_new, vals(v)])])
    ctx = g.reshape(g.op("Transpose", [g.reshape(ctx, [hq, -1, d])], perm=[1, 0, 2]), [1, -1, hq * d])
    return linear(g, ctx, p + "o_proj", w.get(p + "o_proj.weight"), None, quant.get(p + "o_proj"), level)


def _mlp(g: Graph, spec: LLMSpec, h: str, w: dict, l: int, quant, level: int) -> str:
    p = f"model.layers.{l}.mlp."
    gate, up = g.op("Split", [_fused_linear(g, h, w, quant, p, ["gate_proj", "up_proj"], level),
                              g.const([spec.intermediate] * 2)], axis=-1, n_out=2)  # (1, T, I) each
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])                               # SiLU
    return linear(g, g.op("Mul", [act, up]), p + "down_proj", w.get(p + "down_proj.weight"), None,
                  quant.get(p + "down_proj"), level)


def _skip_norm(g: Graph, x: str, skip: str, weight: np.ndarray, eps: float, name: str) -> tuple:
    """(rmsnorm(x + skip), x + skip): one SkipSimplifiedLayerNormalization, or in fp16 graphs the
    Add and the standard-op norm (HF's roundings: the sum rounded to fp16 before its statistics, the
    normed rows rounded before the weight; the contrib op does both in fp32 and flips close greedy
    picks of fp16 engines against the reference)."""
    if g.dtype == "float16":
        total = g.op("Add", [skip, x])
        return _rms_norm(g, total, weight, eps, name), total
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, skip, g.weight(name, weight)],
                               domain=MS, n_out=4, epsilon=eps)
    return normed, total


def build_llm_fused(spec: LLMSpec, weights: dict, dtype: str, quant: dict | None = None,
                    accuracy_level: int = DEFAULT_ACCURACY_LEVEL, hidden_output: bool = False) -> Graph:
    """As onnx_llm.build_llm (same arguments, same I/O), in ORT contrib ops; `accuracy_level`: every
    MatMulNBits' (fixed in the file: ORT has no session option for explicit MatMulNBits nodes)."""
    quant = quant or {}
    g = Graph("vila_edge_llm_fused", dtype)
    hkv = spec.kv_heads
    io = llm_inputs(g, spec, dtype)
    x = io["inputs_embeds"]
    n_new = g.op("Gather", [g.op("Shape", [x]), g.const(1)], axis=0)
    n_past = g.op("Gather", [g.op("Shape", [io["past_k_0"]]), g.const(0)], axis=0)
    mask = g.op("Tile", [_mask(g, io["past_len"], n_past, n_new), g.const([spec.heads // hkv, 1])])
    # fp16 graphs keep HF's fp16 roundings in RoPE and RMSNorm (see _skip_norm): standard ops there.
    hf_rounding = dtype == "float16"
    cos, sin = _rope_tables(g, spec, io["position_ids"]) if hf_rounding else _rope_caches(g, spec)
    shared = {"cos": cos, "sin": sin, "mask": mask, "n_past": g.reshape(n_past, [1]), "hf_rounding": hf_rounding}
    norm = lambda l, which: weights[f"model.layers.{l}.{which}.weight"]
    first = "model.layers.0.input_layernorm.weight"
    if hf_rounding:
        h = _rms_norm(g, x, norm(0, "input_layernorm"), spec.rms_eps, first)
    else:
        h = g.op("SimplifiedLayerNormalization", [x, g.weight(first, norm(0, "input_layernorm"))],
                 axis=-1, epsilon=spec.rms_eps, stash_type=1)
    for l in range(spec.layers):
        attn = _attention(g, spec, h, weights, l, shared, io, quant, accuracy_level)
        h, x = _skip_norm(g, attn, x, norm(l, "post_attention_layernorm"), spec.rms_eps,
                          f"model.layers.{l}.post_attention_layernorm.weight")
        mlp = _mlp(g, spec, h, weights, l, quant, accuracy_level)
        if l + 1 < spec.layers:
            h, x = _skip_norm(g, mlp, x, norm(l + 1, "input_layernorm"), spec.rms_eps,
                              f"model.layers.{l + 1}.input_layernorm.weight")
    last = lambda t: g.op("Slice", [t, g.const([-1]), g.const([SLICE_END]), g.const([1])])  # (1, 1, C)
    h, _ = _skip_norm(g, last(mlp), last(x), weights["model.norm.weight"], spec.rms_eps, "model.norm.weight")
    head = None if LM_HEAD in quant else weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    head_in = head_rows(g, h) if hidden_output else h    # VILA-U: lm_head skippable (onnx_vila_u.head_rows)
    logits = linear(g, head_in, LM_HEAD, head, None, quant.get(LM_HEAD), accuracy_level)  # (1, r, V)
    g.output(g.to_float32(g.reshape(logits, [-1, lm_head_rows(weights, quant)])), "logits", "float32",
             ["R" if hidden_output else 1, lm_head_rows(weights, quant)])
    if hidden_output:     # VILA-U: the depth transformer reads the final-norm hidden state
        g.output(g.to_float32(g.reshape(h, [1, -1])), "hidden", "float32", [1, spec.hidden])
    g.opsets = {MS: 1}
    return g
