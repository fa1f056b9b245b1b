"""Train vila-u-tiny-shapes: VILA-U's recipe in miniature, on CPU, seeded.

    python -m trainers.tiny_vila_u.train --out models/vila-u-tiny-shapes          # make train-vila-u
    python -m trainers.tiny_vila_u.train --part decoder --work build/vila-u-stages  # one stage alone

VILA-U (arXiv 2409.04429) trains its tower first, then the LLM with the tower frozen:
  1 tower   SigLIP + residual quantizer (commitment, EMA codebooks with dead-code restarts) with
            text-image alignment (SigLIP's sigmoid contrastive loss on the quantized features against
            scene captions); standing in for SigLIP's pretraining (the tower starts random here),
            trainers/tiny_shapes/teachers.VisionHeads reads each cell's shape and colour (the
            shape of occupied cells weighted up: tower.SHAPE_WEIGHT), and a geometry probe each
            object's offset, size and tint, off the quantized features.
  1b decoder  post_quant_conv + the pixel decoder on reconstruction (MSE) from the frozen codes,
            plus a perceptual loss: the frozen tower's features of the reconstruction against
            those of the input (VQGAN's LPIPS, with the tower as the network that sees shapes;
            with MSE alone the decoder drew every shape as a blob).
            VILA-U trains the decoder jointly with the encoder; on a 2-core CPU the decoder's
            convolutions cost 10x the rest of the tower step, so here the encoder learns what
            reconstruction needs from the geometry probe, and 1b runs beside stage 2 (both read
            only the frozen stage-1 codes; --part all runs them as two processes).
  2 llm     projector + LLM + depth transformer on a mixture: understanding (the question mixture of
            trainers/tiny_shapes, one and two images, few-shot; answer loss plus its attention
            supervision) and generation (prompt -> the scene's codes, depth-transformer loss),
            the unconditional prompt for UNCOND_SHARE of generation samples (classifier-free guidance);
            then a second pass at a lower rate on new samples, mostly pictures (--finish-*: held-out colour
            0.36 -> 0.77; up to 2800 steps of 4 questions + 12 pictures),
            then a guidance pass (--guide-*): the codes' loss under cfg-3 guided logits added
            (guided_cross_entropy; held-out position at cfg 3 0.50 -> 0.75, fp16 engine), and a second
            one with a fresh warmup (--reguide-*; held-out colour 0.798 -> 0.813, 1,320 pictures, fp16).
Stage 1 also makes the first code level name each cell's content (colour, shape, background): a cluster
loss and a class-balanced first-level k-means (tower.ClusterLoss, tower.class_balance); without them
the colour lived in the second level, which the depth transformer could not predict
(trainers/tiny_vila_u/diagnose.py; benchmarks/results/vila-u-tiny-shapes/README.md).
Stage 1 runs 1400 steps (was 700): the first code names the colour of 0.987 of object cells on unseen
scenes (0.932 after 700); with it and 300 more guidance steps, held-out colour at cfg 3 rose 0.785 -> 0.803
(fp32 engine, 10 pictures a prompt; benchmarks/results/vila-u-tiny-shapes/README.md, "Retrain").
Each stage logs its loss with an ETA and ends with a probe on unseen scenes.
"""
import argparse
import math
import os
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from trainers.tiny_shapes import scenes
from trainers.tiny_shapes.model import build_tokenizer
from trainers.tiny_shapes.attention_targets import KEY_HEAD, attention_terms
from trainers.tiny_shapes.teachers import VisionHeads, stacked_labels
from trainers.tiny_shapes.train import (LLM_LR, PROBE_SEED, QK_INIT_STD, Stream, answer_probe, freeze, pixel_tokens,
                                        qa_batch, qa_stage_loss, pixel_features, tokenizer_corpus)
from trainers.tiny_vila_u import prompts
from trainers.tiny_vila_u.tower import GeometryProbe, decoder_loss, psnr_probe, scene_pixels, tower_batch, tower_loss
from trainers.tiny_vila_u.model import ADDED_TOKENS, D, K, SIGLIP, TinyVilaU, build_configs
from vila_edge_export.reference_vila_u import generation_prompts, tokenize

GEN_SEED = 11                 # generation samples; understanding samples come from tiny_shapes' TRAIN_SEED
UNCOND_SHARE = 0.15
TOWER_LR = 2e-3


