"""GPTQ rounding (vila_edge_export/gptq.py) against an independent reference on tiny shapes, and the
bits-per-weight accounting of the quality report, hand-computed."""
import pytest
import torch

from vila_edge_export.gptq import DAMP, gptq_quantize, hessian
from vila_edge_export.quality import bits_per_weight
from vila_edge_export.quantize import CODE_RANGE, QuantizedLLM, dequantize, quantize_group


def _inputs(seed: int, t: int, k: int) -> torch.Tensor:
    """Correlated activations with a mean, as LLM activations are: x [T, K]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(k, generator=g)


def _obs_reference(w: torch.Tensor, h: torch.Tensor, group: int, bits: int, zero_point: bool) -> tuple:
    """Optimal Brain Quantization in its first form (Frantar & Alistarh 2022, eq. 2-3), one column at a
    time with the explicit inverse Hessian downdated after each column; no Cholesky, no lazy blocks.
    A group's scale / zero point come from its columns as they stand when its first column is reached."""
    qmin, qmax = CODE_RANGE[bits]
    w, k = w.double().clone(), w.shape[1]
    h = h.double() + DAMP * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.int8)
    for i in range(k):
        if i % group == 0:
            q = quantize_group(w[:, i:i + group], group, bits, zero_point)
            s, z = q.scales[:, 0].double(), (q.zeros[:, 0].double() if zero_point else 0.0)
        c = torch.clamp(torch.round(w[:, i] / s) + z, qmin, qmax)
        codes[:, i] = c.to(torch.int8)
        w[:, i:] -= torch.outer((w[:, i] - (c - z) * s) / hinv[i, i], hinv[i, i:])
        hinv -= torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]      # drop column i from the problem
    return codes


@pytest.mark.parametrize("bits, group, zero_point, block", [(4, 16, False, 128), (4, 16, True, 128),
                                                            (4, 16, True, 32), (8, 32, False, 32)])
def test_gptq_matches_the_obq_reference(bits, group, zero_point, block):
    """Same codes as column-by-column OBQ with an explicit inverse; block 32 < K = 96 runs the lazy
    updates between blocks."""
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(bits + group))
    h = hessian(_inputs(7, 256, 96))
    q = gptq_quantize(w, h, group, bits, zero_point, block=block)
    assert q.codes.shape == (12, 96) and q.scales.shape == (12, 96 // group)
    assert (q.zeros is not None) == zero_point
    ref = _obs_reference(w, h, group, bits, zero_point)
    assert torch.equal(q.codes, ref)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Hessian couples no columns: GPTQ rounds each weight to nearest, as quantize_group does."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5)
    for zp in (False, True):
        q, rtn = gptq_quantize(w, h, 16, 4, zp), quantize_group(w, 16, 4, zp)
        assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales)
        assert zp is False or torch.equal(q.zeros, rtn.zeros)


