"""Optional extras (pyproject.toml [project.optional-dependencies]) and the check that names the
pip command when one is missing, instead of a ModuleNotFoundError deep in a stack."""
import importlib.util

from vila_edge.errors import MissingExtraError

EXTRAS = {
    "export": ("torch", "transformers", "safetensors", "onnx", "tqdm"),
    "bench": ("matplotlib",),
    "video": ("av",),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "httpx"),
}


def require_extra(extra: str, what: str) -> None:
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed): "
                                f"pip install 'vila-edge[{extra}]'")
