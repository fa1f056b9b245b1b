"""llm.onnx for ONNX Runtime targets: the decoder of onnx_llm.py in ORT's contrib ops and our own
attention op, taking B sequences per pass (docs/contracts.md: `paged_inputs`).

The op count per layer bounds decode speed on small models (per-op dispatch, not bandwidth), so a
layer is 8 nodes (4 MatMulNBits, PagedAttention, 2 SkipSimplifiedLayerNormalization, SwiGLU):
  MatMulNBits                        int4/int8 weights, one per fused linear (q|k|v, gate|up, o, down,
                                     lm_head), block size and bits taken from each quantized tensor;
  SimplifiedLayerNormalization,      RMSNorm, and the residual add folded into the next RMSNorm
  SkipSimplifiedLayerNormalization   (as ORT GenAI's builder writes Llama: onnxruntime-genai@v0.18.0:
                                     src/python/py/models/builder.py make_layernorm);
  vila_edge::PagedAttention          (vila_edge/ops/csrc/paged_attention.cc) RoPE on q and k from
                                     cos/sin caches of max_positions rows, the new K/V written into
                                     the layer's pool blocks in place, causal GQA over the blocks;
  vila_edge::SwiGLU                  (vila_edge/ops/csrc/swiglu.h) silu(gate) * up of the packed gate|up.
ORT's own fused attention on CPU (GroupQueryAttention, MultiHeadAttention) reads the past as one
[B, Hkv, P, D] tensor, which the paged pool [NB, BS, Hkv, D] only yields by a copy of the whole
context per layer and step, and its PagedAttention is CUDA-only (ORT 1.32): hence our own op.
fp16 graphs keep the standard-op RMSNorm and RoPE (HF's fp16 roundings; see _skip_norm).
An int8 lm_head can be screened (`lm_head_screen` K, see screened_head): an int4 MatMulNBits over the
vocabulary, TopK K, and the K candidates rescored from their int8 rows, for about half the head's bytes.
"""
import numpy as np

from vila_edge_export.checkpoint import LLMSpec
from vila_edge_export.onnx_graph import Graph
from vila_edge.ops import DOMAIN as OPS_DOMAIN
from vila_edge_export.onnx_llm import _concat_linears, _rms_norm, _rope_tables, _rotate, lm_head_rows
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


def _screen_codes(codes: np.ndarray, scales: np.ndarray) -> tuple:
    """The int8 head (codes [V, K], scales [V, K/G]) requantized symmetric int4 with the same groups: the
    screen ranks what the int8 head computes, not the float weights it came from."""
    v, k = codes.shape
    w = codes.astype(np.float32).reshape(v, scales.shape[1], -1) * scales.astype(np.float32)[..., None]
    s4 = np.maximum(np.abs(w).max(-1), np.float32(1e-8)) / np.float32(7)                     # (V, K/G)
    return np.clip(np.round(w / s4[..., None]), -8, 7).astype(np.int8).reshape(v, k), s4


