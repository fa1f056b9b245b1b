"""Decode speed of several systems measured side by side, for ratios a shared host does not scramble.

    python -m benchmarks.paired --engine-int4 ENGINE [--gguf GGUF|smollm2] [--genai DIR] [--contexts 128,512]
        [--steps 32] [--blocks 15] [--threads 2] [--json F]

`make bench-peers` measures each system in a fresh process, one after the other (bench_peers.py's rounds):
its absolute tokens/s are clean, but on this shared 2-core host the machine's speed moves by 20 % between
systems measured 10 s apart, and a round's ratio spans ~0.4 (benchmarks/results/stop33-idle). Here every
system lives in a process of its own for the whole measurement (loaded once, its context filled once per
context) and the parent asks them in turn for one block of `steps` decode steps, the order rotated block by
block. Blocks of different systems are a few hundred ms apart, so a slow second lands on neighbours alike:
a ratio is the median over blocks of (peer's median step / ours) within the same rotation, and its spread
is that of the blocks. Only one process computes at a time; the others wait on their pipe.

Decode steps are what each system's generation runs per token: vila_edge LLMEngine.step of a token id and
the argmax of its logits (vila_edge/measure.py bench_decode), llama.cpp Llama.eval of one token id,
ORT GenAI Generator.generate_next_token (forward and greedy pick). Token ids are random; contexts are
random ids (llama.cpp, GenAI) or random embedding rows (vila_edge: the same positions, its prefill path).
"""
import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from benchmarks.common import machine_info, save_json


class VilaEdge:
    def __init__(self, engine: str, threads: int, max_context: int, seed: int):
        from benchmarks.bench_peers import _pipe
        self.pipe, self.rng, self.seq = _pipe(engine, threads, max_context), np.random.default_rng(seed), None
        self.vocab = self.pipe.manifest.llm.vocab_size

    def context(self, ctx: int, steps: int) -> None:
        from vila_edge.measure import fill_context
        if self.seq is not None:
            self.pipe.llm.release(self.seq)
        self.seq = ("paired", ctx)
        fill_context(self.pipe.llm, self.rng, self.seq, ctx, self.pipe.manifest.llm.hidden, False, grow=steps)
        self.tokens = iter(self.rng.integers(0, self.vocab, steps).tolist())

    def step(self) -> None:
        int(np.argmax(self.pipe.llm.step(self.seq, next(self.tokens))))


class LlamaCpp:
    def __init__(self, gguf: str, threads: int, max_context: int, seed: int):
        from llama_cpp import Llama
        if gguf == "smollm2":
            from benchmarks.smollm2_vila import gguf_path
            gguf = gguf_path()
        self.gguf = gguf
        self.llm = Llama(model_path=gguf, n_ctx=max_context, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, seed=seed, verbose=False)
        self.rng, self.vocab = np.random.default_rng(seed), self.llm.n_vocab()

    def context(self, ctx: int, steps: int) -> None:
        self.llm.reset()
        self.llm.eval(self.rng.integers(10, self.vocab, ctx).tolist())
        self.tokens = iter(self.rng.integers(10, self.vocab, steps).tolist())

    def step(self) -> None:
        self.llm.eval([next(self.tokens)])


class Genai:
    def __init__(self, model_dir: str, threads: int, max_context: int, seed: int):
        import onnxruntime_genai as og
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                              "inter_op_num_threads": 1}}}}))
        self.og, self.model, self.rng = og, og.Model(config), np.random.default_rng(seed)
        with open(os.path.join(model_dir, "genai_config.json")) as f:
            self.vocab = json.load(f)["model"]["vocab_size"]
        self.gen = None

    def context(self, ctx: int, steps: int) -> None:
        self.gen = None                        # the previous generator's buffers go first
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=ctx + steps + 8, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(self.rng.integers(10, self.vocab, ctx).astype(np.int32))

    def step(self) -> None:
        self.gen.generate_next_token()


class Sleep:
    """A step of a known length (`path` seconds): the harness's own check (tests/test_paired.py)."""

    def __init__(self, path: str, threads: int, max_context: int, seed: int):
        self.seconds = float(path)

    def context(self, ctx: int, steps: int) -> None:
        pass

    def step(self) -> None:
        time.sleep(self.seconds)


# What each system's generation runs per token, behind one interface: context(ctx, steps) fills a fresh
# context of ctx positions with room for `steps` more, step() is one decode step. bench_peers.py's fresh-
# process rows use the peers' classes too.
SYSTEMS = {"vila_edge_int4": VilaEdge, "llama_cpp": LlamaCpp, "ort_genai": Genai, "sleep": Sleep}


