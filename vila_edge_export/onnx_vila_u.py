"""VILA-U's graphs beside llm.onnx (which returns its final hidden state too, for the depth transformer).

- vision.onnx   pixel_values (N,3,R,R) -> image_features (N,T,hidden), codes (N,T,D) int64:
                SigLIP to the second-to-last layer, residual quantization, sum of the chosen rows,
                mlp2x_gelu (mit-han-lab/vila-u@096623c: RQS/rqvaesiglip/modeling_rqvaesiglip.py:48-68,
                RQS/rqvaesiglip/quantizations.py:32-58,242-269; RQS = vila_u/model/multimodal_encoder/
                rqvaesigliptransformer)
- code_embed.onnx  codes (B,D) -> projector(sum_d codebook_d[code_d]) (B,hidden): the next LLM input
                (TR/models/llama/modeling_llama.py:861-872, TR = vila_u/train/transformers_replace)
- depth.onnx    h (B,hidden) at depth 0 and (0,hidden) after, codes (B,d) of this position so far,
                past_k/v_i (B,H,d,Dh) -> logits (B,K)
                for depth d, present_k/v_i (B,H,d+1,Dh): a KV cache per position, where the reference
                reruns the whole length-(d+1) sequence (RQS/rqtransformer/modeling_rqtransformer.py:126-177,
                attention.py:15-105; causal masking makes the two equal)
- decoder.onnx  codes (N,g,g,D) -> pixels (N,H,W,3) float = clamp((x+1)*127.5, 0, 255): bilinear resize
                to decoder_latent_shape (384 structure), post_quant_conv, the RQ-VAE decoder
                (RQS/rqvaesiglip/modules.py:12-249, without its bf16 casts); the host truncates to uint8.
Codebooks live in the graphs as one (D*(K+1), C) table: row d*(K+1)+k is codebook d's row k.
"""
import math
from typing import NamedTuple

import numpy as np
from onnx import TensorProto, helper

from vila_edge_export.checkpoint import ProjectorSpec, VisionSpec
from vila_edge_export.onnx_graph import Graph
from vila_edge_export.onnx_vision import _gelu, _layer_norm, _projector, _tower
from vila_edge.families import ROW_MAJOR

SIGLIP_PREFIX = "rqvaesiglip.siglip_model.vision_model."


def vision_spec(vu) -> VisionSpec:
    s = vu.siglip
    return VisionSpec(image_size=s.image_size, patch=s.patch, hidden=s.hidden, layers=s.layers, heads=s.heads,
                      intermediate=s.intermediate, ln_eps=s.ln_eps, act="gelu_pytorch_tanh",
                      select_layer=s.layers - 1, mean=[0.5] * 3, std=[0.5] * 3)


def projector_spec(vu) -> ProjectorSpec:
    return ProjectorSpec("mlp2x_gelu", 1, ROW_MAJOR, vu.siglip.hidden, vu.llm.hidden)


def _books(g: Graph, vu, w: dict) -> str:
    rows = [w[f"rqvaesiglip.quantizer.codebooks.{0 if vu.shared_codebook else d}.weight"] for d in range(vu.depth)]
    return g.weight("codebooks", np.concatenate(rows))                               # (D*(K+1), C)


def _code_rows(g: Graph, vu, books: str, codes: str) -> str:
    """codes (..., d) -> rows (..., d, C) of codebook 0..d-1."""
    depth = g.op("Shape", [codes], start=-1)                                          # [d]
    offsets = g.op("Mul", [g.op("Range", [g.const(0), g.reshape(depth, []), g.const(1)]),
                           g.const(vu.codebook_size + 1)])
    return g.op("Gather", [books, g.op("Add", [codes, offsets])], axis=0)


def _code_sum(g: Graph, vu, books: str, codes: str) -> str:
    """codes (..., D) -> sum over depth (..., C), summed in depth order as the reference does."""
    rows = _code_rows(g, vu, books, codes)
    total = None
    for d in range(vu.depth):
        row = g.op("Squeeze", [g.op("Slice", [rows, g.const([d]), g.const([d + 1]), g.const([-2])]), g.const([-2])])
        total = row if total is None else g.op("Add", [total, row])
    return total


LOGITS_ROWS = "logits_rows"


def head_rows(g: Graph, h: str) -> str:
    """VILA-U's llm.onnx: the final hidden state (1, 1, C) cut to (1, r, C) before lm_head, r from the
    input `logits_rows` [1]: text steps feed 1 and get logits [1, V]; image steps feed 0, so the
    reference's dummy text token per step (TR/models/llama/modeling_llama.py:1058-1073) is never
    computed and lm_head's weights are never read (logits [0, V]). A required input, not a default
    initializer: ORT would warn at every load and stop folding constants around it."""
    g.input(LOGITS_ROWS, "int64", [1])
    return g.op("Slice", [h, g.const([0]), LOGITS_ROWS, g.const([1])])


