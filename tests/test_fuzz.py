"""Fuzzing every user-facing input: only VilaEdgeError escapes, and the KV pool is empty once every
request is finished (issue #22).

Random images (sizes, modes, dtypes, corrupt files), prompts (any code point, lone surrogates,
special-token strings, over-length), generation options (any type, NaN, empty), call forms (chat,
stream, abandoned stream, parts lists, multi-turn, dropped conversations) and engine-directory
faults. CI runs the "ci" profile: 2,100+ examples, derandomized (the same cases every run), about a
minute on one core. `make test-fast` runs the "fast" profile (VILA_FUZZ=fast): a quarter of them, also
derandomized. `make fuzz` runs the "long" profile (VILA_FUZZ=long): 20x the examples, random.
"""
import gc
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from vila_edge import GenerationConfig, Pipeline, VilaEdgeError, preprocess
from vila_edge.families import DYNAMIC, RESIZE
from vila_edge.sampling import Sampler
from vila_edge.templates import render_segments

SCALE = {"fast": 0.25, "ci": 1, "long": 20}[os.environ.get("VILA_FUZZ", "ci")]
settings.register_profile("fuzz-ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-long", deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
PROFILE = "fuzz-long" if SCALE > 1 else "fuzz-ci"


def fuzz(examples: int):
    return settings(settings.get_profile(PROFILE), max_examples=scaled(examples))


def scaled(examples: int) -> int:
    return max(1, int(examples * SCALE))


def run_all(run, calls: list, examples: int) -> None:
    """Run a @given function and check hypothesis really tried `examples` cases (CI counts them)."""
    run()
    assert len(calls) >= scaled(examples), f"only {len(calls)} of {scaled(examples)} examples ran"


# -- strategies ---------------------------------------------------------------------------------

SPECIALS = ["</s>", "<s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<vila/video>", "USER:", "ASSISTANT:", "\ue000", "\ue0001\ue001"]
text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS),
                          st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF).map(str)), max_size=8).map("".join)
long_text = st.integers(1, 60).map(lambda n: "describe the red cube " * n)
prompts = st.one_of(text, text, long_text, st.none(), st.integers(), st.binary(max_size=4))

ARRAY_DTYPES = [np.uint8, np.uint8, np.uint16, np.float32, np.int8, np.bool_, np.int64]
PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB"]
FORMATS = {"PNG": ("RGB", "L", "I;16", "RGBA", "P"), "JPEG": ("RGB", "L", "CMYK"), "GIF": ("P", "L"),
           "BMP": ("RGB", "L"), "TIFF": ("RGB", "I;16", "F"), "WEBP": ("RGB", "RGBA")}


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(ARRAY_DTYPES))
    shape = draw(st.tuples(st.integers(0, 40), st.integers(0, 40)))
    shape += draw(st.sampled_from([(), (1,), (2,), (3,), (4,), (5,)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.random(shape) * 70000).astype(dtype)


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(PIL_MODES))
    size = draw(st.tuples(st.integers(1, 48), st.integers(1, 48)))
    return Image.new(mode, size, draw(st.integers(0, 255)) if mode not in ("F", "I", "I;16") else 1000)


@st.composite
def image_files(draw, tmp):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    size = draw(st.tuples(st.integers(1, 64), st.integers(1, 64)))
    buf = io.BytesIO()
    Image.new(mode, size, 7).save(buf, fmt)
    data = bytearray(buf.getvalue())
    fault = draw(st.sampled_from(["none", "truncate", "flip", "garbage", "empty"]))
    if fault == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif fault == "flip":
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[i] ^= 0xFF
    elif fault == "garbage":
        data = bytearray(draw(st.binary(max_size=64)))
    elif fault == "empty":
        data = bytearray()
    path = os.path.join(tmp, f"f{draw(st.integers(0, 10**9))}.{fmt.lower()}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def images(tmp):
    return st.one_of(arrays(), pil_images(), image_files(tmp), st.sampled_from(["/nonexistent.png", tmp]))


any_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3))
options = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.one_of(st.integers(-2, 4), any_value), "temperature": any_value, "top_k": any_value,
    "top_p": any_value, "repetition_penalty": any_value, "seed": any_value,
    "stop": st.one_of(text, st.lists(text, max_size=3), any_value), "bogus_option": st.integers()})
