"""Attention supervision targets (trainers/tiny_shapes/attention_targets.py) against hand-placed scenes.

Positions are derived here independently: the spliced sequence is rebuilt as a list of token
strings, and the cell of image token t comes from VILA1.5's column-major mlp_downsample order
(token j * S2 + i merges patch block (i, j); with a 6x6 patch grid block (i, j) is cell (i, j)),
not from train_tiny's token_cells.
"""
import os

import pytest
import torch

from trainers.tiny_shapes import attention_targets as at
from trainers.tiny_shapes.scenes import Obj, Sample, Scene
from trainers.tiny_shapes.model import IMAGE_TOKEN_INDEX, encode_conversation

ROOT = os.path.join(os.path.dirname(__file__), "..", "models", "vila-tiny-shapes")
S2 = 3                                            # image tokens per side (scenes.GRID)
T_IMG = S2 * S2


def _cell_of_token(t: int) -> int:
    i, j = t % S2, t // S2                        # column-major: t = j * S2 + i
    return i * S2 + j


def _obj(shape, color, cell):
    return Obj(shape, color, cell, 0.3, (0.0, 0.0), (0, 0, 0))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "llm"))


def _spliced_tokens(tok, ids):
    out = []
    for i in ids:
        out += [f"IMG{t}" for t in range(T_IMG)] if i == IMAGE_TOKEN_INDEX else [tok.convert_ids_to_tokens(i)]
    return out


def _targets(tok, sample):
    ids, labels = encode_conversation(tok, sample.turns)
    cells = [_cell_of_token(t) for t in range(T_IMG)]
    return _spliced_tokens(tok, ids), at.conversation_targets(tok, ids, labels, sample, cells)


def _queries(toks):
    return [k + 1 for k, t in enumerate(toks) if t == "▁ASSISTANT"]


def _image_starts(toks):
    return [k for k, t in enumerate(toks) if t == "IMG0"]


def test_token_order_helper_matches_the_bundled_projector():
    from trainers.tiny_shapes.model import TinyVila
    from trainers.tiny_shapes.teachers import token_cells

    assert token_cells(TinyVila.load(ROOT)).tolist() == [_cell_of_token(t) for t in range(T_IMG)]


def test_single_image_two_rounds(tok):
    scene = Scene("white", (_obj("circle", "red", (0, 1)), _obj("star", "blue", (2, 2)),
                            _obj("square", "green", (1, 0))))
    sample = Sample("color", [scene], [("<image>\nWhat color is the circle?", "red"), ("Where is the square?", "left")])
    toks, got = _targets(tok, sample)
    q1, q2 = _queries(toks)
    img, = _image_starts(toks)
    assert toks[q1] == ":" and toks[q1 + 1] == "▁red"
    circle, square = toks.index("▁circle"), toks.index("▁square")
    # circle at cell (0, 1) = row-major 1 -> token 3; square at (1, 0) = 3 -> token 1
    assert got == [(*at.KEY_HEAD, q1, [circle]), (*at.OBJECT_HEAD, q1, [img + 3]),
                   (*at.KEY_HEAD, q2, [square]), (*at.OBJECT_HEAD, q2, [img + 1])]


def test_count_exists_and_shape_questions(tok):
    scene = Scene("gray", (_obj("circle", "red", (0, 0)), _obj("circle", "blue", (2, 2)),
                           _obj("star", "yellow", (1, 1))))
    sample = Sample("count", [scene], [("<image>\nHow many circles are there?", "2"),
                                       ("Is there a red star?", "no"),
                                       ("Is there a blue circle?", "yes"),
                                       ("What shape is the yellow object?", "star")])
    toks, got = _targets(tok, sample)
    q = _queries(toks)
    img, = _image_starts(toks)
    word = lambda w, n=0: [k for k, t in enumerate(toks) if t == w][n]   # noqa: E731
    whole = list(range(img, img + T_IMG))
    # cells: (0,0) -> token 0, (2,2) -> token 8, (1,1) -> token 4
    assert got == [(*at.KEY_HEAD, q[0], [word("▁circles")]), (*at.IMAGE_HEAD, q[0], whole),
                   (*at.OBJECT_HEAD, q[0], [img + 0, img + 8, at.SINK]),
                   (*at.KEY_HEAD, q[1], [word("▁red"), word("▁star")]), (*at.OBJECT_HEAD, q[1], [at.SINK]),
                   (*at.KEY_HEAD, q[2], [word("▁blue"), word("▁circle")]), (*at.OBJECT_HEAD, q[2], [img + 8]),
                   (*at.KEY_HEAD, q[3], [word("▁yellow")]), (*at.OBJECT_HEAD, q[3], [img + 4])]


def test_two_image_comparison_and_few_shot(tok):
    a = Scene("white", (_obj("star", "red", (0, 2)),))
    b = Scene("black", (_obj("star", "red", (2, 0)), _obj("star", "green", (1, 2))))
    toks, got = _targets(tok, Sample("compare", [a, b], [
        ("<image>\n<image>\nWhich image has more stars? Answer first or second.", "second")]))
    (q,), (i0, i1) = _queries(toks), _image_starts(toks)
    stars = toks.index("▁stars")
    # a: (0,2) -> token 6; b: (2,0) -> token 2, (1,2) -> token 7
    assert got == [(*at.KEY_HEAD, q, [stars]), (*at.IMAGE_HEAD, q, list(range(i1, i1 + T_IMG))),
                   (*at.OBJECT_HEAD, q, [i1 + 2, i1 + 7, at.SINK]),
                   (*at.PREV_OBJECT_HEAD, q, [i0 + 6, at.SINK]),
                   (*at.PREV_IMAGE_HEAD, q, list(range(i0, i0 + T_IMG)))]
    text = "<image>\nThe star is red. <image>\nThe star is green. <image>\nWhat color is the star?"
    toks, got = _targets(tok, Sample("fewshot_color", [a, b, a], [(text, "red")]))
    (q,), starts = _queries(toks), _image_starts(toks)
    assert got == [(*at.KEY_HEAD, q, [max(k for k, t in enumerate(toks) if t == "▁star")]),
                   (*at.OBJECT_HEAD, q, [starts[2] + 6])]


def test_unknown_question_is_refused():
    assert at.parse_question("<image>\nHow many circles does this have?") == ("count", ("circle",))
    with pytest.raises(ValueError, match="no attention target"):
        at.parse_question("<image>\nDescribe the image.")


def test_attention_terms_are_the_cross_entropy_to_uniform_targets():
    att = torch.full((1, 2, 4, 4), 0.25)
    att[0, 1, 3] = torch.tensor([0.5, 0.1, 0.4, 0.0])
    total, n = at.attention_terms((att,), [[(0, 1, 3, [0, 2]), (0, 0, 2, [1])]])
    want = (-(torch.log(torch.tensor(0.5 + at.EPS)) + torch.log(torch.tensor(0.4 + at.EPS))) / 2
            - torch.log(torch.tensor(0.25 + at.EPS)))
    assert n == 2 and torch.allclose(total, want)
