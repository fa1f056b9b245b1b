"""Devices a Pipeline runs on, what each needs, and the ONNX Runtime providers that run it.

    cpu            ORT's CPU provider over a numpy KV pool (vila_edge/ort_runner.py): the default.
    cpu-iobinding  the device runner (vila_edge/ort_device_runner.py) on ORT's CPU provider: the
                   I/O-binding path of cuda/tensorrt, run where CI runs, so its logic is tested.
    cuda           the device runner on ORT's CUDA execution provider (onnxruntime-gpu, cuda-python).
    tensorrt       the device runner on ORT's TensorRT execution provider (CUDA EP for the nodes
                   TensorRT does not take); its engine cache lives in the engine directory.

A device that is not usable raises DeviceUnavailable naming what is missing: never a silent fallback
to the CPU (ORT itself falls back when a provider fails to start, so the session's providers are
checked after loading too).
"""
import ctypes.util
import hashlib
import os

from vila_edge.errors import DeviceUnavailable, EngineError, UsageError

DEVICES = ("cpu", "cpu-iobinding", "cuda", "tensorrt")
GPU_DEVICES = ("cuda", "tensorrt")
PROVIDER = {"cpu": "CPUExecutionProvider", "cpu-iobinding": "CPUExecutionProvider",
            "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
TRT_CACHE_DIR = "trt_cache"          # inside the engine directory (or the user cache when read-only)
# TensorRT's runtime library names (TensorRT 10 and 8), for a check that needs no Python binding.
TRT_LIBS = ("libnvinfer.so.10", "libnvinfer.so.8")
GPU_EXTRA = "pip install 'vila-edge[cuda]' (cuda-python)"


def check_name(device: str) -> str:
    if device not in DEVICES:
        raise UsageError(f"device {device!r} unknown; expected one of {', '.join(DEVICES)}")
    return device


def tensorrt_found() -> bool:
    """TensorRT's libraries load here (the Python package is optional: ORT links libnvinfer)."""
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        pass
    for name in TRT_LIBS:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return ctypes.util.find_library("nvinfer") is not None


def trt_builder_missing() -> str | None:
    """None when this machine can build TensorRT engines through ORT (the export builds the cache),
    else why not, as a phrase."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed here (no `import tensorrt`)"
    import onnxruntime as ort
    if PROVIDER["tensorrt"] not in ort.get_available_providers():
        return f"this onnxruntime {ort.__version__} has no TensorRT execution provider"
    return None


def require(device: str) -> None:
    """Raise DeviceUnavailable unless everything `device` needs is installed and a GPU answers."""
    check_name(device)
    if device not in GPU_DEVICES:
        return
    import onnxruntime as ort

    have = ort.get_available_providers()
    if PROVIDER["cuda"] not in have:
        raise DeviceUnavailable(
            f"device {device!r}: this onnxruntime {ort.__version__} has no CUDA execution provider (it has "
            f"{', '.join(have)}); install onnxruntime-gpu in its place (Jetson: JetPack's onnxruntime-gpu wheel)")
    if device == "tensorrt":
        if PROVIDER["tensorrt"] not in have:
            raise DeviceUnavailable(f"device 'tensorrt': this onnxruntime {ort.__version__} has no TensorRT "
                                    f"execution provider; install an onnxruntime-gpu build with TensorRT")
        if not tensorrt_found():
            raise DeviceUnavailable(f"device 'tensorrt': TensorRT's libraries ({' or '.join(TRT_LIBS)}) are not "
                                    f"found; install TensorRT 10 (JetPack ships it; x86: pip install tensorrt)")
    try:
        from vila_edge.cuda.driver import probe
    except ImportError:
        raise DeviceUnavailable(f"device {device!r}: cuda-python is not installed (the device KV pool's copies "
                                f"and the CUDA kernels use it); {GPU_EXTRA}") from None
    ok, why = probe()
    if not ok:
        raise DeviceUnavailable(f"device {device!r}: {why}")


def check_active(session, device: str, path: str) -> None:
    """ORT starts a session on the CPU when a requested provider fails to load: refuse that."""
    want = PROVIDER[device]
    got = session.get_providers()
    if not got or got[0] != want:
        raise DeviceUnavailable(f"{path}: ONNX Runtime did not start {want} for device {device!r} (running on "
                                f"{', '.join(got)}); its CUDA/cuDNN/TensorRT libraries failed to load (ORT's log "
                                f"above names the file)")


def trt_cache_dir(engine_dir: str) -> str:
    """engine_dir/trt_cache, or a per-engine folder of the user cache when the engine is read-only."""
    inside = os.path.join(engine_dir, TRT_CACHE_DIR)
    if os.access(engine_dir, os.W_OK) or os.path.isdir(inside) and os.access(inside, os.W_OK):
        return inside
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.abspath(engine_dir).encode()).hexdigest()[:16]
    return os.path.join(base, "vila_edge", "trt", f"{os.path.basename(os.path.abspath(engine_dir))}-{key}")


def check_graph(device: str, engine_dir: str, manifest) -> None:
    """The device runner (every device but cpu) binds the LLM graph's past_k_l/past_v_l rows and its
    k_new_l/v_new_l outputs: the standard-op graph of --target orin engines, the one TensorRT parses.
    The fused graph of target cpu engines (vila_edge::PagedAttention over the pool, a CPU op) is refused."""
    graph = manifest.build.get("graph")
    if graph == "standard":
        return
    why = " (target cpu: its vila_edge::PagedAttention op runs on ORT's CPU provider only)" if graph == "fused" else ""
    raise EngineError(f"{engine_dir}: device {device!r} needs the standard-op LLM graph TensorRT parses; this "
                      f"engine's is {graph!r}{why}: export the checkpoint with --target orin (make engines "
                      f"TARGET=orin ...), or run this engine on device 'cpu'")


def providers(device: str, engine_dir: str, manifest, profile: dict | None = None, stream: int | None = None):
    """The provider list of one session: `profile` ({input: {min, opt, max}}) for TensorRT, `stream`
    (a CUstream handle) to run ORT's work on the caller's stream."""
    if device not in GPU_DEVICES:
        return [PROVIDER[device]]
    cuda = {"device_id": "0"}
    if stream is not None:
        cuda["user_compute_stream"] = str(int(stream))   # implies has_user_compute_stream
    if device == "cuda":
        return [(PROVIDER["cuda"], cuda)]
    check_graph(device, engine_dir, manifest)
    from vila_edge.trt_profile import provider_shapes
    cache = trt_cache_dir(engine_dir)
    os.makedirs(cache, exist_ok=True)
    trt = dict(cuda, trt_engine_cache_enable="True", trt_engine_cache_path=cache, trt_timing_cache_enable="True",
               trt_timing_cache_path=cache, trt_fp16_enable=str(manifest.dtype == "float16"),
               **(provider_shapes(profile) if profile else {}))
    return [(PROVIDER["tensorrt"], trt), (PROVIDER["cuda"], cuda)]
