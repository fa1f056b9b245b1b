"""Fixtures and helpers of the server tests: the bundled model's engine, a real server on a loopback
port (uvicorn in a thread), the openai client, and a reference Pipeline on the same engine."""
import base64
import io
import os
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from vila_edge.pipeline import Pipeline
from vila_edge.server import build

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = os.path.join(ROOT, "models", "vila-tiny-shapes", "examples")
COLOR = os.path.join(EXAMPLES, "color.png")
QUESTION = "What color is the square?"
SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue", "yellow"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "count"], "additionalProperties": False}
MAX_IMAGE_BYTES = 64 * 1024
MAX_PROMPT_TOKENS = 300


def data_url(path_or_bytes) -> str:
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_message(text: str, *urls) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tiny(workdir):
    from vila_edge_export.build import ExportOptions, export_engine
    out = str(workdir / "engines" / "vila-tiny-shapes")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        export_engine(os.path.join(ROOT, "models", "vila-tiny-shapes"), out, ExportOptions(progress=False))
    return out


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """(base URL, pipeline, allowed dir, outside dir) of a server running in a thread."""
    allowed, outside = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside")
    Image.open(COLOR).save(allowed / "color.png")
    Image.open(COLOR).save(outside / "secret.png")
    os.symlink(outside / "secret.png", allowed / "link.png")
    app, pipe = build(tiny, model_id="tiny", workers=2, max_queue=8, max_images=3,
                      max_image_bytes=MAX_IMAGE_BYTES, max_prompt_tokens=MAX_PROMPT_TOKENS, allow_dir=str(allowed))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url, pipe, allowed, outside
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny):
    return Pipeline(tiny)


def kv_used(url) -> int:
    return httpx.get(url + "/health").json()["kv_blocks"]["used"]


def tiny_png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_IMAGE_BYTES
    return buf.getvalue()
