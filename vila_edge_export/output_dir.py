"""Where an export may write: never over the user's files, never into its own checkpoint.

An export builds into `.export-<random>/` beside OUT and renames it into place at the end
(vila_edge/atomic.py). Before anything is written:
  - OUT must not be the checkpoint, lie inside it or contain it (the rename would delete it);
  - an existing OUT must be an engine directory holding only files an export writes: any other
    non-empty directory is refused, so a typo never deletes a folder of photos;
  - `.export-*` directories left by exports that were killed (their owner file names a process
    that no longer exists on this host) are removed; live or unknown ones are left alone.
"""
import os

from vila_edge import atomic
from vila_edge.atomic import OWNER, drop_owner  # noqa: F401 (callers' names)
from vila_edge.errors import ExportError
from vila_edge.manifest import MANIFEST

TMP_PREFIX = ".export-"
# Every file an export may leave in an engine directory (build.FILES, VILA-U's generation graphs
# build_vila_u.FILES, the manifest, the template).
ENGINE_FILES = frozenset({MANIFEST, "vision.onnx", "llm.onnx", "llm.onnx.data", "projector.onnx", "embed_tokens.npy",
                          "embed_tokens.npz", "tokenizer.json", "export_report.json", "chat_template.jinja",
                          "code_embed.onnx", "depth.onnx", "decoder.onnx"})


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
    """A fresh `.export-*` dir in `parent` with an owner file (vila_edge/atomic.py); stale ones are
    cleaned first."""
    try:
        return atomic.make_temp_dir(parent, TMP_PREFIX)
    except OSError as e:
        raise ExportError(f"cannot write in {parent} ({e.strerror or e}); choose an OUT in a writable "
                          f"directory or fix its permissions") from e


def clean_stale(parent: str) -> list:
    """Remove `.export-*` dirs whose owner process is gone (same host only); returns their paths."""
    return atomic.clean_stale(parent, TMP_PREFIX)