good_options = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)}, optional={
    "temperature": st.floats(0, 2), "top_k": st.integers(0, 50), "top_p": st.floats(0.05, 1),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2**32), "stop": st.lists(st.text(min_size=1), max_size=2)})


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline(engine("vila1.5-3b-downsample"), max_context=256)


def _assert_pool_empty(p: Pipeline) -> None:
    """No sequence holds blocks once the engine thread has taken its next step: an abandoned stream
    is cancelled at once and freed by the scheduler at its next step (vila_edge/scheduler.py), so
    allow that step a moment (10 ms polls, 5 s at most) before asserting."""
    deadline = time.monotonic() + 5.0
    while p.llm.blocks.stats().used and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = p.llm.blocks.stats()
    assert stats.used == 0, stats


# -- fuzzers ------------------------------------------------------------------------------------

def test_fuzz_images(tmp):
    spec = {m: preprocess.PixelSpec(28, (0.5,) * 3, (0.5,) * 3, m, 1, 4) for m in (RESIZE, DYNAMIC)}

    calls = []

    @fuzz(700)
    @given(img=images(tmp), mode=st.sampled_from([RESIZE, DYNAMIC]))
    def run(img, mode):
        calls.append(1)
        try:
            tiles = preprocess.image_tiles(img, spec[mode])
        except VilaEdgeError:
            return
        assert tiles.dtype == np.float32 and tiles.shape[1:] == (3, 28, 28) and np.isfinite(tiles).all()
    run_all(run, calls, 700)


def test_fuzz_generation_options():
    calls = []

    @fuzz(600)
    @given(opts=options, seed=st.integers(0, 2**31))
    def run(opts, seed):
        calls.append(1)
        try:
            cfg = GenerationConfig(**opts)
        except VilaEdgeError:
            return
        except TypeError as e:
            assert "bogus_option" in str(e)     # dataclass signature; Pipeline turns it into ours
            return
        logits = np.random.default_rng(seed).normal(size=40).astype(np.float32)
        assert 0 <= Sampler(cfg, 32, [3]).__call__(logits, np.arange(5)) < 32
    run_all(run, calls, 600)


def test_fuzz_prompt_encoding(pipe):
    """User/system text: a PromptError, or ids whose control tokens are exactly the template's."""
    controls = {i for i, t in pipe.tokenizer.get_added_tokens_decoder().items() if t.special}
    baseline = [i for i in pipe.splicer.text_ids.encode(
        render_segments(pipe.template, [("user", "q")], "s")) if i in controls]

    calls = []

    @fuzz(500)
    @given(prompt=text, system=text)
    def run(prompt, system):
        calls.append(1)
        try:
            content, _ = pipe.user_message(None, prompt, None)
            conv = pipe.conversation(system)
        except VilaEdgeError:
            return
        ids = pipe.splicer.splice(pipe.splicer.expand(render_segments(pipe.template, [("user", content)],
                                                                      conv.system), []), []).ids
        assert [i for i in ids.tolist() if i in controls] == baseline
    run_all(run, calls, 500)


@pytest.mark.slow   # the longest fuzz run (~1 min on 2 loaded cores); make test runs it
def test_fuzz_call_forms(pipe, tmp):
    small = st.one_of(st.just(np.zeros((20, 30, 3), np.uint8)), images(tmp))

    calls = []

    @fuzz(300)
    @given(form=st.sampled_from(["chat", "stream", "abandon", "parts", "turns", "drop", "explicit"]),
           prompt=prompts, img=st.one_of(st.none(), small), opts=st.one_of(good_options, options))
    def run(form, prompt, img, opts):
        calls.append(1)
        opts = _bounded(opts)
        try:
            _call(pipe, form, prompt, img, opts)
        except VilaEdgeError:
            pass
        if form == "drop":
            gc.collect()                    # the conversation may sit in a cycle with its traceback
        _assert_pool_empty(pipe)
    run_all(run, calls, 300)


