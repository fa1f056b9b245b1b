"""Regenerate the VILA-U engine shipped inside the package (vila_edge/bundled/vila-u-tiny-shapes/), which
`make demo-imagine` and `vila-edge imagine` draw from on a fresh machine with no torch.

    make bundled-vila-u-engine        # = python -m vila_edge_export.bundle_vila_u

The engine is models/vila-u-tiny-shapes (trained by `make train-vila-u`) exported with
BUNDLED_VILA_U_EXPORT. fp32: the VILA-U generation graphs have no fp16 variant on this branch yet.
"""
import argparse
import json
import os
import shutil

from vila_edge_export.build import ExportOptions, export_engine
from vila_edge.manifest import MANIFEST

NAME = "vila-u-tiny-shapes"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "models", NAME)
ENGINE = os.path.join(ROOT, "vila_edge", "bundled", NAME)
BUNDLED_VILA_U_EXPORT = {"dtype": "fp32"}


def build(out: str = ENGINE, progress: bool = True) -> str:
    if os.path.isfile(os.path.join(out, MANIFEST)):    # the export's output check does not know VILA-U's extra graphs
        shutil.rmtree(out)
    export_engine(CHECKPOINT, out, ExportOptions.flat(progress=progress, **BUNDLED_VILA_U_EXPORT))
    path = os.path.join(out, MANIFEST)          # the build machine's path means nothing in a wheel
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["build"]["checkpoint"] = os.path.join("models", NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=ENGINE, help="engine directory to write (default: the package's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    print(build(args.out, not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
