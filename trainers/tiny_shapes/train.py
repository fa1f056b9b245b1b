"""Train vila-tiny-shapes: VILA1.5's recipe in miniature, on CPU, seeded and deterministic.

    python -m trainers.tiny_shapes.train --out models/vila-tiny-shapes --eval-n 300     # 18.5 min on 2 cores
    python -m trainers.tiny_shapes.train --resume A --out B --sft-steps 200            # more stage-3 steps

VILA1.5 trains stages 1-3 from a pretrained SigLIP and a pretrained LLM; both are random here, so
stage 0 stands in for their pretraining, with teachers that read the generated scene's labels
(trainers/tiny_shapes/teachers.py, trainers/tiny_shapes/attention_targets.py; all dropped after training):
  0a vision     the tower learns each grid cell's shape/colour/position and per-shape counts, on
                the features VILA reads (hidden_states[-2])
  0b text       the LLM learns the vocabulary and the chat format as plain text
  0c symbolic   the LLM learns the questions on image tokens written from the labels
  1  align      only the projector trains, toward those symbolic tokens, tower and LLM frozen
  2  interleave projector + LLM on image/caption sequences of 1-2 images
  3  sft        projector + LLM on the question mixture (tower frozen, for CPU time)
The question stages (0c, 1, 3) add attention supervision of four heads to the answers' loss;
each stage ends with a probe on unseen scenes, printed to the log.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from trainers.tiny_shapes import scenes
from trainers.tiny_shapes.attention_targets import conversation_targets
from trainers.tiny_shapes.model import (SELECT_LAYER, TinyVila, build_tokenizer, encode_conversation, render_prompt,
                               tokenize_prompt)
from trainers.tiny_shapes.teachers import SymbolicScenes, VisionHeads, stacked_labels, token_cells
from vila_edge.families import IMAGE_TOKEN_INDEX

TRAIN_SEED = 1            # held-out sets use other seeds (trainers/tiny_shapes/evaluate.py)
TOKENIZER_SEED = 2
PROBE_SEED = TRAIN_SEED + 500     # unseen scenes for the stage-end probes (the held-out set is EVAL_SEED)
QK_INIT_STD = 0.08
# Peak learning rates. The LLM's 1e-3: at 2e-3 the loss of a colour-only run spiked and stayed at
# chance for 300 steps, at 1e-3 the same run reached 0.95 (measured, AdamW, batch 20).
LLM_LR = 1e-3
VISION_LR = 2e-3
PROJECTOR_LR = 2e-3
MULTI_TURN = 0.2          # share of single-image conversations with a second_question round
VOCAB_SIZE = 512          # BPE target; the trainer stops earlier once every word is one piece


def model_configs(vocab: int):
    from transformers import LlamaConfig, SiglipVisionConfig

    llm = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=688, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, hidden_act="silu")
    # 96 px in 16 px patches: a 6x6 patch grid that mlp_downsample's 2x2 merge turns into 3x3 image
    # tokens, one per scene cell (scenes.GRID), so each token sees exactly one whole object.
    vis = SiglipVisionConfig(image_size=96, patch_size=16, hidden_size=128, num_hidden_layers=4,
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


# ---- batches ----------------------------------------------------------------------------------
class Stream:
    """Endless deterministic samples of the training seed; each stage reads its own index range."""

    def __init__(self, start: int):
        self.i = start

    def next(self, **kw):
        self.i += 1
        return scenes.make_sample(TRAIN_SEED, self.i, **kw)


def caption_batch(model, stream, bs, max_images):
    """Stage 2: BOS + ("<image>\\n" + caption) * k + </s>; loss on the captions."""
    tok = model.tokenizer
    ids_b, lab_b, imgs = [], [], []
    for _ in range(bs):
        chosen = [stream.next().scenes[0] for _ in range(1 + stream.i % max_images)]
        ids, labels = [tok.bos_token_id], [-100]
        for sc in chosen:
            text = tok("\n" + scenes.describe(sc)).input_ids[1:]     # chunk tokenization, BOS dropped
            ids += [IMAGE_TOKEN_INDEX] + text
            labels += [-100] + text
            imgs.append(scenes.render(sc))
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
        ids_b.append(ids)
        lab_b.append(labels)
    return ids_b, lab_b, model.pixels(imgs)


@dataclass
class QABatch:
    """Question-answer conversations: ids and labels per row, their scenes in placeholder order,
    and the attention targets of each row (trainers/tiny_shapes/attention_targets.py)."""
    ids: list
    labels: list
    scenes: list
    targets: list


def qa_batch(model, stream, bs, rounds, cells: list) -> QABatch:
    ids_b, lab_b, scs, tgt = [], [], [], []
    for _ in range(bs):
        s = stream.next(multi_turn=MULTI_TURN, extra_rounds=rounds)
        ids, labels = encode_conversation(model.tokenizer, s.turns)
        ids_b.append(ids)
        lab_b.append(labels)
        scs += s.scenes
        tgt.append(conversation_targets(model.tokenizer, ids, labels, s, cells))
    return QABatch(ids_b, lab_b, scs, tgt)


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
        # fp32 throughout: bf16 autocast ran a step 20x slower on a CPU without avx512_bf16 (an
        # AVX2-only EPYC: 11 s against 0.6 s).
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


def qa_stage_loss(model, feats_fn, weight: float):
    """A stage's loss on a QABatch: answers' next-token loss + weight * attention supervision,
    with the image tokens from feats_fn(batch)."""
    def loss(batch: QABatch):
        return model.loss_features(batch.ids, batch.labels, feats_fn(batch), attention=(batch.targets, weight))
    return loss


def pixel_tokens(model):
    """scenes -> image tokens through the tower and projector, from the rendered scenes."""
    return lambda scene_list: model.bucketed_features(model.pixels([scenes.render(sc) for sc in scene_list]))


def pixel_features(model):
    tokens = pixel_tokens(model)
    return lambda batch: tokens(batch.scenes)


def continue_sft(args) -> TinyVila:
    """More stage-3 steps from a saved checkpoint (bf16 weights, upcast), on fresh samples."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = TinyVila.load(args.resume).train()
    freeze(model.tower, on=args.train_tower)
    cells = token_cells(model).tolist()
    stream = Stream(10_000_000 * (2 if args.train_tower else 1))
    groups = [{"params": list(model.projector.parameters()) + list(model.llm.parameters()), "lr": args.lr}]
    if args.train_tower:
        groups.append({"params": list(model.tower.parameters()), "lr": args.lr / 3})
    run_stage("3 sft (continued)", groups, args.sft_steps, args.lr,
              lambda: (qa_batch(model, stream, args.bs, args.rounds, cells),),
              qa_stage_loss(model, pixel_features(model), args.attention),
              deadline=args.start + 60 * args.max_minutes if args.max_minutes else None)
    return model.eval()


