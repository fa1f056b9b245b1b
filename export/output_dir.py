"""Where an export may write: never over the user's files, never into its own checkpoint.

An export builds into `.export-<random>/` beside OUT and renames it into place at the end
(build.publish). Before anything is written:
  - OUT must not be the checkpoint, lie inside it or contain it (the rename would delete it);
  - an existing OUT must be an engine directory holding only files an export writes: any other
    non-empty directory is refused, so a typo never deletes a folder of photos;
  - `.export-*` directories left by exports that were killed (their owner file names a process
    that no longer exists on this host) are removed; live or unknown ones are left alone.
"""
import json
import os
import socket
import tempfile

from vila_edge.errors import ExportError
from vila_edge.manifest import MANIFEST

TMP_PREFIX = ".export-"
OWNER = ".owner.json"        # inside a temp dir: which process is building it
# Every file an export may leave in an engine directory (build.FILES, the manifest, the template).
ENGINE_FILES = frozenset({MANIFEST, "vision.onnx", "llm.onnx", "embed_tokens.npy", "tokenizer.json",
                          "export_report.json", "chat_template.jinja"})


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output(checkpoint: str, out: str) -> None:
    """Refuse an OUT whose replacement would lose data; nothing has been written when this raises."""
    if _inside(out, checkpoint) or _inside(checkpoint, out):
        raise ExportError(f"output {out} overlaps the checkpoint {checkpoint}: the export would replace "
                          f"it; write the engine somewhere else (e.g. engines/<name>)")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise ExportError(f"output {out} exists and is not a directory; choose another OUT or remove it")
    entries = set(os.listdir(out))
    if not entries:
        return
    if MANIFEST not in entries or entries - ENGINE_FILES:
        stray = sorted(entries - ENGINE_FILES)[:5]
        raise ExportError(f"output {out} is not empty and is not an engine directory "
                          f"({'no ' + MANIFEST if MANIFEST not in entries else 'it also holds ' + ', '.join(stray)})"
                          f"; an export replaces its OUT, so choose a new or empty directory "
                          f"(nothing was changed)")


def make_temp_dir(parent: str) -> str:
    """A fresh `.export-*` dir in `parent` with an owner file; stale ones are cleaned first."""
    try:
        os.makedirs(parent, exist_ok=True)
        clean_stale(parent)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
        with open(os.path.join(tmp, OWNER), "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    except OSError as e:
        raise ExportError(f"cannot write in {parent} ({e.strerror or e}); choose an OUT in a writable "
                          f"directory or fix its permissions") from e
    return tmp


def clean_stale(parent: str) -> list:
    """Remove `.export-*` dirs whose owner process is gone (same host only); returns their paths."""
    import shutil

    removed = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path) and not os.path.islink(path) and _is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_dead(tmp: str) -> bool:
    """True only when the owner file proves its process is gone: unreadable, foreign-host or
    owner-less directories may belong to a live export elsewhere and are kept."""
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
    """The owner file is build bookkeeping: removed before the directory is published."""
    os.remove(os.path.join(tmp, OWNER))
