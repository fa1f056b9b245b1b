"""The runner seam's pure pieces: Tokens slicing, the text streamer, incremental repetition history,
quantized embedding rows, and the engine format check."""
import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import data
from vila_edge import EngineError, Pipeline
from vila_edge.embeddings import EmbeddingTable, quantize_table
from vila_edge.runner import IMAGE_POSITION, Tokens
from vila_edge.sampling import GenerationConfig, Sampler, SeenIds
from vila_edge.streamer import TextStreamer

TEXT = "Héllo wörld — 日本語のテキスト 🤖🦾 naïve café, x² ≥ 3.\nNew line\ttab"


def test_tokens_slice_cuts_spans():
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    t = Tokens(np.array([5, IMAGE_POSITION, IMAGE_POSITION, IMAGE_POSITION, 7, 8]), ((1, rows[:3]),))
    s = t.slice(2, 5)
    assert s.ids.tolist() == [IMAGE_POSITION, IMAGE_POSITION, 7]
    assert len(s.spans) == 1 and s.spans[0][0] == 0
    np.testing.assert_array_equal(s.spans[0][1], rows[1:3])
    assert t.slice(4, 6).spans == ()
    e = Tokens.from_embeds(rows)
    assert len(e) == 6 and e.slice(3, 6).spans[0][0] == 0 and e.slice(3, 6).spans[0][1][0, 0] == 6


@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_streamer_equals_whole_decode(name, checkpoint):
    tok = Tokenizer.from_file(os.path.join(checkpoint(name), "llm", "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    s = TextStreamer(tok)
    pieces = [s.push(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == s.text == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)           # split UTF-8 characters are held back


@pytest.mark.parametrize("name", ["vila1.5-3b-downsample", "nvila-lite-3x3"])
def test_streamer_stop_string_never_shown(name, checkpoint):
    tok = Tokenizer.from_file(os.path.join(checkpoint(name), "llm", "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    full = tok.decode(ids, skip_special_tokens=True)
    for stop in ("日本", "café", "wörld — "):
        s = TextStreamer(tok, (stop, "never there"))
        shown = ""
        for i in ids:
            shown += s.push(i)
            assert stop not in shown and full.startswith(shown)
            if s.stopped:
                break
        shown += s.finish()
        assert s.stopped and shown == full[: full.find(stop)] == s.text


def test_seen_ids_match_the_history_scan():
    rng = np.random.default_rng(0)
    cfg = GenerationConfig(repetition_penalty=1.3)
    history = rng.integers(-1, 60, 40)              # -1: an image position, never penalised
    seen = SeenIds(50, history)
    for t in rng.integers(0, 50, 10).tolist():
        seen.add(t)
        history = np.append(history, t)
        logits = rng.standard_normal(55).astype(np.float32)
        assert Sampler(cfg, 50, [])(logits, seen) == Sampler(cfg, 50, [])(logits, history)
    assert sorted(seen.ids().tolist()) == sorted(set(h for h in history.tolist() if 0 <= h < 50))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_rows_by_hand(bits):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((20, 16)).astype(np.float32)
    q = quantize_table(table, bits, 8)
    emb = EmbeddingTable(codes=q["codes"], scales=q["scales"], bits=bits)
    ids = np.array([3, 0, 19, 3])
    rows = emb.rows_of(ids)
    qmax = 2 ** (bits - 1) - 1
    for r, i in zip(rows, ids):
        for g in range(2):
            x = table[i, 8 * g: 8 * g + 8]
            scale = np.float32(np.float16(np.abs(x).max() / qmax))
            codes = np.clip(np.rint(x / scale), -qmax - (bits == 4), qmax)
            np.testing.assert_array_equal(r[8 * g: 8 * g + 8], codes * scale)
    assert np.abs(rows - table[ids]).max() <= np.abs(table).max() / qmax


@pytest.mark.slow   # its own int4 + int8-table export
def test_int8_embedding_engine(engine):
    eng = engine("vila1.5-3b-downsample", quant="rtn", max_ppl_increase_pct=None, embed_bits=8)
    m = json.load(open(os.path.join(eng, "manifest.json")))
    assert m["files"]["embeddings"] == "embed_tokens.npz"
    pipe = Pipeline(eng)
    table = pipe.llm.runner.embeddings
    assert table.bits == 8 and table.table is None
    assert os.path.getsize(os.path.join(eng, "embed_tokens.npz")) < table.rows * table.width * 1.2 + 4096
    assert isinstance(pipe.chat(data("robot_scene.png"), "What is this?", max_new_tokens=4), str)


def test_previous_format_is_refused_with_the_rebuild_command(tmp_path, engine):
    eng = str(tmp_path / "old")
    shutil.copytree(engine("vila1.5-3b-downsample"), eng)
    path = os.path.join(eng, "manifest.json")
    m = json.load(open(path))
    m["format_version"] = 3          # format 3: the fused graph took one sequence and its past as rows
    json.dump(m, open(path, "w"))
    with pytest.raises(EngineError, match=r"format 3.*reads format 4.*rebuild it: make engines"):
        Pipeline(eng)
