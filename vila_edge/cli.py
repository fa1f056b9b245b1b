"""vila-edge command line. Every user error is one line on stderr and exit status 2.

    vila-edge chat bundled "What color is the square?" --image models/vila-tiny-shapes/examples/color.png
    vila-edge chat ENGINE_OR_CHECKPOINT "What is on the table?" --image photo.jpg -i
    vila-edge export CHECKPOINT OUT [--dtype fp16] [--quant none|rtn|awq|gptq] [--lm-head-bits 8|4|0]
    vila-edge fixture OUT --kind nvila-lite
    vila-edge bench ENGINE_DIR
    vila-edge serve ENGINE_DIR [--host 127.0.0.1 --port 8000 --allow-dir DIR]

Each subcommand is one `add_<name>(sub)` function that registers its parser and its handler, so
new ones (plan, serve) are added beside the others without touching them.
"""
import argparse
import dataclasses
import os
import sys

from vila_edge.errors import VilaEdgeError
from vila_edge.version import __version__


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def error(self, message):
        self.exit(2, f"vila-edge: error: {' '.join(str(message).split())}\n")


class IntermixedParser(Parser):
    """Positionals and options in any order (`chat MODEL --image x.png "prompt"`): plain argparse
    binds the optional PROMPT as absent when it first sees MODEL alone."""
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] ((low, high] when low_open); argparse names the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and value > high):
            span = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, " \
                   f"{high if high is not None else 'inf'}{']' if high is not None else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value
    return parse


# ---------------------------------------------------------------------------------------------- chat

def add_chat(sub) -> None:
    from vila_edge.llm import KVConfig
    from vila_edge.pipeline import DEFAULT_CONTEXT
    from vila_edge.sampling import GenerationConfig
    g, kv = _defaults(GenerationConfig), _defaults(KVConfig)
    c = sub.add_parser("chat", help="ask about images or a video with an engine, a checkpoint or the bundled model",
                       description="Ask about images or a video. In --interactive mode: /image PATH and /video "
                                   "PATH add media to the next question, /clear starts over, /quit (or exit, "
                                   "Ctrl-D) leaves; blank lines are ignored.")
    c.add_argument("model", help="engine directory, checkpoint directory (exported once into the cache), "
                                 "or 'bundled' for the bundled vila-tiny-shapes model")
    c.add_argument("prompt", nargs="?", help="the question (optional with --interactive)")
    c.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file (repeat for several images)")
    c.add_argument("--video", metavar="PATH", help="a video file (needs the [video] extra), GIF or folder of frames")
    c.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    c.add_argument("--max-new-tokens", type=_number(int, 1), default=g["max_new_tokens"],
                   help=f"most tokens to generate, >= 1 (default {g['max_new_tokens']})")
    c.add_argument("--temperature", type=_number(float, 0), default=g["temperature"],
                   help=f"sampling temperature, >= 0; 0 = greedy (default {g['temperature']})")
    c.add_argument("--top-k", type=_number(int, 0), default=g["top_k"],
                   help=f"sample among the k likeliest tokens, >= 0; 0 = off (default {g['top_k']})")
    c.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=g["top_p"],
                   help=f"nucleus sampling mass, in (0, 1]; 1 = off (default {g['top_p']})")
    c.add_argument("--repetition-penalty", type=_number(float, 0, low_open=True),
                   default=g["repetition_penalty"], help=f"> 0; 1 = off (default {g['repetition_penalty']})")
    c.add_argument("--seed", type=int, default=g["seed"], help="sampling seed (default: random)")
    c.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable; the model's stop tokens always apply)")
    c.add_argument("--threads", type=_number(int, 1), default=None,
                   help="ONNX Runtime threads (default: all CPUs)")
    from vila_edge.devices import DEVICES
    c.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the model runs: cpu (default); cuda / tensorrt on ONNX Runtime's GPU providers "
                        "(experimental); cpu-iobinding: the GPU runner's code path on the CPU; all but cpu take "
                        "--target orin engines")
    c.add_argument("--block-size", type=_number(int, 1), default=kv["block_size"],
                   help=f"KV cache block size in tokens (default {kv['block_size']})")
    c.add_argument("--max-context", type=_number(int, 1), default=None,
                   help=f"context length in tokens (default {DEFAULT_CONTEXT}, capped by the model)")
    from vila_edge.kv_budget import ALIASES, TARGETS
    c.add_argument("--kv-budget", type=_kv_budget, default=kv["budget"], metavar="SIZE",
                   help=f"KV pool size: bytes ('512MiB', '2GB') or a device (choices: "
                        f"{', '.join(sorted([*TARGETS, *ALIASES]))}); default: room for a few full contexts")
    c.add_argument("--interactive", "-i", action="store_true", help="keep asking follow-up questions")
    c.add_argument("--stats", action="store_true", help="print each turn's statistics to stderr as one JSON line")
    c.add_argument("--json", action="store_true",
                   help="print each turn as one JSON object {answer, stats} on stdout instead of streaming text")
    c.__class__ = IntermixedParser     # add_parser builds every subparser with the parent's class
    c.set_defaults(func=_chat)


