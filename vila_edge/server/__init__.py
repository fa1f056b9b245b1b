"""`vila-edge serve`: an OpenAI-compatible HTTP server over one engine (needs the `serve` extra).

    vila-edge serve engines/vila-tiny-shapes-fp32 --port 8000 [--allow-dir ~/frames]

    from vila_edge.server import ServerConfig, create_app
    app = create_app(Pipeline(engine), ServerConfig(model_id="vila-tiny"))   # any ASGI server

Modules: schema (request bodies), images (image_url -> PIL, limits, allow-list), chat (messages ->
Conversation work), scheduler (bounded worker pool; the seam a batched scheduler replaces),
metrics (Prometheus), app (routes, errors, SSE).
"""
import os
import socket

from vila_edge.errors import ServeError
from vila_edge.server.app import ServerConfig, can_generate_images, create_app
from vila_edge.server.chat import Limits
from vila_edge.server.images import ImagePolicy

# Requests wait this long for KV blocks held by others before a 429 (the pool holds DEFAULT_CONTEXTS
# full contexts; more workers than that could otherwise fail under load).
KV_WAIT_S = 60.0
SHUTDOWN_GRACE_S = 30.0

__all__ = ["ServerConfig", "Limits", "ImagePolicy", "create_app", "can_generate_images", "build", "serve"]


def build(engine: str, *, model_id: str | None = None, workers: int = 4, max_queue: int = 64,
          max_images: int = 8, max_image_bytes: int = 20 * 2**20, max_prompt_tokens: int | None = None,
          allow_dir: str | None = None, allow_remote: bool = False, threads: int | None = None,
          max_context: int | None = None, kv_budget=None, block_size: int = 16, api_key: str | None = None):
    """(app, pipeline) for an engine directory."""
    from vila_edge.llm import KVConfig
    from vila_edge.pipeline import Pipeline
    pipe = Pipeline(engine, threads=threads, max_context=max_context,
                    kv=KVConfig(block_size=block_size, budget=kv_budget, wait_s=KV_WAIT_S))
    limits = Limits(max_images=max_images, max_prompt_tokens=max_prompt_tokens,
                    images=ImagePolicy(max_bytes=max_image_bytes, allow_dir=allow_dir, allow_remote=allow_remote))
    pipe.grammars.tokenizer()     # structured output's tokenizer now, not in the first request's TTFT
    cfg = ServerConfig(model_id=model_id or os.path.basename(os.path.normpath(engine)), workers=workers,
                       max_queue=max_queue, limits=limits, api_key=api_key)
    return create_app(pipe, cfg), pipe


def serve(engine: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> int:
    """Run until SIGINT/SIGTERM; in-flight requests get SHUTDOWN_GRACE_S to finish."""
    import uvicorn
    check_address(host, port)         # before loading the engine: a taken port is a one-line error
    app, _ = build(engine, **options)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    return 0


def check_address(host: str, port: int) -> None:
    """Raise ServeError unless host:port can be bound now (as uvicorn binds: SO_REUSEADDR)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