def test_gptq_lowers_the_output_error():
    """On held-out activations of the same distribution, ||x (W - W_q)^T||^2 well below round-to-nearest's."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    x = _inputs(8, 1280, 128)
    x_calib, x_test = x[:1024], x[1024:]
    for zp in (False, True):
        err = lambda q: (x_test @ (w - dequantize(q.codes, q.scales, q.zeros)).T).pow(2).mean().item()
        gptq, rtn = err(gptq_quantize(w, hessian(x_calib), 32, 4, zp)), err(quantize_group(w, 32, 4, zp))
        assert gptq < 0.7 * rtn, (zp, gptq, rtn)


def test_bits_per_weight_hand_computed():
    """Every stored bit over the matrix's weights: codes at their bits, an fp16 scale per group, a zero
    point at the codes' bits per group (counted unpacked: MatMulNBits pads each row's zero points to a
    whole byte, 4 bits per row at an odd group count, which the report leaves out)."""
    def q(n, k, g, bits, zp):
        return quantize_group(torch.randn(n, k), g, bits, zp)
    linears = {"model.layers.0.self_attn.q_proj": q(4, 128, 32, 4, True),     # 512 w: 2048 + 16*16 + 16*4
               "model.layers.0.mlp.down_proj": q(2, 256, 64, 8, False),       # 512 w: 4096 + 8*16
               "lm_head": q(8, 64, 64, 8, False)}                             # 512 w: 4096 + 8*16
    bpw = bits_per_weight(QuantizedLLM({}, linears, "rtn", 32, 8, True))
    assert bpw == {"decoder": (2048 + 256 + 64 + 4096 + 128) / 1024, "lm_head": (4096 + 128) / 512}
    assert bpw["decoder"] == 6.4375


@pytest.mark.parametrize("search", [False, True])
def test_calibrated_gptq_beats_rtn_on_a_tiny_decoder(search):
    """awq_quantize(gptq=True): GPTQ alone (`--quant gptq`, search False) or after AWQ's scale search
    (search True): every decoder linear GPTQ-rounded on its calibration inputs, int8 where asked
    (symmetric), and the logits on held-out inputs closer to float than round-to-nearest's."""
    from test_quantize import GROUP, _logit_error, outlier_embeds, tiny_model
    from vila_edge_export.awq import awq_quantize
    from vila_edge_export.quantize import rtn_quantize
    model = tiny_model("llama")
    int8 = ("model.layers.0.mlp.down_proj",)
    q = awq_quantize(model, outlier_embeds(seed=4, n=4), GROUP, progress=False, zero_point=True, int8=int8,
                     gptq=True, search=search)
    assert q.method == ("awq+gptq" if search else "gptq")
    assert {n: (w.bits, w.zeros is None) for n, w in q.linears.items() if n != "lm_head"} == \
        {n: ((8, True) if n in int8 else (4, False)) for n in q.linears if n != "lm_head"}
    rtn = rtn_quantize(model, GROUP, zero_point=True, int8=int8)
    held_out = outlier_embeds(seed=5, n=4)
    err_gptq, err_rtn = _logit_error(model, q, held_out), _logit_error(model, rtn, held_out)
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def _outputs(model, names: list, embeds: list) -> dict:
    """{linear: its outputs [sum T, N]} over embeds."""
    got = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, args, out, n=n: got.setdefault(n, []).append(out[0]))
               for n in names]
    try:
        with torch.no_grad():
            for e in embeds:
                model(inputs_embeds=e)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_gptq_rounding_after_awq_keeps_its_ranges_and_lowers_the_output_error():
    """`--quant awq --gptq-rounding` (awq_quantize(search, ranges, gptq)): the same AWQ scales and searched
    ranges as plain AWQ (every group's scale and zero point identical), other codes, and a lower output
    error of layer 0's q/k/v on the calibration inputs than AWQ's round-to-nearest in those ranges and than
    RTN; in act-order (the default, `--act-order`) lower still. Layer 0's q/k/v read the (folded) input norm of
    the calibration embeddings themselves, so that error is the quantity GPTQ minimises: sum ||W_q x - W x||^2
    over the calibration tokens."""
    from test_quantize import GROUP, _logit_error, outlier_embeds, tiny_model
    from vila_edge_export.awq import awq_quantize
    from vila_edge_export.quantize import QuantConfigError, apply_quantized, rtn_quantize
    model, calib = tiny_model("llama"), outlier_embeds(seed=4, n=4)
    awq = awq_quantize(model, calib, GROUP, progress=False, zero_point=True, ranges=True)
    both = awq_quantize(model, calib, GROUP, progress=False, zero_point=True, ranges=True, gptq=True)
    act = awq_quantize(model, calib, GROUP, progress=False, zero_point=True, ranges=True, gptq=True, act_order=True)
    rtn = rtn_quantize(model, GROUP, zero_point=True)
    assert (awq.method, both.method) == ("awq", "awq+gptq")
    assert awq.linears.keys() == both.linears.keys()
    for name, a in awq.linears.items():
        for b in (both.linears[name], act.linears[name]):
            assert torch.equal(a.scales, b.scales) and (a.zeros is None or torch.equal(a.zeros, b.zeros)), name
            if name != "lm_head":           # rounded to nearest in all: llm-awq searches only the decoder
                assert (a.codes != b.codes).float().mean() > 0.05, name
        if name != "lm_head":
            assert (both.linears[name].codes != act.linears[name].codes).float().mean() > 0.02, name
    assert torch.equal(awq.linears["lm_head"].codes, both.linears["lm_head"].codes)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    ref = _outputs(model, names, calib)

    def err(q) -> float:
        out = _outputs(apply_quantized(model, q), names, calib)
        return sum((out[n] - ref[n]).pow(2).sum().item() for n in names)

    err_act, err_both, err_awq, err_rtn = err(act), err(both), err(awq), err(rtn)
    assert err_act < err_both < err_awq < err_rtn, (err_act, err_both, err_awq, err_rtn)
    held_out = outlier_embeds(seed=5, n=4)
    assert max(_logit_error(model, both, held_out), _logit_error(model, act, held_out)) < \
        _logit_error(model, rtn, held_out)
    with pytest.raises(QuantConfigError, match="act_order"):
        awq_quantize(model, calib, GROUP, progress=False, zero_point=True, ranges=False, gptq=True, act_order=True)


