"""Typed prompt parts: `Text(...)` and `Image(...)`, and the rule that turns a parts list into one
user message (text with placeholders + the image sources in order).

    pipe.chat([Text("Before:"), Image("t0.png"), Text("After:"), Image("t1.png"), "What moved?"])

Which part is which:
- `Text(s)` is text, always: it is never opened as a file. Wrap text that comes from users or the
  network in `Text` so that no file named in it is ever read.
- `Image(x)`, a `pathlib.Path`, a PIL image and a numpy array are images.
- A plain string that ends in an image extension (`.png`, `.jpg`, ...) is an image path: it must
  exist, otherwise an `ImageError` names it (a mistyped path never becomes words sent to the
  model). Any other plain string is text.

Parts are joined as VILA's own builders join them: text parts verbatim, with no separator added
(NVlabs/VILA@33b4f1a55cc0fc6b8be138d5097cf7ad8ec487fc:llava/utils/media.py `extract_media`:
`text += part`), and each image becomes the family's `part_text` -- "<image>\\n" for VILA1.5
(NVlabs/VILA@54c970676ce96a5f7df372b5d25b2b98057716c2:llava/eval/run_vila.py `eval_model`:
`(DEFAULT_IMAGE_TOKEN + "\\n") * len(images) + qs`), "<image>" for NVILA, whose encoder embeds
"\\n" after each image's features.
"""
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from vila_edge.errors import ImageError, PromptError
from vila_edge.text_ids import Segment

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Text:
    """A text part: sent to the model as words, never read as a file."""
    text: str

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise PromptError(f"Text(...) takes a str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class Image:
    """An image part: a path (str or os.PathLike), a PIL image or an HWC uint8 array."""
    source: object

    def __post_init__(self):
        if not isinstance(self.source, (str, os.PathLike, PILImage.Image, np.ndarray)):
            raise ImageError(f"Image(...) takes a path, a PIL image or an HWC uint8 array, "
                             f"got {type(self.source).__name__}")


def looks_like_image_path(s: str) -> bool:
    return s.strip().lower().endswith(IMAGE_EXTS) and "\n" not in s


def classify(part):
    """-> Text or Image for one element of a parts list (the rule in the module docstring)."""
    if isinstance(part, (Text, Image)):
        return part
    if isinstance(part, (pathlib.PurePath, PILImage.Image, np.ndarray)):
        return Image(part)
    if isinstance(part, str):
        if not looks_like_image_path(part):
            return Text(part)
        if not os.path.isfile(part):
            raise ImageError(f"{part}: image file not found (a plain string ending in an image extension is "
                             f"an image path; wrap it in vila_edge.Text(...) if it is meant as text)")
        return Image(part)
    raise PromptError(f"unsupported part type {type(part).__name__} in a parts list; use str, Text(...), "
                      f"Image(...), pathlib.Path, a PIL image or a numpy array")


def image_source(part):
    """What preprocess.load_image takes, from an element of the `images` argument."""
    if isinstance(part, Image):
        return part.source
    if isinstance(part, Text):
        raise PromptError(f"Text part {part.text[:40]!r} given as an image; pass text as the prompt, or pass "
                          f"a parts list with no prompt")
    return part


def join_parts(parts, image: list, check_text) -> tuple:
    """([Segment] with the `image` placeholder segments per image, [image sources]) from a parts list.
    Text parts are untrusted text (vila_edge/text_ids.py): never control tokens, never placeholders."""
    content, sources, has_text = [], [], False
    for raw in parts:
        part = classify(raw)
        if isinstance(part, Image):
            content += image
            sources.append(part.source)
            continue
        text = check_text(part.text, "text part")
        content.append(Segment(text))        # a typed "<image>" stays characters: each image is its own part
        has_text = has_text or bool(text.strip())
    if not has_text:
        raise PromptError("the parts list has no text: add the question as a text part")
    return content, sources


def image_list(images) -> list:
    """The `images` argument beside a prompt -> [image sources]: None, one image, a list, or any
    iterable of images (a generator of frames); every element is an image, a str is a path."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, PILImage.Image, np.ndarray, Image, Text)):
        return [image_source(images)]
    if not hasattr(images, "__iter__"):
        raise ImageError(f"unsupported image type {type(images).__name__}; pass a path, a PIL image, an HWC "
                         f"uint8 array, Image(...), or a list or iterable of them")
    return [image_source(p) for p in images]
