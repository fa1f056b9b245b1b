"""The numpy oracles of vila_edge/cuda/reference.py against independent formulations, on CPU.

The GPU tests trust these references, so each is checked here against something written
differently: VILA's own DownSampleBlock code, explicit loops, vila_edge_export's torch projector and
quantizer, and contiguous softmax attention over a plain reshape of the gathered blocks.
"""

import math

import numpy as np
import pytest
import torch

from vila_edge import int4
from vila_edge.cuda import abi
from vila_edge.cuda import reference as ref
from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- merge / projector


def vila_downsample_2x2(x: torch.Tensor, nvila: bool) -> torch.Tensor:
    """VILA's DownSampleBlock verbatim (NVlabs/VILA@1c88211:llava/model/multimodal_projector/base_projector.py);
    nvila adds the second permute."""
    n, t, c = x.shape
    s = math.isqrt(t)
    x = x.reshape(n, s, s, c)
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.cat([x, x.new_zeros(n, 1, h, c)], dim=1)
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.cat([x, x.new_zeros(n, w, 1, c)], dim=2)
        n, w, h, c = x.size()
    x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous().view(n, h // 2, w // 2, c * 4)
    if nvila:
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


def merge_loops(x: np.ndarray, m: int, order: str) -> np.ndarray:
    """Merged token (i, j) = concat over (dy outer, dx inner) of x[m*i+dy, m*j+dx], zero past S."""
    n, t, C = x.shape
    S = math.isqrt(t)
    S2 = -(-S // m)
    out = np.zeros((n, S2 * S2, m * m * C), np.float32)
    for b in range(n):
        for i in range(S2):
            for j in range(S2):
                tok = i * S2 + j if order == ROW_MAJOR else j * S2 + i
                for dy in range(m):
                    for dx in range(m):
                        y, xx = m * i + dy, m * j + dx
                        if y < S and xx < S:
                            k = (dy * m + dx) * C
                            out[b, tok, k:k + C] = x[b, y * S + xx]
    return out


@pytest.mark.parametrize("S", [4, 5, 27])
@pytest.mark.parametrize("order", [ROW_MAJOR, COLUMN_MAJOR])
def test_merge_2x2_matches_vila_downsample_block(S, order):
    x = rng(S).standard_normal((2, S * S, 6)).astype(np.float32)
    want = vila_downsample_2x2(torch.from_numpy(x), nvila=order == ROW_MAJOR).numpy()
    np.testing.assert_array_equal(ref.merge_tokens(x, 2, order), want)


@pytest.mark.parametrize("m,S", [(2, 6), (2, 7), (3, 6), (3, 7), (3, 8), (3, 32)])
@pytest.mark.parametrize("order", [ROW_MAJOR, COLUMN_MAJOR])
def test_merge_matches_loops(m, S, order):
    x = rng(m * S).standard_normal((2, S * S, 3)).astype(np.float32)
    np.testing.assert_array_equal(ref.merge_tokens(x, m, order), merge_loops(x, m, order))


def test_merged_token_counts():
    assert ref.merged_side(27, 2) ** 2 == 196  # VILA1.5 384 px: 27 -> 28 padded
    assert ref.merged_side(32, 2) ** 2 == 256
    assert ref.merged_side(32, 3) ** 2 == 121  # NVILA-Lite 448 px: 32 -> 33 padded


def test_merge_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        ref.merge_tokens(np.zeros((1, 10, 4), np.float32), 2, ROW_MAJOR)


def random_projector(merge: int, C: int, H: int, seed: int = 0) -> ref.ProjectorWeights:
    r = rng(seed)
    fc1_out = H if merge == 2 else 3 * C
    L = merge * merge * C

    def lin(o, i):
        return (r.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32), \
            (0.1 * r.standard_normal(o)).astype(np.float32)

    def ln(d):
        return (1 + 0.1 * r.standard_normal(d)).astype(np.float32), \
            (0.1 * r.standard_normal(d)).astype(np.float32)

    ln0_g, ln0_b = ln(L)
    fc1_w, fc1_b = lin(fc1_out, L)
    if merge == 2:
        fc2_w, fc2_b = lin(H, H)
        return ref.ProjectorWeights(2, ln0_g, ln0_b, fc1_w, fc1_b, fc2_w, fc2_b)
    ln1_g, ln1_b = ln(3 * C)
    fc2_w, fc2_b = lin(H, 3 * C)
    fc3_w, fc3_b = lin(H, H)
    return ref.ProjectorWeights(3, ln0_g, ln0_b, fc1_w, fc1_b, fc2_w, fc2_b, ln1_g, ln1_b,
                                fc3_w, fc3_b)


def torch_projector(w: ref.ProjectorWeights, order: str):
    """vila_edge_export/projector.py's nn.Module (VILA's module list) loaded with w's parameters."""
    from vila_edge_export.projector import build_projector

    kind = "mlp_downsample" if w.merge == 2 else "mlp_downsample_3x3_fix"
    module = build_projector(kind, w.channels, w.hidden, order)
    if w.merge == 2:  # checkpoint indices: base_projector.py's nn.Sequential
        keys = {"1": ("ln0_g", "ln0_b"), "2": ("fc1_w", "fc1_b"), "4": ("fc2_w", "fc2_b")}
    else:
        keys = {"1": ("ln0_g", "ln0_b"), "2": ("fc1_w", "fc1_b"), "4": ("ln1_g", "ln1_b"),
                "5": ("fc2_w", "fc2_b"), "7": ("fc3_w", "fc3_b")}
    state = {}
    for idx, (wn, bn) in keys.items():
        state[f"layers.{idx}.weight"] = torch.from_numpy(getattr(w, wn))
        state[f"layers.{idx}.bias"] = torch.from_numpy(getattr(w, bn))
    module.load_state_dict(state)
    return module.eval()


@pytest.mark.parametrize("merge,S,order", [(2, 27, COLUMN_MAJOR), (2, 8, ROW_MAJOR),
                                           (3, 32, ROW_MAJOR), (3, 7, COLUMN_MAJOR)])
def test_projector_matches_export_torch_module(merge, S, order):
    C, H = 8, 24
    w = random_projector(merge, C, H, seed=S)
    x = rng(S).standard_normal((2, S * S, C)).astype(np.float32)
    with torch.no_grad():
        want = torch_projector(w, order)(torch.from_numpy(x)).numpy()
    got = ref.projector(x, w, order)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_projector_fp16_intermediates_stay_close():
    w = random_projector(3, 8, 24)
    x = rng().standard_normal((1, 49, 8)).astype(np.float32)
    exact, rounded = ref.projector(x, w, ROW_MAJOR), ref.projector(x, w, ROW_MAJOR, True)
    assert not np.array_equal(exact, rounded)
    np.testing.assert_allclose(rounded, exact, rtol=1e-2, atol=1e-2)


def test_gelu_is_exact_erf():
    x = np.linspace(-6, 6, 101).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # approximate="none"
    np.testing.assert_allclose(ref.gelu_erf(x), want, rtol=1e-6, atol=1e-6)


def test_projector_validate_names_bad_weight():
    w = random_projector(2, 8, 24)
    bad = ref.ProjectorWeights(2, w.ln0_g, w.ln0_b, w.fc1_w, w.fc1_b, w.fc2_w[:, :5], w.fc2_b)
    with pytest.raises(ValueError, match="fc2_w"):
        bad.validate()


def test_splice_leaves_other_rows_untouched():
    emb = rng().standard_normal((20, 4)).astype(np.float32)
    feats = np.ones((2, 3, 4), np.float32) * np.array([1, 2], np.float32)[:, None, None]
    out = ref.splice(emb, feats, np.array([2, 10]))
    covered = np.zeros(20, bool)
    covered[2:5] = covered[10:13] = True
    np.testing.assert_array_equal(out[~covered], emb[~covered])
    np.testing.assert_array_equal(out[2:5], 1)
    np.testing.assert_array_equal(out[10:13], 2)


@pytest.mark.parametrize("offsets,match", [([18], "outside"), ([-1], "outside"),
                                           ([0, 2], "overlap")])
def test_check_splice_rejects(offsets, match):
    with pytest.raises(ValueError, match=match):
        ref.check_splice(np.array(offsets), 3, 20)


# ----------------------------------------------------------------------------- int4


def test_pack_puts_even_k_in_low_nibble_unsigned():
    codes = np.array([[-8, 7, 0, -1] + [0] * 28], np.int8)  # N=1, K=G=32
    packed, _ = int4.pack_matmulnbits(codes, np.ones((1, 1), np.float32), 32)
    assert packed.shape == (1, 1, 16) and packed.dtype == np.uint8
    assert packed[0, 0, 0] == 0x0 | (0xF << 4)  # k=0: -8+8=0 low nibble, k=1: 7+8=15 high
    assert packed[0, 0, 1] == 8 | (7 << 4)  # k=2: 0+8, k=3: -1+8


@pytest.mark.parametrize("G", abi.GEMV_GROUPS)
def test_pack_unpack_round_trip(G):
    codes = rng(G).integers(-8, 8, size=(5, 4 * G)).astype(np.int8)
    packed, _ = int4.pack_matmulnbits(codes, np.ones((5, 4), np.float32), G)
    assert packed.shape == (5, 4, G // 2)
    np.testing.assert_array_equal(int4.unpack_matmulnbits(packed), codes)


@pytest.mark.parametrize("G", abi.GEMV_GROUPS)
@pytest.mark.parametrize("M", [1, 4])
def test_int4_gemv_matches_export_dequantize_matmul(G, M):
    from vila_edge_export.quantize import dequantize

    N, K = 37, 3 * 128
    w = rng(G).standard_normal((N, K)).astype(np.float32)
    codes, scales = int4.quantize(w, G)
    packed, scales16 = int4.pack_matmulnbits(codes, scales, G)
    x = rng(M).standard_normal((M, K)).astype(np.float16)
    w_dq = dequantize(torch.from_numpy(codes), torch.from_numpy(scales16.astype(np.float32)))
    want = x.astype(np.float64) @ w_dq.double().numpy().T
    np.testing.assert_allclose(ref.int4_gemv(x, packed, scales16), want, rtol=1e-4, atol=1e-3)


def test_int4_gemv_matches_group_loop():
    G, N, K = 32, 3, 96
    codes = rng(1).integers(-8, 8, size=(N, K)).astype(np.int8)
    scales = rng(2).uniform(0.01, 0.1, size=(N, K // G)).astype(np.float32)
    packed, scales16 = int4.pack_matmulnbits(codes, scales, G)
    x = rng(3).standard_normal((2, K)).astype(np.float32)
    want = np.zeros((2, N))
    for m in range(2):
        for n in range(N):
            for g in range(K // G):
                ks = slice(g * G, (g + 1) * G)
                want[m, n] += float(scales16[n, g]) * np.dot(x[m, ks], codes[n, ks].astype(np.float64))
    np.testing.assert_allclose(ref.int4_gemv(x, packed, scales16), want, rtol=1e-5, atol=1e-5)


def test_quantize_int4_is_symmetric_absmax_over_7():
    w = rng().standard_normal((4, 64)).astype(np.float32)
    codes, scales = int4.quantize(w, 32)
    assert codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_allclose(scales, ref.fp16_round(np.abs(w.reshape(4, 2, 32)).max(-1) / 7))


# ----------------------------------------------------------------------------- paged attention


def make_paged(B, Hq, Hkv, D, BS, lens, NB=None, seed=0):
    """Random pools and a shuffled block assignment: each sequence owns distinct blocks."""
    r = rng(seed)
    per_seq = [max(1, -(-L // BS)) for L in lens]
    max_blocks = max(per_seq)
    NB = NB or sum(per_seq) + 3
    ids = r.permutation(NB)
    tables = np.zeros((B, max_blocks), np.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = ids[at:at + n]
        at += n
    q = r.standard_normal((B, Hq, D)).astype(np.float16)
    k = r.standard_normal((NB, BS, Hkv, D)).astype(np.float16)
    v = r.standard_normal((NB, BS, Hkv, D)).astype(np.float16)
    return q, k, v, tables, np.array(lens, np.int32)


def contiguous_attention(q, k_pool, v_pool, tables, lens):
    """Gather whole blocks, reshape to a contiguous [T, Hkv, D] cache, then plain attention."""
    B, Hq, D = q.shape
    _, BS, Hkv, _ = k_pool.shape
    out = np.zeros((B, Hq, D))
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        n = -(-L // BS)
        k = k_pool[tables[b, :n]].reshape(n * BS, Hkv, D)[:L].astype(np.float64)  # (T, Hkv, D)
        v = v_pool[tables[b, :n]].reshape(n * BS, Hkv, D)[:L].astype(np.float64)
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            s = k[:, kvh] @ q[b, h].astype(np.float64) / math.sqrt(D)  # (T,)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, kvh]
    return out


@pytest.mark.parametrize("B,Hq,Hkv,D,BS,lens", [
    (2, 12, 2, 128, 16, [37, 1]),   # NVILA-Lite-2B GQA, edge blocks
    (1, 20, 20, 128, 32, [65]),     # VILA1.5-3B MHA
    (3, 9, 3, 64, 16, [16, 17, 0]),  # SmolLM2-style D=64, exact block, empty context
])
def test_paged_attention_matches_contiguous(B, Hq, Hkv, D, BS, lens):
    q, k, v, tables, ctx = make_paged(B, Hq, Hkv, D, BS, lens)
    want = contiguous_attention(q, k, v, tables, ctx)
    np.testing.assert_allclose(ref.paged_attention_decode(q, k, v, tables, ctx), want,
                               rtol=1e-5, atol=1e-5)


def test_paged_attention_matches_torch_sdpa():
    q, k, v, tables, ctx = make_paged(1, 4, 2, 64, 16, [40])
    n = 3
    kk = torch.from_numpy(k[tables[0, :n]].reshape(48, 2, 64)[:40].astype(np.float32))  # (T, Hkv, D)
    vv = torch.from_numpy(v[tables[0, :n]].reshape(48, 2, 64)[:40].astype(np.float32))
    kk = kk.permute(1, 0, 2).repeat_interleave(2, dim=0)  # (Hq, T, D): head h reads kv h // 2
    vv = vv.permute(1, 0, 2).repeat_interleave(2, dim=0)
    qq = torch.from_numpy(q[0].astype(np.float32))[:, None, :]  # (Hq, 1, D)
    want = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)[:, 0].numpy()
    np.testing.assert_allclose(ref.paged_attention_decode(q, k, v, tables, ctx)[0], want,
                               rtol=1e-4, atol=1e-5)
