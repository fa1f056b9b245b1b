"""Procedural shape scenes and the questions asked about them: the data of vila-tiny-shapes.

A scene is a background and up to nine objects, one per cell of a 3x3 grid. Every sample is
drawn from its own `random.Random(seed, index)`, so item i of a set is the same whatever the set
size, and a slice of the held-out set equals the start of the full one.

    python -m trainers.tiny_shapes.scenes OUT_DIR --seed 7 -n 8     # PNGs + questions.json (+ prompts.txt: a --calib-dir)

Samples carry raw user messages with "<image>\\n" placeholders (VILA1.5's convention,
NVlabs/VILA@1c88211:llava/mm_utils.py tokenizer_image_token); the chat template is applied by whoever runs
the model.
"""
import argparse
import json
import math
import os
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
          "yellow": (240, 210, 30), "purple": (140, 60, 190), "orange": (245, 135, 25)}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (175, 175, 175), "black": (20, 20, 20)}
GRID = 3                      # 3x3 cells, at most one object per cell
RENDER_SIZE = 128             # pixels; the model's preprocessing resizes to its own image_size
MAX_COUNT = 4                 # counting answers are 1..MAX_COUNT
# Names of the nine cells; only the four edge-middle ones answer "Where is ...?".
CELL_NAMES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
              (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
WHERE_CELLS = {(0, 1): "top", (1, 0): "left", (1, 2): "right", (2, 1): "bottom"}
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
SINGLE = ("color", "count", "exists", "where", "shape")
MULTI = ("compare",)
FEWSHOT = ("fewshot_count", "fewshot_color")
CATEGORIES = SINGLE + MULTI + FEWSHOT


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: tuple          # (row, col)
    radius: float        # in units of the cell size
    offset: tuple        # (dx, dy) jitter, in units of the cell size
    tint: tuple          # small per-object RGB jitter; the colour name never changes


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)


@dataclass
class Sample:
    """One conversation: turns of (user message, answer); images in placeholder order."""
    category: str
    scenes: list
    turns: list = field(default_factory=list)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _obj(rng: random.Random, shape: str, color: str, cell: tuple) -> Obj:
    r = rng.uniform(0.30, 0.38)
    slack = 0.5 - 1.1 * r - 0.02      # stars and triangles reach 1.1 r from the centre
    return Obj(shape, color, cell, r, (rng.uniform(-slack, slack), rng.uniform(-slack, slack)),
               tuple(rng.randint(-12, 12) for _ in range(3)))


def _scene(rng: random.Random, specs: list, cells: list | None = None) -> Scene:
    """specs: [(shape, color)]; cells: fixed cells for the first len(cells) specs, rest random."""
    cells = list(cells or [])
    free = [c for c in CELL_NAMES if c not in cells]
    rng.shuffle(free)
    cells += free[: len(specs) - len(cells)]
    objs = tuple(_obj(rng, s, c, cell) for (s, c), cell in zip(specs, cells))
    return Scene(rng.choice(sorted(BACKGROUNDS)), objs)


def _others(rng, exclude_shape=None, k=0, exclude_colors=()):
    shapes = [s for s in SHAPES if s != exclude_shape]
    colors = [c for c in COLORS if c not in exclude_colors]
    return [(rng.choice(shapes), rng.choice(colors)) for _ in range(k)]


def _color_scene(rng, shape: str, color: str) -> Scene:
    """Exactly one `shape` (coloured `color`) and 0..3 objects of other shapes."""
    return _scene(rng, [(shape, color)] + _others(rng, shape, rng.randint(0, 3)))


def _count_scene(rng, shape: str, n: int) -> Scene:
    specs = [(shape, rng.choice(list(COLORS))) for _ in range(n)]
    return _scene(rng, specs + _others(rng, shape, rng.randint(0, min(2, GRID * GRID - n))))


def q_color(rng):
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    return Sample("color", [_color_scene(rng, shape, color)], [(f"What color is the {shape}?", color)])


