"""Train vila-tiny-shapes: VILA1.5's recipe in miniature, on CPU, deterministic.

    nice -n 5 python -m export.train_tiny --out models/vila-tiny-shapes      # ~12-17 min on 2 cores
    # the bundled checkpoint then had two continued stage-3 runs (--resume, see the help):
    python -m export.train_tiny --resume A --out B --sft-steps 500 --bs 16
    python -m export.train_tiny --resume B --train-tower --out C --sft-steps 600 --bs 16
    python -m export.train_tiny --resume C --train-tower --out D --sft-steps 1600 --bs 16 --lr 1e-3 --max-minutes 8

Stages (VILA1.5 trains 1-3 from a pretrained SigLIP and a pretrained LLM; both are random here,
so stage 0 stands in for their pretraining):
  0  vision: the SigLIP tower learns, on the features VILA uses (hidden_states[-2]), each grid
     cell's shape/colour and the per-shape counts from scene labels (its last layer, post-LN and
     pooling head stay at their random init: VILA never reads them); the LLM learns the
     vocabulary and the chat format as plain text (captions and conversations, images removed).
  1  alignment: only the projector trains, on image -> caption, tower and LLM frozen.
  2  interleaved pretraining: projector + LLM on image/caption sequences of 1-2 images.
  3  instruction tuning: projector + LLM (tower frozen, for CPU time) on the QA mixture: single-image
     questions, 20% of them two-round, two-image comparisons and interleaved few-shot prompts.
Loss is on answer (caption) tokens only in stages 1-3.
"""
import argparse
import math
import os
import time

import torch
from torch import nn

from export import scenes
from export.tiny_model import (SELECT_LAYER, TinyVila, build_tokenizer, encode_conversation, render_prompt,
                               tokenize_prompt)

TRAIN_SEED = 1            # held-out sets use other seeds (export/evaluate.py)
TOKENIZER_SEED = 2
VOCAB_SIZE = 512          # BPE target; the trainer stops earlier once every word is one piece


def model_configs(vocab: int):
    from transformers import LlamaConfig, SiglipVisionConfig

    llm = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=688, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, hidden_act="silu")
    vis = SiglipVisionConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=512, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, num_channels=3)
    return llm, vis


def tokenizer_corpus(n: int) -> list:
    texts = []
    for i in range(n):
        s = scenes.make_sample(TOKENIZER_SEED, i, multi_turn=0.3)
        texts += render_prompt(s.turns).split("<image>")
        texts += [scenes.describe(sc) for sc in s.scenes]
    return texts


# ---- stage 0: vision labels -------------------------------------------------------------------
N_CELLS = scenes.GRID * scenes.GRID
SHAPE_IDS = {s: i + 1 for i, s in enumerate(scenes.SHAPES)}          # 0 = empty cell
COLOR_IDS = {c: i + 1 for i, c in enumerate(scenes.COLORS)}
COUNT_CLASSES = scenes.GRID * scenes.GRID + 1


def vision_labels(scene) -> tuple:
    shape = torch.zeros(N_CELLS, dtype=torch.long)
    color = torch.zeros(N_CELLS, dtype=torch.long)
    for o in scene.objects:
        k = o.cell[0] * scenes.GRID + o.cell[1]
        shape[k], color[k] = SHAPE_IDS[o.shape], COLOR_IDS[o.color]
    counts = torch.tensor([scene.count(s) for s in scenes.SHAPES])
    return shape, color, counts


class VisionHeads(nn.Module):
    """Stage-0 probes on the features VILA reads (hidden_states[-2]): the patches of each grid cell
    are averaged and one shared linear head names the cell's shape and colour, so every patch
    token learns to describe its own neighbourhood; per-shape counts come from the mean patch."""

    def __init__(self, c: int, image_size: int, patch: int):
        super().__init__()
        self.shape = nn.Linear(c, len(scenes.SHAPES) + 1)
        self.color = nn.Linear(c, len(scenes.COLORS) + 1)
        self.count = nn.Linear(c, len(scenes.SHAPES) * COUNT_CLASSES)
        g = image_size // patch
        centre = (torch.arange(g) + 0.5) * patch * scenes.GRID // image_size    # cell index of each patch row/col
        cell = (centre[:, None] * scenes.GRID + centre[None, :]).flatten()      # (g*g,) row-major patches
        pool = nn.functional.one_hot(cell.long(), N_CELLS).T.float()            # (cells, patches)
        self.register_buffer("pool", pool / pool.sum(1, keepdim=True), persistent=False)

    def loss(self, tokens, shape, color, counts):
        ce = nn.functional.cross_entropy
        cells = self.pool @ tokens.float()                                      # (B, cells, C)
        return (ce(self.shape(cells).flatten(0, 1), shape.flatten())
                + ce(self.color(cells).flatten(0, 1), color.flatten())
                + ce(self.count(tokens.float().mean(1)).view(-1, COUNT_CLASSES), counts.flatten()))


