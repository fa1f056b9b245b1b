"""Regenerate the engine shipped inside the package (vila_edge/bundled/), which `Pipeline()` runs.

    make bundled-engine        # = python -m vila_edge_export.bundle

The engine is the bundled checkpoint (models/vila-tiny-shapes) exported with cache.BUNDLED_EXPORT
(fp16: 7.6 MB, the same answers as fp32 on the held-out set). Rerun it whenever the engine format
or the exporter changes; tests/test_first_hour.py fails while the shipped engine is stale.
"""
import argparse
import json
import os

from vila_edge_export.build import ExportOptions, export_engine
from vila_edge.cache import BUNDLED_CHECKPOINT, BUNDLED_ENGINE, BUNDLED_EXPORT
from vila_edge.manifest import MANIFEST


def build_bundled(out: str = BUNDLED_ENGINE, progress: bool = True) -> str:
    checkpoint = os.path.normpath(BUNDLED_CHECKPOINT)
    export_engine(checkpoint, out, ExportOptions.flat(progress=progress, **BUNDLED_EXPORT))
    # The build machine's absolute path means nothing in a wheel: record the repository's.
    path = os.path.join(out, MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["build"]["checkpoint"] = os.path.join("models", os.path.basename(checkpoint))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=BUNDLED_ENGINE, help="engine directory to write (default: the package's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    print(build_bundled(args.out, not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
