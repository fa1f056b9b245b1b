"""The OpenAI-compatible HTTP API over one Pipeline (FastAPI; run by uvicorn, see server/__init__.py).

Every error a client can cause answers a 4xx in OpenAI's error format,
{"error": {"message", "type", "param", "code"}}; the server keeps serving. A client that goes away
cancels its job: the worker stops at the next token and closes the conversation, freeing its KV.
"""
import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from vila_edge.errors import RequestError, VilaEdgeError
from vila_edge.sampling import GenerationConfig
from vila_edge.server.chat import ChatTask, Limits, parse_messages
from vila_edge.server.metrics import Metrics
from vila_edge.server.scheduler import Job, ThreadScheduler
from vila_edge.server.schema import ChatRequest, ImageRequest
from vila_edge.server.wire import error_body, error_response, json_dumps, png_b64, timings_of, usage_of

POLL_S = 0.25        # how often a waiting request checks that its client is still there
IMAGE_CAPABILITY = "generate_image"
ENDPOINTS = ("/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/metrics")
OPEN_ENDPOINTS = ("/health", "/metrics")      # probes and scrapers need no API key


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    workers: int = 2
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None           # when set, /v1/* needs "Authorization: Bearer <key>"

    @property
    def max_body_bytes(self) -> int:
        """Base64 images plus 1 MiB of text."""
        return self.limits.max_images * (self.limits.images.max_bytes * 4 // 3 + 64) + 2**20


def can_generate_images(pipe) -> bool:
    """VILA-U engines list "generate_image" in the manifest's capabilities."""
    caps = getattr(pipe.manifest, "capabilities", None) or pipe.manifest.build.get("capabilities", ())
    return IMAGE_CAPABILITY in caps and callable(getattr(pipe, "generate_image", None))


class ClientGone(Exception):
    pass


async def next_event(job: Job, request: Request) -> tuple:
    """The job's next event; raises ClientGone (and cancels the job) once the client has left,
    checked at least every POLL_S whether events flow or not."""
    while True:
        if time.monotonic() - job.checked_at >= POLL_S:
            job.checked_at = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


def gen_config(req: ChatRequest, max_context: int) -> dict:
    field_ = req.unsupported()
    if field_ is not None:
        raise RequestError(f"{field_} is not supported by this server (vila-edge: text answers, optionally "
                           "constrained by response_format / guided_choice / guided_regex)", param=field_,
                           code="unsupported_parameter")
    fmt, schema = req.response_format, None
    if fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise RequestError("response_format json_schema needs its json_schema.schema", param="response_format")
        schema = fmt.json_schema.schema_
    gen = dict(max_new_tokens=min(req.max_completion_tokens or req.max_tokens or 256, max_context),
               temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
               repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop or (),
               json_schema=schema, choices=req.guided_choice, regex=req.guided_regex)
    GenerationConfig(**gen)       # range checks now: a ValueError is a 400 before any work
    return gen


def create_app(pipe, cfg: ServerConfig) -> FastAPI:
    metrics, sched = Metrics(), ThreadScheduler(pipe, cfg.workers, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its grace period):
        # stop what is left at its next token, then wait for the workers.
        await asyncio.to_thread(sched.shutdown, True)

    app = FastAPI(title="vila-edge", lifespan=lifespan)
    app.state.pipe, app.state.scheduler, app.state.metrics = pipe, sched, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        msg = "request body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid')}"
        param = None if first.get("type") == "json_invalid" else where or None
        return JSONResponse(error_body(msg, 400, first.get("type"), param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)

    @app.exception_handler(VilaEdgeError)
    async def _vila(request, exc):
        return error_response(exc)

    @app.exception_handler(ValueError)
    async def _value(request, exc):
        return error_response(exc)

    def check_model(model):
        if model not in (None, cfg.model_id):
            raise RequestError(f"model {model!r} is not served here; this server serves {cfg.model_id!r}",
                               status=404, code="model_not_found", param="model")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        gen = gen_config(req, pipe.max_context)
        system, turns = await run_in_threadpool(parse_messages, req, pipe.family.part_text, cfg.limits)
        job = sched.submit(Job(ChatTask(system, turns, gen, cfg.limits), asyncio.get_running_loop()))
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        try:
            first = await next_event(job, request)
            if first[0] == "error":
                return error_response(first[1])
            if req.stream:                              # the SSE generator owns the job from here
                usage = req.stream_options is not None and req.stream_options.include_usage
                return StreamingResponse(sse(job, first, rid, created, usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, event = "", first
            while event[0] == "text":
                text += event[1]
                event = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        except BaseException:
            job.cancel()          # e.g. the server cancelled this request task: stop the generation
            raise
        if event[0] == "error":
            return error_response(event[1])
        stats = event[1]
        metrics.record(stats)
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stats["finish_reason"], "logprobs": None}],
                "usage": usage_of(stats), "timings": timings_of(stats)}

    async def sse(job: Job, first, rid: str, created: int, include_usage: bool):
        def chunk(delta, reason=None, **extra):
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
            return "data: " + json_dumps(body) + "\n\n"
        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while event[0] == "text":
                yield chunk({"content": event[1]})
                event = await job.events.get()
            if event[0] == "error":
                yield "data: " + json_dumps(error_body(str(event[1]), 500 if not isinstance(
                    event[1], VilaEdgeError) else 400)) + "\n\n"
                return
            stats = event[1]
            metrics.record(stats)
            yield chunk({}, stats["finish_reason"], timings=timings_of(stats))
            if include_usage:
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_id,
                        "choices": [], "usage": usage_of(stats)}
                yield "data: " + json_dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()          # no-op once done; a client that left frees its KV at the next token

    @app.post("/v1/images/generations")
    async def images(req: ImageRequest, request: Request):
        check_model(req.model)
        if not can_generate_images(pipe):
            raise RequestError(f"this engine ({pipe.manifest.family}) cannot generate images; "
                               "serve a VILA-U engine for /v1/images/generations", code="unsupported_capability")

        job = sched.submit(Job(ImageTask(req), asyncio.get_running_loop()))
        try:
            kind, value = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if kind == "error":
            return error_response(value)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in value]}

    @app.get("/v1/models")
    async def models():
        caps = ["chat", "vision"] + ([IMAGE_CAPABILITY] if can_generate_images(pipe) else [])
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": 0,
                                            "owned_by": "vila-edge", "capabilities": caps,
                                            "max_context": pipe.max_context}]}

    @app.get("/health")
    async def health():
        kv = pipe.llm.blocks.stats()
        return {"status": "ok", "model": cfg.model_id, **sched.stats(),
                "kv_blocks": {"total": kv.num_blocks, "used": kv.used, "cached": kv.cached, "free": kv.free}}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(pipe.llm.blocks.stats(), sched.stats()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return LimitsMiddleware(app, cfg.max_body_bytes, metrics, cfg.api_key)


@dataclass
class ImageTask:
    req: ImageRequest

    def run(self, pipe, job) -> None:
        r = self.req
        images = pipe.generate_image(r.prompt, n=r.n, cfg_scale=r.cfg_scale, temperature=r.temperature,
                                     top_k=r.top_k, top_p=r.top_p, seed=r.seed)
        job.emit("done", [png_b64(im) for im in images])


class LimitsMiddleware:
    """ASGI, around the app: the API key (401), the body size (413: by Content-Length before
    reading, and while reading a chunked body), and the request counter by endpoint and status."""

    def __init__(self, app, max_body: int, metrics: Metrics, api_key: str | None = None):
        self.app, self.max_body, self.metrics, self.api_key = app, max_body, metrics, api_key
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"   # bounded label values
        headers = dict(scope["headers"])
        refusal = self._refusal(headers, path)
        if refusal is not None:
            self.metrics.requests.labels(path, str(refusal.status_code)).inc()
            return await refusal(scope, receive, send)
        status, received = {}, [0]

        async def counting_send(message):
            if received[0] > self.max_body:
                # The app answers a body it could not read with a 400: answer 413 in its place.
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    status["code"] = 413
                    await JSONResponse(error_body(self._too_large(), 413, "request_too_large"),
                                       status_code=413)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def limited_receive():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body:       # a chunked body: stop reading it
                raise RequestError(self._too_large(), status=413, code="request_too_large")
            return message
        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            self.metrics.requests.labels(path, str(status.get("code", 499))).inc()

    def _refusal(self, headers: dict, path: str) -> JSONResponse | None:
        if self.api_key is not None and path not in OPEN_ENDPOINTS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given, "Bearer " + self.api_key):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer <key>)", 401,
                                               "invalid_api_key"), status_code=401)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return JSONResponse(error_body(self._too_large(), 413, "request_too_large"), status_code=413)
        return None

    def _too_large(self) -> str:
        return f"request body over the server's limit of {self.max_body} bytes"
