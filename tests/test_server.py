"""`vila-edge serve`: the real server on a loopback port, spoken to with the official openai client
and with raw HTTP. References: Pipeline.chat / Conversation on the same engine, jsonschema."""
import base64
import io
import json
import os
import socket
import threading
import time

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from vila_edge.pipeline import Pipeline  # noqa: E402
from vila_edge.server import build  # noqa: E402

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
    from export.build import ExportOptions, export_engine
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


def _kv_used(url) -> int:
    return httpx.get(url + "/health").json()["kv_blocks"]["used"]


def test_chat_with_an_image_answers_as_pipeline_chat(server, client, reference):
    expected = reference.chat(COLOR, QUESTION)
    conv = reference.conversation()
    conv.send(COLOR, QUESTION)
    r = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))],
                                       temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == conv.last_stats["prompt_tokens"]
    assert r.usage.completion_tokens == conv.last_stats["new_tokens"]
    conv.close()


def test_streaming_gives_the_same_text_in_pieces(server, client, reference):
    for extra in ({}, {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}):
        kw = dict(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))], max_tokens=64, **extra)
        whole = client.chat.completions.create(**kw).choices[0].message.content
        pieces, reasons, usage = [], [], None
        for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                pieces += [c.delta.content] if c.delta.content else []
                reasons += [c.finish_reason] if c.finish_reason else []
        assert "".join(pieces) == whole and reasons == ["stop"] and usage.completion_tokens >= len(pieces)
    assert len(pieces) > 1           # the JSON answer comes in several pieces
    assert whole == reference.chat(COLOR, QUESTION, json_schema=SCHEMA, max_new_tokens=64)


def test_response_format_json_schema_and_json_object_validate(server, client):
    for fmt, schema in (({"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}, SCHEMA),
                        ({"type": "json_object"}, {"type": "object"})):
        r = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))],
                                           response_format=fmt, max_tokens=200)
        assert r.choices[0].finish_reason in ("stop", "length")
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = httpx.post(server[0] + "/v1/chat/completions", json={
        "messages": [image_message(QUESTION, data_url(COLOR))], "guided_choice": ["red", "green", "blue"]})
    assert r.json()["choices"][0]["message"]["content"] in ("red", "green", "blue")


def test_multi_turn_history_reuses_the_kv_prefix(server, client, tiny):
    """Turn 2 replays turn 1 as history: same text as a live Conversation, its prefix from the pool."""
    ref = Pipeline(tiny)
    with ref.conversation() as conv:
        a1 = conv.send(COLOR, QUESTION)
        a2 = conv.send(None, "Is there a red square?")
        ref_cached = conv.last_stats["cached_tokens"]
    url = data_url(COLOR)
    r1 = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, url)])
    assert r1.choices[0].message.content == a1
    history = [image_message(QUESTION, url), {"role": "assistant", "content": a1},
               {"role": "user", "content": "Is there a red square?"}]
    r2 = client.chat.completions.create(model="tiny", messages=history)
    assert r2.choices[0].message.content == a2
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # All full blocks of turn 1's prompt are reused, as within the live Conversation.
    assert cached >= ref_cached > 0 and cached >= (r1.usage.prompt_tokens // 16) * 16
    assert _kv_used(server[0]) == 0


def test_several_images_and_a_local_file_under_the_allowed_dir(server, client, reference):
    allowed = server[2]
    expected = reference.chat([COLOR, os.path.join(EXAMPLES, "count.png")], "Which image has more circles?")
    r = client.chat.completions.create(model="tiny", messages=[image_message(
        "Which image has more circles?", f"file://{allowed}/color.png", data_url(os.path.join(EXAMPLES, "count.png")))])
    assert r.choices[0].message.content == expected


def _tiny_png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_IMAGE_BYTES
    return buf.getvalue()


def _bad_requests(allowed, outside):
    msg = lambda *urls: {"messages": [image_message(QUESTION, *urls)]}   # noqa: E731
    return [
        ("bad json", b'{"messages": [', 400, "json_invalid"),
        ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}, 400, None),
        ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, None),
        ("max_tokens wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, None),
        ("temperature out of range", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, None),
        ("no messages", {"messages": []}, 400, None),
        ("last message not user", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
        ("placeholder in text", {"messages": [{"role": "user", "content": "<image> hi"}]}, 400, None),
        ("corrupt image", msg("data:image/png;base64," + base64.b64encode(b"not a png at all").decode()), 400, None),
        ("not base64", msg("data:image/png;base64,@@@@"), 400, None),
        ("oversize image", msg(data_url(_noise_png())), 413, "image_too_large"),
        ("too many images", msg(*[data_url(_tiny_png())] * 4), 400, "too_many_images"),
        ("path outside allow-list", msg(f"file://{outside}/secret.png"), 403, "path_not_allowed"),
        ("dotdot out of allow-list", msg(f"file://{allowed}/../{outside.name}/secret.png"), 403, "path_not_allowed"),
        ("symlink out of allow-list", msg(f"file://{allowed}/link.png"), 403, "path_not_allowed"),
        ("remote url", msg("http://example.com/a.png"), 403, "remote_images_disabled"),
        ("too many tokens", {"messages": [{"role": "user", "content": "red square " * 400}]}, 400,
         "context_length_exceeded"),
        ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ("uncompilable schema", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, 400, None),
        ("n > 1", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None),
        ("logprobs", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "unsupported_parameter"),
        ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
         "unsupported_parameter"),
    ]


