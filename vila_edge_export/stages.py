"""The export stages as commands: each reads files and writes files, so any one can be rerun alone.

    python -m vila_edge_export.stages quantize CHECKPOINT WORK/quant --quant awq [--group-size 128]
    python -m vila_edge_export.stages graphs   CHECKPOINT WORK/graphs [--quantized WORK/quant] --quant awq
    python -m vila_edge_export.stages engine   CHECKPOINT WORK/graphs OUT

The three in a row give the same engine directory as `vila-edge export CHECKPOINT OUT` with the
same options. Every option is a field of options.ExportOptions or options.QuantOptions, with its
default from there.
"""
import argparse
import dataclasses
import sys
import typing

from vila_edge_export.build import engine_stage
from vila_edge_export.options import ExportOptions, QuantOptions
from vila_edge.errors import VilaEdgeError


def _flag_type(field: dataclasses.Field):
    """argparse type of a field from its annotation; "none" gives None where the field allows it."""
    kinds = [a for a in typing.get_args(field.type) if a is not type(None)]
    if field.type is bool:       # bool("false") is True: parse the word
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    if not kinds:
        return field.type
    if kinds[0] is bool:         # bool("false") is True: parse the word
        return lambda text: None if text.lower() == "none" else text.lower() in ("1", "true", "yes", "on")
    return lambda text: None if text.lower() == "none" else kinds[0](text)


def _flags(cls, skip: tuple) -> list:
    """(flag, field) per field of a dataclass; QuantOptions.method is --quant, as in vila-edge export."""
    return [("--quant" if f.name == "method" else "--" + f.name.replace("_", "-"), f)
            for f in dataclasses.fields(cls) if f.name not in skip]


def add_options(ap: argparse.ArgumentParser) -> None:
    """One flag per field of ExportOptions and QuantOptions, defaulting to the dataclass's value."""
    for cls, skip in ((ExportOptions, ("progress", "quant")), (QuantOptions, ())):
        for flag, f in _flags(cls, skip):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ap.add_argument(flag, dest=f.name, type=_flag_type(f), default=default, help=f"default {default}")
    ap.add_argument("--quiet", action="store_true")


def options(args) -> ExportOptions:
    given = vars(args)
    quant = QuantOptions(**{f.name: given[f.name] for f in dataclasses.fields(QuantOptions)})
    top = {f.name: given[f.name] for f in dataclasses.fields(ExportOptions) if f.name not in ("progress", "quant")}
    return ExportOptions(progress=not args.quiet, quant=quant, **top)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vila_edge_export.stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    q = sub.add_parser("quantize", help="checkpoint -> int4 codes, scales and quant_config.json")
    q.add_argument("checkpoint")
    q.add_argument("out")
    g = sub.add_parser("graphs", help="checkpoint (+ quantize output) -> ONNX graphs, embeddings, graphs.json")
    g.add_argument("checkpoint")
    g.add_argument("out")
    g.add_argument("--quantized", default=None, help="the quantize stage's directory (quantized engines)")
    e = sub.add_parser("engine", help="checkpoint + graphs output -> engine directory with manifest.json")
    e.add_argument("checkpoint")
    e.add_argument("graphs")
    e.add_argument("out")
    for p in (q, g, e):
        add_options(p)
    return ap


def main(argv=None) -> int:
    from vila_edge_export.stage_graphs import graphs_stage
    from vila_edge_export.stage_quantize import quantize_stage

    args = parser().parse_args(argv)
    opts = options(args)
    try:
        if args.stage == "quantize":
            quantize_stage(args.checkpoint, args.out, opts)
        elif args.stage == "graphs":
            graphs_stage(args.checkpoint, args.out, opts, args.quantized)
        else:
            engine_stage(args.checkpoint, args.graphs, args.out, opts)
    except VilaEdgeError as e:
        print(f"{parser().prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
