"""ASGI middleware around the app: API key, body size, request counting (before FastAPI parses)."""
import hmac

from fastapi.responses import JSONResponse

from vila_edge.errors import RequestError
from vila_edge.server.metrics import Metrics
from vila_edge.server.wire import error_body

ENDPOINTS = ("/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/metrics")
OPEN_ENDPOINTS = ("/health", "/metrics")      # probes and scrapers need no API key


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