def train(args) -> TinyVila:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer(tokenizer_corpus(2000), VOCAB_SIZE)
    llm_cfg, vis_cfg = model_configs(len(tok))
    model = TinyVila(llm_cfg, vis_cfg, tok)
    # Larger query/key init than the 0.02 of every other weight: with 0.02 the attention logits
    # start near zero and attention stays uniform over the ~50 prompt positions.
    for layer in model.llm.model.layers:
        nn.init.normal_(layer.self_attn.q_proj.weight, std=QK_INIT_STD)
        nn.init.normal_(layer.self_attn.k_proj.weight, std=QK_INIT_STD)
    print(f"vocab {len(tok)}; params: tower {_n(model.tower)}, projector {_n(model.projector)}, "
          f"llm {_n(model.llm)}", flush=True)
    s, lr = args.scale, args.lr
    stream = Stream(0)
    cells = token_cells(model)

    # Stage 0a: vision tower pretraining on scene labels.
    heads = VisionHeads(vis_cfg.hidden_size, vis_cfg.image_size, vis_cfg.patch_size)

    def vision_batch():
        scs = [sc for _ in range(args.vision_bs) for sc in stream.next().scenes][: args.vision_bs]
        return (model.pixels([scenes.render(sc) for sc in scs]), *stacked_labels(scs))

    def vision_loss(pixels, shape, color, counts):
        out = model.tower(pixel_values=pixels, output_hidden_states=True)
        return heads.loss(out.hidden_states[SELECT_LAYER], shape, color, counts)

    model.train()
    run_stage("0a vision", list(model.tower.parameters()) + list(heads.parameters()), int(args.vision_steps * s),
              VISION_LR, vision_batch, vision_loss)
    probe = [sc for i in range(64) for sc in scenes.make_sample(PROBE_SEED, i).scenes][:128]
    model.eval()
    with torch.no_grad():
        feats = model.tower(pixel_values=model.pixels([scenes.render(sc) for sc in probe]),
                            output_hidden_states=True).hidden_states[SELECT_LAYER]
    acc = heads.accuracy(feats, *stacked_labels(probe))
    print("[stage 0a vision] probe accuracy on unseen scenes: " +
          " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    model.train()
    # Stage 0b: LLM text pretraining (vocabulary and chat format).
    run_stage("0b text", list(model.llm.parameters()), int(20 * s), lr,
              lambda: text_batch(model, stream, args.bs), model.loss)
    # Stage 0c: the LLM learns the questions on symbolic image tokens.
    sym = SymbolicScenes(llm_cfg.hidden_size, cells)
    qa = lambda: (qa_batch(model, stream, args.bs, args.rounds, cells.tolist()),)   # noqa: E731
    run_stage("0c symbolic", list(model.llm.parameters()) + list(sym.parameters()), int(args.symbolic_steps * s),
              lr, qa, qa_stage_loss(model, lambda batch: sym(batch.scenes), args.attention))
    print(f"[stage 0c symbolic] answers on unseen symbolic scenes: {answer_probe(model, sym)}", flush=True)
    # Stage 1: projector alignment, tower and LLM frozen: the answers' loss (and attention targets)
    # plus the distance of each image token to its symbolic target.
    freeze(model.tower, model.llm, sym)

    def align_loss(batch: QABatch):
        feats = pixel_features(model)(batch)
        with torch.no_grad():
            target = sym(batch.scenes).float()
        mse = ((feats.float() - target) ** 2).mean() / (target ** 2).mean()
        return (model.loss_features(batch.ids, batch.labels, feats, attention=(batch.targets, args.attention))
                + args.align_mse * mse)

    run_stage("1 align", list(model.projector.parameters()), int(args.align_steps * s), PROJECTOR_LR, qa, align_loss)
    print(f"[stage 1 align] answers on unseen rendered scenes: {answer_probe(model, pixel_tokens(model))}", flush=True)
    # Stage 2: interleaved image-text pretraining.
    freeze(model.llm, on=True)
    run_stage("2 interleave", list(model.projector.parameters()) + list(model.llm.parameters()), int(25 * s),
              lr, lambda: caption_batch(model, stream, args.bs, 2), model.loss)
    # Stage 3: instruction tuning. The tower stays frozen (VILA1.5 unfreezes it here, but its
    # backward would double the step time on a 2-core CPU).
    run_stage("3 sft", list(model.projector.parameters()) + list(model.llm.parameters()), int(args.sft_steps * s), lr,
              qa, qa_stage_loss(model, pixel_features(model), args.attention),
              deadline=args.start + 60 * args.max_minutes if args.max_minutes else None)
    print(f"[stage 3 sft] answers on unseen rendered scenes: {answer_probe(model, pixel_tokens(model))}", flush=True)
    return model.eval()


@torch.no_grad()
def answer_probe(model, image_tokens, n: int = 96) -> str:
    """First-answer-token accuracy (teacher forced) on n unseen single-round questions, with the
    image tokens from image_tokens(scenes): a quick read of what a stage taught."""
    was_training = model.training
    model.eval()
    per = {}
    for i in range(n):
        s = scenes.make_sample(PROBE_SEED, i)
        ids, labels = encode_conversation(model.tokenizer, s.turns)
        feats = image_tokens(s.scenes)
        embeds, _ = model.embed([ids], feats)
        spliced = model.spliced_labels([ids], [labels], feats.shape[1], embeds.shape[1])[0]
        first = int((spliced != -100).nonzero()[0])
        logits = model.llm(inputs_embeds=embeds[:, :first]).logits[0, -1]
        per.setdefault(s.category, []).append(int(logits.argmax()) == int(spliced[first]))
    model.train(was_training)
    total = sum(sum(v) for v in per.values()) / n
    return f"{total:.3f} (" + " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in per.items()) + ")"


