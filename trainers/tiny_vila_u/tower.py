"""Stage 1 of trainers/tiny_vila_u/train.py: what trains the tower (SigLIP + residual quantizer) and,
beside stage 2, the pixel decoder; and the PSNR probe that ends stage 1b."""
import torch
import torch.nn.functional as F

from trainers.tiny_shapes import scenes
from trainers.tiny_shapes.teachers import stacked_labels
from trainers.tiny_shapes.train import PROBE_SEED
from trainers.tiny_vila_u.model import K

COMMIT = 0.25                 # latent_loss_weight (vila-u.md §1.6)
CONTRASTIVE = 0.1
# Extra weight on naming the shape of each occupied cell: the VisionHeads' shape loss is mostly
# empty cells (2 of 3), and a tower that tells a blob from a star only 82 % of the time (measured,
# 500 steps without it) caps both the answers about shapes and the shapes the decoder can draw.
SHAPE_WEIGHT = 2.0
CAPTION_TOKENS = 48           # the text model's positions; captions are padded/cut to this
# What a cell holds, as one class: (background, shape, colour), or (background, empty). The cluster
# loss pulls each token's features towards its class's running centre, so that the first residual
# level (128 rows, 3 * (4 * 6 + 1) = 75 classes) can name the class and the later levels only the
# jitter (offset, size, tint) and the neighbours' bleed. Without it the first level named the
# shape but merged colours (measured on the shipped checkpoint: colour 0.72 from the first code,
# 0.46 of decodes of the first level alone in the asked colour), and the colour was decided by the
# second level, whose code the depth transformer could not predict (4.2 nats of 4.85; the same
# with the colour word swapped), so a sampled picture had a random colour.
N_CLASSES = len(scenes.BACKGROUNDS) * (len(scenes.SHAPES) * len(scenes.COLORS) + 1)
CENTRE_DECAY = 0.95


def scene_pixels(model, scene_list: list) -> torch.Tensor:
    return model.pixels([scenes.render(sc) for sc in scene_list])


class GeometryProbe(torch.nn.Module):
    """Per cell: the object's offset, radius and tint (regressed) and the background (classified),
    from the quantized token of that cell (a 3x3 grid: token t is cell t)."""

    def __init__(self, c: int):
        super().__init__()
        self.geo = torch.nn.Linear(c, 6)
        self.bg = torch.nn.Linear(c, len(scenes.BACKGROUNDS))

    def loss(self, z, geo, present, bg):
        err = ((self.geo(z) - geo) ** 2).mean(-1)                             # (N, T)
        return (err * present).sum() / present.sum().clamp(min=1) + F.cross_entropy(
            self.bg(z).flatten(0, 1), bg[:, None].expand(-1, z.shape[1]).flatten())


def geometry_labels(scs: list) -> tuple:
    cells = scenes.GRID * scenes.GRID
    geo, present = torch.zeros(len(scs), cells, 6), torch.zeros(len(scs), cells)
    for i, sc in enumerate(scs):
        for o in sc.objects:
            k = o.cell[0] * scenes.GRID + o.cell[1]
            geo[i, k] = torch.tensor([10 * o.offset[0], 10 * o.offset[1], 10 * (o.radius - 0.34)] +
                                     [t / 12 for t in o.tint])
            present[i, k] = 1
    bg = torch.tensor([sorted(scenes.BACKGROUNDS).index(sc.background) for sc in scs])
    return geo, present, bg


def cell_classes(labels: tuple, bg: torch.Tensor) -> torch.Tensor:
    """(N, cells) class ids (see N_CLASSES) from stacked_labels' shape and colour ids (0 = empty)."""
    shape, color = labels[0], labels[1]
    content = torch.where(shape > 0, 1 + (shape - 1) * len(scenes.COLORS) + (color - 1), torch.zeros_like(shape))
    return bg[:, None] * (len(scenes.SHAPES) * len(scenes.COLORS) + 1) + content


