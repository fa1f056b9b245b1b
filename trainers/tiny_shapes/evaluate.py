"""Held-out accuracy of a model on generated shape scenes, with any backend.

    python -m trainers.tiny_shapes.evaluate models/vila-tiny-shapes [-n 300] [--seed 1000] [--out result.json]

A backend is `answer_fn(images: list[PIL.Image], prompt: str) -> str`, where `prompt` is the raw
user message with one "<image>" per image ("<image>\\n" before the question, or interleaved for
few-shot); the backend applies its own chat template (vicuna_v1 for this model). Answers are
scored by exact match after `scenes.normalize_answer` (case, surrounding spaces, a final period,
number words). `torch_backend` is the training model (trainers/tiny_shapes/model.py), greedy.
"""
import argparse
import os
import json
import sys
import time

from trainers.tiny_shapes import scenes

EVAL_SEED = 1000          # training uses seed 1 (trainers/tiny_shapes/train.py); never the same set
GROUPS = {"single": scenes.SINGLE, "multi_image": scenes.MULTI, "few_shot": scenes.FEWSHOT}


def heldout(n: int, seed: int = EVAL_SEED) -> list:
    """The first n items of the held-out set; categories cycle, so any prefix is balanced."""
    return [scenes.make_sample(seed, i) for i in range(n)]


def evaluate(answer_fn, n: int = 300, seed: int = EVAL_SEED, keep_items: bool = False) -> dict:
    per = {c: [0, 0] for c in scenes.CATEGORIES}
    items = []
    t0 = time.time()
    for i, s in enumerate(heldout(n, seed)):
        (question, expected), = s.turns
        got = answer_fn([scenes.render(sc) for sc in s.scenes], question)
        ok = scenes.normalize_answer(got) == scenes.normalize_answer(expected)
        per[s.category][0] += ok
        per[s.category][1] += 1
        if keep_items:
            items.append({"index": i, "category": s.category, "prompt": question, "expected": expected,
                          "answer": got, "correct": ok})
    cats = {c: {"correct": k, "total": t, "accuracy": k / t} for c, (k, t) in per.items() if t}
    groups = {}
    for g, members in GROUPS.items():
        k, t = sum(per[c][0] for c in members), sum(per[c][1] for c in members)
        if t:
            groups[g] = {"correct": k, "total": t, "accuracy": k / t}
    correct = sum(k for k, _ in per.values())
    report = {"seed": seed, "n": n, "overall": correct / max(1, n), "correct": correct,
              "categories": cats, "groups": groups, "seconds": round(time.time() - t0, 2)}
    if keep_items:
        report["items"] = items
    return report


def torch_backend(checkpoint: str, max_new_tokens: int = 8):
    """Greedy answers from the saved checkpoint, loaded in fp32 from its bf16 weights."""
    import torch

    from trainers.tiny_shapes.model import TinyVila

    model = TinyVila.load(checkpoint, dtype=torch.float32)

    def answer(images, prompt):
        return model.generate(images, prompt, max_new_tokens=max_new_tokens)

    return answer


def pipeline_backend(engine_dir: str, max_new_tokens: int = 8, threads: int | None = None):
    """Greedy answers from an engine directory through vila_edge.Pipeline (any backend it runs)."""
    from vila_edge import Pipeline

    pipe = Pipeline(engine_dir, threads=threads)

    def answer(images, prompt):
        return pipe.chat(images, prompt, max_new_tokens=max_new_tokens).strip()

    return answer


def write_report(report: dict, out: str | None) -> None:
    """The evaluation's JSON to `out`, or to stdout without one."""
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint (torch model) or an engine directory (vila_edge.Pipeline)")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the JSON report here (default: stdout)")
    ap.add_argument("--items", action="store_true", help="include every item's prompt and answer")
    args = ap.parse_args(argv)
    if os.path.isfile(os.path.join(args.checkpoint, "manifest.json")):
        backend = pipeline_backend(args.checkpoint, threads=args.threads)
    else:
        import torch

        torch.set_num_threads(args.threads)
        backend = torch_backend(args.checkpoint)
    report = evaluate(backend, n=args.n, seed=args.seed, keep_items=args.items)
    write_report(report, args.out)
    print(f"overall {report['overall']:.3f} ({report['correct']}/{report['n']})", file=sys.stderr)


if __name__ == "__main__":
    main()
