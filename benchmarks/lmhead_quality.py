"""Quality of engines that differ only in their lm_head graph (--lm-head-screen), on held-out text.

    python -m benchmarks.lmhead_quality CHECKPOINT ENGINE [ENGINE ...] [--tokens 1024] [--window 256] [--json F]

Teacher-forced through the engines' own decode step (LLMEngine.step: the fused graph's logits row, as a
sampler reads it): each window of `window` held-out tokens (vila_edge_export/llm_quant.eval_ids, the
export's quality text) is prefilled from its first token and stepped through the rest, and every
position's logits row is scored against the float checkpoint run by transformers on the same window:
top-1 agreement with float, perplexity, agreement with the first engine (greedy picks equal), and the
largest difference from the first engine at its top-1 logit and at the true token's log-probability.
"""
import argparse
import json
import os

import numpy as np

from benchmarks.common import save_json
from vila_edge.pipeline import Pipeline
from vila_edge.runner import Tokens


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def engine_rows(pipe: Pipeline, ids: np.ndarray) -> np.ndarray:
    """logits [len(ids) - 1, V]: the row predicting ids[t + 1], teacher-forced."""
    first, _ = pipe.llm.prefill("q", Tokens(ids[:1]), ids[:1], grow=len(ids))
    rows = [np.asarray(first).reshape(-1)]
    for t in ids[1:-1]:
        rows.append(np.asarray(pipe.llm.step("q", int(t))).reshape(-1))
    pipe.llm.release("q")
    return np.stack(rows)


def float_rows(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(ids[None, :-1])).logits[0].float().numpy()


def run(checkpoint: str, engines: list, tokens: int, window: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vila_edge_export.llm_quant import eval_ids
    llm = os.path.join(checkpoint, "llm")
    ids = eval_ids(AutoTokenizer.from_pretrained(llm), tokens).numpy().astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(llm, torch_dtype=torch.float32).eval()
    pipes = [Pipeline(e, threads=threads, max_context=window + 8) for e in engines]
    per = {e: {"top1": [], "nll": [], "first_top1": [], "d_top1_logit": [], "d_true_logprob": []} for e in engines}
    ref_nll = []
    for start in range(0, len(ids) - window + 1, window):
        win = ids[start:start + window]
        ref = float_rows(model, win)
        vocab = ref.shape[-1]
        ref_nll.append(-_log_softmax(ref)[np.arange(window - 1), win[1:]])
        first = None
        for e, p in zip(engines, pipes):
            rows = engine_rows(p, win)[:, :vocab]
            lp = _log_softmax(rows)
            d = per[e]
            d["top1"].append(rows.argmax(-1) == ref.argmax(-1))
            d["nll"].append(-lp[np.arange(window - 1), win[1:]])
            if first is None:
                first = (rows, lp)
            pick = first[0].argmax(-1)
            d["first_top1"].append(rows.argmax(-1) == pick)
            d["d_top1_logit"].append(np.abs(rows[np.arange(window - 1), pick] - first[0][np.arange(window - 1), pick]))
            d["d_true_logprob"].append(np.abs(lp - first[1])[np.arange(window - 1), win[1:]])
    ref_ppl = float(np.exp(np.concatenate(ref_nll).mean()))
    out = {"checkpoint": checkpoint, "positions": int(sum(len(x) for x in ref_nll)), "window": window,
           "float_ppl": ref_ppl, "rows": []}
    for e, p in zip(engines, pipes):
        d = {k: np.concatenate(v) for k, v in per[e].items()}
        ppl = float(np.exp(d["nll"].mean()))
        out["rows"].append({"engine": e, "lm_head_screen": (p.manifest.quant or {}).get("lm_head_screen", 0),
                            "top1_vs_float": float(d["top1"].mean()), "ppl": ppl,
                            "ppl_increase_pct": 100 * (ppl / ref_ppl - 1),
                            "top1_vs_first": float(d["first_top1"].mean()),
                            "max_abs_d_top1_logit_vs_first": float(d["d_top1_logit"].max()),
                            "max_abs_d_true_logprob_vs_first": float(d["d_true_logprob"].max()),
                            "mean_abs_d_true_logprob_vs_first": float(d["d_true_logprob"].mean())})
    return out


def markdown(r: dict) -> str:
    lines = [f"{r['positions']} held-out positions (windows of {r['window']}), float perplexity {r['float_ppl']:.3f}", "",
             "| engine | screen K | top-1 vs float | ppl (+%) | greedy = first engine | max abs d top-1 logit | "
             "true-token logprob d (max / mean) |", "|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        lines.append(f"| {w['engine']} | {w['lm_head_screen']} | {w['top1_vs_float']:.4f} | {w['ppl']:.3f} "
                     f"({w['ppl_increase_pct']:+.2f}) | {w['top1_vs_first']:.4f} | {w['max_abs_d_top1_logit_vs_first']:.2e} | "
                     f"{w['max_abs_d_true_logprob_vs_first']:.2e} / {w['mean_abs_d_true_logprob_vs_first']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.checkpoint, args.engines, args.tokens, args.window, args.threads)
    print(markdown(r))
    if args.json:
        save_json(r, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