def build_vision_vila_u(vu, tower: dict, projector: dict, dtype: str) -> Graph:
    g = Graph("vila_u_vision", dtype)
    spec, T, C = vision_spec(vu), vu.image_tokens, vu.siglip.hidden
    pixels = g.input("pixel_values", dtype, ["N", 3, spec.image_size, spec.image_size])
    x = _tower(g, spec, pixels, {k[len(SIGLIP_PREFIX):]: v for k, v in tower.items() if k.startswith(SIGLIP_PREFIX)})
    r = g.reshape(x, [-1, C])                                                          # (N*T, C)
    agg, codes = None, []
    for d in range(vu.depth):
        book = tower[f"rqvaesiglip.quantizer.codebooks.{0 if vu.shared_codebook else d}.weight"][:vu.codebook_size]
        c = g.weight(f"codebook_{d}", book)                                            # row K (padding) left out
        csq = g.weight(f"codebook_{d}.sq", (book.astype(np.float32) ** 2).sum(1))
        rsq = g.op("ReduceSum", [g.op("Mul", [r, r]), g.const([1])], keepdims=1)
        dist = g.op("Sub", [g.op("Add", [rsq, csq]),
                            g.op("Mul", [g.op("MatMul", [r, g.op("Transpose", [c])]), g.scalar(2.0)])])
        k = g.op("ArgMin", [dist], axis=1, keepdims=0)                                 # first index on ties
        q = g.op("Gather", [c, k], axis=0)
        r, agg = g.op("Sub", [r, q]), q if agg is None else g.op("Add", [agg, q])
        codes.append(g.op("Unsqueeze", [k, g.const([1])]))
    feats = _projector(g, g.reshape(agg, [-1, T, C]), projector_spec(vu), vu.siglip.grid, projector)
    g.output(feats, "image_features", dtype, ["N", T, vu.llm.hidden])
    g.output(g.reshape(g.op("Concat", codes, axis=1), [-1, T, vu.depth]), "codes", "int64", ["N", T, vu.depth])
    return g


def build_code_embed(vu, tower: dict, projector: dict, dtype: str) -> Graph:
    g = Graph("vila_u_code_embed", dtype)
    codes = g.input("codes", "int64", ["B", vu.depth])
    x = _projector(g, _code_sum(g, vu, _books(g, vu, tower), codes), projector_spec(vu), vu.siglip.grid, projector)
    g.output(x, "inputs_embeds", dtype, ["B", vu.llm.hidden])
    return g


# The depth transformer's input and output projections: the LLM's hidden state and the code sums in,
# the codebook logits out. Their bits follow the LLM's lm_head (DepthQuant.edge_bits, int8 by default), as
# the LLM keeps its vocabulary projection int8; the blocks between them take DepthQuant.bits (int8 by
# default, --depth-bits). Measured on the bundled tiny VILA-U with an int4 AWQ LLM (1,320 held-out
# pictures at cfg 3; benchmarks/results/vila-u-tiny-shapes/README.md): with every depth linear int4,
# colour / position 1.4 / 2.5 points under fp16 (first checkpoint); with these three int8 and int4
# blocks, at fp16 there but shape 3.4 points under (retrained checkpoint); all int8, within 1 point.
DEPTH_EDGE = ("in_mlp_1", "in_mlp_2", "classifier_mlp.linear")


class DepthQuant(NamedTuple):
    group: int               # group size, resolved per linear against its K
    zero_point: bool         # int4 with a zero point per group (int8 stays symmetric)
    bits: int                # the blocks' linears: 8, 4, or 0 = float (QuantOptions.depth_bits)
    edge_bits: int           # DEPTH_EDGE's linears: 8, 4, or 0 = float (QuantOptions.lm_head_bits)


def _lin(g, x, w, name, quant: DepthQuant | None = None):
    """nn.Linear `name` of w; with quant: quant.bits (quant.edge_bits for DEPTH_EDGE; 0 = float) by
    round-to-nearest in groups of K (the largest power of two <= quant.group dividing K),
    DequantizeLinear -> MatMul, which ORT runs as MatMulNBits. The depth transformer has no
    calibration data of its own: RTN, as its linears are small next to the LLM's and the tests
    measure the code agreement it costs."""
    bits = 0 if quant is None else quant.edge_bits if name in DEPTH_EDGE else quant.bits
    if not bits:
        return g.linear(x, name, w[name + ".weight"], w[name + ".bias"])
    import torch
    from vila_edge_export.quantize import quantize_group, resolve_group

    weight = torch.from_numpy(np.asarray(w[name + ".weight"], np.float32))
    q = quantize_group(weight, resolve_group(name, weight.shape[1], quant.group, True), bits,
                       quant.zero_point and bits == 4)
    packed = (q.codes.numpy(), q.scales.numpy(), q.group, bits) + (() if q.zeros is None else (q.zeros.numpy(),))
    return g.linear(x, name, None, w[name + ".bias"], packed)