def test_malformed_requests_get_the_right_4xx_and_the_server_keeps_serving(server, client):
    url, _, allowed, outside = server
    expected = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))])
    for name, body, status, code in _bad_requests(allowed, outside):
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       **({"content": body, "headers": {"content-type": "application/json"}}
                          if isinstance(body, bytes) else {"json": body}))
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], name
        if code:
            assert err["code"] == code, (name, err)
        again = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))])
        assert again.choices[0].message.content == expected.choices[0].message.content, name
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "<image>"}])
    assert _kv_used(url) == 0


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"x" * (4 * 2**20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = (b"x" * 2**16 for _ in range(64))              # no Content-Length: counted while read
    r = httpx.post(server[0] + "/v1/chat/completions", content=chunked, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server[0] + "/health").status_code == 200


def test_image_generation_is_refused_by_an_engine_that_cannot_generate(server, client):
    with pytest.raises(openai.BadRequestError, match="cannot generate images"):
        client.images.generate(model="tiny", prompt="a red square")


def test_a_client_that_disconnects_frees_its_kv_blocks(server):
    url = server[0]
    body = {"messages": [image_message(QUESTION, data_url(COLOR))], "stream": True, "max_tokens": 900,
            "guided_regex": "(red ){800}"}       # no stop token allowed before 800 words
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _kv_used(url) > 0
    deadline = time.time() + 20
    while (_kv_used(url) or not httpx.get(url + "/health").json()["interrupted"]) and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["interrupted"] == 1 and health["kv_blocks"]["used"] == 0 and health["running"] == 0


def test_a_non_streaming_client_that_disconnects_frees_its_kv_blocks(server):
    url = server[0]
    before = httpx.get(url + "/health").json()["interrupted"]
    body = {"messages": [image_message(QUESTION, data_url(COLOR))], "max_tokens": 900, "guided_regex": "(red ){800}"}
    with pytest.raises(httpx.ReadTimeout):              # the client gives up and closes its connection
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["interrupted"] == before and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["interrupted"] == before + 1 and health["kv_blocks"]["used"] == 0


def test_models_health_and_metrics(server, client):
    url = server[0]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))])
    text = httpx.get(url + "/metrics").text
    for name in ("vila_edge_requests_total", "vila_edge_prompt_tokens_total", "vila_edge_completion_tokens_total",
                 "vila_edge_time_to_first_token_seconds_bucket", "vila_edge_decode_tokens_per_second_bucket",
                 'vila_edge_kv_blocks{state="used"} 0.0', "vila_edge_queue_length"):
        assert name in text, name
    assert 'vila_edge_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_a_full_queue_is_a_429_and_shutdown_interrupts_running_work():
    import asyncio

    from vila_edge.errors import RequestError
    from vila_edge.server.scheduler import Job, ThreadScheduler

    async def main():
        sched, release, loop = ThreadScheduler(None, workers=2, max_queue=3), threading.Event(), asyncio.get_running_loop()

        class Wait:
            def run(self, pipe, job):
                while not release.is_set() and not job.cancelled.is_set():
                    time.sleep(0.01)
                job.interrupted = job.cancelled.is_set()
                job.emit("done")
        jobs = [sched.submit(Job(Wait(), loop)) for _ in range(5)]
        with pytest.raises(RequestError) as e:
            sched.submit(Job(Wait(), loop))
        assert e.value.status == 429 and e.value.code == "queue_full"
        await asyncio.to_thread(sched.shutdown, True)
        events = [await j.events.get() for j in jobs]
        assert sched.stats() == {"queued": 0, "running": 0, "workers": 2, "interrupted": 5}
        assert [k for k, _ in events] == ["done", "done", "error", "error", "error"]
        with pytest.raises(RequestError, match="shutting down"):
            sched.submit(Job(Wait(), loop))
    asyncio.run(main())