# ---- batches ----------------------------------------------------------------------------------
class Stream:
    """Endless deterministic samples of the training seed; each stage reads its own index range."""

    def __init__(self, start: int):
        self.i = start

    def next(self, **kw):
        self.i += 1
        return scenes.make_sample(TRAIN_SEED, self.i, **kw)


def caption_batch(model, stream, bs, max_images):
    """Stage 1/2: BOS + ("<image>\\n" + caption) * k + </s>; loss on the captions."""
    tok = model.tokenizer
    ids_b, lab_b, imgs = [], [], []
    for _ in range(bs):
        chosen = [stream.next().scenes[0] for _ in range(1 + stream.i % max_images)]
        ids, labels = [tok.bos_token_id], [-100]
        for sc in chosen:
            text = tok("\n" + scenes.describe(sc)).input_ids[1:]     # chunk tokenization, BOS dropped
            ids += [-200] + text
            labels += [-100] + text
            imgs.append(scenes.render(sc))
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
        ids_b.append(ids)
        lab_b.append(labels)
    return ids_b, lab_b, model.pixels(imgs)


def sft_batch(model, stream, bs, multi_turn):
    ids_b, lab_b, imgs = [], [], []
    for _ in range(bs):
        s = stream.next(multi_turn=multi_turn)
        ids, labels = encode_conversation(model.tokenizer, s.turns)
        ids_b.append(ids)
        lab_b.append(labels)
        imgs += [scenes.render(sc) for sc in s.scenes]
    return ids_b, lab_b, model.pixels(imgs)


def text_batch(model, stream, bs):
    """Stage 0 LLM: plain-text LM on all tokens of conversations (images removed) and captions."""
    tok = model.tokenizer
    ids_b = []
    for _ in range(bs):
        s = stream.next(multi_turn=0.3)
        if stream.i % 2:
            text = render_prompt(s.turns).replace("<image>\n", "")
            ids = tokenize_prompt(tok, text)
        else:
            ids = tok(" ".join(scenes.describe(sc) for sc in s.scenes)).input_ids + [tok.eos_token_id]
        ids_b.append(ids)
    return ids_b, [list(x) for x in ids_b], torch.zeros(0)