def _serve(kind: str, path: str, threads: int, max_context: int, seed: int, conn) -> None:
    """A worker: load the system, then answer ("context", ctx, steps) with "ok" and ("steps", n) with n
    step times (after one untimed step: the first after waiting pays the threads' wake-up), until "stop"."""
    try:
        system = SYSTEMS[kind](path, threads, max_context, seed)
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "context":
                system.context(msg[1], msg[2])
                conn.send("ok")
            else:
                system.step()
                times = []
                for _ in range(msg[1]):
                    t = time.perf_counter()
                    system.step()
                    times.append(time.perf_counter() - t)
                conn.send(times)
    except BaseException as e:        # the parent reports it and stops the others
        conn.send(("error", f"{kind} ({path}): {type(e).__name__}: {' '.join(str(e).split())}"))


def int4_systems(engine: str, gguf: str | None = None, genai: str | None = None) -> dict:
    """paired_decode's systems for an int4 engine and the peers given (a GGUF path or "smollm2", a GenAI dir)."""
    systems = {"vila_edge_int4": ("vila_edge_int4", engine)}
    if gguf:
        systems["llama_cpp"] = ("llama_cpp", gguf)
    if genai:
        systems["ort_genai"] = ("ort_genai", genai)
    return systems


def paired_decode(systems: dict, threads: int, contexts: list, steps: int, blocks: int, seed: int = 0) -> dict:
    """systems: name -> (kind, path), kind one of SYSTEMS; the first is "ours". Per context: each system's
    median step per block, tokens/s from the median over blocks, and each other system's ratio to the
    first (its median step / ours, block by block: > 1 = ours faster) with the blocks' 10th-90th
    percentile. A worker that fails raises RuntimeError naming it; every worker is stopped either way."""
    ctx_mp = multiprocessing.get_context("spawn")
    per_context = (blocks + 1) * (steps + 1) + 8
    max_context = max(contexts) + per_context
    workers = {}
    try:
        for name, (kind, path) in systems.items():
            parent, child = ctx_mp.Pipe()
            proc = ctx_mp.Process(target=_serve, args=(kind, path, threads, max_context, seed, child), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        for name, (_, conn) in workers.items():
            _expect(name, _recv(name, conn), "ready")
        names, ours = list(workers), next(iter(workers))
        out = {"threads": threads, "steps": steps, "blocks": blocks, "contexts": []}
        for ctx in contexts:
            for name, (_, conn) in workers.items():
                conn.send(("context", ctx, per_context))
                _expect(name, _recv(name, conn), "ok")
            block_s = {name: [] for name in names}
            for b in range(blocks):
                for name in names[b % len(names):] + names[:b % len(names)]:
                    conn = workers[name][1]
                    conn.send(("steps", steps))
                    times = _recv(name, conn)
                    _expect(name, times, None)
                    block_s[name].append(float(np.median(times)))
            row = {"context": ctx, "tok_s": {n: 1 / float(np.median(s)) for n, s in block_s.items()},
                   "block_step_s": block_s, "ratio": {}}
            for name in names[1:]:
                r = np.array(block_s[name]) / np.array(block_s[ours])
                row["ratio"][name] = {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                                      "p90": float(np.percentile(r, 90)), "blocks": r.tolist()}
            out["contexts"].append(row)
        return out
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


WAIT_S = 600       # one answer: a load, a context's prefill or a block of steps


def _recv(name: str, conn):
    if not conn.poll(WAIT_S):
        raise RuntimeError(f"{name}: no answer in {WAIT_S} s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"{name}: its process ended without an answer") from None


def _expect(name: str, got, want) -> None:
    if isinstance(got, tuple) and got and got[0] == "error":
        raise RuntimeError(got[1])
    if want is not None and got != want:
        raise RuntimeError(f"{name}: expected {want!r}, got {got!r}")


def markdown(r: dict, labels: dict) -> list:
    lines = [f"Side by side (benchmarks/paired.py): each system in its own process for the whole run, "
             f"{r['blocks']} blocks of {r['steps']} decode steps per context, the order rotated block by block; "
             f"ratio = the median over blocks of (peer's median step / ours), p10-p90 of the blocks.", "",
             "| context | system | tok/s | vila_edge / system (p10-p90) |", "|---|---|---|---|"]
    for row in r["contexts"]:
        for name, tok_s in row["tok_s"].items():
            ratio = row["ratio"].get(name)
            cell = f"{ratio['median']:.2f} ({ratio['p10']:.2f}-{ratio['p90']:.2f})" if ratio else ""
            lines.append(f"| {row['context']} | {labels.get(name, name)} | {tok_s:.1f} | {cell} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-int4", required=True)
    ap.add_argument("--gguf", default=None, help="a GGUF of the same LLM, or 'smollm2' for the bundled Q4_1")
    ap.add_argument("--genai", default=None, help="ORT GenAI model dir of the same LLM")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    r = paired_decode(int4_systems(args.engine_int4, args.gguf, args.genai), threads, [int(c) for c in args.contexts.split(",")], args.steps, args.blocks, args.seed)
    r["machine"] = machine_info(threads)
    print("\n".join(markdown(r, {})))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
