"""Attention supervision for training vila-tiny-shapes: where a few heads should look.

A 4-layer LLM trained from scratch has to learn a two-hop lookup to answer "What color is the
circle?": bring the key word ("circle") to the answer position, then find the image token holding
a circle. Neither hop helps the loss before the other exists, and plain next-token training sat
at chance for 1200 steps (measured: held-out first-token accuracy 0.30 at step 1200, 8 categories).
During training we know both targets exactly (the scene is generated), so a cross-entropy on the
attention of four heads at each answer position teaches the hops directly; the next-token loss
then only has to learn the readout. The model is an ordinary Llama afterwards: nothing of this is
saved, and inference never computes it.

Heads (layer, head) and what they attend to from the position that predicts an answer:
  KEY_HEAD            the question's key words ("circle", "circles", "red")
  OBJECT_HEAD         the image tokens of the asked-about objects in the question's image (the
                      last image before it); for counts and yes/no also BOS as a sink, so "none"
                      has a place to look and 1/(n+1) of the attention on BOS tells the count
  PREV_OBJECT_HEAD    the same in the image before it (two-image comparisons)
  IMAGE_HEAD          all image tokens of the question's image (counts: the share of a shape's
                      tokens in their mean is n / T_img)
  PREV_IMAGE_HEAD     all image tokens of the image before it (comparisons)
Positions are in the spliced sequence (each "<image>" replaced by T_img tokens).
"""
import re

import torch

from trainers.tiny_shapes import scenes
from vila_edge.families import IMAGE_TOKEN_INDEX

KEY_HEAD = (0, 0)
OBJECT_HEAD = (1, 0)
PREV_OBJECT_HEAD = (1, 1)
IMAGE_HEAD = (1, 2)
PREV_IMAGE_HEAD = (1, 3)
SINK = 0                       # BOS position
EPS = 1e-6

# Every question scenes.py asks, with the words that name what it is about.
QUESTIONS = (
    (re.compile(r"What color is the (\w+)\?"), "color"),
    (re.compile(r"How many (\w+)s (?:are there|does this have)\?"), "count"),
    (re.compile(r"Is there an? (\w+) (\w+)\?"), "exists"),
    (re.compile(r"Where is the (\w+)\?"), "where"),
    (re.compile(r"What shape is the (\w+) object\?"), "shape"),
    (re.compile(r"Which image has more (\w+)s\? Answer first or second\."), "compare"),
)


def parse_question(message: str) -> tuple:
    """A user message's question (its last line) -> (kind, captured words). Raises on other text."""
    question = message.rsplit("\n", 1)[-1]
    for pattern, kind in QUESTIONS:
        m = pattern.fullmatch(question)
        if m:
            return kind, m.groups()
    raise ValueError(f"no attention target for the question {question!r}")


def _spliced(ids: list, n_img_tok: int) -> tuple:
    """-> (spliced position of each id, spliced start of each image)."""
    pos, starts, off = [], [], 0
    for i, t in enumerate(ids):
        pos.append(i + off)
        if t == IMAGE_TOKEN_INDEX:
            starts.append(i + off)
            off += n_img_tok - 1
    return pos, starts


def conversation_targets(tok, ids: list, labels: list, sample, token_cells: list) -> list:
    """[(layer, head, query position, [key positions])] for every answered round of `sample`.

    ids/labels: encode_conversation's output for sample.turns; token_cells[t]: the scene cell
    (row-major) that image token t covers (train_tiny.token_cells)."""
    n_img_tok = len(token_cells)
    pos, img_start = _spliced(ids, n_img_tok)
    answer_starts = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
    if len(answer_starts) != len(sample.turns):
        raise ValueError(f"{len(answer_starts)} answer spans for {len(sample.turns)} rounds")
    out, round_begin = [], 0
    for (message, _), start in zip(sample.turns, answer_starts):
        kind, words = parse_question(message)
        query = pos[start - 1]
        image = sum(t == IMAGE_TOKEN_INDEX for t in ids[:start]) - 1

        def objects(img: int, match) -> list:
            at = {o.cell[0] * scenes.GRID + o.cell[1]: o for o in sample.scenes[img].objects}
            return [img_start[img] + t for t, c in enumerate(token_cells) if c in at and match(at[c])]

        def whole(img: int) -> list:
            return list(range(img_start[img], img_start[img] + n_img_tok))

        keys = [words[0] + "s"] if kind in ("count", "compare") else list(words)
        key_pos = []
        for w in keys:
            wid = tok.convert_tokens_to_ids("▁" + w)
            found = [i for i in range(round_begin, start) if ids[i] == wid]
            if not found:
                raise ValueError(f"key word {w!r} is not one token of {message!r}")
            key_pos.append(pos[found[-1]])
        out.append((*KEY_HEAD, query, key_pos))
        if kind in ("color", "where"):
            target = objects(image, lambda o: o.shape == words[0])
        elif kind == "shape":
            target = objects(image, lambda o: o.color == words[0])
        elif kind == "exists":
            target = objects(image, lambda o: (o.color, o.shape) == words) or [SINK]
        else:                                                       # count, compare
            target = objects(image, lambda o: o.shape == words[0]) + [SINK]
            out.append((*IMAGE_HEAD, query, whole(image)))
        out.append((*OBJECT_HEAD, query, target))
        if kind == "compare":
            out.append((*PREV_OBJECT_HEAD, query, objects(image - 1, lambda o: o.shape == words[0]) + [SINK]))
            out.append((*PREV_IMAGE_HEAD, query, whole(image - 1)))
        round_begin = start
    return out


def attention_terms(attentions: tuple, rows: list) -> tuple:
    """(sum, count) over supervised (row, head, query) of the cross-entropy between the head's
    attention and the uniform distribution over its target keys. attentions[layer]: (B, H, T, T)."""
    total, n = 0.0, 0
    for b, targets in enumerate(rows):
        for layer, head, query, keys in targets:
            total = total - torch.log(attentions[layer][b, head, query, keys].float() + EPS).mean()
            n += 1
    return total, n
