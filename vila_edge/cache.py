"""Which engine a `Pipeline(model)` runs: the bundled one, an engine directory, or a checkpoint
exported once into a cache.

    Pipeline()                      -> the bundled engine (vila_edge/bundled/, shipped as package data)
    Pipeline("engines/x")           -> that engine directory (it has a manifest.json)
    Pipeline("models/ckpt")         -> exported on first use into $XDG_CACHE_HOME/vila_edge/engines/<key>
                                       (~/.cache/vila_edge/... without XDG_CACHE_HOME); later calls reuse it

The cache key hashes the checkpoint's content (every file's relative path and bytes), the export
options and the exporter's version and engine format, so an edited checkpoint, other options or a
new vila_edge each get their own engine. Hashing a multi-GB checkpoint takes seconds, so digests
are remembered per (path, size, mtime) in hashes.json next to the engines.
"""
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from vila_edge import errors
from vila_edge.atomic import write_text
from vila_edge.errors import EngineError, ExportError, ExportOptionError, VilaEdgeError
from vila_edge.extras import require_extra
from vila_edge.manifest import FORMAT_VERSION, MANIFEST
from vila_edge.version import __version__

BUNDLED_NAME = "vila-tiny-shapes"
BUNDLED_ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", BUNDLED_NAME)
# The bundled engine's checkpoint in a source checkout (not installed with the package).
BUNDLED_CHECKPOINT = os.path.join(os.path.dirname(BUNDLED_ENGINE), "..", "..", "models", BUNDLED_NAME)
# Answers equal the fp32 engine's (tests/test_first_hour.py). fp16 activations keep an fp16 KV pool whatever the
# fused graph's default (options.FUSED_KV_DTYPE applies to fp32 graphs), so the shipped engine is unchanged by it.
BUNDLED_EXPORT = {"dtype": "fp16"}
CHUNK = 1 << 20
HASH_BAR_BYTES = 256 << 20     # below this hashing takes well under a second: no bar


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vila_edge")


