"""Bad or unusual user inputs give a right answer or a VilaEdgeError, never a silent wrong answer
or a foreign exception (issue #22, findings 5, 6, 7)."""
import numpy as np
import pytest
from PIL import Image

from vila_edge import GenerationConfig, ImageError, Pipeline, PromptError, preprocess
from vila_edge.errors import GenerationConfigError, VilaEdgeError


def test_16_bit_grayscale_is_scaled_not_saturated(tmp_path):
    """Before: convert("RGB") clipped 16-bit values at 255, so mid-grey came out white."""
    mid = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(mid).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.asarray(preprocess.load_image(str(tmp_path / "g16.png"))).tolist() == \
        np.full((8, 8, 3), 128).tolist()                    # 32768 * 255 / 65535 = 127.5 -> 128
    assert np.asarray(preprocess.load_image(mid))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(preprocess.load_image(Image.fromarray(np.full((4, 4), 0.5, np.float32))))[0, 0, 0] == 128


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    """An 8192x8192 PNG is ~200 KB on disk and 192 MiB decoded: refused from its header."""
    Image.new("L", (8192, 8192)).save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 300_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match=r"8192x8192 pixels is outside the accepted size .*MAX_PIXELS"):
        preprocess.load_image(str(tmp_path / "bomb.png"))
    assert decoded == []


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    w, h = 5000, 4000                                       # 20 MP > MAX_PIXELS (16.8 MP)
    assert w * h > preprocess.MAX_PIXELS
    Image.new("RGB", (w, h), (200, 30, 30)).save(tmp_path / "big.jpg", quality=50)
    img = preprocess.load_image(str(tmp_path / "big.jpg"))
    assert img.size == (2500, 2000)                         # libjpeg's 1/2 scale: the largest that fits
    assert np.abs(np.asarray(img, np.int16)[1000, 1000] - [200, 30, 30]).max() <= 4


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((4, 4, 3), np.float64), np.zeros((4, 4, 3), np.int32),
                                 "nope.png", 3.5, b"\x89PNG"])
def test_bad_images_are_image_errors(bad):
    with pytest.raises(ImageError):
        preprocess.load_image(bad)


def test_prompt_errors(engine):
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    with pytest.raises(PromptError, match="not valid Unicode text"):
        pipe.chat(None, "hello \ud800 world")
    with pytest.raises(PromptError, match="system prompt is not valid Unicode"):
        pipe.conversation("sys \udfff")
    with pytest.raises(PromptError, match="prompt must be a str"):
        pipe.chat(None, 42)
    with pytest.raises(PromptError, match="text part is not valid Unicode"):
        pipe.chat(["a \ud834 b", "x"])
    assert pipe.llm.blocks.stats().used == 0


@pytest.mark.parametrize("opts,match", [
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be finite"),
    ({"stop": ""}, "stop strings must be non-empty"),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
    ({"temperature": float("inf")}, "temperature must be finite"),
    ({"top_p": float("nan")}, "top_p must be finite"),
    ({"top_k": 2.0}, "top_k must be an integer"),
    ({"seed": -3}, "seed must be >= 0"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"max_new_token": 5}, "unexpected keyword argument 'max_new_token'.*generation options are"),
])
def test_generation_option_errors(engine, opts, match):
    """Before: NaN repetition penalty and empty stop strings answered ""; others raised TypeError."""
    pipe = Pipeline(engine("vila1.5-3b-downsample"))
    with pytest.raises(GenerationConfigError, match=match):
        pipe.chat(None, "hello", **opts)
    assert isinstance(GenerationConfigError("x"), ValueError)
    assert pipe.llm.blocks.stats().used == 0


def test_valid_options_still_accepted():
    cfg = GenerationConfig(max_new_tokens=np.int64(3), temperature=1, top_p=np.float32(0.5), stop="x")
    assert (cfg.max_new_tokens, cfg.temperature, cfg.stop) == (3, 1.0, ("x",))


def test_every_public_error_is_ours():
    import vila_edge.errors as errors
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, VilaEdgeError) for c in classes)


def test_tiny_temperature_is_greedy_not_nan():
    """Found by the fuzz suite: logits / 5e-324 overflow to inf and inf - inf gave NaN probabilities."""
    from vila_edge.sampling import Sampler
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    assert Sampler(GenerationConfig(temperature=5e-324, seed=0), 4, []).__call__(logits, np.arange(0)) == 1