def test_api_key_and_graceful_shutdown_lets_an_in_flight_stream_finish(tiny):
    app, _ = build(tiny, model_id="tiny", workers=1, api_key="k3y")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        timeout_graceful_shutdown=30))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not srv.started:
        time.sleep(0.02)
    body = {"messages": [{"role": "user", "content": "Say red."}], "stream": True, "max_tokens": 200,
            "guided_regex": "(red ){60}"}
    for key in (None, "wrong"):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200           # probes need no key
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": "Bearer k3y"}) as r:
        lines = r.iter_lines()
        first = next(lines)
        srv.should_exit = True                      # as SIGTERM does
        rest = [line for line in [first] + list(lines) if line]
    chunks = [json.loads(l[6:]) for l in rest if l.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "red " * 60 and rest[-1] == "data: [DONE]"
    thread.join(timeout=30)
    assert not thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health")


def test_sampling_options_answer_as_pipeline_chat_does(server, client, reference):
    """temperature/top_p/seed/stop/max_tokens reach the sampler as Pipeline.chat's options do."""
    for opts in (dict(temperature=1.0, top_p=0.9, seed=3, max_tokens=12),
                 dict(temperature=1.5, seed=11, max_tokens=20, stop=["e"])):
        expected = reference.chat(COLOR, QUESTION, temperature=opts["temperature"], top_p=opts.get("top_p", 1.0),
                                  seed=opts["seed"], max_new_tokens=opts["max_tokens"], stop=opts.get("stop", ()))
        r = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))], **opts)
        assert r.choices[0].message.content == expected, opts


def test_remote_images_are_fetched_only_when_enabled_and_within_the_byte_limit(tmp_path):
    import functools
    import http.server

    from vila_edge.errors import RequestError
    from vila_edge.server.images import ImagePolicy, load_image_url
    Image.open(COLOR).save(tmp_path / "a.png")
    (tmp_path / "big.png").write_bytes(_noise_png())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(RequestError, match="remote image URLs are disabled"):
            load_image_url(base + "/a.png", ImagePolicy())
        img = load_image_url(base + "/a.png", ImagePolicy(allow_remote=True))
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(COLOR).convert("RGB")))
        with pytest.raises(RequestError) as e:
            load_image_url(base + "/big.png", ImagePolicy(allow_remote=True, max_bytes=MAX_IMAGE_BYTES))
        assert e.value.status == 413
    finally:
        httpd.shutdown()


def test_cli_serve_errors_are_one_line_and_status_2(tiny, capsys):
    from vila_edge.cli import main
    assert main(["serve", tiny + "-missing", "--port", "0"]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", tiny, "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "manifest.json" in err[0] and "cannot listen" in err[1]