def _block(g: Graph, x: str, w: dict, p: str, E: int, heads: int, past: tuple, present: tuple, quant=None) -> str:
    """One pre-LN block on the newest row x (B, 1, E); past K/V (B, H, d, Dh) come in, the
    concatenated (B, H, d+1, Dh) go out. The newest row sees every earlier row: the causal mask of
    the reference's full rerun (attention.py:15-77) changes nothing for it."""
    h = _layer_norm(g, x, w, p + "ln1", 1e-5)
    split = lambda n: g.op("Transpose", [g.reshape(_lin(g, h, w, p + "attn." + n, quant), [0, 0, heads, E // heads])],
                           perm=[0, 2, 1, 3])                                          # (B, H, 1, Dh)
    q = split("query")
    k = g.op("Concat", [past[0], split("key")], axis=2, out=present[0])                 # (B, H, d+1, Dh)
    v = g.op("Concat", [past[1], split("value")], axis=2, out=present[1])
    att = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.scalar(math.sqrt(E // heads))])
    att = g.from_float32(g.op("Softmax", [g.to_float32(att)], axis=-1))
    ctx = g.reshape(g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3]), [0, 0, E])
    x = g.op("Add", [x, _lin(g, ctx, w, p + "attn.proj", quant)])
    h = _lin(g, _gelu(g, _lin(g, _layer_norm(g, x, w, p + "ln2", 1e-5), w, p + "mlp.0", quant), False), w, p + "mlp.2",
             quant)
    return g.op("Add", [x, h])


def build_depth(vu, tower: dict, dtype: str, quant: DepthQuant | None = None) -> Graph:
    """quant: None (float), or the blocks' and DEPTH_EDGE's bits (_lin)."""
    g = Graph("vila_u_depth", dtype)
    E, n_layer, heads = vu.head
    w = {k[len("rqtransformer."):]: v for k, v in tower.items() if k.startswith("rqtransformer.")}
    # hidden: (B, C) at depth 0, (0, C) after: in_mlp_2 (C x E, C = the LLM width) is read once per
    # position, not D times; the newest row is in_mlp_2(h) at depth 0, else in_mlp_1(sum of codes so far).
    h = g.input("hidden", dtype, ["H", vu.llm.hidden])
    codes = g.input("codes", "int64", ["B", "d"])
    partial = g.op("CumSum", [_code_rows(g, vu, _books(g, vu, tower), codes), g.const(1)])   # (B, d, C)
    newest = g.reshape(g.op("Slice", [partial, g.const([-1]), g.const([2 ** 62]), g.const([1])]),
                       [-1, vu.siglip.hidden])                                        # (B or 0, C)
    x = g.op("Concat", [_lin(g, h, w, "in_mlp_2", quant), _lin(g, newest, w, "in_mlp_1", quant)], axis=0)  # (B, E)
    d = g.op("Shape", [codes], start=1, end=2)                                        # [d]
    pos = g.op("Slice", [g.weight("pos_emb_d", w["pos_emb_d"]), d, g.op("Add", [d, g.const([1])]), g.const([1])])
    x = g.op("Add", [g.op("Unsqueeze", [x, g.const([1])]), pos])                      # (B, 1, E): depth d only
    dh = E // heads
    for i in range(n_layer):
        past = tuple(g.input(f"past_{kv}_{i}", dtype, ["B", heads, "d", dh]) for kv in "kv")
        present = (f"present_k_{i}", f"present_v_{i}")
        x = _block(g, x, w, f"head_transformer.blocks.{i}.", E, heads, past, present, quant)
        for name in present:
            g.outputs.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16, ["B", heads, "d1", dh]))
    last = g.op("Squeeze", [x, g.const([1])])
    logits = _lin(g, _layer_norm(g, last, w, "classifier_mlp.layer_norm", 1e-5), w, "classifier_mlp.linear", quant)
    g.output(g.to_float32(logits), "logits", "float32", ["B", vu.codebook_size])
    return g


def _group_norm(g: Graph, x: str, w: dict, name: str, channels: int) -> str:
    """GroupNorm(32, eps 1e-6) from primitives (statistics in the graph dtype, as torch does in fp32)."""
    y = g.reshape(x, [0, 32, -1])
    mean = g.op("ReduceMean", [y, g.const([2])], keepdims=1)
    centred = g.op("Sub", [y, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred]), g.const([2])], keepdims=1)
    y = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.scalar(1e-6)])])])
    y = g.op("Reshape", [y, g.op("Shape", [x])])
    scale = g.weight(name + ".weight", w[name + ".weight"].reshape(channels, 1, 1))
    return g.op("Add", [g.op("Mul", [y, scale]), g.weight(name + ".bias", w[name + ".bias"].reshape(channels, 1, 1))])


