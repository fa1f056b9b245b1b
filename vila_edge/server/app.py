"""The OpenAI-compatible HTTP API over one Pipeline (FastAPI; run by uvicorn, see server/__init__.py).

Every error a client can cause answers a 4xx in OpenAI's error format,
{"error": {"message", "type", "param", "code"}}; the server keeps serving. A client that goes away
cancels its job: the worker stops at the next token and closes the conversation, freeing its KV.
"""
import asyncio
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
from vila_edge.server.middleware import LimitsMiddleware
from vila_edge.server.scheduler import Job, ThreadScheduler
from vila_edge.server.schema import ChatRequest, ImageRequest
from vila_edge.server.wire import error_body, error_response, json_dumps, png_b64, timings_of, usage_of

POLL_S = 0.25        # how often a waiting request checks that its client is still there
IMAGE_CAPABILITY = "generate_image"


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    workers: int = 4                     # requests generating at once: the scheduler's decode batch
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


def create_app(pipe, cfg: ServerConfig) -> LimitsMiddleware:
    """The ASGI app: FastAPI routes inside the limits middleware. `.state` holds pipe, scheduler, metrics."""
    metrics, sched = Metrics(), ThreadScheduler(pipe, cfg.workers, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its grace period):
        # stop what is left at its next token, then wait for the workers.
        await asyncio.to_thread(sched.shutdown, True)

    app = FastAPI(title="vila-edge", lifespan=lifespan)
    app.state.pipe, app.state.scheduler, app.state.metrics = pipe, sched, metrics
    install_error_handlers(app)
    completions = Completions(pipe, cfg, sched, metrics)
    app.post("/v1/chat/completions")(completions.create)
    app.post("/v1/images/generations")(ImageGenerations(pipe, cfg, sched).create)
    install_info_routes(app, pipe, cfg, sched, metrics)
    return LimitsMiddleware(app, cfg.max_body_bytes, metrics, cfg.api_key)


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client can cause -> a 4xx in OpenAI's format (wire.error_response)."""
    async def invalid(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            msg, where = "request body is not valid JSON", ""
        else:
            msg = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(msg, 400, first.get("type"), where or None), status_code=400)

    async def http(request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)

    async def ours(request, exc):
        return error_response(exc)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(VilaEdgeError, ours)
    app.add_exception_handler(ValueError, ours)


def check_model(model: str | None, cfg: ServerConfig) -> None:
    if model not in (None, cfg.model_id):
        raise RequestError(f"model {model!r} is not served here; this server serves {cfg.model_id!r}",
                           status=404, code="model_not_found", param="model")


class Completions:
    """POST /v1/chat/completions: one JSON answer, or server-sent events with stream: true."""

    def __init__(self, pipe, cfg: ServerConfig, sched, metrics: Metrics):
        self.pipe, self.cfg, self.sched, self.metrics = pipe, cfg, sched, metrics

    async def create(self, req: ChatRequest, request: Request):
        check_model(req.model, self.cfg)
        gen = gen_config(req, self.pipe.max_context)
        system, turns = await run_in_threadpool(parse_messages, req, self.pipe.family.part_text, self.cfg.limits)
        job = self.sched.submit(Job(ChatTask(system, turns, gen, self.cfg.limits), asyncio.get_running_loop()))
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        try:
            first = await next_event(job, request)
            if first[0] == "error":
                return error_response(first[1])
            if req.stream:                              # the SSE generator owns the job from here
                usage = req.stream_options is not None and req.stream_options.include_usage
                return StreamingResponse(self.sse(job, first, rid, created, usage), media_type="text/event-stream",
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
        self.metrics.record(event[1])
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.cfg.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": event[1]["finish_reason"], "logprobs": None}],
                "usage": usage_of(event[1]), "timings": timings_of(event[1])}

    async def sse(self, job: Job, event, rid: str, created: int, include_usage: bool):
        def data(choices, **extra) -> str:
            return "data: " + json_dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": self.cfg.model_id, "choices": choices, **extra}) + "\n\n"

        def delta(d, reason=None) -> list:
            return [{"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}]
        try:
            yield data(delta({"role": "assistant", "content": ""}))
            while event[0] == "text":
                yield data(delta({"content": event[1]}))
                event = await job.events.get()
            if event[0] == "error":       # headers are sent: the error travels as an event
                status = 400 if isinstance(event[1], VilaEdgeError) else 500
                yield "data: " + json_dumps(error_body(str(event[1]), status)) + "\n\n"
                return
            stats = event[1]
            self.metrics.record(stats)
            yield data(delta({}, stats["finish_reason"]), timings=timings_of(stats))
            if include_usage:
                yield data([], usage=usage_of(stats))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()          # no-op once done; a client that left frees its KV at the next token


class ImageGenerations:
    """POST /v1/images/generations: b64 PNGs from engines that can generate (VILA-U), else 400."""

    def __init__(self, pipe, cfg: ServerConfig, sched):
        self.pipe, self.cfg, self.sched = pipe, cfg, sched

    async def create(self, req: ImageRequest, request: Request):
        check_model(req.model, self.cfg)
        if not can_generate_images(self.pipe):
            raise RequestError(f"this engine ({self.pipe.manifest.family}) cannot generate images; "
                               "serve a VILA-U engine for /v1/images/generations", code="unsupported_capability")
        job = self.sched.submit(Job(ImageTask(req), asyncio.get_running_loop()))
        try:
            kind, value = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if kind == "error":
            return error_response(value)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in value]}


@dataclass
class ImageTask:
    req: ImageRequest

    def run(self, pipe, job) -> None:
        r = self.req
        images = pipe.generate_image(r.prompt, n=r.n, cfg_scale=r.cfg_scale, temperature=r.temperature,
                                     top_k=r.top_k, top_p=r.top_p, seed=r.seed)
        job.emit("done", [png_b64(im) for im in images])


def install_info_routes(app: FastAPI, pipe, cfg: ServerConfig, sched, metrics: Metrics) -> None:
    async def models():
        caps = ["chat", "vision"] + ([IMAGE_CAPABILITY] if can_generate_images(pipe) else [])
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": 0,
                                            "owned_by": "vila-edge", "capabilities": caps,
                                            "max_context": pipe.max_context}]}

    async def health():
        kv = pipe.llm.blocks.stats()
        return {"status": "ok", "model": cfg.model_id, **sched.stats(), "engine": pipe.scheduler.stats(),
                "kv_blocks": {"total": kv.num_blocks, "used": kv.used, "cached": kv.cached, "free": kv.free}}

    async def prometheus():
        return Response(metrics.render(pipe.llm.blocks.stats(), sched.stats()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")
    app.get("/v1/models")(models)
    app.get("/health")(health)
    app.get("/metrics")(prometheus)
