"""Writes users depend on are atomic: build under a temporary name beside the target, rename when
complete. The one helper for engine directories, export stages, fixtures, trained checkpoints and
result files: an interrupted run never leaves something that looks finished.
"""
import os
import shutil
import tempfile
from contextlib import contextmanager


def publish(tmp: str, out: str) -> None:
    """Rename the finished temp dir `tmp` to `out`, replacing an older `out` only once the new one
    is complete. mkdtemp makes 0700 and files may come 0600: published as 0755 / 0644 like any
    other directory, so other users (a robot's service account) can read it."""
    for d, _, files in os.walk(tmp):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str, prefix: str = ".tmp-"):
    """`with atomic_dir(out) as tmp:` fill tmp; it becomes `out` when the block ends, and is removed
    if the block raises (KeyboardInterrupt included)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str, text: str) -> None:
    """Write a file whole: readers see the old content or the new, never a part."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