def _conv(g: Graph, x: str, w: dict, name: str) -> str:
    k = w[name + ".weight"].shape[-1]
    return g.op("Conv", [x, g.weight(name + ".weight", w[name + ".weight"]), g.weight(name + ".bias", w[name + ".bias"])],
                pads=[k // 2] * 4)


def _silu(g: Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def _resblock(g: Graph, x: str, w: dict, p: str) -> str:
    cin, cout = w[p + "conv1.weight"].shape[1], w[p + "conv1.weight"].shape[0]
    h = _conv(g, _silu(g, _group_norm(g, x, w, p + "norm1", cin)), w, p + "conv1")
    h = _conv(g, _silu(g, _group_norm(g, h, w, p + "norm2", cout)), w, p + "conv2")
    return g.op("Add", [_conv(g, x, w, p + "nin_shortcut") if p + "nin_shortcut.weight" in w else x, h])


def _attnblock(g: Graph, x: str, w: dict, p: str) -> str:
    c = w[p + "q.weight"].shape[0]
    h = _group_norm(g, x, w, p + "norm", c)
    flat = lambda n: g.reshape(_conv(g, h, w, p + n), [0, c, -1])                      # (B, C, HW)
    q = g.op("Transpose", [flat("q")], perm=[0, 2, 1])                                 # (B, HW, C)
    att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, flat("k")]), g.scalar(c ** -0.5)])], axis=2)
    out = g.op("MatMul", [flat("v"), g.op("Transpose", [att], perm=[0, 2, 1])])        # (B, C, HW)
    return g.op("Add", [x, _conv(g, g.op("Reshape", [out, g.op("Shape", [x])]), w, p + "proj_out")])


def build_decoder(vu, tower: dict, dtype: str) -> Graph:
    g = Graph("vila_u_decoder", dtype)
    gs, dd = vu.siglip.grid, vu.decoder
    w = {k[len("rqvaesiglip."):]: v for k, v in tower.items()
         if k.startswith(("rqvaesiglip.decoder.", "rqvaesiglip.post_quant_conv."))}
    codes = g.input("codes", "int64", ["N", gs, gs, vu.depth])
    z = g.op("Transpose", [_code_sum(g, vu, _books(g, vu, tower), codes)], perm=[0, 3, 1, 2])   # (N, C, g, g)
    if vu.decoder_latent:
        h_, w_ = vu.decoder_latent
        z = g.op("Resize", [z, "", "", g.op("Concat", [g.op("Shape", [z], end=2), g.const([h_, w_])], axis=0)],
                 mode="linear", coordinate_transformation_mode="half_pixel")          # torch bilinear, align_corners False
    x = _conv(g, z, w, "post_quant_conv")
    p = "decoder."
    x = _conv(g, x, w, p + "conv_in")
    x = _resblock(g, _attnblock(g, _resblock(g, x, w, p + "mid.block_1."), w, p + "mid.attn_1."), w, p + "mid.block_2.")
    levels = len(dd["ch_mult"])
    for lvl in reversed(range(levels)):
        for j in range(dd["num_res_blocks"] + 1):
            x = _resblock(g, x, w, f"{p}up.{lvl}.block.{j}.")
            if f"{p}up.{lvl}.attn.{j}.q.weight" in w:
                x = _attnblock(g, x, w, f"{p}up.{lvl}.attn.{j}.")
        if lvl:
            x = g.op("Resize", [x, "", g.const([1.0, 1.0, 2.0, 2.0], "float32")], mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            x = _conv(g, x, w, f"{p}up.{lvl}.upsample.conv")
    x = _conv(g, _silu(g, _group_norm(g, x, w, p + "norm_out", w[p + "norm_out.weight"].shape[0])), w, p + "conv_out")
    x = g.op("Mul", [g.op("Add", [g.to_float32(x), g.const(1.0, "float32")]), g.const(127.5, "float32")])
    x = g.op("Clip", [x, g.const(0.0, "float32"), g.const(255.0, "float32")])
    side = (vu.decoder_latent or [gs])[0] * 2 ** (levels - 1)
    g.output(g.op("Transpose", [x], perm=[0, 2, 3, 1]), "pixels", "float32", ["N", side, side, 3])
    return g
