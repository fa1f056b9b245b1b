"""vision.onnx: SigLIP tower (up to hidden_states[select_layer]) + mm_projector in one graph.

pixel_values [N, 3, R, R] -> image_features [N, tokens, H]. Precision as transformers' eager
SigLIP: softmax in fp32, the rest in the graph dtype (NVlabs/VILA@1c88211:llava/model/llava_arch.py runs tower and
projector in fp16).
"""
import math


from vila_edge_export.checkpoint import ProjectorSpec, VisionSpec
from vila_edge_export.onnx_graph import Graph
from vila_edge.families import COLUMN_MAJOR

SIGLIP = ""  # weight names as checkpoint.load_vision_weights returns them


def _layer_norm(g: Graph, x: str, w: dict, name: str, eps: float) -> str:
    return g.op("LayerNormalization", [x, g.weight(name + ".weight", w[name + ".weight"]),
                                       g.weight(name + ".bias", w[name + ".bias"])], axis=-1, epsilon=eps)


def _gelu(g: Graph, x: str, approximate: bool) -> str:
    """GELU from primitives (the Gelu op is opset 20, past what TensorRT 10.3 is known to parse)."""
    half = g.op("Mul", [x, g.scalar(0.5)])
    if approximate:  # gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715)])]),
                             g.scalar(math.sqrt(2.0 / math.pi))])
        return g.op("Mul", [half, g.op("Add", [g.op("Tanh", [inner]), g.scalar(1.0)])])
    erf = g.op("Erf", [g.op("Mul", [x, g.scalar(1.0 / math.sqrt(2.0))])])
    return g.op("Mul", [half, g.op("Add", [erf, g.scalar(1.0)])])


def _encoder_layer(g: Graph, spec: VisionSpec, x: str, w: dict, l: int) -> str:
    p = f"{SIGLIP}encoder.layers.{l}."
    heads, d = spec.heads, spec.hidden // spec.heads
    h = _layer_norm(g, x, w, p + "layer_norm1", spec.ln_eps)
    a = p + "self_attn."
    split = lambda n: g.op("Transpose", [g.reshape(g.linear(h, a + n, w[a + n + ".weight"], w[a + n + ".bias"]),
                                                   [0, 0, heads, d])], perm=[0, 2, 1, 3])  # (N, heads, P, d)
    q, k, v = split("q_proj"), split("k_proj"), split("v_proj")
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.scalar(d ** -0.5)])
    probs = g.from_float32(g.op("Softmax", [g.to_float32(scores)], axis=-1))            # (N, heads, P, P)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])             # (N, P, heads, d)
    ctx = g.reshape(ctx, [0, 0, spec.hidden])
    x = g.op("Add", [x, g.linear(ctx, a + "out_proj", w[a + "out_proj.weight"], w[a + "out_proj.bias"])])
    h = _layer_norm(g, x, w, p + "layer_norm2", spec.ln_eps)
    m = p + "mlp."
    h = g.linear(h, m + "fc1", w[m + "fc1.weight"], w[m + "fc1.bias"])
    h = _gelu(g, h, approximate=spec.act == "gelu_pytorch_tanh")
    return g.op("Add", [x, g.linear(h, m + "fc2", w[m + "fc2.weight"], w[m + "fc2.bias"])])


def _downsample(g: Graph, x: str, grid: int, merge: int, order: str, channels: int) -> str:
    """[N, S*S, C] -> [N, S2*S2, m*m*C] with zero padding bottom/right (vila_edge_export/projector.py)."""
    pad = (-grid) % merge
    s2 = (grid + pad) // merge
    x = g.reshape(x, [0, grid, grid, channels])                                         # (N, row, col, C)
    if pad:
        x = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, pad, pad, 0])])
    x = g.reshape(x, [0, s2, merge, s2, merge, channels])                               # (N, i, dy, j, dx, C)
    perm = [0, 3, 1, 2, 4, 5] if order == COLUMN_MAJOR else [0, 1, 3, 2, 4, 5]          # (N, j|i, i|j, dy, dx, C)
    return g.reshape(g.op("Transpose", [x], perm=perm), [0, s2 * s2, merge * merge * channels])


