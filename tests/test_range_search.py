"""Per-group range search (vila_edge_export/range_search.py) against a brute-force reference that
scores every candidate range on the calibration tokens themselves, and GPTQ with ranges fixed
beforehand (vila_edge_export/gptq.py `ranges`) against hand-computed rounding."""
import numpy as np
import pytest
import torch

from vila_edge_export.gptq import gptq_quantize
from vila_edge_export.quantize import CODE_RANGE, dequantize, quantize_group
from vila_edge_export.range_search import GRID, MAX_SHRINK, blocks_of_hessian, group_blocks, search_ranges


def _data(seed: int, n: int, k: int, t: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2.0, k)      # groups of different spread
    w[0, 1] = 6.0                                                           # an outlier worth clipping
    x = torch.randn(t, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(k, generator=g)
    return w, x


def _reference(w: torch.Tensor, x: torch.Tensor, group: int, bits: int, zero_point: bool) -> tuple:
    """Every (row, group) and every candidate range in plain numpy float64, error measured as the mean
    over tokens of (x_g . (w_g - dequantized_g))^2; the first minimum wins, as in the search."""
    qmin, qmax = CODE_RANGE[bits]
    w, x = w.double().numpy(), x.double().numpy()
    n, k = w.shape
    steps = [i / GRID for i in range(int(GRID * MAX_SHRINK))]
    cands = [(a, b) for a in steps for b in steps] if zero_point else [(a, a) for a in steps]
    codes, scales, zeros = np.zeros((n, k)), np.zeros((n, k // group)), np.zeros((n, k // group))
    for r in range(n):
        for g in range(k // group):
            wg, xg = w[r, g * group:(g + 1) * group], x[:, g * group:(g + 1) * group]
            best = None
            for a, b in cands:
                if zero_point:
                    lo, hi = min(wg.min(), 0.0) * (1 - a), max(wg.max(), 0.0) * (1 - b)
                    s = float(np.float16(np.float32(max(hi - lo, 1e-8) / (qmax - qmin))))
                    z = min(max(qmin - np.round(lo / s), qmin), qmax)
                else:
                    s = float(np.float16(np.float32(max(np.abs(wg).max() * (1 - a), 1e-8) / qmax)))
                    z = 0.0
                c = np.clip(np.round(wg / s) + z, qmin, qmax)
                err = np.mean((xg @ (wg - (c - z) * s)) ** 2)
                if best is None or err < best[0]:
                    best = (err, c, s, z)
            codes[r, g * group:(g + 1) * group], scales[r, g], zeros[r, g] = best[1], best[2], best[3]
    return codes, scales, zeros


@pytest.mark.parametrize("bits, zero_point", [(4, True), (4, False), (8, False)])
def test_search_matches_the_brute_force_reference(bits, zero_point):
    w, x = _data(0, 5, 32, 64)
    got = search_ranges(w, group_blocks(x, 8), 8, bits, zero_point)
    codes, scales, zeros = _reference(w, x, 8, bits, zero_point)
    np.testing.assert_array_equal(got.codes.numpy(), codes)
    np.testing.assert_allclose(got.scales.numpy(), scales, rtol=0, atol=0)
    if zero_point:
        np.testing.assert_array_equal(got.zeros.numpy(), zeros)
    else:
        assert got.zeros is None


def test_search_is_never_worse_than_round_to_nearest():
    w, x = _data(1, 6, 32, 64)
    blocks = group_blocks(x, 16)
    rtn, got = quantize_group(w, 16, 4, True), search_ranges(w, blocks, 16, 4, True)

    def err(q):      # (N, K/G): the measure the search minimises, per row and group
        dw = (dequantize(q.codes, q.scales, q.zeros) - w).reshape(6, 2, 16).transpose(0, 1)
        return (torch.bmm(dw, blocks) * dw).sum(-1).T
    assert (err(got) <= err(rtn) + 1e-6).all()
    assert err(got).sum() < 0.9 * err(rtn).sum()


def test_hessian_blocks_are_the_diagonal_blocks():
    _, x = _data(2, 1, 12, 20)
    h = x.T @ x / x.shape[0]
    torch.testing.assert_close(blocks_of_hessian(h, 4), torch.stack([h[i:i + 4, i:i + 4] for i in (0, 4, 8)]))
    torch.testing.assert_close(group_blocks(x, 4), blocks_of_hessian(h, 4))


def test_gptq_with_fixed_ranges_keeps_them_and_rounds_to_nearest_without_correlation():
    """With H = I no column's error reaches another: GPTQ is round-to-nearest on the given grid,
    clamp(round(w / s) + z, qmin, qmax), and the given scales and zeros come back unchanged."""
    w, x = _data(3, 4, 32, 64)
    ranges = search_ranges(w, group_blocks(x, 8), 8, 4, True)
    got = gptq_quantize(w, torch.eye(32, dtype=torch.float64), 8, 4, True, ranges=ranges)
    s = ranges.scales.repeat_interleave(8, dim=1).double()
    z = ranges.zeros.repeat_interleave(8, dim=1).double()
    want = torch.clamp(torch.round(w.double() / s) + z, -8, 7).to(torch.int8)
    torch.testing.assert_close(got.codes, want, rtol=0, atol=0)
    torch.testing.assert_close(got.scales, ranges.scales, rtol=0, atol=0)
    torch.testing.assert_close(got.zeros, ranges.zeros, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ranges"):
        gptq_quantize(w, torch.eye(32, dtype=torch.float64), 8, 4, False, ranges=ranges)


@pytest.mark.parametrize("gptq, search", [(False, True), (True, True), (False, False)])
def test_calibrated_range_search_beats_rtn_on_a_tiny_decoder(gptq, search):
    """awq_quantize(ranges=True): every decoder linear's groups searched on its calibration inputs (after
    AWQ's scales, with GPTQ picking the codes, or alone), int8 where asked (symmetric), and the logits on
    held-out inputs closer to float than round-to-nearest's."""
    from test_quantize import GROUP, _logit_error, outlier_embeds, tiny_model
    from vila_edge_export.awq import awq_quantize
    from vila_edge_export.quantize import rtn_quantize
    model = tiny_model("llama")
    int8 = ("model.layers.1.mlp.down_proj",)
    q = awq_quantize(model, outlier_embeds(seed=4, n=4), GROUP, progress=False, zero_point=True, int8=int8,
                     gptq=gptq, search=search, ranges=True)
    assert {n: (w.bits, w.zeros is None) for n, w in q.linears.items() if n != "lm_head"} == \
        {n: ((8, True) if n in int8 else (4, False)) for n in q.linears if n != "lm_head"}
    rtn = rtn_quantize(model, GROUP, zero_point=True, int8=int8)
    held_out = outlier_embeds(seed=5, n=4)
    assert _logit_error(model, q, held_out) < _logit_error(model, rtn, held_out)
