"""vila-edge command line: chat with an engine, export a checkpoint, write fixtures, evaluate.

    vila-edge chat ENGINE_DIR --image photo.jpg "What is on the table?"
    vila-edge export CHECKPOINT OUT [--dtype fp16] [--quant none|rtn|awq] [--lm-head-bits 8|4|0]
    vila-edge fixture OUT --kind nvila-lite
"""
import argparse
import sys

from vila_edge.errors import VilaEdgeError


def _chat(args) -> int:
    from vila_edge.llm import KVConfig
    from vila_edge.pipeline import Pipeline

    pipe = Pipeline(args.engine, threads=args.threads, max_context=args.max_context,
                    kv=KVConfig(block_size=args.block_size, budget=args.kv_budget))
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    conv = pipe.conversation(args.system)
    prompt = args.prompt
    images = args.image or None
    while True:
        for piece in conv.stream(images, prompt, video=args.video, **gen):
            print(piece, end="", flush=True)
        print()
        if args.stats:
            print(conv.last_stats, file=sys.stderr)
        if not args.interactive:
            conv.close()
            return 0
        try:
            prompt = input("> ")
        except EOFError:
            conv.close()
            return 0
        images, args.video = None, None


def _export(args) -> int:
    from export.build import ExportOptions, export_engine

    manifest = export_engine(args.checkpoint, args.out, ExportOptions(
        dtype=args.dtype, quant=args.quant, group_size=args.group_size, lm_head_bits=args.lm_head_bits,
        zero_point=args.zero_point, max_bpw=None if args.max_bpw == 0 else args.max_bpw,
        target=args.target, template=args.template, token_order=args.token_order, progress=not args.quiet,
        calib_dir=args.calib_dir, eval_tokens=args.eval_tokens,
        max_ppl_increase_pct=None if args.no_quality_floor else args.max_ppl_increase,
        min_top1_agreement=args.min_top1))
    print(f"{args.out}: {manifest.family} engine, {manifest.dtype}, quant {manifest.quant.get('method')}")
    return 0


def _fixture(args) -> int:
    from export.fixtures import main
    return main([args.out, "--kind", args.kind, "--shape", args.shape] +
                (["--projector", args.projector] if args.projector else [])) or 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vila-edge", description="VILA vision-language models on the edge")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat about images with an engine directory")
    c.add_argument("engine")
    c.add_argument("prompt")
    c.add_argument("--image", action="append", help="an image path (repeat for several images)")
    c.add_argument("--video", help="a video file, GIF or folder of frames")
    c.add_argument("--system", default=None)
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--max-context", type=int, default=None, help="context length in tokens (default 4096)")
    c.add_argument("--kv-budget", default=None,
                   help="KV pool size: bytes ('512MiB') or a device (orin-nano, orin-nx, agx-orin-32gb, agx-orin-64gb)")
    c.add_argument("--interactive", "-i", action="store_true", help="keep asking follow-up questions")
    c.add_argument("--stats", action="store_true", help="print timing and cache statistics to stderr")
    c.set_defaults(func=_chat)
    e = sub.add_parser("export", help="checkpoint -> engine directory (needs the export extras: torch)")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--quant", choices=["none", "rtn", "awq"], default="none")
    e.add_argument("--group-size", type=int, default=None,
                   help="int4 group size (default 64 with zero points, 32 without)")
    e.add_argument("--lm-head-bits", type=int, choices=[8, 4, 0], default=None,
                   help="lm_head with --quant rtn/awq: symmetric int8 (default), int4, or 0 = float")
    e.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=None,
                   help="int4 linears with a zero point per group, +4/G bits per weight (default: on for "
                        "--target cpu; TensorRT takes none)")
    e.add_argument("--max-bpw", type=float, default=4.5,
                   help="int8 for the outermost layers' down_proj while the decoder's bits per weight stay "
                        "<= this (0: every decoder linear int4)")
    e.add_argument("--target", default="cpu")
    e.add_argument("--template", default=None, help="override the chat template")
    e.add_argument("--token-order", choices=["row", "column"], default=None,
                   help="override the mlp_downsample token order (default from the checkpoint era)")
    e.add_argument("--calib-dir", default=None, help="AWQ calibration images (+ prompts.txt, one per line)")
    e.add_argument("--max-ppl-increase", type=float, default=15.0,
                   help="stop the export when 4-bit perplexity rises more than this %% over fp (held-out text)")
    e.add_argument("--min-top1", type=float, default=0.80, help="... or top-1 agreement falls below this")
    e.add_argument("--no-quality-floor", action="store_true", help="write the quality report but never stop")
    e.add_argument("--eval-tokens", type=int, default=4096,
                   help="held-out text tokens of the 4-bit quality report (a float and a quantized pass over "
                        "them; on a CPU a 3B model takes ~10 min per 4096)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)
    f = sub.add_parser("fixture", help="write a random-weight checkpoint in the real VILA layout")
    f.add_argument("out")
    f.add_argument("--kind", default="vila1.5")
    f.add_argument("--shape", default="tiny")
    f.add_argument("--projector", default=None)
    f.set_defaults(func=_fixture)
    from vila_edge import bench
    b = sub.add_parser("bench", help="measure an engine: latency, tokens/s, memory, decode GB/s",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(func=bench.run_cli)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VilaEdgeError as e:
        print(f"vila-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