def _projector(g: Graph, x: str, proj: ProjectorSpec, grid: int, w: dict) -> str:
    lin = lambda x, i: g.linear(x, f"layers.{i}", w[f"layers.{i}.weight"], w[f"layers.{i}.bias"])
    ln = lambda x, i: _layer_norm(g, x, w, f"layers.{i}", 1e-5)
    if proj.kind == "linear":
        return g.linear(x, "layers", w["layers.weight"], w["layers.bias"])
    if proj.kind == "mlp2x_gelu":
        return lin(_gelu(g, lin(x, 0), False), 2)
    x = _downsample(g, x, grid, proj.merge, proj.token_order, proj.in_channels)
    # Every downsample projector is DS, then steps of LayerNorm (1-D weight at 1 + 3i) -> Linear ->
    # GELU, then one Linear (vila_edge_export/projector.py): mlp_downsample 1 step, 3x3_fix 2, 3x3_s2 4, _s2_new 5.
    steps = 0
    while w.get(f"layers.{1 + 3 * steps}.weight") is not None and w[f"layers.{1 + 3 * steps}.weight"].ndim == 1:
        steps += 1
    for i in range(steps):
        x = _gelu(g, lin(ln(x, 1 + 3 * i), 2 + 3 * i), False)
    return lin(x, 1 + 3 * steps)


def _tower(g: Graph, spec: VisionSpec, pixels: str, tower: dict) -> str:
    """SigLIP up to hidden_states[select_layer]: [N, 3, R, R] -> [N, S*S, C]."""
    c, grid = spec.hidden, spec.grid
    e = SIGLIP + "embeddings."
    x = g.op("Conv", [pixels, g.weight(e + "patch_embedding.weight", tower[e + "patch_embedding.weight"]),
                      g.weight(e + "patch_embedding.bias", tower[e + "patch_embedding.bias"])],
             strides=[spec.patch, spec.patch])                                          # (N, C, S, S)
    x = g.op("Transpose", [g.reshape(x, [0, c, grid * grid])], perm=[0, 2, 1])           # (N, S*S, C)
    x = g.op("Add", [x, g.weight(e + "position_embedding.weight", tower[e + "position_embedding.weight"])])
    for l in range(spec.layers_run):
        x = _encoder_layer(g, spec, x, tower, l)
    return x


def build_tower(spec: VisionSpec, tower: dict, dtype: str) -> Graph:
    """vision.onnx of multi-scale engines (the tower alone): pixel_values [N, 3, R, R] -> tower_features [N, S*S, C];
    the runtime merges scales (vila_edge/multiscale.py) before projector.onnx."""
    g = Graph("vila_edge_tower", dtype)
    pixels = g.input("pixel_values", dtype, ["N", 3, spec.image_size, spec.image_size])
    g.output(_tower(g, spec, pixels, tower), "tower_features", dtype, ["N", spec.grid * spec.grid, spec.hidden])
    return g


def build_projector(proj: ProjectorSpec, grid: int, projector: dict, dtype: str) -> Graph:
    """projector.onnx: tower_features [N, S*S, C_in] (scales concatenated) -> image_features [N, tokens, H]."""
    g = Graph("vila_edge_projector", dtype)
    x = g.input("tower_features", dtype, ["N", grid * grid, proj.in_channels])
    g.output(_projector(g, x, proj, grid, projector), "image_features", dtype,
             ["N", merged_tokens(grid, proj), proj.out_channels])
    return g


def build_vision(spec: VisionSpec, proj: ProjectorSpec, tower: dict, projector: dict, dtype: str) -> Graph:
    g = Graph("vila_edge_vision", dtype)
    r = spec.image_size
    pixels = g.input("pixel_values", dtype, ["N", 3, r, r])
    x = _projector(g, _tower(g, spec, pixels, tower), proj, spec.grid, projector)
    g.output(x, "image_features", dtype, ["N", tokens_per_image(spec, proj), proj.out_channels])
    return g


def merged_tokens(grid: int, proj: ProjectorSpec) -> int:
    return grid * grid if proj.merge == 1 else ((grid + (-grid) % proj.merge) // proj.merge) ** 2


def tokens_per_image(spec: VisionSpec, proj: ProjectorSpec) -> int:
    return merged_tokens(spec.grid, proj)
