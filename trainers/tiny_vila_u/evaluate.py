"""Held-out evaluation of a VILA-U model: a checkpoint (through the torch reference) or any engine.

    python -m trainers.tiny_vila_u.evaluate ENGINE_OR_CHECKPOINT [-n 300] [--samples 40] [--out r.json]
    make evaluate-vila-u OUT=ENGINE_OR_CHECKPOINT

- understanding: trainers/tiny_shapes/evaluate.py's held-out questions (seed 1000: one and two
  images, few-shot), greedy, exact match;
- reconstruction: PSNR of tower + decoder (codes -> pixels) against the model-size input, on
  held-out scenes (seed 1000);
- generation faithfulness on held-out prompts (trainers/tiny_vila_u/prompts.py: combinations never
  asked for in training) at cfg_scale 3 and 1, judged by nothing of the model being judged:
  colour and position from the pixels (palette masks), shape and count by the bundled
  VILA1.5-architecture model (vila_edge's Pipeline()) asked about the picture. The same judges
  on the real scenes for those prompts give each attribute's ceiling ("judge on real scenes").
"""
import argparse
import os
import random
import sys
import time

import numpy as np

from trainers.tiny_shapes import scenes
from trainers.tiny_shapes.evaluate import EVAL_SEED, evaluate as understanding, write_report
from trainers.tiny_vila_u import prompts

PALETTE_TOLERANCE = 45        # max |channel - palette| of a pixel of that colour (tint is +-12)
MIN_PIXELS = 8                # fewer matching pixels than this: the colour is absent
CFGS = (3.0, 1.0)


