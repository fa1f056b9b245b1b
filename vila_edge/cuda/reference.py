"""numpy oracles for the CUDA kernels: fp32 math, the layouts of docs/contracts.md.

Shape legend: N_img images, S grid side, S2 merged side, T tokens, C channels, H hidden,
M batch rows, N out features, K in features, G group, B batch, Hq/Hkv heads, D head dim,
NB blocks, BS block size.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vila_edge.cuda.abi import LN_EPS
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR
from vila_edge.int4 import unpack_matmulnbits

_erf = np.vectorize(math.erf, otypes=[np.float64])


def fp16_round(x: np.ndarray) -> np.ndarray:
    """Round to fp16 and back: where the kernels store an fp16 intermediate."""
    return x.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------- projector


@dataclass(frozen=True)
class ProjectorWeights:
    """mlp_downsample (merge 2) or mlp_downsample_3x3_fix (merge 3); nn.Linear W[out, in].

    Checkpoint keys: 2x2 layers.1 -> ln0, layers.2 -> fc1, layers.4 -> fc2;
    3x3 layers.1 -> ln0, .2 -> fc1, .4 -> ln1, .5 -> fc2, .7 -> fc3.
    """

    merge: int
    ln0_g: np.ndarray
    ln0_b: np.ndarray
    fc1_w: np.ndarray
    fc1_b: np.ndarray
    fc2_w: np.ndarray
    fc2_b: np.ndarray
    ln1_g: Optional[np.ndarray] = None
    ln1_b: Optional[np.ndarray] = None
    fc3_w: Optional[np.ndarray] = None
    fc3_b: Optional[np.ndarray] = None

    @property
    def hidden(self) -> int:
        return (self.fc3_w if self.merge == 3 else self.fc2_w).shape[0]

    @property
    def channels(self) -> int:
        return self.ln0_g.shape[0] // (self.merge * self.merge)

    def validate(self) -> None:
        """Raise ValueError naming the first weight whose shape breaks the projector's math."""
        m, C, H = self.merge, self.channels, self.hidden
        if m not in (2, 3):
            raise ValueError(f"projector merge must be 2 or 3, got {m}")
        fc1_out = H if m == 2 else 3 * C
        want = {"ln0_g": (m * m * C,), "ln0_b": (m * m * C,), "fc1_w": (fc1_out, m * m * C),
                "fc1_b": (fc1_out,), "fc2_w": (H, fc1_out), "fc2_b": (H,)}
        if m == 3:
            want.update(ln1_g=(3 * C,), ln1_b=(3 * C,), fc3_w=(H, H), fc3_b=(H,))
        for name, shape in want.items():
            got = getattr(self, name)
            if got is None or tuple(got.shape) != shape:
                raise ValueError(f"projector weight {name}: expected shape {shape}, got "
                                 f"{None if got is None else tuple(got.shape)}")