def is_checkpoint(path: str) -> bool:
    """A VILA checkpoint in NVIDIA's layout: config.json beside an llm/ folder."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "llm"))


def resolve_engine(model: str | os.PathLike | None = None, export_options: dict | None = None,
                   progress: bool = True) -> str:
    """The engine directory to load for `model` (see the module docstring), exporting if needed."""
    if model is None:
        return bundled_engine(progress)
    path = os.path.expanduser(os.fspath(model))
    if os.path.isfile(os.path.join(path, MANIFEST)):
        if export_options:
            raise EngineError(f"{path}: export options were given but this is an engine directory, already "
                              f"exported; pass its checkpoint directory instead")
        return path
    if is_checkpoint(path):
        return cached_export(path, export_options or {}, progress)
    if not os.path.exists(path):
        raise EngineError(f"{path}: no such engine or checkpoint directory")
    raise EngineError(f"{path}: neither an engine directory (no {MANIFEST}) nor a VILA checkpoint "
                      f"(config.json + llm/, vision_tower/, mm_projector/)")


def bundled_engine(progress: bool = True) -> str:
    """The shipped engine; in a source checkout whose shipped engine a newer engine format has made
    stale, the bundled checkpoint exported into the cache instead (needs the export extra)."""
    from vila_edge.manifest import Manifest
    try:
        Manifest.load(BUNDLED_ENGINE)
        return BUNDLED_ENGINE
    except EngineError as stale:
        if not is_checkpoint(BUNDLED_CHECKPOINT):
            raise EngineError(f"the bundled engine cannot be loaded ({stale}); reinstall vila-edge") from stale
        return cached_export(os.path.normpath(BUNDLED_CHECKPOINT), dict(BUNDLED_EXPORT), progress)


def cache_key(checkpoint: str, export_options: dict, progress: bool = False) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"options": export_options, "exporter": __version__, "format": FORMAT_VERSION},
                        sort_keys=True).encode())
    h.update(checkpoint_digest(checkpoint, progress).encode())
    return h.hexdigest()[:24]


def cached_export(checkpoint: str, export_options: dict, progress: bool = True) -> str:
    """Export `checkpoint` into the cache unless an engine for its content + options is there."""
    out = os.path.join(cache_dir(), "engines", cache_key(checkpoint, export_options, progress))
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return out
    require_extra("export", f"{checkpoint}: exporting a checkpoint")
    # Two processes starting on the same new checkpoint (two robot nodes) export it once: the
    # second waits for the first's engine instead of doubling an export's memory.
    with _exclusive(out + ".lock"):
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            if progress:
                print(f"vila_edge: exporting {checkpoint} -> {out} (once; later runs reuse it)", file=sys.stderr,
                      flush=True)
            run_export(checkpoint, out, export_options, progress)
    return out


def run_export(checkpoint: str, out: str, export_options: dict, progress: bool) -> None:
    """`python -m vila_edge_export` in a child process: torch, the float weights and the ONNX
    graphs being written never enter this (the robot's) process, and their memory is the OS's
    again when the export ends. Its progress bars are passed on to sys.stderr; a user error it
    reports is raised here as the same VilaEdgeError subclass with the same message."""
    try:
        options = json.dumps(export_options)
    except (TypeError, ValueError) as e:
        raise ExportOptionError(f"export options {sorted(export_options)}: not JSON values ({e})") from None
    with tempfile.TemporaryDirectory(prefix="vila_edge-export-") as tmp:
        error_file = os.path.join(tmp, "error.json")
        cmd = [sys.executable, "-m", "vila_edge_export", checkpoint, out, "--options", options,
               "--error-file", error_file] + ([] if progress else ["--quiet"])
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=_child_env()) as proc:
            try:
                tail = _pass_on(proc.stderr, sys.stderr if progress else None)
            except BaseException:       # Ctrl-C, a closed stderr: no export left running on its own
                proc.kill()
                raise
        if proc.returncode == 0:
            return
        if os.path.isfile(error_file):
            with open(error_file, encoding="utf-8") as f:
                err = json.load(f)
            cls = getattr(errors, err["type"], None)
            if isinstance(cls, type) and issubclass(cls, VilaEdgeError):
                raise cls(err["message"])
            raise ExportError(err["message"])
    last = next((line for line in reversed(tail.splitlines()) if line.strip()), "no message")
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"failed (exit status {proc.returncode})"
    raise ExportError(f"exporting {checkpoint} {how}: {last.strip()}")


def _pass_on(stream, sink, keep: int = 1 << 16) -> str:
    """Copy a child's stderr to `sink` (None: drop it) as it arrives, unbuffered so that progress
    bars redraw; returns its last `keep` characters (the message of a crash)."""
    tail = ""
    while chunk := os.read(stream.fileno(), 8192):
        text = chunk.decode("utf-8", "replace")
        if sink is not None:
            sink.write(text)
            sink.flush()
        tail = (tail + text)[-keep:]
    return tail


def _child_env() -> dict:
    """This process's environment, with the folder this vila_edge was imported from first on the
    path: the child imports the same vila_edge and, beside it, vila_edge_export (a source checkout
    run from anywhere, or an installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))


@contextlib.contextmanager
def _exclusive(path: str):
    """An advisory lock file (POSIX flock; where there is none, no lock)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _files(root: str) -> list:
    """(relative path, size, mtime_ns) of every file under root, sorted; hidden files skipped."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for n in sorted(names):
            if not n.startswith("."):
                st = os.stat(os.path.join(d, n))
                out.append((os.path.relpath(os.path.join(d, n), root), st.st_size, st.st_mtime_ns))
    return out


def checkpoint_digest(root: str, progress: bool = True) -> str:
    """sha256 over every file's relative path and bytes; remembered per file list + stat."""
    files = _files(root)
    memo_path = os.path.join(cache_dir(), "hashes.json")
    stamp = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    memo = _read_memo(memo_path)
    key = os.path.abspath(root)
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["digest"]
    h = hashlib.sha256()
    with _bar(sum(size for _, size, _ in files), progress, f"hashing {os.path.basename(key)}") as bar:
        for rel, _, _ in files:
            h.update(rel.encode() + b"\0")
            with open(os.path.join(root, rel), "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
    memo[key] = {"stamp": stamp, "digest": h.hexdigest()}
    _write_memo(memo_path, memo)
    return memo[key]["digest"]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _bar(total: int, progress: bool, desc: str):
    """A tqdm byte bar for checkpoints worth waiting for (tqdm comes with the export extra)."""
    if not progress or total < HASH_BAR_BYTES:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def _read_memo(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}      # a missing or damaged memo only costs a re-hash


def _write_memo(path: str, memo: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, json.dumps(memo))