def make_tokenizer():
    corpus = tokenizer_corpus(2000) + [s.text for s in prompts.all_specs()] + list(generation_prompts("x"))
    tok = build_tokenizer(corpus, 512)
    tok.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})   # the last four ids
    return tok


def timed_stage(name, params, lr, budget_s, max_steps, make_batch, loss_fn, log_every=10,
                checkpoint=None, checkpoint_every=100) -> int:
    """AdamW with warmup + cosine over the stage's wall-clock budget (or its step cap, whichever ends
    first): on a shared machine the step rate varies, and the schedule still ends at a low rate.
    checkpoint(): called every checkpoint_every steps (a run cut short keeps its last weights).
    -> steps run."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, avg, step = time.time(), None, 0
    while step < max_steps and time.time() - t0 < budget_s:
        done = max(step / max_steps, (time.time() - t0) / budget_s)
        opt.param_groups[0]["lr"] = lr * max(0.05, min(1.0, (step + 1) / 20, 0.5 * (1 + math.cos(math.pi * done))))
        loss = loss_fn(*make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if step % log_every == 0:
            print(f"[stage {name}] step {step} loss {avg:.4f} ({time.time() - t0:.0f}s of {budget_s:.0f}s, "
                  f"{100 * done:.0f}% of the schedule, {time.process_time():.0f} s CPU)", flush=True)
        if checkpoint and step % checkpoint_every == 0:
            checkpoint()
    # CPU seconds of this process: about the stage's wall time on an idle machine (one thread each).
    print(f"[stage {name}] done: {step} steps in {time.time() - t0:.0f}s ({time.process_time():.0f} s CPU), "
          f"loss {avg:.4f}", flush=True)
    return step


# ---- stage 1: the tower -------------------------------------------------------------------------
# ---- stage 2: LLM + depth transformer ---------------------------------------------------------------
def gen_batch(model, rng: random.Random, pool: list, bs: int):
    """-> (prompt id lists, pixels): the conditional prompt of a training spec or, for UNCOND_SHARE,
    the unconditional one (reference_vila_u.generation_prompts), each ending in <im_start>."""
    ids, scs = [], []
    for _ in range(bs):
        spec = prompts.train_spec(rng, pool)
        cond, uncond = generation_prompts(spec.text)
        ids.append(tokenize(model.tokenizer, uncond if rng.random() < UNCOND_SHARE else cond))
        scs.append(prompts.scene_for(spec, rng))
    return ids, scene_pixels(model, scs)


def prompt_words(tok, ids: list) -> list:
    """Positions of the user's words in generation prompt ids (between "USER:" and "ASSISTANT:");
    empty for the unconditional prompt."""
    user, assistant = tok.convert_tokens_to_ids("▁USER"), tok.convert_tokens_to_ids("▁ASSISTANT")
    if user not in ids or assistant not in ids:                                # "USER:ASSISTANT:"
        return []
    start = ids.index(user) + 2                                                # past "▁USER" ":"
    return list(range(start, len(ids) - 1 - ids[::-1].index(assistant)))


def gen_loss(model, ids: list, pixels: torch.Tensor, guided: float = 0.0, cfg: float = 3.0) -> torch.Tensor:
    """Left-padded prompts + the image's first T-1 positions (projector(sum of their codebook rows));
    the final hidden states at <im_start> and those positions predict every position's D codes.
    guided > 0: plus guided x the cross-entropy of the conditional rows' codes under the logits the
    sampler draws from at cfg (vila_edge/imagine.py: l_u + cfg (l_c - l_u)), l_u from the same image
    after the unconditional prompt and held fixed (it stays the plain likelihood of its own rows)."""
    codes = model.encode(pixels)                                              # (B, T, D)
    cond = [b for b, row in enumerate(ids) if prompt_words(model.tokenizer, row)] if guided else []
    if cond:
        ids = ids + [tokenize(model.tokenizer, generation_prompts("x")[1])] * len(cond)
        codes = torch.cat([codes, codes[cond]])
    B, T, _ = codes.shape
    image = model.projector(model.rq.code_sum(codes[:, :-1]))                 # (B, T-1, H)
    table = model.llm.get_input_embeddings()
    width = max(map(len, ids))
    embeds = torch.zeros(B, width + T - 1, image.shape[-1])
    mask = torch.zeros(B, width + T - 1, dtype=torch.long)
    for b, row in enumerate(ids):
        embeds[b, width - len(row):width] = table(torch.tensor(row))
        mask[b, width - len(row):] = 1
    embeds[:, width:] = image
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_attentions=True)
    h = out.last_hidden_state[:, -T:]
    logits = model.depth_logits(h.reshape(B * T, -1), codes.reshape(B * T, D)).reshape(B, T, D, K)
    n = B - len(cond)                                                         # the batch's own rows
    loss = F.cross_entropy(logits[:n].reshape(-1, K), codes[:n].reshape(-1))
    if cond:
        loss = loss + guided * guided_cross_entropy(logits[cond], logits[n:], codes[cond], cfg)
    # Attention supervision, as for the questions (trainers/tiny_shapes/attention_targets.py): from
    # every image position, KEY_HEAD looks at the prompt's words (a from-scratch LLM otherwise
    # draws unconditionally for hundreds of steps: measured, held-out colour 0.11 after 764 steps).
    targets = [(*KEY_HEAD, q, [width - len(row) + k for k in prompt_words(model.tokenizer, row)])
               for row in ids for q in range(width - 1, width + T - 1)]
    rows = [[t for t in targets[b * T:(b + 1) * T] if t[3]] for b in range(B)]
    att, n = attention_terms(out.attentions, rows)
    return loss + (att / n if n else 0.0)


def guided_cross_entropy(cond: torch.Tensor, uncond: torch.Tensor, codes: torch.Tensor, cfg: float) -> torch.Tensor:
    """Mean cross-entropy of codes (...) under the guided logits l_u + cfg (l_c - l_u) of cond and
    uncond (..., K), with no gradient into l_u: the conditional model learns not to lift a code above
    the unconditional one where the truth is not (guidance multiplies such a lift by cfg; measured:
    the codes it picked instead of the asked object had l_c - l_u of 4-7 nats, rare rows)."""
    u = uncond.detach()
    return F.cross_entropy((u + cfg * (cond - u)).reshape(-1, cond.shape[-1]), codes.reshape(-1))


def _save(state: dict, path: str) -> None:
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# Stage 2's passes: (log name, Stream start, args prefix of lr / minutes / steps, guided's arg or None).
PASSES = {"2": ("2 llm", 20_000_000, "", None),
          "2b": ("2b llm, second pass", 30_000_000, "finish_", None),
          "2c": ("2c llm, guidance pass", 50_000_000, "guide_", "guided"),
          "2d": ("2d llm, second guidance pass", 60_000_000, "reguide_", "guided")}
# Defaults of the passes after stage 2, by PASSES' prefix: (what, step cap, minutes, lr, questions and
# pictures a step). The second guidance pass ("reguide_") is a fresh warmup + cosine over new samples;
# measured on the checkpoint that the recipe without it saved (1,320 held-out pictures, cfg 3, fp32
# engine): 800 more guidance steps lifted colour 0.798 -> 0.823 and position 0.844 -> 0.858; stretching
# the one guidance pass to ~2100 steps by trimming stage 2 and the second pass did not (colour 0.792).
PASS_DEFAULTS = {"finish_": ("the second pass", 2800, 7, 5e-4, 4, 12),
                 "guide_": ("the guidance pass", 1500, 6.5, 3e-4, 4, 12),
                 "reguide_": ("the second guidance pass", 800, 3.5, 3e-4, 4, 12)}


def llm_stage(model, args, which: str = "2") -> None:
    """Stage 2 (which "2"); its second pass "2b": a fresh warmup + cosine at --finish-lr on new samples
    (the previous checkpoint's resumed pass lifted its first-answer-token probe 0.82 -> 0.94; this
    tower's richer first code, one row per kind of object, leaves the LLM more to learn); the
    guidance pass "2c": the same at --guide-lr plus the codes' loss under the guided logits
    (gen_loss's guided; at cfg 3 the previous checkpoint drew the asked object in the wrong cell
    half the time, the conditional logits of rare rows lifted above the unconditional ones)."""
    name, start, prefix, weight_arg = PASSES[which]
    stream, rng = Stream(start), random.Random(GEN_SEED + list(PASSES).index(which))
    pool = prompts.specs(heldout=False)
    cells = list(range(scenes.GRID * scenes.GRID))      # image token t covers scene cell t (row-major)
    qa_loss = qa_stage_loss(model, pixel_features(model), args.attention)
    guided = getattr(args, weight_arg) if weight_arg else 0.0

    per_pass = ("lr", "minutes", "steps", "bs", "gen_bs")           # --finish-*, --guide-*; stage 2's own names
    lr, minutes, steps, bs, gen_bs = (getattr(args, prefix + k) for k in per_pass) if prefix else \
        (args.lr, args.llm_minutes, args.llm_steps, args.bs, args.gen_bs)

    def batch():
        return (qa_batch(model, stream, bs, args.rounds, cells),
                gen_batch(model, rng, pool, gen_bs))

    def loss(qa, gen):
        return qa_loss(qa) + gen_loss(model, *gen, guided=guided)

    params = list(model.projector.parameters()) + list(model.llm.parameters()) + list(model.depth_head.parameters())
    timed_stage(name, params, lr, 60 * minutes, steps, batch, loss,
                checkpoint=lambda: _save(llm_state(model), os.path.join(args.work, "llm.pt")))


def llm_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("llm.", "projector.", "depth_head."))}


def new_model(args) -> TinyVilaU:
    torch.manual_seed(args.seed)
    tok = make_tokenizer()
    llm_cfg, siglip_cfg = build_configs(len(tok))
    model = TinyVilaU(llm_cfg, siglip_cfg, tok)
    for layer in model.llm.model.layers:     # see trainers/tiny_shapes/train.py QK_INIT_STD
        torch.nn.init.normal_(layer.self_attn.q_proj.weight, std=QK_INIT_STD)
        torch.nn.init.normal_(layer.self_attn.k_proj.weight, std=QK_INIT_STD)
    return model


def part_tower(args) -> None:
    model = new_model(args)
    gen = torch.Generator().manual_seed(args.seed)
    n = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"   # noqa: E731
    print(f"vocab {len(model.tokenizer)}; params: tower {n(model.rq)}, depth {n(model.depth_head)}, "
          f"llm {n(model.llm)}", flush=True)
    model.train()
    heads = VisionHeads(SIGLIP["hidden"], SIGLIP["image_size"], SIGLIP["patch"])
    probe = GeometryProbe(SIGLIP["hidden"])
    stream = Stream(0)
    encoder = [p for name, p in model.rq.named_parameters() if not name.startswith(("decoder.", "post_quant_conv."))]
    timed_stage("1 tower", encoder + list(heads.parameters()) + list(probe.parameters()), TOWER_LR,
                60 * args.tower_minutes, args.tower_steps, lambda: tower_batch(model, stream, args.tower_bs),
                tower_loss(model, heads, probe, gen, args.cluster, args.balance))
    model.eval()
    with torch.no_grad():
        scs = [scenes.make_sample(PROBE_SEED, i).scenes[0] for i in range(256)]
        z = model.rq.quantize(model.rq.features(scene_pixels(model, scs)))[1]
    labels = stacked_labels(scs)
    acc = heads.accuracy(z, *labels)
    occupied = labels[0] > 0
    named = heads.logits(z)[0].argmax(-1)[occupied] == labels[0][occupied]
    acc["shape of occupied cells"] = named.float().mean().item()
    acc.update(first_level_purity(model, scs, labels))
    print("[stage 1 tower] probe on unseen scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    torch.save(model.state_dict(), os.path.join(args.work, "tower.pt"))


@torch.no_grad()
def first_level_purity(model, scs: list, labels: tuple) -> dict:
    """Share of occupied cells whose first-level code's majority colour (shape) is theirs: how much
    of the cell's content the first code names (what the depth transformer draws first)."""
    codes = model.encode(scene_pixels(model, scs))[..., 0].flatten()
    occupied = labels[0].flatten() > 0
    out = {}
    for name, lab in (("colour from the first code", labels[1]), ("shape from the first code", labels[0])):
        pairs = list(zip(codes[occupied].tolist(), lab.flatten()[occupied].tolist()))
        groups = {}
        for code, y in pairs:
            groups.setdefault(code, []).append(y)
        out[name] = sum(max(v.count(y) for y in set(v)) for v in groups.values()) / max(1, len(pairs))
    return out


def load_stage(args, *parts) -> TinyVilaU:
    model = new_model(args)
    for part in parts:
        model.load_state_dict(torch.load(os.path.join(args.work, part + ".pt")), strict=False)
    return model


def part_decoder(args) -> None:
    model = load_stage(args, "tower")
    freeze(model.rq)
    freeze(model.rq.decoder, model.rq.post_quant_conv, on=True)
    model.train()
    stream = Stream(40_000_000)

    def batch():
        return (scene_pixels(model, [sc for _ in range(args.tower_bs) for sc in stream.next().scenes][:args.tower_bs]),)

    def save():
        state = {k: v for k, v in model.state_dict().items() if k.startswith(("rq.decoder.", "rq.post_quant_conv."))}
        _save(state, os.path.join(args.work, "decoder.pt"))

    timed_stage("1b decoder", list(model.rq.decoder.parameters()) + list(model.rq.post_quant_conv.parameters()),
                TOWER_LR, 60 * args.decoder_minutes, args.decoder_steps, batch, decoder_loss(model, args.perceptual),
                checkpoint=save)
    model.eval()
    print(f"[stage 1b decoder] reconstruction PSNR on unseen scenes: {psnr_probe(model):.2f} dB", flush=True)
    save()


def part_llm(args) -> None:
    model = load_stage(args, "tower", *(["llm"] if args.resume else []))
    freeze(model.rq)
    model.train()
    model.rq.eval()
    llm_stage(model, args)
    _save(llm_state(model), os.path.join(args.work, "llm.pt"))
    if not args.resume:
        for which, (_, _, prefix, _) in PASSES.items():
            if prefix and getattr(args, prefix + "steps"):
                llm_stage(model, args, which)
                _save(llm_state(model), os.path.join(args.work, "llm.pt"))
    model.eval()
    _save(llm_state(model), os.path.join(args.work, "llm.pt"))
    print(f"[stage 2 llm] answers on unseen scenes: {answer_probe(model, pixel_tokens(model))}", flush=True)


def part_finish(args) -> None:
    """Stage 2's second pass alone, from the work dir's llm.pt (what --part llm runs after stage 2)."""
    _further_pass(args, "2b")


def part_guide(args) -> None:
    """Stage 2's guidance pass alone, from the work dir's llm.pt (what --part llm runs after 2b)."""
    _further_pass(args, "2c")


def _further_pass(args, which: str) -> None:
    model = load_stage(args, "tower", "llm")
    freeze(model.rq)
    model.train()
    model.rq.eval()
    llm_stage(model, args, which)
    model.eval()
    _save(llm_state(model), os.path.join(args.work, "llm.pt"))
    print(f"[stage {which} llm] answers on unseen scenes: {answer_probe(model, pixel_tokens(model))}", flush=True)


def part_import(args) -> None:
    """A saved checkpoint (--checkpoint, VILA-U's layout, bf16) -> the work dir's tower.pt, decoder.pt and
    llm.pt (upcast): to run a later pass (--part guide) on a shipped model without its stage files."""
    from safetensors.torch import load_file

    model = new_model(args)
    root = args.checkpoint
    tower = load_file(os.path.join(root, "vision_tower", "model.safetensors"))
    state = {"rq." + k[len("rqvaesiglip."):]: v for k, v in tower.items() if k.startswith("rqvaesiglip.")}
    state.update({"depth_head." + k[len("rqtransformer."):]: v for k, v in tower.items()
                  if k.startswith("rqtransformer.")})
    state.update({"projector." + k[len("layers."):]: v
                  for k, v in load_file(os.path.join(root, "mm_projector", "model.safetensors")).items()})
    state.update({"llm." + k: v for k, v in load_file(os.path.join(root, "llm", "model.safetensors")).items()})
    mine = model.state_dict()
    if set(state) != set(mine):
        raise SystemExit(f"{root}: not this trainer's layout (missing {sorted(set(mine) - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - set(mine))[:3]})")
    state = {k: v.to(mine[k].dtype) for k, v in state.items()}
    parts = {"tower": ("rq.",), "decoder": ("rq.decoder.", "rq.post_quant_conv."),
             "llm": ("llm.", "projector.", "depth_head.")}
    for name, prefixes in parts.items():
        _save({k: v for k, v in state.items() if k.startswith(prefixes)}, os.path.join(args.work, name + ".pt"))
    print(f"imported {root} into {args.work}", flush=True)


def part_save(args) -> None:
    model = load_stage(args, "tower", "decoder", "llm").eval()
    model.save(args.out)
    print(f"saved {args.out} after {time.time() - args.start:.0f}s", flush=True)
    from trainers.tiny_vila_u.examples import write_examples
    write_examples(args.out)


def part_all(args, argv: list) -> None:
    """tower, then decoder and llm as two processes (one thread each), then save."""
    part_tower(args)
    cmd = [sys.executable, "-m", "trainers.tiny_vila_u.train", *argv, "--threads", "1", "--part"]
    procs = [subprocess.Popen(cmd + [p]) for p in ("decoder", "llm")]
    if any(p.wait() for p in procs):
        raise SystemExit("a stage failed")
    part_save(args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/vila-u-tiny-shapes")
    ap.add_argument("--seed", type=int, default=0)
    # One thread per process: on the shared 2-core machine (load ~15) a tower step took 13 s with 2
    # torch threads and 0.3 s with 1 (OpenMP barriers stall when threads are not co-scheduled);
    # the two cores are used by running stages 1b and 2 side by side.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tower-bs", type=int, default=16)
    ap.add_argument("--tower-steps", type=int, default=1400)
    ap.add_argument("--tower-minutes", type=float, default=1.5, help="wall-clock budget of stage 1")
    ap.add_argument("--cluster", type=float, default=3.0,
                    help="weight of stage 1's cluster loss (tower.ClusterLoss: the first code names a cell's content)")
    ap.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                    help="stage 1: the first codebook's k-means weights every cell class alike (tower.class_balance)")
    ap.add_argument("--bs", type=int, default=12, help="understanding conversations per step")
    ap.add_argument("--gen-bs", type=int, default=12, help="generation samples per step")
    ap.add_argument("--rounds", type=int, default=3, help="extra question rounds per single-image conversation")
    # Step caps and budgets, measured on a 2-core machine under `nice` (the shipped checkpoint's run, stop 32):
    # tower 1400 steps in 59 s; then side by side, stage 1b 4000 steps in 876 s || stage 2 2280 of 2300 in
    # its 690 s budget (12 questions + 12 pictures a step, 0.28-0.30 s) + the second pass 2208 of 2800 in
    # its 420 s budget, the guidance pass 1500 in 390 s and the second guidance pass 800 in 199 s (4 + 12 a
    # step: 0.19 s / 0.25 s; an earlier pass measured the same held-out colour per step with 4 + 20 as with
    # 12 + 12): saved after 1770 s (29.5 min). The minute budgets (1.5 + 11.5 + 7 + 6.5 + 3.5) stop the
    # stages earlier on a busier machine: they total 30 min, plus ~1 min of setup and saving (fewer steps there).
    ap.add_argument("--decoder-steps", type=int, default=4000)
    ap.add_argument("--perceptual", type=float, default=0.5,
                    help="weight of stage 1b's tower-feature (perceptual) loss")
    ap.add_argument("--decoder-minutes", type=float, default=20, help="wall-clock budget of stage 1b")
    ap.add_argument("--llm-steps", type=int, default=2300)
    ap.add_argument("--llm-minutes", type=float, default=11.5, help="wall-clock budget of stage 2")
    ap.add_argument("--lr", type=float, default=LLM_LR)
    for prefix, (what, steps, minutes, lr, bs, gen_bs) in PASS_DEFAULTS.items():    # --finish-*, --guide-*, ...
        flag = "--" + prefix.replace("_", "-")
        ap.add_argument(flag + "steps", type=int, default=steps, help=f"{what} (0: none)")
        ap.add_argument(flag + "minutes", type=float, default=minutes, help=f"wall-clock budget of {what}")
        ap.add_argument(flag + "lr", type=float, default=lr)
        ap.add_argument(flag + "bs", type=int, default=bs, help=f"{what}: understanding conversations per step")
        ap.add_argument(flag + "gen-bs", type=int, default=gen_bs, help=f"{what}: generation samples per step")
    ap.add_argument("--guided", type=float, default=1.0,
                    help="guidance pass: weight of the codes' loss under cfg-3 guided logits (gen_loss)")
    ap.add_argument("--checkpoint", help="--part import: the saved checkpoint to read")
    ap.add_argument("--resume", action="store_true", help="--part llm: continue from the work dir's llm.pt")
    ap.add_argument("--attention", type=float, default=1.0, help="weight of the attention supervision")
    ap.add_argument("--work", default="build/vila-u-stages", help="each stage's weights (tower.pt, decoder.pt, llm.pt)")
    ap.add_argument("--part", default="all",
                    choices=["all", "tower", "decoder", "llm", "finish", "guide", "save", "import"])
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.start = time.time()
    os.makedirs(args.work, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.part == "all":
        part_all(args, [a for a in argv if a not in ("--part", "all")])
    else:
        globals()["part_" + args.part](args)


if __name__ == "__main__":
    main()
