"""Was this engine built with these export options? The manifest's `build.options` answers it.

    python -m vila_edge_export.recorded ENGINE [--options '{"quant": "awq", "kv_dtype": "fp16"}']

Exit status 0: ENGINE was exported with `--options` (a flat JSON object, ExportOptions.flat's names;
every option not given at its default, so an engine built before a default changed is stale too).
Exit status 1 and one line on stderr naming the first option that differs, or saying why there is no
record (no engine, an unreadable or older-format manifest, an engine exported before options were
recorded). The Makefile's benchmark targets re-export an engine when this says 1, instead of timing
an engine a previous default built (an fp32 KV pool, another quantizer).

Torch-free: options.py and the manifest reader only.
"""
import argparse
import json
import os
import sys
from dataclasses import fields

from vila_edge.errors import VilaEdgeError
from vila_edge_export.options import DEFAULT_DEPTH_BITS

# Options that decide what the engine holds. Left out: progress, and what only the export's quality report
# reads or decides (eval_tokens, max_ppl_increase_pct, min_top1_agreement): the same engine either way.
REPORT_ONLY = ("progress", "eval_tokens", "max_ppl_increase_pct", "min_top1_agreement")
# Options added after engines began recording theirs, with what an engine that does not record one was built
# with (the export's behaviour before the option existed), from its other recorded options. Such an engine is
# stale only where that differs from what is wanted: an rtn engine from before GPTQ rounding was an option is
# still an rtn engine; an awq one rounded to nearest, which the default no longer does.
# Each is called with (build.options, the manifest's family).
LEGACY = {
    "gptq_rounding": lambda have, family: have.get("quant") == "gptq",      # llm_quant: gptq=method == "gptq"
    "act_order": lambda have, family: False,
    # VILA-U's quantized depth transformer was int4 throughout (no value of depth_bits builds that now);
    # other families have none, and their engines do not change with it.
    "depth_bits": lambda have, family: (0 if have.get("quant") in (None, "none") else
                                        "int4 throughout" if family == "vila-u" else DEFAULT_DEPTH_BITS),
}


def recorded_options(opts) -> dict:
    """`opts` (ExportOptions, defaults resolved) as the flat dict build.options records: ExportOptions.flat's
    names ("quant" is the method), JSON values."""
    out = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ("quant", *REPORT_ONLY)}
    out["quant"] = opts.quant.method
    out.update({f.name: getattr(opts.quant, f.name) for f in fields(opts.quant)
                if f.name not in ("method", *REPORT_ONLY)})
    return json.loads(json.dumps(out))


def stale_option(engine: str, wanted) -> str | None:
    """None when `engine`'s build.options equal `wanted` (ExportOptions, defaults resolved) as recorded_options
    writes them; else one line why not."""
    from vila_edge.manifest import MANIFEST, Manifest

    want = recorded_options(wanted)
    if not os.path.isfile(os.path.join(engine, MANIFEST)):
        return f"{engine}: no engine ({MANIFEST} missing)"
    try:
        manifest = Manifest.load(engine)
    except VilaEdgeError as e:
        return f"{engine}: unreadable ({' '.join(str(e).split())})"
    have, family = manifest.build.get("options"), manifest.family
    if not isinstance(have, dict):
        return f"{engine}: no build.options in its manifest (exported before options were recorded)"
    for name in sorted(want, key=lambda n: n != "quant"):     # the method first: the difference that says most
        value = want[name]
        if name not in have and name in LEGACY:
            built = LEGACY[name](have, family)
            if built != value:
                return f"{engine}: option {name} not recorded (built before it existed: {built!r}), wanted {value!r}"
            continue
        if name not in have:
            return f"{engine}: option {name} not recorded, wanted {value!r}"
        if have[name] != value:
            return f"{engine}: option {name} is {have[name]!r}, wanted {value!r}"
    return None


def main(argv=None) -> int:
    from vila_edge_export.__main__ import options as parse_options

    ap = argparse.ArgumentParser(prog="python -m vila_edge_export.recorded", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", help="engine directory")
    ap.add_argument("--options", default="{}", help="the export options wanted, a flat JSON object (default: every "
                                                    "default)")
    args = ap.parse_args(argv)
    try:
        # the same parsing and errors as an export given them
        why = stale_option(args.engine, parse_options(args.options, progress=False))
    except VilaEdgeError as e:
        print(f"vila_edge_export.recorded: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
