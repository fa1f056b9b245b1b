"""Structured output: the token mask (llguidance) against independent checkers (jsonschema, re)."""
import json
import os
import re

import jsonschema
import numpy as np
import pytest

from vila_edge.constrain import Grammars
from vila_edge.errors import GrammarError, IncompleteOutput
from vila_edge.pipeline import Pipeline
from vila_edge.sampling import GenerationConfig, Sampler

from serving import tiny  # noqa: E402,F401  (the bundled model's engine, exported once per module)

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "models", "vila-tiny-shapes", "examples", "color.png")
SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue", "yellow"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "shapes": {"type": "array", "items": {"enum": ["circle", "square"]}, "maxItems": 3}},
    "required": ["color", "count", "shapes"], "additionalProperties": False}




def _walk(grammars, cfg, vocab, seed, never=()):
    """Sample a whole answer from random logits through the Sampler; returns ids (stop excluded)."""
    sampler = Sampler(cfg, vocab, list(never), grammars.constraint(cfg))
    rng, ids = np.random.default_rng(seed), []
    for _ in range(cfg.max_new_tokens):
        tok = sampler(rng.normal(size=vocab + 7).astype(np.float32) * 3, np.asarray(ids, np.int64))
        assert tok < vocab and tok not in never
        if tok in grammars.stop_ids:
            return ids
        ids.append(tok)
    raise AssertionError("the grammar never let the answer end")


def _text(tok, ids):
    text = tok.decode(ids, skip_special_tokens=True)
    return text[1:] if text.startswith(" ") else text


@pytest.mark.parametrize("seed", range(6))
def test_random_logits_always_give_valid_output(tiny, seed):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tiny, "tokenizer.json"))
    g = Grammars(os.path.join(tiny, "tokenizer.json"), 350, [2], [])
    temp = dict(temperature=1.0, seed=seed, max_new_tokens=200)
    jsonschema.validate(json.loads(_text(tok, _walk(g, GenerationConfig(json_schema=SCHEMA, **temp), 350, seed))),
                        SCHEMA)
    choices = ["red", "green", "the blue circle"]
    assert _text(tok, _walk(g, GenerationConfig(choices=choices, **temp), 350, seed)) in choices
    regex = r"(left|right) [0-9]{1,2}"
    assert re.fullmatch(regex, _text(tok, _walk(g, GenerationConfig(regex=regex, **temp), 350, seed)))


def test_mask_never_allows_ids_outside_the_vocabulary_or_media_tokens(tiny):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tiny, "tokenizer.json"))
    never = [tok.token_to_id(c) for c in "0123"]          # as if they were media tokens
    vocab = 300                                            # the tokenizer has 350 pieces
    g = Grammars(os.path.join(tiny, "tokenizer.json"), vocab, [2], never)
    c = g.constraint(GenerationConfig(regex=r"[0-9a-z]{4}"))
    for _ in range(4):
        allowed = c.allowed()
        assert allowed.shape == (vocab,) and not allowed[never].any()
        c.accept(int(np.flatnonzero(allowed)[0]))
    assert _walk(g, GenerationConfig(regex=r"[0-9]{3}", temperature=1.0, seed=1), vocab, 1, never)


@pytest.mark.parametrize("bad, match", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1]), "JSON object"),
    (dict(regex="(["), "regex"),
    (dict(choices=[]), "non-empty"),
    (dict(choices=["a"], regex="a"), "one of"),
])
def test_uncompilable_constraints_are_grammar_errors(tiny, bad, match):
    g = Grammars(os.path.join(tiny, "tokenizer.json"), 350, [2], [])
    with pytest.raises(GrammarError, match=match):
        g.constraint(GenerationConfig(**bad))


def test_stop_strings_and_constraints_do_not_mix():
    with pytest.raises(GrammarError, match="stop"):
        GenerationConfig(stop=["}"], json_schema={"type": "object"})


def test_pipeline_chat_json_schema_validates_and_choices_pick_the_answer(tiny):
    pipe = Pipeline(tiny)
    answer = pipe.chat(EXAMPLE, "What color is the square?")
    assert pipe.chat(EXAMPLE, "What color is the square?", choices=["red", "green", "blue"]) == answer
    out = pipe.chat(EXAMPLE, "What color is the square?", json_schema=SCHEMA, max_new_tokens=64)
    jsonschema.validate(json.loads(out), SCHEMA)
    with pytest.raises(IncompleteOutput) as e:
        pipe.chat(EXAMPLE, "What color is the square?", json_schema=SCHEMA, max_new_tokens=3)
    assert SCHEMA and e.value.text.startswith("{")
    assert pipe.llm.blocks.stats().used == 0
