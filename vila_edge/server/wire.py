"""OpenAI's wire format: error bodies (a VilaEdgeError's status), usage, timings, PNGs."""
import base64
import io
import json

from fastapi.responses import JSONResponse

from vila_edge.errors import KVCacheFull, RequestError, VilaEdgeError


def error_body(message: str, status: int, code=None, param=None) -> dict:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: BaseException) -> JSONResponse:
    if isinstance(e, RequestError):
        status, code, param = e.status, e.code, e.param
    elif isinstance(e, KVCacheFull):
        status, code, param = 429, "kv_cache_full", None
    elif isinstance(e, VilaEdgeError):
        status, code, param = 400, type(e).__name__, None
    elif isinstance(e, ValueError):       # GenerationConfig's range checks
        status, code, param = 400, "invalid_value", None
    else:
        status, code, param = 500, "internal_error", None
    return JSONResponse(error_body(str(e) or type(e).__name__, status, code, param), status_code=status)


def usage_of(stats: dict) -> dict:
    p, c = stats.get("prompt_tokens", 0), stats.get("new_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}


def timings_of(stats: dict) -> dict:
    return {"ttft_s": stats.get("ttft_s"), "decode_tok_s": stats.get("decode_tok_s"),
            "vision_s": stats.get("vision_s")}


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def json_dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
