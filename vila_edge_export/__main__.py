"""python -m vila_edge_export CHECKPOINT OUT [--options JSON] [--quiet] [--error-file PATH]

The whole export (vila_edge_export.build.export_engine) in a process of its own: what
`Pipeline(checkpoint)` runs the first time (vila_edge/cache.py), so torch and the float weights
never enter the robot's process and their memory goes back to the OS when the export ends.
`--options` is a flat JSON object of ExportOptions / QuantOptions fields ({"dtype": "fp16",
"quant": "rtn", "group_size": 64}: ExportOptions.flat). A user error (VilaEdgeError) is one line
on stderr and exit status 2; with --error-file its class and message are written there as JSON
instead, so the caller raises the same error.
"""
import argparse
import json
import sys

from vila_edge.atomic import write_text
from vila_edge.errors import ExportOptionError, VilaEdgeError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vila_edge_export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="VILA checkpoint directory")
    ap.add_argument("out", help="engine directory to write (replaced only when the new one is complete)")
    ap.add_argument("--options", default="{}", help="export options, a flat JSON object (default: every default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--error-file", default=None, help="write a user error here as {\"type\", \"message\"}")
    return ap


def options(text: str, progress: bool):
    from vila_edge_export.options import ExportOptions
    try:
        given = json.loads(text)
    except ValueError as e:
        raise ExportOptionError(f"--options is not JSON ({e})") from None
    if not isinstance(given, dict):
        raise ExportOptionError(f"--options must be a JSON object of option names, got {text!r}")
    try:
        return ExportOptions.flat(progress=progress, **given)
    except TypeError as e:          # a value of the wrong type for a field
        raise ExportOptionError(f"export options {sorted(given)}: {e}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        opts = options(args.options, progress=not args.quiet)      # before torch loads: a bad option fails fast
        from vila_edge_export.build import export_engine
        export_engine(args.checkpoint, args.out, opts)
    except VilaEdgeError as e:
        message = " ".join(str(e).split())
        if args.error_file:         # the caller raises it: printing it too would show it twice
            write_text(args.error_file, json.dumps({"type": type(e).__name__, "message": message}))
        else:
            print(f"vila_edge_export: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
