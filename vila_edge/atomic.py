"""Writes users depend on are atomic: build under a temporary name beside the target, rename when
complete. The one helper for engine directories, export stages, fixtures, trained checkpoints and
result files: an interrupted run never leaves something that looks finished.

Temporary directories carry an owner file (pid + host) while they are built; a later run in the
same parent removes those whose process is gone (a killed export), and leaves live or foreign ones.
"""
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager

OWNER = ".owner.json"        # inside a temp dir: which process is building it


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


def make_temp_dir(parent: str, prefix: str = ".tmp-") -> str:
    """A fresh `<prefix>*` dir in `parent` with an owner file; stale ones of that prefix are removed
    first. OSError propagates (callers name the problem in their own error type)."""
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(tmp, OWNER), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return tmp


def clean_stale(parent: str, prefix: str) -> list:
    """Remove `<prefix>*` dirs whose owner process is gone (same host only); returns their paths."""
    removed = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path) and _is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_dead(tmp: str) -> bool:
    """True only when the owner file proves its process is gone: unreadable, foreign-host or
    owner-less directories may belong to a live process elsewhere and are kept."""
    try:
        with open(os.path.join(tmp, OWNER), encoding="utf-8") as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, owned by another user
        return False
    return False


def drop_owner(tmp: str) -> None:
    """The owner file is bookkeeping: removed before the directory is published."""
    os.remove(os.path.join(tmp, OWNER))


@contextmanager
def atomic_dir(out: str, prefix: str = ".tmp-", tmp: str | None = None):
    """`with atomic_dir(out) as tmp:` fill tmp; it becomes `out` when the block ends, and is removed
    if the block raises (KeyboardInterrupt included). `tmp`: a directory make_temp_dir made already."""
    tmp = tmp or make_temp_dir(os.path.dirname(os.path.abspath(out)), prefix)
    try:
        yield tmp
        drop_owner(tmp)
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