def q_count(rng):
    shape, n = rng.choice(SHAPES), rng.randint(1, MAX_COUNT)
    return Sample("count", [_count_scene(rng, shape, n)], [(f"How many {shape}s are there?", str(n))])


def q_exists(rng):
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    specs = [] if rng.random() < 0.5 else [(shape, color)]
    # Hard negatives: the same shape in another colour, or the same colour on another shape.
    while len(specs) < rng.randint(1, 4):
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        if (s, c) != (shape, color):
            specs.append((s, c))
    rng.shuffle(specs)
    answer = "yes" if (shape, color) in specs else "no"
    return Sample("exists", [_scene(rng, specs)], [(f"Is there {article(color)} {color} {shape}?", answer)])


def q_where(rng):
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    cells = rng.sample(sorted(WHERE_CELLS), 1) + rng.sample([c for c in CELL_NAMES], len(shapes) - 1)
    while len(set(cells)) < len(cells):
        cells[1:] = rng.sample([c for c in CELL_NAMES if c != cells[0]], len(shapes) - 1)
    scene = _scene(rng, [(s, rng.choice(list(COLORS))) for s in shapes], cells)
    return Sample("where", [scene], [(f"Where is the {shapes[0]}?", WHERE_CELLS[cells[0]])])


def q_shape(rng):
    colors = rng.sample(list(COLORS), rng.randint(1, 4))
    scene = _scene(rng, [(rng.choice(SHAPES), c) for c in colors])
    target = scene.objects[0]
    return Sample("shape", [scene], [(f"What shape is the {target.color} object?", target.shape)])


def q_compare(rng):
    shape = rng.choice(SHAPES)
    a, b = rng.sample(range(0, MAX_COUNT + 1), 2)
    scenes = [_count_scene(rng, shape, a) if a else _scene(rng, _others(rng, shape, rng.randint(1, 3))),
              _count_scene(rng, shape, b) if b else _scene(rng, _others(rng, shape, rng.randint(1, 3)))]
    q = f"<image>\n<image>\nWhich image has more {shape}s? Answer first or second."
    return Sample("compare", scenes, [(q, "first" if a > b else "second")])


def q_fewshot_count(rng):
    shape = rng.choice(SHAPES)
    counts = [rng.randint(1, MAX_COUNT) for _ in range(3)]
    text = "".join(f"<image>\nThis has {n} {plural(shape, n)}. " for n in counts[:2])
    text += f"<image>\nHow many {shape}s does this have?"
    return Sample("fewshot_count", [_count_scene(rng, shape, n) for n in counts], [(text, str(counts[2]))])


def q_fewshot_color(rng):
    shape = rng.choice(SHAPES)
    colors = [rng.choice(list(COLORS)) for _ in range(3)]
    text = "".join(f"<image>\nThe {shape} is {c}. " for c in colors[:2])
    text += f"<image>\nWhat color is the {shape}?"
    return Sample("fewshot_color", [_color_scene(rng, shape, c) for c in colors], [(text, colors[2])])


MAKERS = {"color": q_color, "count": q_count, "exists": q_exists, "where": q_where, "shape": q_shape,
          "compare": q_compare, "fewshot_count": q_fewshot_count, "fewshot_color": q_fewshot_color}


def sample_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def make_sample(seed: int, index: int, categories=CATEGORIES, multi_turn: float = 0.0,
                extra_rounds: int = 0) -> Sample:
    """Item `index` of the set `seed`: categories cycle so any prefix of a set is balanced.

    With probability `multi_turn` a single-image sample gets a second question about its image,
    asked in a second round (training only: "... ASSISTANT: a1</s>USER: q2 ASSISTANT:").
    `extra_rounds` more rounds (training only) ask `any_question`s about the same image: one
    forward pass then carries several supervised answers instead of one.
    """
    rng = sample_rng(seed, index)
    cat = categories[index % len(categories)]
    s = MAKERS[cat](rng)
    if cat in SINGLE:
        s.turns[0] = ("<image>\n" + s.turns[0][0], s.turns[0][1])
        if rng.random() < multi_turn:
            s.turns.append(second_question(rng, s.scenes[0]))
        for _ in range(extra_rounds):
            s.turns.append(any_question(rng, s.scenes[0]))
    return s


