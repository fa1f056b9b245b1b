"""image_url parts -> PIL images, within the server's limits.

Accepted: data URLs (base64); local files only under the allow-listed directory given at start
(resolved with every symlink and `..` first, so nothing outside it is ever opened); http(s) only
when remote images were enabled. Sizes are checked before decoding: bytes first, then pixels.
"""
import base64
import binascii
import io
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from PIL import Image

from vila_edge.errors import ImageError, RequestError
from vila_edge.preprocess import MAX_PIXELS, MAX_SIDE

REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 2**20          # per image, encoded
    allow_dir: str | None = None         # local files: only under this directory
    allow_remote: bool = False           # http(s) URLs


def load_image_url(url: str, policy: ImagePolicy) -> Image.Image:
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param="image_url")
    if url.startswith("data:"):
        data = _data_url(url, policy)
    elif url.startswith(("http://", "https://")):
        data = _remote(url, policy)
    elif url.startswith("file://") or url.startswith("/"):
        data = _local(unquote(urlparse(url).path) if url.startswith("file://") else url, policy)
    else:
        raise RequestError(f"unsupported image URL scheme in {url[:40]!r}: use a data: URL"
                           + (", a file:// path under the allowed directory" if policy.allow_dir else "")
                           + (" or http(s)" if policy.allow_remote else ""), param="image_url")
    return decode_image(data)


def _too_big(n: int, policy: ImagePolicy) -> RequestError:
    return RequestError(f"image is {n} bytes, over the server's limit of {policy.max_bytes} bytes per image",
                        status=413, code="image_too_large", param="image_url")


def _data_url(url: str, policy: ImagePolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError("a data URL image must be base64: data:image/png;base64,<data>", param="image_url")
    if len(payload) * 3 // 4 > policy.max_bytes + 3:          # refuse before decoding
        raise _too_big(len(payload) * 3 // 4, policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image data URL is not valid base64 ({e})") from e
    if len(data) > policy.max_bytes:
        raise _too_big(len(data), policy)
    return data


def _local(path: str, policy: ImagePolicy) -> bytes:
    if policy.allow_dir is None:
        raise RequestError("local image files are disabled on this server (start it with --allow-dir DIR)",
                           status=403, code="local_files_disabled", param="image_url")
    root = os.path.realpath(policy.allow_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise RequestError(f"{path} is outside the allowed image directory", status=403,
                           code="path_not_allowed", param="image_url")
    if not os.path.isfile(real):
        raise RequestError(f"{path}: no such image file under the allowed directory", status=404,
                           code="image_not_found", param="image_url")
    size = os.path.getsize(real)
    if size > policy.max_bytes:
        raise _too_big(size, policy)
    with open(real, "rb") as f:
        return f.read(policy.max_bytes + 1)


def _remote(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise RequestError("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                           "send the image as a data URL", status=403, code="remote_images_disabled",
                           param="image_url")
    import httpx
    buf = bytearray()
    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > policy.max_bytes:
                    raise _too_big(len(buf), policy)
    except httpx.HTTPError as e:
        raise ImageError(f"cannot fetch {url}: {e}") from e
    return bytes(buf)


def decode_image(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise RequestError(f"image of {w}x{h} pixels is over the limit ({MAX_PIXELS} pixels, "
                                   f"sides up to {MAX_SIDE})", status=413, code="image_too_large", param="image_url")
            img.load()
            return img.convert("RGB")
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image cannot be decoded ({e})") from e
