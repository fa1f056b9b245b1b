"""`vila-edge serve` answers as the Python API does: the real server on a loopback port, spoken to
with the official openai client and raw HTTP; references are Pipeline.chat / Conversation on the same
engine and jsonschema."""
import json
import os

import httpx
import jsonschema
import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serving import (COLOR, EXAMPLES, QUESTION, SCHEMA, client, data_url, image_message, kv_used,  # noqa: E402,F401
                     reference, server, tiny)
from vila_edge.pipeline import Pipeline  # noqa: E402


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
    assert kv_used(server[0]) == 0


def test_several_images_and_a_local_file_under_the_allowed_dir(server, client, reference):
    allowed = server[2]
    expected = reference.chat([COLOR, os.path.join(EXAMPLES, "count.png")], "Which image has more circles?")
    r = client.chat.completions.create(model="tiny", messages=[image_message(
        "Which image has more circles?", f"file://{allowed}/color.png", data_url(os.path.join(EXAMPLES, "count.png")))])
    assert r.choices[0].message.content == expected


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


def test_sampling_options_answer_as_pipeline_chat_does(server, client, reference):
    """temperature/top_p/seed/stop/max_tokens reach the sampler as Pipeline.chat's options do."""
    for opts in (dict(temperature=1.0, top_p=0.9, seed=3, max_tokens=12),
                 dict(temperature=1.5, seed=11, max_tokens=20, stop=["e"])):
        expected = reference.chat(COLOR, QUESTION, temperature=opts["temperature"], top_p=opts.get("top_p", 1.0),
                                  seed=opts["seed"], max_new_tokens=opts["max_tokens"], stop=opts.get("stop", ()))
        r = client.chat.completions.create(model="tiny", messages=[image_message(QUESTION, data_url(COLOR))], **opts)
        assert r.choices[0].message.content == expected, opts
