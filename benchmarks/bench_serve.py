"""How does `vila-edge serve` hold up under many clients? 32 concurrent streaming clients x 10 requests.

    python -m benchmarks.bench_serve ENGINE_DIR [--clients 32] [--requests 10] [--workers 2]

    make bench-serve          # the bundled model's engine

Starts the real server (`python -m vila_edge.cli serve`, a subprocess on a free loopback port),
then each client (the official openai AsyncOpenAI client) sends its requests one after another,
streaming: one of the bundled example images as a data URL and a question, alternately free text
and a response_format json_schema answer. Reported: failed requests (goal 0), client-side TTFT
p50/p99 (request sent -> first content piece, queueing included), aggregate completion tokens/s,
the server's RSS before (after one warm-up request) and after the load, and the KV blocks in use
when the load has ended (goal 0). Baseline in the same run: the same requests sent one at a time
by one client (the server's TTFT and tokens/s without contention).
Writes serve.json and serve.md under benchmarks/results/serve/.
"""
import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


from benchmarks.common import ROOT, env_with_root, finish, machine_info

EXAMPLES = os.path.join(ROOT, "models", "vila-tiny-shapes", "examples")
QUESTIONS = {"color.png": "What color is the square?", "count.png": "How many stars are there?",
             "shape.png": "What shape is the blue object?", "where.png": "Where is the triangle?"}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16},
                                           "confident": {"type": "boolean"}},
          "required": ["answer", "confident"], "additionalProperties": False}
MAX_TOKENS = 48


def _requests() -> list:
    out = []
    for name, q in QUESTIONS.items():
        with open(os.path.join(EXAMPLES, name), "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": q}]}]
        out.append({"messages": msg})
        out.append({"messages": msg, "response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "a", "schema": SCHEMA}}})
    return out


async def _one(client, model: str, req: dict) -> dict:
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    stream = await client.chat.completions.create(model=model, stream=True, max_tokens=MAX_TOKENS,
                                                  stream_options={"include_usage": True}, **req)
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                ttft = ttft or time.perf_counter() - t0
                text += c.delta.content
    if "response_format" in req and usage is not None and usage.completion_tokens < MAX_TOKENS:
        json.loads(text)          # a complete structured answer must parse
    return {"ttft_s": ttft or time.perf_counter() - t0, "tokens": usage.completion_tokens if usage else 0,
            "s": time.perf_counter() - t0}


async def _load(base: str, model: str, clients: int, per_client: int) -> dict:
    import openai
    reqs = _requests()
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)))
    results, failures = [], []

    async def run_client(c: int):
        for i in range(per_client):
            try:
                results.append(await _one(client, model, reqs[(c + i) % len(reqs)]))
            except Exception as e:       # counted, with its message: the goal is zero
                failures.append(f"{type(e).__name__}: {e}"[:200])
    t0 = time.perf_counter()
    await asyncio.gather(*(run_client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ttfts = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": clients * per_client, "ok": len(results), "failed": len(failures),
            "failures": failures[:10], "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(results) / wall, "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def run(engine: str, clients: int, per_client: int, workers: int, threads: int | None) -> dict:
    import psutil
    port, model = _free_port(), "bench"
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vila_edge.cli", "serve", engine, "--port", str(port), "--model-id", model,
           "--workers", str(workers), "--max-queue", str(clients * 2), "--log-level", "warning"]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env=env_with_root())
    try:
        _wait_ready(base, proc)
        server = psutil.Process(proc.pid)
        asyncio.run(_load(base, model, 1, 1))                        # warm-up: sessions, caches
        rss_before = server.memory_info().rss
        sequential = asyncio.run(_load(base, model, 1, len(_requests())))
        print(f"sequential: {sequential['tokens_per_s']:.1f} tok/s, TTFT p50 {sequential['ttft_p50_s']:.3f} s",
              flush=True)
        loaded = asyncio.run(_load(base, model, clients, per_client))
        rss_after = server.memory_info().rss
        health = httpx.get(base + "/health").json()
        metrics = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"command": "python -m benchmarks.bench_serve " + " ".join(sys.argv[1:]), "engine": engine,
            "machine": machine_info(threads or os.cpu_count()), "workers": workers, "max_tokens": MAX_TOKENS,
            "sequential": sequential, "load": loaded, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "kv_blocks_after": health["kv_blocks"], "server_exit_status": proc.returncode,
            "interrupted": health["interrupted"],
            "metrics_sample": [l for l in metrics.splitlines() if l.startswith("vila_edge_") and "_created" not in l
                               and "_bucket" not in l]}


def markdown(r: dict) -> str:
    s, L = r["sequential"], r["load"]
    mb = 2**20
    return "\n".join([
        "# vila-edge serve under load", "",
        f"`{r['command']}` on {r['machine']['cpu']} ({r['machine']['cpus_available']} CPUs, load at start "
        f"{r['machine']['loadavg_start']}); engine `{r['engine']}`, {r['workers']} workers, "
        f"max_tokens {r['max_tokens']}, streaming, half the requests with a json_schema.", "",
        "| run | requests | failed | TTFT p50 s | TTFT p99 s | completion tok/s | requests/s |",
        "|---|---|---|---|---|---|---|",
        f"| 1 client, sequential (baseline) | {s['requests']} | {s['failed']} | {s['ttft_p50_s']:.3f} | "
        f"{s['ttft_p99_s']:.3f} | {s['tokens_per_s']:.1f} | {s['requests_per_s']:.2f} |",
        f"| {L['clients']} clients x {L['requests'] // L['clients']} | {L['requests']} | {L['failed']} | "
        f"{L['ttft_p50_s']:.3f} | {L['ttft_p99_s']:.3f} | {L['tokens_per_s']:.1f} | {L['requests_per_s']:.2f} |",
        "", f"Aggregate throughput under load / sequential: {L['tokens_per_s'] / s['tokens_per_s']:.2f}x.",
        f"Server RSS: {r['rss_before_bytes'] / mb:.0f} MiB before the load, {r['rss_after_bytes'] / mb:.0f} MiB after.",
        f"KV blocks after the load: {r['kv_blocks_after']['used']} in use of {r['kv_blocks_after']['total']} "
        f"({r['kv_blocks_after']['cached']} cached for prefix reuse). Server exit status after SIGTERM: "
        f"{r['server_exit_status']} (uvicorn re-raises the signal once its graceful shutdown is done).", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "serve"))
    args = ap.parse_args(argv)
    r = run(args.engine, args.clients, args.requests, args.workers, args.threads)
    finish(r, args.out, "serve", markdown)
    return 0 if r["load"]["failed"] == 0 and r["kv_blocks_after"]["used"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