def merged_side(S: int, merge: int) -> int:
    """Side of the merged grid: VILA pads S up to a multiple of merge (27 -> 28, 32 -> 33)."""
    return -(-S // merge)


def merge_tokens(x: np.ndarray, merge: int, order: str) -> np.ndarray:
    """x [N_img, S*S, C] -> [N_img, S2*S2, merge*merge*C], channel order (dy, dx, c)."""
    n, tokens, C = x.shape
    S = math.isqrt(tokens)
    if S * S != tokens:
        raise ValueError(f"vision features: {tokens} tokens per image is not a square grid")
    if order not in (ROW_MAJOR, COLUMN_MAJOR):
        raise ValueError(f"token order must be {ROW_MAJOR!r} or {COLUMN_MAJOR!r}, got {order!r}")
    S2 = merged_side(S, merge)
    pad = S2 * merge - S
    g = x.astype(np.float32).reshape(n, S, S, C)  # (N_img, y, x, C)
    g = np.pad(g, ((0, 0), (0, pad), (0, pad), (0, 0)))  # zero rows at the bottom, columns right
    g = g.reshape(n, S2, merge, S2, merge, C)  # (N_img, i, dy, j, dx, C)
    if order == ROW_MAJOR:
        g = g.transpose(0, 1, 3, 2, 4, 5)  # (N_img, i, j, dy, dx, C): t = i*S2 + j
    else:
        g = g.transpose(0, 3, 1, 2, 4, 5)  # (N_img, j, i, dy, dx, C): t = j*S2 + i
    return g.reshape(n, S2 * S2, merge * merge * C)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    x = x.astype(np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g.astype(np.float32) + b.astype(np.float32)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """nn.GELU() default: the exact erf form."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w.astype(np.float32).T + b.astype(np.float32)


def projector(x: np.ndarray, w: ProjectorWeights, order: str,
              fp16_intermediates: bool = False) -> np.ndarray:
    """x [N_img, S*S, C] -> [N_img, S2*S2, H] float32.

    fp16_intermediates rounds each stored intermediate to fp16 exactly where the kernels store
    one (after merge+LN, after each hidden GEMM, after the middle LN), for a tight comparison.
    """
    w.validate()
    r = fp16_round if fp16_intermediates else (lambda a: a)
    h = r(layer_norm(merge_tokens(x, w.merge, order), w.ln0_g, w.ln0_b))
    h = r(gelu_erf(linear(h, w.fc1_w, w.fc1_b)))
    if w.merge == 3:
        h = r(layer_norm(h, w.ln1_g, w.ln1_b))
        h = r(gelu_erf(linear(h, w.fc2_w, w.fc2_b)))
        return linear(h, w.fc3_w, w.fc3_b)
    return linear(h, w.fc2_w, w.fc2_b)


def check_splice(dst_offsets: np.ndarray, tokens_per_image: int, emb_rows: int) -> None:
    """Each image's rows [off, off + T) must lie inside the buffer and not overlap another's."""
    spans = sorted((int(o), int(o) + tokens_per_image) for o in dst_offsets)
    for k, (lo, hi) in enumerate(spans):
        if lo < 0 or hi > emb_rows:
            raise ValueError(f"splice offset {lo}: rows [{lo}, {hi}) fall outside the embedding "
                             f"buffer of {emb_rows} rows")
        if k and lo < spans[k - 1][1]:
            raise ValueError(f"splice offsets overlap: rows [{lo}, {hi}) and {list(spans[k - 1])}")


def splice(emb: np.ndarray, features: np.ndarray, dst_offsets: np.ndarray) -> np.ndarray:
    """Copy of emb [T_total, H] with image i's features [T, H] at rows dst_offsets[i]..+T."""
    n_img, T, _ = features.shape
    check_splice(dst_offsets, T, emb.shape[0])
    out = emb.copy()
    for i in range(n_img):
        out[dst_offsets[i]:dst_offsets[i] + T] = features[i]
    return out


# ----------------------------------------------------------------------------- int4 GEMV


def int4_gemv(x: np.ndarray, packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """y [M, N] = x [M, K] @ (codes * scales[:, k // G])^T, fp32."""
    N, n_groups, half_g = packed.shape
    G = 2 * half_g
    codes = unpack_matmulnbits(packed).astype(np.float32)  # (N, K)
    w = codes * np.repeat(scales.astype(np.float32), G, axis=1)  # (N, K)
    return x.astype(np.float32) @ w.T


# ----------------------------------------------------------------------------- paged attention


def paged_attention_decode(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                           block_tables: np.ndarray, context_lens: np.ndarray) -> np.ndarray:
    """q [B, Hq, D], pools [NB, BS, Hkv, D] -> out [B, Hq, D] float32; empty context -> zeros."""
    B, Hq, D = q.shape
    _, BS, Hkv, _ = k_pool.shape
    group = Hq // Hkv
    out = np.zeros((B, Hq, D), np.float32)
    for b in range(B):
        L = int(context_lens[b])
        if L == 0:
            continue
        t = np.arange(L)
        blocks, rows = block_tables[b, t // BS], t % BS  # token t: row t % BS of table[t // BS]
        k = np.repeat(k_pool[blocks, rows].astype(np.float32), group, axis=1)  # (L, Hq, D)
        v = np.repeat(v_pool[blocks, rows].astype(np.float32), group, axis=1)  # (L, Hq, D)
        s = np.einsum("hd,lhd->hl", q[b].astype(np.float32), k) / math.sqrt(D)  # (Hq, L)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[b] = np.einsum("hl,lhd->hd", p, v)
    return out
