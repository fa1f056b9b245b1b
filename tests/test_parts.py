"""Typed prompt parts (issue 22 finding 4): a Text part is never read as a file, a mistyped image
path is an error naming it, and parts are joined as VILA's extract_media / run_vila join them."""
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from vila_edge import Image, ImageError, PromptError, Text
from vila_edge.cache import BUNDLED_CHECKPOINT
from vila_edge.families import FAMILIES
from vila_edge.splice import placeholder_segments
from vila_edge.parts import join_parts

EXAMPLES = os.path.join(BUNDLED_CHECKPOINT, "examples")
COLOR = os.path.join(EXAMPLES, "color.png")


@pytest.fixture(scope="module")
def pipe(bundled_pipeline):
    return bundled_pipeline


def _turn(pipe, images, prompt=None):
    conv = pipe.conversation()
    try:
        answer = conv.send(images, prompt, max_new_tokens=4)
        return answer, conv.messages[0][1], len(conv.tiles), list(conv.last_ids)
    finally:
        conv.close()


def test_text_part_naming_an_existing_file_is_never_read(pipe, tmp_path, monkeypatch):
    """The file read of issue 22 finding 4, `../` paths included: as Text, only its words are sent."""
    secret = tmp_path / "secret.png"
    shutil.copyfile(COLOR, secret)
    monkeypatch.chdir(tmp_path)
    sneaky = os.path.join("..", tmp_path.name, "secret.png")
    assert os.path.isfile(sneaky)
    import vila_edge.preprocess as pre
    monkeypatch.setattr(pre, "_open", lambda path: pytest.fail(f"{path} was opened"))
    _, text, tiles, _ = _turn(pipe, [Text(sneaky), Text(" What color is the square?")])
    assert text == sneaky + " What color is the square?" and tiles == 0


def test_mistyped_image_path_is_an_error_naming_it(pipe):
    with pytest.raises(ImageError, match=r"t0\.jpg: image file not found.*Text\(") as e:
        pipe.chat(["Before:", "t0.jpg", "What moved?"])
    assert "t0.jpg" in str(e.value)
    with pytest.raises(ImageError, match="missing.png"):
        pipe.chat([Image("missing.png"), "What?"])
    with pytest.raises(ImageError, match="missing.png"):
        pipe.chat([pathlib.Path("missing.png"), "What?"])


def test_every_image_form_gives_the_same_tokens(pipe):
    """Image(...), a plain existing path, pathlib.Path, PIL and ndarray parts, and the prompt form."""
    pil = PILImage.open(COLOR).convert("RGB")
    forms = [[Image(COLOR), "What color is the square?"], [COLOR, "What color is the square?"],
             [pathlib.Path(COLOR), Text("What color is the square?")], [pil, "What color is the square?"],
             [np.asarray(pil), "What color is the square?"]]
    runs = [_turn(pipe, f) for f in forms] + [_turn(pipe, Image(COLOR), "What color is the square?"),
                                              _turn(pipe, (x for x in [COLOR]), "What color is the square?")]
    assert all(r == runs[0] for r in runs), runs
    assert runs[0][0] == "green" and runs[0][1] == "<image>\nWhat color is the square?"


def test_plain_strings_without_an_image_extension_are_text(pipe):
    _, text, tiles, _ = _turn(pipe, [Image(COLOR), "Is notes.txt or report.pdf", " green?"])
    assert text == "<image>\nIs notes.txt or report.pdf green?" and tiles == 1


@pytest.mark.parametrize("family,expected", [
    # NVlabs/VILA@54c9706:llava/eval/run_vila.py: "<image>\n" per image (VILA1.5).
    ("vila1.5", "Before:<image>\nAfter:<image>\nWhat moved?"),
    # NVlabs/VILA@33b4f1a:llava/utils/media.py extract_media: text += part; image -> "<image>"
    # (the "\n" after each image is embedded by the encoder, not written in the text).
    ("nvila-lite", "Before:<image>After:<image>What moved?"),
])
def test_parts_are_joined_as_vila_joins_them(family, expected):
    a, b = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    content, sources = join_parts(["Before:", Image(a), Text("After:"), b, "What moved?"],
                                  placeholder_segments(FAMILIES[family].part_text), lambda text, what: text)
    assert "".join(s.text for s in content) == expected and sources[0] is a and sources[1] is b
    assert [s.image for s in content if s.text == "<image>"] == [True, True]


def test_bad_parts(pipe):
    with pytest.raises(PromptError, match="no text"):
        pipe.chat([Image(COLOR)])
    with pytest.raises(PromptError, match="unsupported part type int"):
        pipe.chat([Image(COLOR), 3, "What?"])
    with pytest.raises(PromptError, match="given as an image"):
        pipe.chat([Text("hi")], "What?")
    with pytest.raises(PromptError, match=r"Text\(\.\.\.\) takes a str"):
        Text(b"bytes")
    with pytest.raises(ImageError, match=r"Image\(\.\.\.\) takes"):
        Image(42)