def _bounded(opts: dict) -> dict:
    """At most 3 new tokens (the fuzzers test paths, not long answers)."""
    n = opts.get("max_new_tokens", 3)
    big = isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 3
    return {**opts, "max_new_tokens": 3 if big else n}


def _call(pipe, form, prompt, img, opts):
    """One request in the given form; a conversation is closed, or dropped ("drop") on return."""
    if form == "chat":
        pipe.chat(img, prompt, **opts)
    elif form == "stream":
        "".join(pipe.stream(img, prompt, **opts))
    elif form == "abandon":
        next(iter(pipe.stream(img, prompt, **opts)), None)
    elif form == "parts":
        pipe.chat([prompt, img, prompt] if img is not None else [prompt], **opts)
    elif form == "explicit":
        pipe.chat([img, img], f"<image> {prompt} <image>", **opts)
    else:
        conv = pipe.conversation(prompt if isinstance(prompt, str) and len(prompt) < 40 else None)
        try:
            conv.send(img, "first", max_new_tokens=2)
            conv.send(None, prompt, **opts)
        finally:
            if form == "turns":
                conv.close()


FAULTS = ["drop_field", "retype_field", "revalue_field", "truncate", "garbage", "delete", "swap", "empty_json"]


def test_fuzz_engine_dir(engine):
    base = engine("vila1.5-3b-downsample")
    files = sorted(os.listdir(base))
    manifest = json.load(open(os.path.join(base, "manifest.json")))
    paths = [(s, k) for s, sub in manifest.items() if isinstance(sub, dict) for k in sub] + \
            [(None, k) for k in manifest]

    calls = []

    @fuzz(100)
    @given(fault=st.sampled_from(FAULTS), target=st.sampled_from(files), field=st.sampled_from(paths),
           value=any_value, cut=st.floats(0, 1))
    def run(fault, target, field, value, cut):
        calls.append(1)
        d = tempfile.mkdtemp(prefix="fuzz-engine-")
        try:
            eng = shutil.copytree(base, os.path.join(d, "e"))
            _damage(eng, fault, target, field, value, cut)
            try:
                p = Pipeline(eng, max_context=128)
                p.chat(np.zeros((8, 8, 3), np.uint8), "hi", max_new_tokens=2)
            except VilaEdgeError:
                return
            _assert_pool_empty(p)
        finally:
            shutil.rmtree(d)
    run_all(run, calls, 100)


def _damage(eng, fault, target, field, value, cut):
    mpath = os.path.join(eng, "manifest.json")
    m = json.load(open(mpath))
    section, key = field
    where = m if section is None else m[section]
    if fault == "drop_field":
        where.pop(key, None)
    elif fault == "retype_field":
        where[key] = value
    elif fault == "revalue_field":
        old = where.get(key)
        where[key] = old + 1 if isinstance(old, int) and not isinstance(old, bool) else value
    elif fault == "empty_json":
        m = []
    path = os.path.join(eng, target)
    if fault == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:int(len(data) * cut)])
    elif fault == "garbage":
        open(path, "wb").write(os.urandom(64))
    elif fault == "delete":
        os.remove(path)
    elif fault == "swap":
        os.replace(os.path.join(eng, "vision.onnx"), os.path.join(eng, "x"))
        os.replace(os.path.join(eng, "llm.onnx"), os.path.join(eng, "vision.onnx"))
        os.replace(os.path.join(eng, "x"), os.path.join(eng, "llm.onnx"))
    if fault in ("drop_field", "retype_field", "revalue_field", "empty_json"):
        json.dump(m, open(mpath, "w"))