def screened_head(g: Graph, x: str, quant: tuple, k: int, level: int) -> str:
    """x (1, B, C) -> logits (1, B, V) of an int8 head (codes, scales, G, 8) in two stages: an int4
    MatMulNBits screen over the whole vocabulary (half the int8 head's bytes, the decode step's second
    largest read), TopK k of the screen, and the k candidates rescored exactly from their int8 rows
    (GatherBlockQuantized dequantizes them: (code + 128 - 128) * scale, the uint8 rows read against their
    default zero point 128 as MatMulNBits reads its 8-bit B; the activations stay float, where the
    unscreened head's MatMulNBits at accuracy_level 4 rounds them to int8 per block). The candidates'
    exact logits are scattered into the screen row: the graph still outputs a full row, and every logit
    outside the k candidates is the int4 approximation (samplers, grammar masks and logprobs read it;
    docs/contracts.md). The greedy pick is the int8 head's whenever its argmax is among the screen's top k."""
    codes, scales, group, bits = quant[:4]
    if bits != 8 or len(quant) > 4 and quant[4] is not None:
        raise ValueError(f"lm_head_screen needs a symmetric int8 lm_head, got {bits} bits")
    codes, scales = np.asarray(codes), np.asarray(scales)
    k = min(k, codes.shape[0])           # a vocabulary smaller than K: every row a candidate
    c4, s4 = _screen_codes(codes, scales)
    screen = linear(g, x, LM_HEAD + "_screen", None, None, (c4, s4, group, 4), level)         # (1, B, V)
    _, idx = g.op("TopK", [screen, g.const([k])], n_out=2, axis=-1, largest=1, sorted=0)     # (1, B, k)
    data = g.init(LM_HEAD + ".rows", (codes.astype(np.int16) + 128).astype(np.uint8))       # (V, C) uint8
    rows = g.op("GatherBlockQuantized", [data, idx, g.weight(LM_HEAD + ".row_scales", scales)], domain=MS,
                bits=8, block_size=group, gather_axis=0, quantize_axis=1)                   # (1, B, k, C)
    exact = g.op("ReduceSum", [g.op("Mul", [rows, g.op("Unsqueeze", [x, g.const([2])])]), g.const([-1])],
                 keepdims=0)                                                                  # (1, B, k)
    return g.op("ScatterElements", [screen, idx, exact], axis=-1)


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
    """qkv projection -> PagedAttention (writes this layer's new K/V into its pool blocks in place, RoPE
    inside from the cos/sin caches) -> o_proj: 3 nodes, as GroupQueryAttention with do_rotary makes it."""
    hq, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
    p = f"model.layers.{l}.self_attn."
    qkv = _fused_linear(g, h, w, quant, p, ["q_proj", "k_proj", "v_proj"], level)          # (1, T, (Hq+2Hkv)*D)
    rope = [shared["cos"], shared["sin"]]
    if shared["hf_rounding"]:                 # RoPE in standard ops (HF's fp16 roundings), then repacked
        qk, v = g.op("Split", [qkv, g.const([(hq + hkv) * d, hkv * d])], axis=-1, n_out=2)
        qk = _rotate(g, g.reshape(qk, [-1, hq + hkv, d]), shared["cos"], shared["sin"], d)   # (T, Hq+Hkv, D)
        qkv = g.reshape(g.op("Concat", [qk, g.reshape(v, [-1, hkv, d])], axis=1), [1, -1, (hq + 2 * hkv) * d])
        rope = []
    ctx = g.op("PagedAttention", [qkv, io[f"key_cache_{l}"], io[f"value_cache_{l}"], *shared["paged"], *rope],
               domain=OPS_DOMAIN, num_heads=hq, num_kv_heads=hkv, scale=0.0)           # (1, T, Hq*D)
    return linear(g, ctx, p + "o_proj", w.get(p + "o_proj.weight"), None, quant.get(p + "o_proj"), level)


def _mlp(g: Graph, spec: LLMSpec, h: str, w: dict, l: int, quant, level: int) -> str:
    """gate|up projection -> silu(gate) * up -> down_proj. Float graphs: one vila_edge::SwiGLU on the packed
    projection (vila_edge/ops/csrc/swiglu.h) where the standard ops take three nodes (Split, Sigmoid + Mul,
    Mul; ORT has no CPU kernel for its own SwiGLU); float16 graphs keep those (ORT's fp16 roundings)."""
    p = f"model.layers.{l}.mlp."
    gate_up = _fused_linear(g, h, w, quant, p, ["gate_proj", "up_proj"], level)       # (1, T, 2I)
    if g.dtype == "float16":
        gate, up = g.op("Split", [gate_up, g.const([spec.intermediate] * 2)], axis=-1, n_out=2)  # (1, T, I) each
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])            # SiLU(gate) * up
    else:
        act = g.op("SwiGLU", [gate_up], domain=OPS_DOMAIN)                               # (1, T, I)
    return linear(g, act, p + "down_proj", w.get(p + "down_proj.weight"), None, quant.get(p + "down_proj"), level)


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