def any_question(rng, scene: Scene) -> tuple:
    """A random question of any single-image category that has one right answer for `scene`."""
    options = []
    for o in scene.objects:
        if scene.count(o.shape) == 1:
            options.append((f"What color is the {o.shape}?", o.color))
            if o.cell in WHERE_CELLS:
                options.append((f"Where is the {o.shape}?", WHERE_CELLS[o.cell]))
        if sum(p.color == o.color for p in scene.objects) == 1:
            options.append((f"What shape is the {o.color} object?", o.shape))
    for shape in SHAPES:
        if 1 <= scene.count(shape) <= MAX_COUNT:
            options.append((f"How many {shape}s are there?", str(scene.count(shape))))
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    present = any(o.shape == shape and o.color == color for o in scene.objects)
    options.append((f"Is there {article(color)} {color} {shape}?", "yes" if present else "no"))
    return rng.choice(options)


def second_question(rng, scene: Scene) -> tuple:
    shape = rng.choice(SHAPES)
    n = scene.count(shape)
    if n == 1 and rng.random() < 0.5:
        return f"What color is the {shape}?", next(o.color for o in scene.objects if o.shape == shape)
    if n >= 1:
        return f"How many {shape}s are there?", str(n)
    color = rng.choice(list(COLORS))
    present = any(o.shape == shape and o.color == color for o in scene.objects)
    return f"Is there {article(color)} {color} {shape}?", "yes" if present else "no"


def describe(scene: Scene) -> str:
    """A caption listing every object in reading order (stage 1/2 text)."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    parts = [f"{article(o.color)} {o.color} {o.shape} {'in the' if o.cell == (1, 1) else 'at the'} {CELL_NAMES[o.cell]}"
             for o in objs]
    counts = ", ".join(f"{scene.count(s)} {plural(s, scene.count(s))}" for s in SHAPES if scene.count(s))
    return f"There is {', '.join(parts)} on a {scene.background} background. In total: {counts}."


def _polygon(shape: str, cx: float, cy: float, r: float) -> list:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    pts = []  # five-pointed star, inner radius 0.45 r
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        rr = r if k % 2 == 0 else 0.45 * r
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(scene: Scene, size: int = RENDER_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene.objects:
        cx = (o.cell[1] + 0.5 + o.offset[0]) * cell
        cy = (o.cell[0] + 0.5 + o.offset[1]) * cell
        r = o.radius * cell
        rgb = tuple(min(255, max(0, v + t)) for v, t in zip(COLORS[o.color], o.tint))
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "square":
            h = r * 0.8
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r * 1.1), fill=rgb)
    return img


def normalize_answer(text: str) -> str:
    t = text.strip().lower().rstrip(".!").strip()
    return NUMBER_WORDS.get(t, t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("-n", type=int, default=8)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, prompts = [], []
    for i in range(args.n):
        s = make_sample(args.seed, i)
        names = []
        for k, sc in enumerate(s.scenes):
            names.append(f"{i:04d}_{k}.png")
            render(sc).save(os.path.join(args.out, names[-1]))
            prompts.append(s.turns[0][0].rsplit("\n", 1)[-1])
        rows.append({"category": s.category, "images": names, "turns": s.turns})
    with open(os.path.join(args.out, "questions.json"), "w") as f:
        json.dump(rows, f, indent=1)
    # One question per image, in file-name order: the folder is a `vila-edge export --calib-dir`.
    with open(os.path.join(args.out, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")


if __name__ == "__main__":
    main()
