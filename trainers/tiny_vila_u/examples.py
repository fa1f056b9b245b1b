"""examples/ of vila-u-tiny-shapes: pictures the saved checkpoint drew (torch reference, seeded) and
scenes it was asked about, with a README listing prompts, questions and what came back."""
import os

import torch

from trainers.tiny_shapes import scenes

DRAW = ("a red circle at the top left", "a blue square in the center", "two green triangles",
        "a yellow star at the bottom right")
EXAMPLES_SEED = 2024          # scenes asked about: not a training seed
ASK = (0, 1, 3, 4)            # color, count, where, shape questions


def write_examples(root: str, seed: int = 0) -> None:
    from trainers.tiny_vila_u.evaluate import reference_answer
    from vila_edge_export.checkpoint_vila_u import read_vila_u
    from vila_edge_export.reference_vila_u import VilaUReference

    ref = VilaUReference(read_vila_u(root))
    folder = os.path.join(root, "examples")
    os.makedirs(folder, exist_ok=True)
    lines = ["# vila-u-tiny-shapes examples", "",
             f"Drawn by this checkpoint through the torch reference (cfg_scale 3, temperature 1, seed {seed}):", "",
             "| prompt | picture |", "|---|---|"]
    for i, prompt in enumerate(DRAW):
        codes = ref.generate_codes(prompt, cfg=3.0, generator=torch.Generator().manual_seed(seed + i))
        name = "draw_" + prompt.replace(" ", "_") + ".png"
        from PIL import Image
        Image.fromarray(ref.decode(codes)[0]).save(os.path.join(folder, name))
        lines.append(f"| {prompt} | ![]({name}) |")
    lines += ["", f"Scenes from `trainers/tiny_shapes/scenes.py` (seed {EXAMPLES_SEED}), asked with the image "
              "(greedy, torch reference):", "", "| image | question | expected | answer |", "|---|---|---|---|"]
    for i in ASK:
        s = scenes.make_sample(EXAMPLES_SEED, i)
        (q, a), = s.turns
        img = scenes.render(s.scenes[0])
        name = f"ask_{s.category}.png"
        img.save(os.path.join(folder, name))
        got = reference_answer(ref, [img], q)
        lines.append(f"| {name} | {q.replace('<image>', '').strip()} | {a} | {got} |")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
