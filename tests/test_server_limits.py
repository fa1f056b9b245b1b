"""`vila-edge serve` under bad input and bad luck: malformed requests, limits, disconnects, a full
queue, shutdown, API key, remote images, CLI errors. Each gets its 4xx (or clean end) and the server
keeps serving with no KV block left in use."""
import asyncio
import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from serving import (COLOR, MAX_IMAGE_BYTES, QUESTION, client, data_url, image_message, kv_used,  # noqa: E402,F401
                     noise_png, server, tiny, tiny_png)
from vila_edge.server import build  # noqa: E402


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
        ("oversize image", msg(data_url(noise_png())), 413, "image_too_large"),
        ("too many images", msg(*[data_url(tiny_png())] * 4), 400, "too_many_images"),
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
    assert kv_used(url) == 0


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
        assert kv_used(url) > 0
    deadline = time.time() + 20
    while (kv_used(url) or not httpx.get(url + "/health").json()["interrupted"]) and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["interrupted"] == 1 and health["kv_blocks"]["used"] == 0 and health["running"] == 0


def test_a_non_streaming_client_that_disconnects_frees_its_kv_blocks(server):
    url = server[0]
    before = httpx.get(url + "/health").json()["interrupted"]
    body = {"messages": [image_message(QUESTION, data_url(COLOR))], "max_tokens": 900, "guided_regex": "(red ){800}"}
    # 800 constrained tokens take ~1 s on an idle 2-core machine since the one-sequence decode path;
    # the client gives up after 0.2 s and closes its connection
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.2))
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["interrupted"] == before and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["interrupted"] == before + 1 and health["kv_blocks"]["used"] == 0


def test_a_full_queue_is_a_429_and_shutdown_interrupts_running_work():
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


def test_remote_images_are_fetched_only_when_enabled_and_within_the_byte_limit(tmp_path):
    import functools
    import http.server

    from vila_edge.errors import RequestError
    from vila_edge.server.images import ImagePolicy, load_image_url
    Image.open(COLOR).save(tmp_path / "a.png")
    (tmp_path / "big.png").write_bytes(noise_png())
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
    assert len(err) == 2 and "no such engine" in err[0] and "cannot listen" in err[1]
