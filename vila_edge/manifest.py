"""manifest.json: the contract between export and runtime, read once into dataclasses.

The runtime trusts nothing it cannot check: the format version, the exporter's major version and
the presence of every file the manifest lists. A mismatch says how to rebuild.
"""
import json
import os
from dataclasses import asdict, dataclass, field, fields

from vila_edge.errors import EngineError
from vila_edge.version import __version__

# 2: llm.onnx takes past_k_l/past_v_l rows, not the pool and a block table
# 3: kv_dtype field; files lists every file the runtime loads (llm.onnx.data); build.graph names the
#    LLM graph variant (fused contrib ops for ORT targets, standard ops for TensorRT's parser)
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
REBUILD = "rebuild it: make engines CHECKPOINT=<checkpoint dir> OUT={out} (or: vila-edge export <checkpoint> {out})"


@dataclass
class LLMInfo:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int        # original vocabulary: ids >= this are never sampled
    logits_size: int       # rows of lm_head (>= vocab_size when embeddings were resized)
    max_positions: int
    intermediate: int = 0  # MLP width (the memory ledger's activation estimate; 0: unknown, 4 x hidden)


@dataclass
class VisionInfo:
    image_size: int
    tokens_per_image: int  # projected tokens per image or tile
    mean: list
    std: list
    image_mode: str        # families.RESIZE / PAD / DYNAMIC
    min_tiles: int
    max_tiles: int
    token_order: str
    # Multi-scale towers (export/checkpoint.py ScalesSpec): "" = one scale, vision.onnx is tower +
    # projector; S2 / DYNAMIC_S2 = vision.onnx is the tower alone and projector.onnx follows the merge.
    multiscale: str = ""
    scales: list = field(default_factory=list)
    max_split: int = 0
    resize_output_to: int = 0
    grid: int = 0          # tower output side in patches (projector input side for multi-scale)


@dataclass
class TokenInfo:
    bos_id: int | None
    stop_ids: list         # any of these ends generation
    image_token_id: int | None  # the real <image> token (MEDIA_TOKEN families)
    never_sample: list     # ids inside logits_size that are not text (media tokens)


@dataclass
class Manifest:
    format_version: int
    exporter_version: str
    family: str
    template: str
    dtype: str             # activation dtype of the graphs: float32 / float16
    kv_dtype: str          # numpy dtype name of the KV pool's rows (the graph's past/new K and V)
    quant: dict            # {"method": "none"|"rtn"|"awq", "group_size": G, ...}
    num_video_frames: int
    llm: LLMInfo
    vision: VisionInfo
    tokens: TokenInfo
    files: dict            # role -> file name inside the engine directory
    build: dict = field(default_factory=dict)   # opset, onnx/ORT versions, source checkpoint, target
    # What the engine can do beyond chat: ["generate_image"] for VILA-U (the server looks for it).
    capabilities: list = field(default_factory=list)
    # VILA-U image generation: depth, codebook_size, grid, image_size (pixels out), im_start_id.
    generation: dict = field(default_factory=dict)

    def write(self, engine_dir: str) -> None:
        with open(os.path.join(engine_dir, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)

    @staticmethod
    def load(engine_dir: str) -> "Manifest":
        path = os.path.join(engine_dir, MANIFEST)
        if not os.path.isfile(path):
            raise EngineError(f"{engine_dir}: no {MANIFEST}; not an engine directory (or an interrupted export); "
                              + REBUILD.format(out=engine_dir))
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}: corrupt JSON ({e}); " + REBUILD.format(out=engine_dir)) from e
        _check_version(raw, path, engine_dir)
        try:
            nested = {"llm": LLMInfo, "vision": VisionInfo, "tokens": TokenInfo}
            args = {f.name: raw[f.name] for f in fields(Manifest) if f.name in raw}
            for key, cls in nested.items():
                args[key] = cls(**raw[key])
            manifest = Manifest(**args)
        except (KeyError, TypeError) as e:
            raise EngineError(f"{path}: missing or unexpected field ({e}); " + REBUILD.format(out=engine_dir)) from e
        for role, name in manifest.files.items():
            if not os.path.isfile(os.path.join(engine_dir, name)):
                raise EngineError(f"{engine_dir}: file {name} ({role}) listed in {MANIFEST} is missing; "
                                  + REBUILD.format(out=engine_dir))
        return manifest


def _major(version: str) -> str:
    return str(version).split(".")[0]


def _check_version(raw: dict, path: str, engine_dir: str) -> None:
    fmt, exporter = raw.get("format_version"), raw.get("exporter_version", "unknown")
    if fmt != FORMAT_VERSION or _major(exporter) != _major(__version__):
        raise EngineError(f"{path}: built by vila_edge {exporter} (manifest format {fmt}); this runtime is "
                          f"vila_edge {__version__} and reads format {FORMAT_VERSION}; "
                          + REBUILD.format(out=engine_dir))