# ---- loop -------------------------------------------------------------------------------------
def run_stage(name, params, steps, lr, make_batch, loss_fn, log_every=10, deadline=None):
    groups = params if isinstance(params[0], dict) else [{"params": params, "lr": lr}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    base = [g["lr"] for g in opt.param_groups]
    warm = max(1, steps // 20)
    t0, avg = time.time(), None
    for step in range(steps):
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * max(f, 0.05)
        # bf16 autocast: the CPU's avx512_bf16 matmuls are ~4x fp32; master weights stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(*make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if deadline is not None and time.time() > deadline:
            print(f"[stage {name}] stopped at step {step + 1}/{steps}: --max-minutes reached", flush=True)
            return
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            print(f"[stage {name}] step {step + 1}/{steps} loss {avg:.4f} "
                  f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)", flush=True)


def freeze(*mods, on=False):
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(on)


def continue_sft(args) -> TinyVila:
    """More stage-3 steps from a saved checkpoint (bf16 weights, upcast), on fresh samples."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = TinyVila.load(args.resume).train()
    freeze(model.tower, on=args.train_tower)
    stream = Stream(10_000_000 * (2 if args.train_tower else 1))
    groups = [{"params": list(model.projector.parameters()) + list(model.llm.parameters()), "lr": args.lr}]
    if args.train_tower:
        groups.append({"params": list(model.tower.parameters()), "lr": args.lr / 3})
    run_stage("3 sft (continued)", groups, args.sft_steps, args.lr, lambda: sft_batch(model, stream, args.bs, 0.2), model.loss,
              deadline=args.start + 60 * args.max_minutes if args.max_minutes else None)
    return model.eval()


def train(args) -> TinyVila:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer(tokenizer_corpus(2000), VOCAB_SIZE)
    llm_cfg, vis_cfg = model_configs(len(tok))
    model = TinyVila(llm_cfg, vis_cfg, tok)
    print(f"vocab {len(tok)}; params: tower {_n(model.tower)}, projector {_n(model.projector)}, "
          f"llm {_n(model.llm)}", flush=True)
    s = args.scale
    stream = Stream(0)

    # Stage 0a: vision tower pretraining on scene labels.
    heads = VisionHeads(vis_cfg.hidden_size, vis_cfg.image_size, vis_cfg.patch_size)

    def vision_batch():
        batch = [stream.next() for _ in range(args.vision_bs)]
        scs = [sc for b in batch for sc in b.scenes][: args.vision_bs]
        labels = [vision_labels(sc) for sc in scs]
        return (model.pixels([scenes.render(sc) for sc in scs]),
                *(torch.stack([lab[k] for lab in labels]) for k in range(3)))

    def vision_loss(pixels, shape, color, counts):
        out = model.tower(pixel_values=pixels, output_hidden_states=True)
        return heads.loss(out.hidden_states[SELECT_LAYER], shape, color, counts)

    model.train()
    run_stage("0a vision", list(model.tower.parameters()) + list(heads.parameters()), int(200 * s), 2e-3,
              vision_batch, vision_loss)
    # Stage 0b: LLM text pretraining.
    run_stage("0b text", list(model.llm.parameters()), int(20 * s), 2e-3,
              lambda: text_batch(model, stream, args.bs), model.loss)
    # Stage 1: projector alignment.
    freeze(model.tower, model.llm)
    run_stage("1 align", list(model.projector.parameters()), int(25 * s), 2e-3,
              lambda: caption_batch(model, stream, args.bs, 1), model.loss)
    # Stage 2: interleaved image-text pretraining.
    freeze(model.llm, on=True)
    run_stage("2 interleave", list(model.projector.parameters()) + list(model.llm.parameters()), int(25 * s),
              1e-3, lambda: caption_batch(model, stream, args.bs, 2), model.loss)
    # Stage 3: instruction tuning. The tower stays frozen (VILA1.5 unfreezes it here, but its
    # backward would double the step time on a 2-core CPU).
    run_stage("3 sft", list(model.projector.parameters()) + list(model.llm.parameters()), int(args.sft_steps * s), 2e-3,
              lambda: sft_batch(model, stream, args.bs, 0.2), model.loss,
              deadline=args.start + 60 * args.max_minutes if args.max_minutes else None)
    return model.eval()


def _n(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"


EXAMPLES_SEED = 2024
EXAMPLE_INDICES = (0, 1, 3, 4)         # color, count, where, shape questions


def write_examples(model, root: str) -> None:
    """examples/: a few scenes as PNGs and a README with the question and expected answer each."""
    folder = os.path.join(root, "examples")
    os.makedirs(folder, exist_ok=True)
    lines = ["# vila-tiny-shapes examples", "",
             f"Scenes from `export/scenes.py` (seed {EXAMPLES_SEED}, not used in training). Ask each question "
             "with the image (the user message is `<image>`, a newline, then the question; vicuna_v1 template).", "",
             "| image | question | expected answer | this checkpoint (torch, greedy) |", "|---|---|---|---|"]
    for i in EXAMPLE_INDICES:
        s = scenes.make_sample(EXAMPLES_SEED, i)
        (q, a), = s.turns
        img = scenes.render(s.scenes[0])
        name = f"{s.category}.png"
        img.save(os.path.join(folder, name))
        got = model.generate([img], q)
        lines.append(f"| {name} | {q.replace(chr(10), ' ').replace('<image>', '').strip()} | {a} | {got} |")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/vila-tiny-shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bs", type=int, default=20)
    ap.add_argument("--vision-bs", type=int, default=48)
    ap.add_argument("--sft-steps", type=int, default=480)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (short dev runs)")
    ap.add_argument("--eval-n", type=int, default=0, help="held-out items scored after saving (0: none)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop instruction tuning early past this wall time (a busy machine); 0: never")
    ap.add_argument("--resume", help="a saved checkpoint: run only --sft-steps more stage-3 steps from it")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate of --resume")
    ap.add_argument("--train-tower", action="store_true", help="with --resume: unfreeze the tower (lr / 3)")
    args = ap.parse_args(argv)
    args.start = time.time()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = continue_sft(args) if args.resume else train(args)
    model.save(args.out)
    print(f"saved {args.out} after {time.time() - t0:.0f}s", flush=True)
    write_examples(model, args.out)
    if args.eval_n:
        from export.evaluate import evaluate, torch_backend

        report = evaluate(torch_backend(args.out), n=args.eval_n)
        print(f"held-out overall {report['overall']:.3f} " +
              " ".join(f"{k} {v['accuracy']:.2f}" for k, v in report["categories"].items()), flush=True)


if __name__ == "__main__":
    main()