def paged_inputs(g: Graph, spec: LLMSpec, dtype: str, kv_dtype: str | None = None) -> dict:
    """The fused graph's inputs (docs/contracts.md): B sequences' T new positions flattened, and the
    paged-attention metadata of vila_edge/ops/csrc/paged_attention.cc over each layer's pool blocks
    (of kv_dtype: default dtype; float16 under a float32 graph)."""
    kv = [spec.kv_heads, spec.head_dim]
    io = {"inputs_embeds": g.input("inputs_embeds", dtype, ["T", spec.hidden]),
          "position_ids": g.input("position_ids", "int64", ["T"]),
          "block_tables": g.input("block_tables", "int32", ["B", "max_blocks"]),
          "seq_lens": g.input("seq_lens", "int32", ["B"]),
          "query_start_loc": g.input("query_start_loc", "int32", ["B1"]),
          "slot_mapping": g.input("slot_mapping", "int32", ["T"]),
          "logits_indices": g.input("logits_indices", "int64", ["B"])}
    for l in range(spec.layers):
        for which in ("key", "value"):
            io[f"{which}_cache_{l}"] = g.input(f"{which}_cache_{l}", kv_dtype or dtype, ["NB", "BS", *kv])
    return io


def build_llm_fused(spec: LLMSpec, weights: dict, dtype: str, quant: dict | None = None,
                    accuracy_level: int = DEFAULT_ACCURACY_LEVEL, hidden_output: bool = False,
                    kv_dtype: str | None = None, lm_head_screen: int = 0) -> Graph:
    """As onnx_llm.build_llm (same weights and arguments) with the paged, batched I/O of `paged_inputs`:
    logits [B, V] at logits_indices (+ hidden [B, C]); `accuracy_level`: every MatMulNBits' (fixed in
    the file: ORT has no session option for explicit MatMulNBits nodes); `lm_head_screen` K > 0: the
    int8 lm_head as screened_head with K candidates."""
    quant = quant or {}
    g = Graph("vila_edge_llm_fused", dtype)
    io = paged_inputs(g, spec, dtype, kv_dtype)
    x = g.reshape(io["inputs_embeds"], [1, -1, spec.hidden])                     # (1, T, C): the contrib ops' rank
    # fp16 graphs keep HF's fp16 roundings in RoPE and RMSNorm (see _skip_norm): standard ops there. Float
    # graphs read no position_ids (PagedAttention takes positions from seq_lens): no Reshape of them left
    # for ORT to run each step (it does not prune a dead node).
    hf_rounding = dtype == "float16"
    if hf_rounding:
        cos, sin = _rope_tables(g, spec, g.reshape(io["position_ids"], [1, -1]))            # (1, T) positions
    else:
        cos, sin = _rope_caches(g, spec)
    paged = [io[n] for n in ("block_tables", "seq_lens", "query_start_loc", "slot_mapping")]
    shared = {"cos": cos, "sin": sin, "paged": paged, "hf_rounding": hf_rounding}
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
    last = lambda t: g.op("Gather", [t, io["logits_indices"]], axis=1)              # (1, B, C)
    h, _ = _skip_norm(g, last(mlp), last(x), weights["model.norm.weight"], spec.rms_eps, "model.norm.weight")
    head = None if LM_HEAD in quant else weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    # VILA-U: lm_head skippable, `logits_rows` of the B rows get logits (onnx_vila_u.head_rows: B or 0)
    head_in = head_rows(g, h) if hidden_output else h
    if lm_head_screen:
        logits = screened_head(g, head_in, quant[LM_HEAD], lm_head_screen, accuracy_level)  # (1, B or r, V)
    else:
        logits = linear(g, head_in, LM_HEAD, head, None, quant.get(LM_HEAD), accuracy_level)
    g.output(g.to_float32(g.reshape(logits, [-1, lm_head_rows(weights, quant)])), "logits", "float32",
             ["R" if hidden_output else "B", lm_head_rows(weights, quant)])
    if hidden_output:     # VILA-U: the depth transformer reads the final-norm hidden state
        g.output(g.to_float32(g.reshape(h, [-1, spec.hidden])), "hidden", "float32", ["B", spec.hidden])
    g.opsets = {MS: 1, OPS_DOMAIN: 1}
    return g