class ClusterLoss(torch.nn.Module):
    """Within-class spread of the tokens' features over their total spread (a centre loss against
    running class centres, EMA like the codebooks): 0 when every cell of a class looks the same."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("centres", torch.zeros(N_CLASSES, c))
        self.register_buffer("seen", torch.zeros(N_CLASSES, dtype=torch.bool))

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        x, classes = x.flatten(0, 1), classes.flatten()
        with torch.no_grad():
            for k in classes.unique().tolist():
                mean = x[classes == k].mean(0)
                if self.seen[k]:
                    mean = CENTRE_DECAY * self.centres[k] + (1 - CENTRE_DECAY) * mean
                self.centres[k] = mean
                self.seen[k] = True
            total = ((x - x.mean(0)) ** 2).sum(1).mean()
        return ((x - self.centres[classes]) ** 2).sum(1).mean() / total


def class_balance(classes: torch.Tensor) -> torch.Tensor:
    """(N,) weights, mean 1, equal in total for every class present: the first level's k-means then
    spends its rows on the 72 kinds of object, not on the empty cells (two thirds of all cells, 61 of
    the 105 first-level rows in use, measured) whose features vary with their neighbours."""
    _, inverse, counts = classes.unique(return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse].float()
    return w * len(w) / w.sum()


def tower_loss(model, heads, probe, gen: torch.Generator, cluster: float = 0.0, balance: bool = False):
    rq = model.rq
    centres = ClusterLoss(x_dim(model))

    def loss(pixels, captions, labels, geometry):
        x = rq.features(pixels)
        if not rq.quantizer.codebooks[0].cluster_size_ema.any():
            _init_codebooks(rq, x.detach(), gen)
        codes, agg, residuals = rq.quantize(x)
        classes = cell_classes(labels, geometry[2])
        w0 = class_balance(classes.flatten()) if balance else None
        for d, book in enumerate(rq.quantizer.codebooks):
            book.ema_update(residuals[d], codes[..., d].flatten(), gen, w0 if d == 0 else None)
        z = x + (agg - x).detach()                                           # straight-through
        commit = F.mse_loss(x, agg.detach())
        v = F.normalize(rq.pooled(z), dim=-1)
        t = F.normalize(rq.siglip_model.text_model(input_ids=captions).pooler_output, dim=-1)
        sm = rq.siglip_model
        logits = t @ v.T * sm.logit_scale.exp() + sm.logit_bias
        target = 2 * torch.eye(len(v)) - 1
        contrastive = -F.logsigmoid(target * logits).sum() / len(v)          # SigLIP's sigmoid loss
        shape = heads.logits(z)[0]
        occupied = labels[0] > 0
        cells = SHAPE_WEIGHT * F.cross_entropy(shape[occupied], labels[0][occupied]) if occupied.any() else 0.0
        spread = cluster * centres(x, classes) if cluster else 0.0
        return (COMMIT * commit + CONTRASTIVE * contrastive + heads.loss(z, *labels) + cells
                + probe.loss(z, *geometry) + spread)
    return loss


def x_dim(model) -> int:
    return model.rq.quantizer.codebooks[0].weight.shape[1]


@torch.no_grad()
def _init_codebooks(rq, x, gen) -> None:
    r = x.reshape(-1, x.shape[-1])
    for book in rq.quantizer.codebooks:
        book.init_from(r, gen)
        c = book.weight[:K]
        r = r - c[torch.cdist(r, c).argmin(1)]


def tower_batch(model, stream, bs):
    tok = model.tokenizer
    scs = [sc for _ in range(bs) for sc in stream.next().scenes][:bs]
    captions = torch.zeros(bs, CAPTION_TOKENS, dtype=torch.long)
    for i, sc in enumerate(scs):
        ids = tok(scenes.describe(sc)).input_ids[:CAPTION_TOKENS]
        captions[i, :len(ids)] = torch.tensor(ids)
    return scene_pixels(model, scs), captions, stacked_labels(scs), geometry_labels(scs)


def decoder_loss(model, perceptual: float = 0.0):
    """MSE + perceptual * the frozen tower's feature distance between the
    reconstruction and the input (relative to the features' power): a perceptual loss as VQGAN's
    LPIPS, from a network that knows shapes (the tower names 99.5 % of them)."""
    def loss(pixels):
        with torch.no_grad():
            x = model.rq.features(pixels)
            z = model.rq.quantize(x)[1]
        out = model.rq.decode(z)
        total = F.mse_loss(out, pixels)
        if perceptual:
            total = total + perceptual * ((model.rq.features(out) - x) ** 2).mean() / (x ** 2).mean()
        return total
    return loss


@torch.no_grad()
def psnr_probe(model, n: int = 64) -> float:
    scs = [scenes.make_sample(PROBE_SEED, i).scenes[0] for i in range(n)]
    px = scene_pixels(model, scs)
    z = model.rq.quantize(model.rq.features(px))[1]
    mse = F.mse_loss((model.rq.decode(z).clamp(-1, 1) + 1) * 127.5, (px + 1) * 127.5)
    return float(10 * torch.log10(255 ** 2 / mse))
