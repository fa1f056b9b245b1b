"""What vila-u-tiny-shapes is asked to draw: prompt specs, the scenes that answer them, held-out prompts.

Two kinds of prompt, each a scene of trainers/tiny_shapes/scenes.py built to match it exactly:
  single   "a red circle at the top left" ("in the center"): one object in that cell
  count    "three blue stars": that many of them in random cells
Held-out prompts are whole combinations (colour, shape, cell) and (count, colour, shape) that no
training sample uses (HELDOUT_EVERY: one in eight, by a fixed hash), so the evaluation asks for
pictures the model never saw asked for; every colour, shape, cell and count alone is seen.
"""
import hashlib
import random
from dataclasses import dataclass

from trainers.tiny_shapes import scenes

COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
HELDOUT_EVERY = 8
CELLS = sorted(scenes.CELL_NAMES)


@dataclass(frozen=True)
class Spec:
    kind: str            # "single" | "count"
    color: str
    shape: str
    cell: tuple = None   # single
    n: int = 1           # count

    @property
    def text(self) -> str:
        if self.kind == "count":
            return f"{COUNT_WORDS[self.n]} {self.color} {scenes.plural(self.shape, self.n)}"
        where = "in the" if self.cell == (1, 1) else "at the"
        return f"{scenes.article(self.color)} {self.color} {self.shape} {where} {scenes.CELL_NAMES[self.cell]}"

    @property
    def heldout(self) -> bool:
        key = f"{self.kind}|{self.color}|{self.shape}|{self.cell}|{self.n}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % HELDOUT_EVERY == 0


def all_specs() -> list:
    single = [Spec("single", c, s, cell) for c in scenes.COLORS for s in scenes.SHAPES for cell in CELLS]
    count = [Spec("count", c, s, n=n) for c in scenes.COLORS for s in scenes.SHAPES for n in COUNT_WORDS]
    return single + count


def specs(heldout: bool) -> list:
    return [s for s in all_specs() if s.heldout == heldout]


def scene_for(spec: Spec, rng: random.Random) -> scenes.Scene:
    if spec.kind == "single":
        return scenes._scene(rng, [(spec.shape, spec.color)], [spec.cell])
    return scenes._scene(rng, [(spec.shape, spec.color)] * spec.n)


def train_spec(rng: random.Random, pool: list) -> Spec:
    """A training prompt: single prompts twice as often as count prompts (there are 3x as many)."""
    return rng.choice(pool)
