"""Why does a VILA-U checkpoint draw the wrong colour or place? Cheap checks (a minute on one core):

    python -m trainers.tiny_vila_u.diagnose models/vila-u-tiny-shapes [-n 48]

1. prompt sensitivity: teacher-forced loss of real scenes' codes (held-out "single" prompts) under the
   true prompt, the prompt with its colour word swapped, with its position swapped, with its shape
   swapped, and the unconditional prompt; per depth and for the object's cell vs the empty cells.
   If a swap costs ~nothing, the LLM ignores that word.
2. where colour lives in the codes: the judges (evaluate.judge's colour and position) on decodes of
   the first d depth levels of real scenes (d = 1..D).
3. the judges on the full reconstructions (the ceiling any generator can reach through the decoder).
"""
import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F

from trainers.tiny_shapes import scenes
from trainers.tiny_vila_u import prompts
from trainers.tiny_vila_u.evaluate import color_masks, MIN_PIXELS
from vila_edge_export.reference_vila_u import generation_prompts, tokenize


def swapped(spec, what: str, rng: random.Random):
    if what == "color":
        return prompts.Spec("single", rng.choice([c for c in scenes.COLORS if c != spec.color]), spec.shape, spec.cell)
    if what == "position":
        return prompts.Spec("single", spec.color, spec.shape, rng.choice([c for c in prompts.CELLS if c != spec.cell]))
    return prompts.Spec("single", spec.color, rng.choice([s for s in scenes.SHAPES if s != spec.shape]), spec.cell)


@torch.no_grad()
def code_losses(ref, prompt_ids: list, codes: torch.Tensor) -> torch.Tensor:
    """-> (T, D) cross-entropy of the true codes (T, D) teacher-forced after prompt_ids (ending in <im_start>)."""
    embed = ref.llm.get_input_embeddings()
    T, D = codes.shape
    x = torch.cat([embed(torch.tensor(prompt_ids)), ref.projector(ref.code_sum(codes[:-1]))])[None]
    h = ref.llm.model(inputs_embeds=x).last_hidden_state[0, -T:]               # (T, H)
    rows = torch.stack([book[codes[:, d]] for d, book in enumerate(ref.codebooks)], 1)
    partial = rows.cumsum(1)
    out = torch.zeros(T, D)
    for d in range(D):
        logits = ref.head.logits(h, partial[:, :d])
        out[:, d] = F.cross_entropy(logits.float(), codes[:, d], reduction="none")
    return out


def sensitivity(ref, n: int) -> dict:
    rng = random.Random(0)
    specs = [s for s in prompts.specs(heldout=True) if s.kind == "single"]
    sums = {}
    for i in range(n):
        spec = specs[i % len(specs)]
        sc = prompts.scene_for(spec, random.Random(1000 + i))
        codes = ref.encode(ref.pixels(scenes.render(sc)))[0][0].reshape(-1, ref.spec.depth)   # (T, D)
        cell = spec.cell[0] * scenes.GRID + spec.cell[1]
        variants = {"true": spec.text, "color swapped": swapped(spec, "color", rng).text,
                    "position swapped": swapped(spec, "position", rng).text,
                    "shape swapped": swapped(spec, "shape", rng).text}
        for name, text in list(variants.items()) + [("unconditional", None)]:
            cond, uncond = generation_prompts(text or "x")
            loss = code_losses(ref, tokenize(ref.tokenizer, uncond if text is None else cond), codes)
            zeros = torch.zeros(ref.spec.depth)
            s = sums.setdefault(name, {"object cell": zeros.clone(), "empty cells": zeros.clone()})
            s["object cell"] += loss[cell]
            s["empty cells"] += (loss.sum(0) - loss[cell]) / (loss.shape[0] - 1)
    return {k: {part: (v / n).tolist() for part, v in parts.items()} for k, parts in sums.items()}


def judge_colour_position(pixels: np.ndarray, spec) -> tuple:
    masks = color_masks(pixels)
    sizes = {c: int(m.sum()) for c, m in masks.items()}
    colour = max(sizes, key=sizes.get) == spec.color and sizes[spec.color] >= MIN_PIXELS
    ys, xs = np.nonzero(masks[spec.color])
    side = pixels.shape[0] / scenes.GRID
    pos = len(ys) >= MIN_PIXELS and (int(ys.mean() // side), int(xs.mean() // side)) == spec.cell
    return colour, pos


@torch.no_grad()
def depth_levels(ref, n: int) -> list:
    """Colour and position judged on decodes of real scenes' codes with only the first d levels
    summed (levels past d dropped): how much of each the first code level carries."""
    specs = [s for s in prompts.specs(heldout=True) if s.kind == "single"]
    D = ref.spec.depth
    ok = np.zeros((D, 2))
    for i in range(n):
        spec = specs[i % len(specs)]
        sc = prompts.scene_for(spec, random.Random(1000 + i))
        codes = ref.encode(ref.pixels(scenes.render(sc)))[0]
        for d in range(1, D + 1):
            z = sum(book[codes[..., k]] for k, book in enumerate(ref.codebooks[:d])).permute(0, 3, 1, 2)
            x = ref.decoder(ref.post_quant_conv(z))
            px = ((x.float() + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy().astype("uint8")[0]
            ok[d - 1] += judge_colour_position(px, spec)
    return (ok / n).tolist()


@torch.no_grad()
def first_level_purity(ref, n: int) -> dict:
    """How much of the object's colour / shape / background the first code of its cell pins down:
    the share of objects whose level-0 code's majority colour (shape, ...) is theirs."""
    specs = [s for s in prompts.specs(heldout=False) if s.kind == "single"]
    rng = random.Random(5)
    rows = []
    for i in range(n):
        spec = rng.choice(specs)
        sc = prompts.scene_for(spec, random.Random(i))
        codes = ref.encode(ref.pixels(scenes.render(sc)))[0][0].reshape(-1, ref.spec.depth)
        cell = spec.cell[0] * scenes.GRID + spec.cell[1]
        rows.append((codes[cell].tolist(), spec.color, spec.shape, sc.background))
    out = {}
    for d in range(ref.spec.depth):
        for j, attr in ((1, "colour"), (2, "shape"), (3, "background")):
            groups = {}
            for r in rows:
                groups.setdefault(r[0][d], []).append(r[j])
            hit = sum(max(v.count(x) for x in set(v)) for v in groups.values())
            out[f"level {d} -> {attr}"] = hit / len(rows)
        out[f"level {d} distinct codes"] = len({r[0][d] for r in rows})
    return out


def main(argv=None):
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    from vila_edge_export.reference_vila_u import VilaUReference

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = VilaUReference(read_vila_u(args.checkpoint))
    print("teacher-forced code loss (nats) per depth level, object cell | empty cells:")
    for name, parts in sensitivity(ref, args.n).items():
        print(f"  {name:17s} " + " | ".join(" ".join(f"{x:.2f}" for x in v) for v in parts.values()))
    print("colour, position judged on decodes of the first d levels of real scenes:")
    for d, (c, p) in enumerate(depth_levels(ref, args.n), 1):
        print(f"  d={d}: colour {c:.2f} position {p:.2f}")
    print("first-level purity:", {k: round(v, 2) for k, v in first_level_purity(ref, 4 * args.n).items()})


if __name__ == "__main__":
    main()