# ---- backends -------------------------------------------------------------------------------------
def reference_answer(ref, images: list, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy answer of the torch reference to a user message with "<image>" placeholders in place
    (vila_edge_export/reference_vila_u.py's understanding path, interleaved images allowed)."""
    import torch
    from vila_edge_export.reference_vila_u import IMAGE_TOKEN_INDEX, tokenize, understanding_prompt

    ids = tokenize(ref.tokenizer, understanding_prompt(prompt, 0))
    embed = ref.llm.get_input_embeddings()
    with torch.no_grad():
        feats = iter(ref.projector(ref.encode(ref.pixels(im))[1].flatten(1, 2))[0] for im in images)
        x = torch.cat([next(feats) if t == IMAGE_TOKEN_INDEX else embed(torch.tensor([t])) for t in ids])[None]
        out, reply = ref.llm(inputs_embeds=x, use_cache=True), []
        for _ in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            if tok in ref.spec.llm.eos_ids:
                break
            reply.append(tok)
            out = ref.llm(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return ref.tokenizer.decode(reply).strip()


class ReferenceBackend:
    def __init__(self, checkpoint: str):
        from vila_edge_export.checkpoint_vila_u import read_vila_u
        from vila_edge_export.reference_vila_u import VilaUReference

        self.ref = VilaUReference(read_vila_u(checkpoint))
        self.name = f"torch reference ({checkpoint})"

    def answer(self, images, prompt):
        return reference_answer(self.ref, images, prompt)

    def reconstruct(self, image) -> np.ndarray:
        return self.ref.decode(self.ref.encode(self.ref.pixels(image))[0])[0]

    def draw(self, prompt, cfg, seed) -> np.ndarray:
        import torch
        codes = self.ref.generate_codes(prompt, cfg=cfg, generator=torch.Generator().manual_seed(seed))
        return self.ref.decode(codes)[0]


class EngineBackend:
    def __init__(self, engine_dir: str, threads: int | None = None):
        import onnxruntime as ort
        from vila_edge.pipeline import Pipeline

        self.pipe = Pipeline(engine_dir, threads=threads, progress=False)
        vision = os.path.join(engine_dir, self.pipe.manifest.files["vision"])
        self.vision = ort.InferenceSession(vision, providers=["CPUExecutionProvider"])
        self.name = f"engine {engine_dir} ({self.pipe.manifest.dtype})"

    def answer(self, images, prompt):
        return self.pipe.chat(images, prompt, max_new_tokens=8, temperature=0).strip()

    def reconstruct(self, image) -> np.ndarray:
        """vision.onnx's codes output -> decoder.onnx (the runtime's own decode)."""
        x = model_input(image, self.pipe.manifest.generation)
        dtype = np.float16 if self.vision.get_inputs()[0].type == "tensor(float16)" else np.float32
        codes = self.vision.run(["codes"], {"pixel_values": x[None].astype(dtype)})[0]
        g = self.pipe.manifest.generation["grid"]
        return self.pipe.imager.decode(codes.reshape(1, g, g, -1))[0]

    def draw(self, prompt, cfg, seed) -> np.ndarray:
        return np.asarray(self.pipe.generate_image(prompt, cfg_scale=cfg, seed=seed)[0])


def model_input(image, gen: dict) -> np.ndarray:
    """CHW float32 in [-1, 1]: the runtime's VILA-U preprocessing (resize, mean = std = 0.5)."""
    from vila_edge.families import RESIZE
    from vila_edge.preprocess import PixelSpec, normalize
    return normalize(image.convert("RGB"), PixelSpec(size=gen["image_size"], mean=(0.5,) * 3, std=(0.5,) * 3, mode=RESIZE))


# ---- reconstruction ---------------------------------------------------------------------------------
def reconstruction(backend, n: int, size: int, seed: int = EVAL_SEED) -> dict:
    psnrs = []
    for i in range(n):
        img = scenes.render(scenes.make_sample(seed, i).scenes[0])
        target = np.round((model_input(img, {"image_size": size}).transpose(1, 2, 0) + 1) * 127.5)
        mse = float(((backend.reconstruct(img).astype(np.float64) - target) ** 2).mean())
        psnrs.append(10 * np.log10(255 ** 2 / max(mse, 1e-10)))
    return {"n": n, "psnr_db": float(np.mean(psnrs)), "psnr_min_db": float(np.min(psnrs))}


# ---- generation faithfulness ------------------------------------------------------------------------
def color_masks(pixels: np.ndarray) -> dict:
    p = pixels.astype(int)
    return {c: (np.abs(p - np.array(rgb)).max(-1) <= PALETTE_TOLERANCE) for c, rgb in scenes.COLORS.items()}


def judge(pixels: np.ndarray, spec, ask) -> dict:
    """{attribute: correct} for one picture: colour (the asked colour is the dominant palette colour),
    position (its mask's centroid in the asked cell), shape / count (the judge model's answer)."""
    masks = color_masks(pixels)
    sizes = {c: int(m.sum()) for c, m in masks.items()}
    dominant = max(sizes, key=sizes.get)
    out = {"color": dominant == spec.color and sizes[spec.color] >= MIN_PIXELS}
    img = _image(pixels)
    if spec.kind == "single":
        ys, xs = np.nonzero(masks[spec.color])
        side = pixels.shape[0] / scenes.GRID
        out["position"] = bool(len(ys) >= MIN_PIXELS and (int(ys.mean() // side), int(xs.mean() // side)) == spec.cell)
        out["shape"] = scenes.normalize_answer(ask([img], f"<image>\nWhat shape is the {spec.color} object?")) == spec.shape
    else:
        out["count"] = scenes.normalize_answer(ask([img], f"<image>\nHow many {spec.shape}s are there?")) == str(spec.n)
    return out


def _image(pixels):
    from PIL import Image
    return Image.fromarray(pixels)


def faithfulness(draw, ask, samples: int, size: int, cfgs=CFGS, limit: int | None = None) -> dict:
    """Per cfg (and for the real scenes: "judge on real scenes"), per attribute: correct / total,
    over the first `limit` held-out prompts (all by default)."""
    specs = prompts.specs(heldout=True)[:limit]
    tallies = {}
    for cfg in (*cfgs, "real"):
        per = {}
        for i, spec in enumerate(specs):
            for k in range(samples):
                seed = 1000 * k + i
                if cfg == "real":
                    img = prompts.scene_for(spec, random.Random(seed))
                    pixels = np.asarray(scenes.render(img).resize((size, size), 3))    # PIL bicubic
                else:
                    pixels = draw(spec.text, cfg, seed)
                for attr, ok in judge(pixels, spec, ask).items():
                    per.setdefault(attr, [0, 0])
                    per[attr][0] += ok
                    per[attr][1] += 1
        name = "judge on real scenes" if cfg == "real" else f"cfg {cfg:g}"
        tallies[name] = {a: {"correct": k, "total": t, "accuracy": k / t} for a, (k, t) in sorted(per.items())}
    return tallies


def judge_model(threads: int | None):
    """The bundled VILA1.5-architecture model (vila_edge/bundled/), greedy."""
    from vila_edge.pipeline import Pipeline
    pipe = Pipeline(threads=threads, progress=False)
    return lambda images, prompt: pipe.chat(images, prompt, max_new_tokens=8, temperature=0).strip()


def run(target: str, n: int = 300, recon_n: int = 100, samples: int = 40, threads: int | None = 2,
        parts=("understanding", "reconstruction", "generation")) -> dict:
    backend = (EngineBackend(target, threads) if os.path.isfile(os.path.join(target, "manifest.json"))
               else ReferenceBackend(target))
    size = _image_size(backend)
    report = {"model": backend.name, "image_size": size}
    t0 = time.time()
    if "understanding" in parts:
        u = understanding(backend.answer, n=n)
        report["understanding"] = {k: u[k] for k in ("n", "overall", "groups", "categories")}
    if "reconstruction" in parts:
        report["reconstruction"] = reconstruction(backend, recon_n, size)
    if "generation" in parts:
        report["generation"] = {"prompts": len(prompts.specs(heldout=True)), "samples_per_prompt": samples,
                                "faithfulness": faithfulness(backend.draw, judge_model(threads), samples, size)}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _image_size(backend) -> int:
    if isinstance(backend, EngineBackend):
        return backend.pipe.manifest.generation["image_size"]
    return backend.ref.spec.siglip.image_size


def summary(report: dict) -> str:
    lines = [report["model"]]
    if "understanding" in report:
        u = report["understanding"]
        lines.append(f"understanding {u['overall']:.3f} (n={u['n']}): " +
                     " ".join(f"{k} {v['accuracy']:.2f}" for k, v in u["categories"].items()))
    if "reconstruction" in report:
        r = report["reconstruction"]
        lines.append(f"reconstruction PSNR {r['psnr_db']:.2f} dB (min {r['psnr_min_db']:.2f}, n={r['n']})")
    for name, per in report.get("generation", {}).get("faithfulness", {}).items():
        lines.append(f"faithfulness {name}: " + " ".join(f"{a} {v['accuracy']:.2f} ({v['correct']}/{v['total']})"
                                                         for a, v in per.items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", help="a VILA-U engine directory (any dtype) or checkpoint (torch reference)")
    ap.add_argument("-n", type=int, default=300, help="held-out understanding questions")
    ap.add_argument("--recon-n", type=int, default=100, help="held-out scenes for PSNR")
    ap.add_argument("--samples", type=int, default=40,
                    help="pictures per held-out prompt and cfg (40: 1,320 pictures per cfg, a standard error of ~1.1 "
                         "points at 0.8; 10 gave ~2, too wide for a floor: two engines 1 point apart swapped order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["understanding", "reconstruction", "generation"], action="append")
    ap.add_argument("--out", help="write the JSON report here (default: stdout)")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.target, "manifest.json")):
        import torch
        torch.set_num_threads(args.threads)
    report = run(args.target, args.n, args.recon_n, args.samples, args.threads,
                 tuple(args.only or ("understanding", "reconstruction", "generation")))
    write_report(report, args.out)
    print(summary(report), file=sys.stderr)


if __name__ == "__main__":
    main()
