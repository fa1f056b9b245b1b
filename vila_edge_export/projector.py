"""The mm_projector in torch, exactly as VILA builds it
(NVlabs/VILA@1c88211:llava/model/multimodal_projector/base_projector.py).

The module list mirrors VILA's `nn.Sequential` indices so `layers.<i>.*` keys load unchanged.
"""
from torch import nn

from vila_edge.families import COLUMN_MAJOR


class DownSample(nn.Module):
    """Merge m x m neighbouring patches into one token: [N, S*S, C] -> [N, S2*S2, m*m*C].

    Zero rows are padded at the bottom and zero columns at the right until S is a multiple of m.
    Channel order is (dy, dx, c). `order` picks the token order of the merged (S2, S2) grid.
    """

    def __init__(self, merge: int, order: str):
        super().__init__()
        self.merge, self.order = merge, order

    def forward(self, x):
        n, t, c = x.shape
        s = int(round(t ** 0.5))
        m = self.merge
        x = x.reshape(n, s, s, c)                                   # (N, row, col, C)
        pad = (-s) % m
        x = nn.functional.pad(x, (0, 0, 0, pad, 0, pad))            # zero rows bottom, cols right
        s2 = (s + pad) // m
        x = x.reshape(n, s2, m, s2, m, c)                           # (N, i, dy, j, dx, C)
        if self.order == COLUMN_MAJOR:
            x = x.permute(0, 3, 1, 2, 4, 5)                         # (N, j, i, dy, dx, C)
        else:
            x = x.permute(0, 1, 3, 2, 4, 5)                         # (N, i, j, dy, dx, C)
        return x.reshape(n, s2 * s2, m * m * c)


def build_projector(kind: str, mm: int, hidden: int, order: str) -> nn.Module:
    """An nn.Module whose state-dict keys equal those of the checkpoint's mm_projector."""
    ln = lambda d: nn.LayerNorm(d, eps=1e-5)  # nn.LayerNorm default eps, as in VILA
    if kind == "linear":
        seq = nn.Linear(mm, hidden)
    elif kind == "mlp2x_gelu":
        seq = nn.Sequential(nn.Linear(mm, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    elif kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        seq = nn.Sequential(DownSample(2, order), ln(4 * mm), nn.Linear(4 * mm, hidden), nn.GELU(),
                            nn.Linear(hidden, hidden))
    elif kind == "mlp_downsample_3x3_fix":
        seq = nn.Sequential(DownSample(3, order), ln(9 * mm), nn.Linear(9 * mm, 3 * mm), nn.GELU(),
                            ln(3 * mm), nn.Linear(3 * mm, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    else:
        raise ValueError(f"unknown projector type {kind!r}")
    return Projector(seq)


class Projector(nn.Module):
    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)
