"""The bundled VILA-U (models/vila-u-tiny-shapes, its engine in vila_edge/bundled/): the checkpoint is in
the real layout and the shipped engine is the checkpoint exported (argmax codes equal the torch
reference's); a slice of the held-out evaluation (trainers/tiny_vila_u/evaluate.py) stays above floors
a broken engine, decoder or tokenizer would fall through; the judges are right on real scenes."""
import os

import numpy as np
import pytest

from trainers.tiny_shapes import scenes
from trainers.tiny_vila_u import evaluate, prompts
from vila_edge_export.bundle import VILA_U_CHECKPOINT as CHECKPOINT, VILA_U_ENGINE as ENGINE

# Floors of the slices below, the trained engine's own slice scores less a margin (measured: see
# the tests); a random-weight engine answers nothing right, reconstructs at ~7 dB and draws no
# shape (the judge's guess: 1/4) in a palette colour at most by chance (1/6), in the asked cell by
# chance 1/9. The generation path is also held to the torch reference code for code.
FLOORS = {"understanding": 0.8, "psnr_db": 24.5}   # measured on this slice: 1.00, 25.9 dB (fp32 engine)
GEN_SLICE = 12                                     # the first held-out prompts, one picture each, cfg 3
# measured on this slice (fp32 engine): shape 0.92 (11/12), colour 0.83 (10/12), position 0.83 (10/12)
GEN_FLOORS = {"shape": 0.75, "color": 0.5, "position": 0.5}


@pytest.fixture(scope="module")
def engine():
    return evaluate.EngineBackend(ENGINE, threads=2)


def test_checkpoint_is_the_real_layout_and_small():
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    spec = read_vila_u(CHECKPOINT)
    v = spec.llm.vocab_size
    assert (spec.siglip.grid, spec.depth, spec.codebook_size, spec.rope_factor) == (3, 4, 128, 2.0)
    assert spec.special_ids["<im_start>"] == v - 4 and spec.head == (64, 2, 4)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CHECKPOINT) for f in fs)
    assert size <= 25e6


def test_shipped_engine_draws_what_the_reference_draws(engine):
    """temperature 0: the same codes at every position and depth, pixels within 2 (fp32 engine).
    If this fails after a retrain or an engine format change: make bundled-vila-u-engine."""
    from vila_edge.imagine import generate_codes
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    from vila_edge_export.reference_vila_u import VilaUReference

    ref = VilaUReference(read_vila_u(CHECKPOINT))
    prompt = prompts.specs(heldout=True)[0].text
    want = ref.generate_codes(prompt, temperature=0)
    got = generate_codes(engine.pipe, prompt, temperature=0)
    np.testing.assert_array_equal(got, want.numpy())
    image = np.asarray(engine.pipe.generate_image(prompt, temperature=0)[0]).astype(int)
    assert np.abs(image - ref.decode(want)[0].astype(int)).max() <= 2


def test_judges_are_right_on_real_scenes():
    """The colour/position masks and the judge model, on the real scenes of held-out prompts."""
    import random
    ask = evaluate.judge_model(threads=2)
    for i, spec in enumerate(prompts.specs(heldout=True)[:6]):
        pixels = np.asarray(scenes.render(prompts.scene_for(spec, random.Random(i))).resize((48, 48), 3))
        verdict = evaluate.judge(pixels, spec, ask)
        assert verdict["color"] and verdict.get("position", True), (spec.text, verdict)
    blank = np.full((48, 48, 3), 175, np.uint8)                      # a gray background, nothing drawn
    assert not evaluate.judge(blank, prompts.specs(heldout=True)[0], ask)["color"]


def test_evaluation_slice_stays_above_floors(engine):
    u = evaluate.understanding(engine.answer, n=32)["overall"]
    psnr = evaluate.reconstruction(engine, 8, 48)["psnr_db"]
    assert u >= FLOORS["understanding"] and psnr >= FLOORS["psnr_db"], (u, psnr)


def test_generation_slice_stays_above_floors(engine):
    """Seeded pictures of held-out prompts: the asked shape (the judge model), colour and cell (palette masks)."""
    got = evaluate.faithfulness(engine.draw, evaluate.judge_model(threads=2), samples=1, size=48, cfgs=(3.0,),
                                limit=GEN_SLICE)["cfg 3"]
    assert all(got[a]["accuracy"] >= f for a, f in GEN_FLOORS.items()), got


def test_first_code_teachers_by_hand():
    """Stage 1's cluster loss and class balance (trainers/tiny_vila_u/tower.py), against hand values."""
    import torch
    from trainers.tiny_vila_u.model import Codebook
    from trainers.tiny_vila_u.tower import ClusterLoss, cell_classes, class_balance

    shape, color = torch.tensor([[0, 1, 4]]), torch.tensor([[0, 1, 6]])       # empty, circle red, star orange
    assert cell_classes((shape, color), torch.tensor([2])).tolist() == [[50, 51, 74]]   # bg 2 * 25 + content
    w = class_balance(torch.tensor([3, 3, 3, 7]))
    assert torch.allclose(w, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))               # each class 2 of 4 in total
    loss = ClusterLoss(2)
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 5.0]]])
    classes = torch.tensor([[0, 0, 1, 1]])
    # centres (2, 0), (0, 5): within = mean(1, 1, 0, 0) = 0.5; total: mean(6.25, 10.25, 7.25, 7.25) = 7.75
    assert abs(loss(x, classes).item() - 0.5 / 7.75) < 1e-6
    a, b = Codebook(3, 2), Codebook(3, 2)
    r, codes = torch.randn(6, 2), torch.tensor([0, 1, 1, 2, 2, 2])
    for book in (a, b):
        book.init_from(r, torch.Generator().manual_seed(0))
    a.ema_update(r, codes, torch.Generator().manual_seed(1))
    b.ema_update(r, codes, torch.Generator().manual_seed(1), torch.ones(6))
    assert torch.allclose(a.weight, b.weight) and torch.allclose(a.cluster_size_ema, b.cluster_size_ema)


def test_guided_cross_entropy_by_hand():
    """The guidance pass's loss (trainers/tiny_vila_u/train.py): cross-entropy under l_u + cfg (l_c - l_u),
    no gradient into the unconditional logits."""
    import math

    import torch
    from trainers.tiny_vila_u.train import guided_cross_entropy

    cond = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    uncond = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    loss = guided_cross_entropy(cond, uncond, torch.tensor([0]), 3.0)     # guided logits (4, -2, 0)
    assert abs(loss.item() - math.log(1 + math.exp(-6) + math.exp(-4))) < 1e-6
    loss.backward()
    assert uncond.grad is None and cond.grad is not None
    p = torch.tensor([4.0, -2.0, 0.0]).softmax(0)
    assert torch.allclose(cond.grad[0], 3 * (p - torch.tensor([1.0, 0.0, 0.0])), atol=1e-6)
