"""What training vila-tiny-shapes supervises besides next-token loss, all dropped after training.

VILA starts from a pretrained SigLIP and a pretrained LLM; here both start random, so stage 0
stands in for their pretraining with two teachers that read the generated scene's labels:
  VisionHeads     probes on the tower's hidden_states[-2] (the features VILA reads): each grid
                  cell's shape, colour and name, and per-shape counts.
  SymbolicScenes  image tokens written from the labels, for the LLM to learn the questions on
                  before any projector exists; stage 1 then fits the projector to them.
trainers/tiny_shapes/attention_targets.py is the third: where four attention heads should look.
"""
import torch
from torch import nn

from trainers.tiny_shapes import scenes

N_CELLS = scenes.GRID * scenes.GRID
SHAPE_IDS = {s: i + 1 for i, s in enumerate(scenes.SHAPES)}          # 0 = empty cell
COLOR_IDS = {c: i + 1 for i, c in enumerate(scenes.COLORS)}
COUNT_CLASSES = N_CELLS + 1


def vision_labels(scene) -> tuple:
    """-> (shape id per cell, colour id per cell, count per shape); cells row-major."""
    shape = torch.zeros(N_CELLS, dtype=torch.long)
    color = torch.zeros(N_CELLS, dtype=torch.long)
    for o in scene.objects:
        k = o.cell[0] * scenes.GRID + o.cell[1]
        shape[k], color[k] = SHAPE_IDS[o.shape], COLOR_IDS[o.color]
    counts = torch.tensor([scene.count(s) for s in scenes.SHAPES])
    return shape, color, counts


def stacked_labels(scene_list: list) -> tuple:
    """vision_labels of each scene, stacked: ((N, cells), (N, cells), (N, shapes))."""
    labels = [vision_labels(sc) for sc in scene_list]
    return tuple(torch.stack([lab[k] for lab in labels]) for k in range(3))


class VisionHeads(nn.Module):
    """The patches of each grid cell are averaged and one shared linear head names the cell's
    shape, colour and position, so every patch token learns to describe its own neighbourhood;
    per-shape counts come from the mean patch."""

    def __init__(self, c: int, image_size: int, patch: int):
        super().__init__()
        self.shape = nn.Linear(c, len(scenes.SHAPES) + 1)
        self.color = nn.Linear(c, len(scenes.COLORS) + 1)
        self.count = nn.Linear(c, len(scenes.SHAPES) * COUNT_CLASSES)
        self.cell = nn.Linear(c, N_CELLS)
        g = image_size // patch
        centre = (torch.arange(g) + 0.5) * patch * scenes.GRID // image_size    # cell of each patch row/col
        cell = (centre[:, None] * scenes.GRID + centre[None, :]).flatten()      # (g*g,) row-major patches
        pool = nn.functional.one_hot(cell.long(), N_CELLS).T.float()            # (cells, patches)
        self.register_buffer("pool", pool / pool.sum(1, keepdim=True), persistent=False)

    def logits(self, tokens: torch.Tensor) -> tuple:
        cells = self.pool @ tokens.float()                                      # (B, cells, C)
        return (self.shape(cells), self.color(cells), self.count(tokens.float().mean(1)).view(-1, COUNT_CLASSES),
                self.cell(cells))

    def loss(self, tokens, shape, color, counts) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        s, c, n, where = self.logits(tokens)
        cell_ids = torch.arange(N_CELLS).repeat(len(tokens))
        return (ce(s.flatten(0, 1), shape.flatten()) + ce(c.flatten(0, 1), color.flatten())
                + ce(n, counts.flatten()) + 0.5 * ce(where.flatten(0, 1), cell_ids))

    @torch.no_grad()
    def accuracy(self, tokens, shape, color, counts) -> dict:
        s, c, n, _ = self.logits(tokens)
        return {"shape": (s.argmax(-1) == shape).float().mean().item(),
                "color": (c.argmax(-1) == color).float().mean().item(),
                "count": (n.argmax(-1) == counts.flatten()).float().mean().item()}


class SymbolicScenes(nn.Module):
    """Image tokens from the scene labels: the token of each grid cell is S[shape] + C[colour] +
    P[cell] (an empty cell: S[0] + C[0] + P[cell]), learned vectors, in the projector's token
    order. (Learned vectors, not the LLM's word embeddings: with those, reading a colour out of a
    token trained ~10x slower.)"""

    def __init__(self, hidden: int, cells: torch.Tensor, init_std: float = 0.02):
        super().__init__()
        self.shape = nn.Embedding(len(scenes.SHAPES) + 1, hidden)
        self.color = nn.Embedding(len(scenes.COLORS) + 1, hidden)
        self.cell = nn.Embedding(N_CELLS, hidden)
        for e in (self.shape, self.color, self.cell):
            nn.init.normal_(e.weight, std=init_std)
        self.register_buffer("token_cells", cells, persistent=False)

    def forward(self, scene_list: list) -> torch.Tensor:
        """[N scenes] -> [N, T_img, H] image tokens."""
        shape, color, _ = stacked_labels(scene_list)
        return (self.shape(shape[:, self.token_cells]) + self.color(color[:, self.token_cells])
                + self.cell(self.token_cells))


def token_cells(model) -> torch.Tensor:
    """(T_img,) the scene cell (row-major index) each image token covers, read off the
    projector's own DownSample applied to a map of patch -> cell (column-major for VILA1.5)."""
    cfg = model.tower.config
    g = cfg.image_size // cfg.patch_size
    centre = ((torch.arange(g) + 0.5) * cfg.patch_size * scenes.GRID // cfg.image_size).long()
    ids = (centre[:, None] * scenes.GRID + centre[None, :]).float().reshape(1, g * g, 1)
    merged = model.projector.layers[0](ids)                                    # (1, T_img, m*m)
    if not torch.equal(merged[0], merged[0, :, :1].expand_as(merged[0])):
        raise ValueError("image tokens do not align with scene cells; pick image_size/patch_size so they do")
    return merged[0, :, 0].long()
