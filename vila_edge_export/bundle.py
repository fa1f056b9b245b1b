"""Regenerate the engines shipped inside the package (vila_edge/bundled/): the VILA1.5-architecture
model `Pipeline()` runs, and the VILA-U one `make demo-imagine` draws from (no torch needed to run
either).

    make bundled-engine           # = python -m vila_edge_export.bundle
    make bundled-vila-u-engine    # = python -m vila_edge_export.bundle --vila-u

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VILA_U_NAME = "vila-u-tiny-shapes"
# models/vila-u-tiny-shapes (trained by `make train-vila-u`): fp32 with an fp32 KV pool, as its README's figures
# and the shipped engine (pinned: the fused graph's default KV pool is fp16, options.FUSED_KV_DTYPE, so
# regenerating it with the defaults would change it).
VILA_U_CHECKPOINT = os.path.join(ROOT, "models", VILA_U_NAME)
VILA_U_ENGINE = os.path.join(ROOT, "vila_edge", "bundled", VILA_U_NAME)
VILA_U_EXPORT = {"dtype": "fp32", "kv_dtype": "fp32"}


def build_bundled(out: str = BUNDLED_ENGINE, progress: bool = True, checkpoint: str = BUNDLED_CHECKPOINT,
                  options: dict = BUNDLED_EXPORT) -> str:
    checkpoint = os.path.normpath(checkpoint)
    export_engine(checkpoint, out, ExportOptions.flat(progress=progress, **options))
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
    ap.add_argument("--out", help="engine directory to write (default: the package's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--vila-u", action="store_true", help=f"the bundled VILA-U instead (default out: {VILA_U_ENGINE})")
    args = ap.parse_args(argv)
    if args.vila_u:
        print(build_bundled(args.out or VILA_U_ENGINE, not args.quiet, VILA_U_CHECKPOINT, VILA_U_EXPORT))
    else:
        print(build_bundled(args.out or BUNDLED_ENGINE, not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
