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


# The 3x3 projectors for S2 features (NVlabs/VILA@b760c34:llava/model/multimodal_projector/base_projector.py):
# the widths after DS3x3 as functions of mm_hidden_size, each step LayerNorm -> Linear -> GELU, then
# a plain Linear(H, H).
S2_WIDTHS = {
    "mlp_downsample_3x3_s2": (lambda m: 9 * m, lambda m: 3 * m, lambda m: m, lambda m: m // 3),
    "mlp_downsample_3x3_s2_new": (lambda m: 9 * m, lambda m: 4 * m, lambda m: 2 * m, lambda m: m, lambda m: m // 3),
}


def _ln_mlp(widths: list, ln) -> list:
    """LN(w0), Lin(w0, w1), GELU, LN(w1), Lin(w1, w2), GELU, ..., Lin(w_{n-1}, H), GELU, Lin(H, H):
    the layer list after the DownSample block, so indices match VILA's nn.Sequential."""
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [ln(a), nn.Linear(a, b), nn.GELU()]
    return mods + [nn.Linear(widths[-1], widths[-1])]


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
    elif kind in S2_WIDTHS:
        seq = nn.Sequential(DownSample(3, order), *_ln_mlp([w(mm) for w in S2_WIDTHS[kind]] + [hidden], ln))
    else:
        raise ValueError(f"unknown projector type {kind!r}")
    return Projector(seq)


class Projector(nn.Module):
    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)
