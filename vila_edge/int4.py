"""The int4 weight format every part agrees on (docs/contracts.md "Int4 weights"), in numpy.

A linear W [N, K] is codes q in [-8, 7] and scales [N, K/G], W ~= q * scales[:, k // G]. The same
codes travel in two byte layouts:
  ONNX INT4     the engine's llm.onnx initializers: q.T [K, N] in row-major order, two per byte,
                the even-indexed element in the low nibble, signed nibbles  -> pack_onnx / unpack_onnx
  MatMulNBits   the CUDA kernels' (and ORT MatMulNBits') B: uint8 [N, K/G, G/2], element k of a
                block in byte k // 2, even k in the low nibble, unsigned q + 8 -> pack_matmulnbits /
                                                                                unpack_matmulnbits
`onnx_to_matmulnbits` repacks an engine's weights for the kernels. `quantize` is the numpy twin of
vila_edge_export/quantize.py's quantize_symmetric (bits=4): same floor, same fp16-rounded scales.
"""
import numpy as np

INT4_MIN, INT4_MAX = -8, 7
INT4_OFFSET = 8      # MatMulNBits stores q + 8, so codes are unsigned nibbles
# llm-awq's pseudo_quantize_tensor clamps the group range at 1e-5 so all-zero groups get a finite scale.
MIN_ABSMAX = 1e-5


def quantize(w: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes int8 [N, K] in [-8, 7], scales float32 [N, K/G]), s = absmax / 7 rounded to fp16."""
    N, K = w.shape
    if K % G:
        raise ValueError(f"int4 quantize: K={K} is not a multiple of the group size G={G}")
    wg = w.astype(np.float32).reshape(N, K // G, G)                                   # (N, K/G, G)
    absmax = np.maximum(np.abs(wg).max(axis=-1, keepdims=True), np.float32(MIN_ABSMAX))
    scales = (absmax / np.float32(INT4_MAX)).astype(np.float16).astype(np.float32)   # (N, K/G, 1)
    codes = np.clip(np.round(wg / scales), INT4_MIN, INT4_MAX).astype(np.int8)
    return codes.reshape(N, K), scales.reshape(N, K // G)


def _check_codes(codes: np.ndarray) -> None:
    if codes.size and (codes.min() < INT4_MIN or codes.max() > INT4_MAX):
        raise ValueError(f"int4 codes must lie in [{INT4_MIN}, {INT4_MAX}]")


def pack_onnx(codes: np.ndarray) -> bytes:
    """int8 codes in [-8, 7], any shape -> the ONNX INT4 byte stream; an odd count pads the last
    high nibble with 0 (onnx.helper.make_tensor's packing, done on arrays)."""
    _check_codes(codes)
    flat = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F                                     # two's complement low 4 bits
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def unpack_onnx(raw: bytes, shape: tuple) -> np.ndarray:
    """The ONNX INT4 byte stream of a tensor of `shape` -> int8 codes of that shape."""
    n = int(np.prod(shape))
    if len(raw) != (n + 1) // 2:
        raise ValueError(f"int4 tensor {tuple(shape)}: expected {(n + 1) // 2} bytes, got {len(raw)}")
    b = np.frombuffer(raw, np.uint8)
    nibbles = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(-1)[:n]        # element order
    return ((nibbles.astype(np.int8) ^ 8) - 8).reshape(shape)               # sign-extend 4 bits


def pack_matmulnbits(codes: np.ndarray, scales: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [N, K], scales [N, K/G]) -> MatMulNBits (B uint8 [N, K/G, G/2], fp16 [N, K/G])."""
    N, K = codes.shape
    if K % G or G % 2:
        raise ValueError(f"int4 pack: K={K} must be a multiple of an even group size G={G}")
    _check_codes(codes)
    u = (codes.astype(np.int16) + INT4_OFFSET).astype(np.uint8).reshape(N, K // G, G // 2, 2)
    packed = u[..., 0] | (u[..., 1] << 4)                                  # (N, K/G, G/2): even k low
    return packed.astype(np.uint8), scales.astype(np.float16)


def unpack_matmulnbits(packed: np.ndarray) -> np.ndarray:
    """B uint8 [N, K/G, G/2] -> codes int8 [N, K]."""
    N = packed.shape[0]
    lo = (packed & 0x0F).astype(np.int8) - INT4_OFFSET
    hi = (packed >> 4).astype(np.int8) - INT4_OFFSET
    return np.stack([lo, hi], axis=-1).reshape(N, -1)                      # (N, K/G, G/2, 2) -> (N, K)


def onnx_to_matmulnbits(raw: bytes, scales_kn: np.ndarray, K: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """An engine linear (DequantizeLinear(int4 [K, N] as raw bytes, scale [K/G, N], block_size=G))
    -> the kernels' (B uint8 [N, K/G, G/2], scales fp16 [N, K/G]); G is K / scales_kn.shape[0]."""
    groups = scales_kn.shape[0]
    if scales_kn.shape != (groups, N) or K % groups:
        raise ValueError(f"int4 repack: scales {scales_kn.shape} do not fit a [{K}, {N}] weight")
    codes = unpack_onnx(raw, (K, N)).T                                     # (N, K)
    return pack_matmulnbits(codes, np.ascontiguousarray(scales_kn.T), K // groups)