def _n(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"


EXAMPLES_SEED = 2024
EXAMPLE_INDICES = (0, 1, 3, 4)         # color, count, where, shape questions


def write_examples(model, root: str) -> None:
    """examples/: a few scenes as PNGs and a README with the question and expected answer each."""
    folder = os.path.join(root, "examples")
    os.makedirs(folder, exist_ok=True)
    lines = ["# vila-tiny-shapes examples", "",
             f"Scenes from `trainers/tiny_shapes/scenes.py` (seed {EXAMPLES_SEED}, not used in training). Ask each question "
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
    ap.add_argument("--vision-steps", type=int, default=700)
    ap.add_argument("--rounds", type=int, default=3,
                    help="extra question rounds per single-image training conversation (more answers per pass)")
    ap.add_argument("--symbolic-steps", type=int, default=700)
    ap.add_argument("--align-steps", type=int, default=150)
    ap.add_argument("--align-mse", type=float, default=1.0, help="weight of the stage-1 distance to symbolic tokens")
    ap.add_argument("--sft-steps", type=int, default=450)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (short dev runs)")
    ap.add_argument("--eval-n", type=int, default=0, help="held-out items scored after saving (0: none)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop instruction tuning early past this wall time (a busy machine); 0: never")
    ap.add_argument("--resume", help="a saved checkpoint: run only --sft-steps more stage-3 steps from it")
    ap.add_argument("--lr", type=float, default=LLM_LR, help="peak learning rate of the LLM stages")
    ap.add_argument("--attention", type=float, default=1.0,
                    help="weight of the attention supervision in the question stages (trainers/tiny_shapes/attention_targets.py)")
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
        from trainers.tiny_shapes.evaluate import evaluate, torch_backend

        report = evaluate(torch_backend(args.out), n=args.eval_n)
        print(f"held-out overall {report['overall']:.3f} " +
              " ".join(f"{k} {v['accuracy']:.2f}" for k, v in report["categories"].items()), flush=True)


if __name__ == "__main__":
    main()