def _obq_fixed_reference(w: torch.Tensor, h: torch.Tensor, order: list, scales: torch.Tensor, zeros: torch.Tensor,
                         group: int) -> torch.Tensor:
    """OBQ with an explicit inverse (as _obs_reference) visiting the columns in `order`, each rounded with its
    own group's fixed scale and zero point; the inverse downdated over the columns not yet visited."""
    w, k = w.double().clone(), w.shape[1]
    hinv = torch.linalg.inv(h.double() + DAMP * h.diagonal().mean() * torch.eye(k, dtype=torch.float64))
    codes, left = torch.zeros(w.shape, dtype=torch.int8), list(order)
    for j in order:
        s, z = scales[:, j // group].double(), zeros[:, j // group].double()
        c = torch.clamp(torch.round(w[:, j] / s) + z, -8, 7)
        codes[:, j] = c.to(torch.int8)
        left.remove(j)
        w[:, left] -= torch.outer((w[:, j] - (c - z) * s) / hinv[j, j], hinv[j, left])
        hinv -= torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


def test_act_order_matches_the_obq_reference_within_fixed_ranges():
    """ordered_inverse_hessian: columns by descending H_kk (worked out here by hand from a diagonal we set),
    codes as OBQ visiting them in that order with each group's fixed scale / zero point, which stay as given."""
    from vila_edge_export.gptq import ordered_inverse_hessian
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(10, 48, generator=g), _inputs(12, 512, 48)
    x[:, 40] *= 6.0                                 # the largest H_kk: rounded first
    h = hessian(x)
    order = sorted(range(48), key=lambda j: -h[j, j].item())
    assert order[0] == 40
    ranges = quantize_group(w * 0.9, 16, 4, True)   # any fixed ranges (here: narrower than w's own)
    got = gptq_quantize(w, ordered_inverse_hessian(h), 16, 4, True, ranges=ranges)
    assert torch.equal(ordered_inverse_hessian(h)[2], torch.tensor(order))
    assert torch.equal(got.codes, _obq_fixed_reference(w, h, order, ranges.scales, ranges.zeros, 16))
    assert torch.equal(got.scales, ranges.scales) and torch.equal(got.zeros, ranges.zeros)
    # lazy blocks of 16 ordered columns (the error of a block reaching later blocks in one product): the same codes
    lazy = gptq_quantize(w, ordered_inverse_hessian(h), 16, 4, True, block=16, ranges=ranges)
    assert torch.equal(lazy.codes, got.codes)
    in_order = gptq_quantize(w, h, 16, 4, True, ranges=ranges)       # the plain order: the same reference
    assert torch.equal(in_order.codes, _obq_fixed_reference(w, h, list(range(48)), ranges.scales, ranges.zeros, 16))
    assert not torch.equal(got.codes, in_order.codes)
    with pytest.raises(ValueError, match="act-order"):
        gptq_quantize(w, ordered_inverse_hessian(h), 16, 4, True)
