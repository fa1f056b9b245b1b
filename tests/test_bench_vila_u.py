"""bench_vila_u's arithmetic and the reference's official-loop mode: the dummy text token leaves the
codes alone, the extrapolation counts the prefill once, the per-layer scaling is the weight-byte ratio."""
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_vila_u, vila_u_scale
from vila_edge_export.checkpoint_vila_u import read_vila_u
from vila_edge_export.fixtures import write_fixture


def test_reference_text_token_leaves_the_codes_and_is_timed(tmp_path):
    from vila_edge_export.reference_vila_u import VilaUReference

    ref = VilaUReference(read_vila_u(write_fixture(str(tmp_path / "tiny"), kind="vila-u", shape="tiny", seed=3)))
    draw = lambda **kw: ref.generate_codes("a red cube", generator=torch.Generator().manual_seed(5), positions=5, **kw)
    timing = {}
    with torch.inference_mode():
        assert torch.equal(draw(), draw(timing=timing, text_head=True))
    assert timing["llm_s"] > timing["prefill_s"] > 0 and timing["depth_s"] > 0 and timing["text_head_s"] > 0


def test_extrapolation_counts_the_prefill_once():
    side = {"seconds": [9.0], "split": [{"loop_s": 5.0, "prefill_s": 1.0, "decoder_s": 4.0}]}
    assert bench_vila_u.per_image(side, 4, 16) == 1.0 + 4.0 * 16 / 4 + 4.0
    bare = bench_vila_u.without_head({"seconds": [9.0], "split": [{"loop_s": 5.0, "text_head_s": 2.0}]})
    assert bare["seconds"] == [7.0] and bare["split"][0]["loop_s"] == 3.0


def _spec(llm_layers, head_layers):
    """The vila-u-7b-256 widths (fixtures_vila_u.SHAPES) with fewer layers."""
    llm = SimpleNamespace(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, layers=llm_layers)
    return SimpleNamespace(llm=llm, siglip=SimpleNamespace(hidden=1024), head=(2560, head_layers, 40),
                           codebook_size=16384, depth=4)


def test_scaling_is_the_weight_byte_ratio():
    f = vila_u_scale.factors(_spec(1, 1))
    # by hand: an LLM layer 4096*(32+2*32)*128 + 32*128*4096 + 3*4096*11008 = 202_375_168 weights, the
    # projector 1024*4096 + 4096*4096 = 20_971_520; a depth block 12*2560^2 = 78_643_200, the depth
    # step's fixed part 16384*2560 + 1024*2560 + 4096*2560/4 = 47_185_920
    assert f["prefill"] == 32
    assert f["llm_steps"] == pytest.approx((20_971_520 + 32 * 202_375_168) / (20_971_520 + 202_375_168))
    assert f["depth"] == pytest.approx(4.125)
    assert vila_u_scale.factors(_spec(32, 6)) == dict(f, prefill=1.0, llm_steps=1.0, depth=1.0, layers=(32, 6))
    split = {"loop_s": 10.0, "prefill_s": 1.0, "llm_s": 3.0, "depth_s": 5.0, "text_head_s": 1.5, "decoder_s": 2.0}
    want = 1.0 * 32 + ((3.0 - 1.0) * f["llm_steps"] + 5.0 * 4.125 + 1.5 + 0.5) / 4 * 256 + 2.0
    assert vila_u_scale.scaled_image(12.0, split, 4, 256, f) == pytest.approx(want)