def _kv_budget(text: str) -> str:
    from vila_edge.kv_budget import parse_budget
    try:
        parse_budget(text)
    except VilaEdgeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _given(**flags) -> dict:
    """The flags a user gave: the rest keep their defaults from the dataclasses they configure."""
    return {k: v for k, v in flags.items() if v is not None}


def _chat(args) -> int:
    from vila_edge.chat_session import ChatSession
    if args.prompt is None and not args.interactive:
        raise_usage("chat needs a prompt (or --interactive)")
    return ChatSession(args).run()


def raise_usage(message: str):
    from vila_edge.errors import UsageError
    raise UsageError(message)


# -------------------------------------------------------------------------------------------- export

def _target(text: str) -> str:
    from vila_edge.targets import TARGETS, UNSUPPORTED
    if text in TARGETS:
        return text
    if text in UNSUPPORTED:
        raise argparse.ArgumentTypeError(f"{text}: {UNSUPPORTED[text]}")
    raise argparse.ArgumentTypeError(f"{text!r} unknown; choices: {', '.join(TARGETS)}")


def add_export(sub) -> None:
    from vila_edge.targets import TARGETS
    e = sub.add_parser("export", help="checkpoint -> engine directory (needs the [export] extra: torch)")
    e.add_argument("checkpoint", help="VILA checkpoint directory (config.json, llm/, vision_tower/, mm_projector/)")
    e.add_argument("out", help="engine directory to write (replaced only when the new one is complete)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default=None, help="activation and weight dtype (default fp32)")
    e.add_argument("--kv-dtype", choices=["fp32", "fp16"], default=None,
                   help="KV pool rows (default: fp16 for an fp32 --target cpu graph, half the KV bytes each decode "
                        "step reads; else --dtype); fp32 there gives the fp32 pool")
    e.add_argument("--quant", choices=["none", "rtn", "awq", "gptq"], default=None,
                   help="4-bit LLM weights: none, round-to-nearest, AWQ or GPTQ (both calibrated)")
    e.add_argument("--group-size", type=_number(int, 1), default=None,
                   help="int4 quantization group size (default 64 with zero points, 32 without); alone, every "
                        "linear at this G")
    e.add_argument("--group-plan", default=None, metavar="KIND=G,...",
                   help="G per decoder linear kind, e.g. q_proj=32,down_proj=128; 'auto': G or int8 per layer's "
                        "linears allocated on calibration data under --max-bpw (awq/gptq); '' for none (default with "
                        "zero points and no --group-size: vila_edge_export/options.py DEFAULT_GROUP_PLAN)")
    e.add_argument("--lm-head-bits", type=int, choices=[8, 4, 0], default=None,
                   help="lm_head (and VILA-U's depth transformer input / output projections) with --quant "
                        "rtn/awq/gptq: symmetric int8 (default), int4, or 0 = float")
    e.add_argument("--lm-head-screen", type=_number(int, 0), default=None, metavar="K",
                   help="--target cpu, fp32, int8 lm_head: an int4 screen over the vocabulary, then the K best "
                        "candidates rescored from their int8 rows (logits outside them: the screen's); default 64 where it "
                        "applies, 0: off (the int8 head over every row)")
    e.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=None,
                   help="int4 linears with a zero point per group, +4/G bits per weight (default: on for "
                        "--target cpu; TensorRT takes none)")
    e.add_argument("--max-bpw", type=_number(float, 0), default=None,
                   help="int8 for the outermost layers' down_proj while the decoder's bits per weight stay "
                        "<= this (default 4.5; 0: every decoder linear int4)")
    e.add_argument("--range-search", action=argparse.BooleanOptionalAction, default=None,
                   help="--quant awq/gptq: search each group's scale and zero point on calibration data (default on; "
                        "off: llm-awq's clip search)")
    e.add_argument("--gptq-rounding", action=argparse.BooleanOptionalAction, default=None,
                   help="--quant awq: each linear's codes picked by GPTQ error feedback on its AWQ-scaled calibration "
                        "inputs, inside the searched ranges (default on: vila_edge_export/options.py "
                        "DEFAULT_AWQ_GPTQ; off: round to nearest; --quant gptq always on)")
    e.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="with GPTQ rounding and --range-search: GPTQ's columns in act-order (largest activations "
                        "first; default on for --quant awq)")
    e.add_argument("--target", type=_target, default=None,
                   help=f"engine target (choices: {', '.join(TARGETS)}; default cpu); cpu: LLM graph of ONNX Runtime contrib "
                        "ops (fused); orin: standard ops (TensorRT's parser; TensorRT engines are not built yet)")
    e.add_argument("--int4-accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="--target cpu: MatMulNBits activations (4 (default): int8 per block, fastest; 0: float)")
    e.add_argument("--embed-bits", type=int, choices=[8, 4, 0], default=None,
                   help="with --quant rtn/awq/gptq: store the token embedding table as int8/int4 groups (0, the default: fp16)")
    e.add_argument("--depth-bits", type=int, choices=[8, 4, 0], default=None,
                   help="VILA-U with --quant: the depth transformer's blocks int8 (default), int4 (~half the bytes; "
                        "measured: 3.4 points of held-out shape faithfulness) or 0 = float; its input / output "
                        "projections follow --lm-head-bits")
    e.add_argument("--template", default=None, help="override the chat template (e.g. vicuna_v1, llama_3, auto)")
    e.add_argument("--token-order", choices=["row", "column"], default=None,
                   help="override the mlp_downsample token order (default from the checkpoint era)")
    e.add_argument("--calib-dir", default=None, help="AWQ / GPTQ calibration images (+ prompts.txt, one per line)")
    e.add_argument("--max-ppl-increase", type=_number(float, 0), default=None,
                   help="stop the export when 4-bit perplexity rises more than this %% over fp (held-out text; default 15)")
    e.add_argument("--min-top1", type=_number(float, 0, 1), default=None,
                   help="... or top-1 agreement falls below this (default 0.85)")
    e.add_argument("--no-quality-floor", action="store_true", help="write the quality report but never stop")
    e.add_argument("--eval-tokens", type=_number(int, 1), default=None,
                   help="held-out text tokens of the 4-bit quality report (a float and a quantized pass over "
                        "them; on a CPU a 3B model takes ~10 min per 4096)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_export)


def _export(args) -> int:
    from vila_edge.extras import require_extra
    require_extra("export", "vila-edge export")
    from vila_edge_export.build import ExportOptions, QuantOptions, export_engine
    from vila_edge_export.checkpoint import read_checkpoint
    if args.lm_head_bits and args.quant in (None, "none"):
        raise_usage(f"--lm-head-bits {args.lm_head_bits} needs --quant rtn or awq (--quant none keeps every weight float)")
    if args.calib_dir is not None and not os.path.isdir(args.calib_dir):
        raise_usage(f"--calib-dir {args.calib_dir}: no such directory")
    read_checkpoint(args.checkpoint, args.template, args.token_order)    # its errors before any progress bar
    from vila_edge.targets import notice
    line = notice(args.target or "cpu")
    if line:
        print(f"vila-edge: {line}", file=sys.stderr)
    given = _given(method=args.quant, group_size=args.group_size, group_plan=args.group_plan,
                   lm_head_bits=args.lm_head_bits,
                   embed_bits=args.embed_bits, depth_bits=args.depth_bits, calib_dir=args.calib_dir, eval_tokens=args.eval_tokens,
                   zero_point=args.zero_point, max_bpw=args.max_bpw, range_search=args.range_search,
                   gptq_rounding=args.gptq_rounding, act_order=args.act_order,
                   max_ppl_increase_pct=args.max_ppl_increase, min_top1_agreement=args.min_top1)
    if args.max_bpw == 0:
        given["max_bpw"] = None      # every decoder linear int4
    quant = QuantOptions(**given)
    if args.no_quality_floor:
        quant.max_ppl_increase_pct = None
    manifest = export_engine(args.checkpoint, args.out, ExportOptions(
        **_given(dtype=args.dtype, kv_dtype=args.kv_dtype, target=args.target, int4_accuracy_level=args.int4_accuracy_level,
                 lm_head_screen=args.lm_head_screen, template=args.template, token_order=args.token_order),
        progress=not args.quiet, quant=quant))
    print(f"{args.out}: {manifest.family} engine, {manifest.dtype}, quant {manifest.quant.get('method')}")
    return 0


# ---------------------------------------------------------------------------------------------- plan

def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory plan of an engine on a device: weights, KV pool, buffers vs DRAM")
    p.add_argument("engine", help="engine directory")
    p.add_argument("--device", default="orin-nano",
                   help="orin-nano, orin-nx, agx-orin-32gb, agx-orin-64gb, or a KV byte budget ('512MiB')")
    p.add_argument("--max-context", type=_number(int, 1), default=None,
                   help="context length in tokens (default 4096, capped by the model)")
    p.add_argument("--block-size", type=_number(int, 1), default=16, help="KV cache block size in tokens (default 16)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from vila_edge.manifest import Manifest
    from vila_edge.memory import plan
    from vila_edge.pipeline import DEFAULT_CONTEXT

    m = Manifest.load(args.engine)
    max_context = min(args.max_context or DEFAULT_CONTEXT, m.llm.max_positions)
    p = plan(args.engine, m, args.device, args.block_size, max_context)
    print(f"{args.engine} on {args.device}: {m.family}, {m.dtype} activations, KV {m.kv_dtype}, "
          f"quant {m.quant.get('method')}, max context {max_context}")
    print(p.table())
    return 0


# ------------------------------------------------------------------------------------ fixture, bench

def add_fixture(sub) -> None:
    try:
        from vila_edge_export.fixtures import KINDS, OTHER_LAYOUTS, OTHER_SHAPES, SHAPES
        kinds, shapes = sorted(KINDS) + sorted(OTHER_LAYOUTS), sorted(SHAPES) + list(OTHER_SHAPES)
    except ImportError:           # a runtime-only install: _fixture names the extra to install
        kinds = shapes = None
    f = sub.add_parser("fixture", help="write a random-weight checkpoint in the real VILA layout ([export] extra)")
    f.add_argument("out", help="checkpoint directory to write")
    f.add_argument("--kind", choices=kinds, default="vila1.5", help="model family and LLM")
    f.add_argument("--shape", choices=shapes, default="tiny", help="size preset")
    f.add_argument("--projector", default=None, help="projector type (default: the kind's usual one)")
    f.add_argument("--llm-layers", type=_number(int, 1), default=None, help="override the shape's LLM layer count")
    f.add_argument("--vision-layers", type=_number(int, 1), default=None,
                   help="override the shape's SigLIP layer count")
    f.set_defaults(func=_fixture)


def _fixture(args) -> int:
    from vila_edge.extras import require_extra
    require_extra("export", "vila-edge fixture")
    from vila_edge_export.fixtures import main
    return main([args.out, "--kind", args.kind, "--shape", args.shape] +
                (["--projector", args.projector] if args.projector else []) +
                (["--llm-layers", str(args.llm_layers)] if args.llm_layers else []) +
                (["--vision-layers", str(args.vision_layers)] if args.vision_layers else [])) or 0


def add_bench(sub) -> None:
    from vila_edge import measure
    b = sub.add_parser("bench", help="measure an engine here: vision latency, TTFT, tokens/s, memory",
                       description=measure.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    measure.add_arguments(b)
    b.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")
    b.set_defaults(func=_bench)


def _bench(args) -> int:
    from vila_edge import measure
    return measure.run_cli(args)


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat with images, structured output, "
                                     "metrics; [serve] extra)",
                       epilog="Set VILA_EDGE_API_KEY to require 'Authorization: Bearer <key>' on /v1/*.")
    s.add_argument("engine", help="engine directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    s.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="TCP port; 0 picks a free one (default 8000)")
    s.add_argument("--model-id", default=None, help="the model name clients use (default: the engine dir's name)")
    s.add_argument("--workers", type=_number(int, 1), default=4, help="requests generating at once, their decode steps batched (default 4)")
    s.add_argument("--max-queue", type=_number(int, 0), default=64,
                   help="requests waiting beyond those; more get 429 (default 64)")
    s.add_argument("--max-images", type=_number(int, 0), default=8, help="images per request (default 8)")
    s.add_argument("--max-image-mb", type=_number(float, 0, low_open=True), default=20.0,
                   help="encoded size per image, MiB (default 20)")
    s.add_argument("--max-prompt-tokens", type=_number(int, 1), default=None,
                   help="prompt tokens per request (default: the engine's context)")
    s.add_argument("--allow-dir", default=None, help="image_url file paths are read only under this directory")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    s.add_argument("--threads", type=_number(int, 1), default=None, help="ONNX Runtime threads (default: all CPUs)")
    s.add_argument("--max-context", type=_number(int, 1), default=None, help="context length in tokens")
    s.add_argument("--kv-budget", type=_kv_budget, default=None,
                   help="KV pool: bytes ('512MiB') or a device (orin-nano, ...)")
    s.add_argument("--device", dest="kv_budget", type=_kv_budget, help="alias of --kv-budget with a device preset")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    from vila_edge.extras import require_extra
    require_extra("serve", "vila-edge serve")
    from vila_edge.server import serve
    return serve(args.engine, host=args.host, port=args.port, workers=args.workers, max_queue=args.max_queue,
                 max_images=args.max_images, max_image_bytes=int(args.max_image_mb * 2**20),
                 max_prompt_tokens=args.max_prompt_tokens, allow_dir=args.allow_dir,
                 allow_remote=args.allow_remote_images, model_id=args.model_id, threads=args.threads,
                 max_context=args.max_context, kv_budget=args.kv_budget, log_level=args.log_level,
                 api_key=os.environ.get("VILA_EDGE_API_KEY") or None)


# --------------------------------------------------------------------------------------------- imagine

def add_imagine(sub) -> None:
    p = sub.add_parser("imagine", help="VILA-U: draw images from a text prompt")
    p.add_argument("engine", help="engine directory of a VILA-U export")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--out", default="out.png",
                   help="PNG path; with --n > 1, images are written as OUT-0.png, OUT-1.png, ...")
    p.add_argument("--n", type=_number(int, 1), default=1, help="images to draw (default 1)")
    p.add_argument("--cfg-scale", type=_number(float, 0), default=3.0, help="classifier-free guidance (default 3; 1 = off)")
    p.add_argument("--temperature", type=_number(float, 0), default=1.0, help="code sampling temperature (0 = argmax)")
    p.add_argument("--top-k", type=_number(int, 0), default=900, help="code top-k (default 900)")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=0.96, help="code top-p (default 0.96)")
    p.add_argument("--seed", type=int, default=None, help="seed: the same seed draws the same images")
    p.add_argument("--threads", type=_number(int, 1), default=None, help="ONNX Runtime threads (default: all CPUs)")
    p.add_argument("--video", action="store_true",
                   help="draw a video instead: its 8 frames side by side in one PNG (as upstream inference.py)")
    p.set_defaults(func=_imagine)


def _imagine(args) -> int:
    import time
    from tqdm import tqdm
    from vila_edge.pipeline import Pipeline

    pipe = Pipeline(args.engine, threads=args.threads)
    t0 = time.perf_counter()
    with tqdm(total=1, desc="imagine", unit="pos") as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        draw = pipe.generate_video if args.video else pipe.generate_image
        images = draw(args.prompt, n=args.n, cfg_scale=args.cfg_scale, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, progress=progress)
    seconds = (time.perf_counter() - t0) / len(images)
    if args.video:
        from vila_edge.imagine import strip
        images = [strip(frames) for frames in images]
    root, ext = os.path.splitext(args.out)
    paths = [args.out] if len(images) == 1 else [f"{root}-{i}{ext or '.png'}" for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"{path}: {image.width}x{image.height}, {seconds:.2f} s per {'video' if args.video else 'image'}")
    return 0


SUBCOMMANDS = [add_chat, add_export, add_fixture, add_plan, add_bench, add_serve, add_imagine]


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="vila-edge", description="VILA vision-language models on the edge")
    ap.add_argument("--version", action="version", version=f"vila-edge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            help="what to do; `vila-edge COMMAND --help` documents its flags")
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VilaEdgeError as e:
        print(f"vila-edge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vila-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
