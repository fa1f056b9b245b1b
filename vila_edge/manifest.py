"""manifest.json: the contract between export and runtime, read once into dataclasses.

The runtime trusts nothing it cannot check: the format version, the exporter's major version and
the presence of every file the manifest lists. A mismatch says how to rebuild.
"""
import json
import math
import os
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from vila_edge.errors import EngineError
from vila_edge.families import DYNAMIC, DYNAMIC_S2, PAD, RESIZE, S2
from vila_edge.version import __version__

# 2: llm.onnx takes past_k_l/past_v_l rows, not the pool and a block table
# 3: kv_dtype field; files lists every file the runtime loads (llm.onnx.data); build.graph names the
#    LLM graph variant (fused contrib ops for ORT targets, standard ops for TensorRT's parser)
# 4: the fused graph (target cpu) runs B sequences' flattened tokens over the pool's blocks with
#    vila_edge::PagedAttention, which writes new K/V into the pool in place; logits [B, V]
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
GRAPH_DTYPES = ("float32", "float16")
IMAGE_MODES = (RESIZE, PAD, DYNAMIC, DYNAMIC_S2)
MULTISCALE = ("", S2, DYNAMIC_S2)
MAX_TILES = 64   # NVILA uses 12; the tile-grid search is cubic in it, and each tile costs a vision pass
# int fields where 0 is a valid value (multi-scale fields are 0 on single-scale engines; intermediate
# 0 = unknown)
POSSIBLY_ZERO = ("bos_id", "image_token_id", "num_video_frames", "max_split", "grid", "intermediate")
ANY_INT = ("resize_output_to",)
REQUIRED_FILES = ("vision", "llm", "embeddings", "tokenizer")     # files roles every engine loads      # a scale index: -1 = the last scale (NVILA-8B)
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
    # Multi-scale towers (vila_edge_export/checkpoint.py ScalesSpec): "" = one scale, vision.onnx is tower +
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
    quant: dict            # {"method": "none"|"rtn"|"awq"|"gptq", "group_size": G, ...}
    num_video_frames: int
    llm: LLMInfo
    vision: VisionInfo
    tokens: TokenInfo
    files: dict            # role -> file name inside the engine directory
    build: dict = field(default_factory=dict)   # opset, onnx/ORT versions, source checkpoint, target, options
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
        except PermissionError as e:
            raise EngineError(f"{path}: permission denied; make the engine directory readable by this user "
                              f"(chmod -R a+rX {engine_dir})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: corrupt JSON ({e}); " + REBUILD.format(out=engine_dir)) from e
        if not isinstance(raw, dict):
            raise EngineError(f"{path}: expected a JSON object, got {type(raw).__name__}; "
                              + REBUILD.format(out=engine_dir))
        _check_version(raw, path, engine_dir)
        try:
            nested = {"llm": LLMInfo, "vision": VisionInfo, "tokens": TokenInfo}
            args = {f.name: raw[f.name] for f in fields(Manifest) if f.name in raw}
            for key, cls in nested.items():
                args[key] = cls(**raw[key])
            manifest = Manifest(**args)
        except (KeyError, TypeError) as e:
            raise EngineError(f"{path}: missing or unexpected field ({e}); " + REBUILD.format(out=engine_dir)) from e
        _check_fields(manifest, "", path, engine_dir)
        missing = [role for role in REQUIRED_FILES if role not in manifest.files]
        if missing:
            raise EngineError(f"{path}: files lists no {', '.join(missing)}; " + REBUILD.format(out=engine_dir))
        for role, name in manifest.files.items():
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise EngineError(f"{path}: files.{role} is {name!r}; expected a file name inside the engine "
                                  f"directory; " + REBUILD.format(out=engine_dir))
            if not os.path.isfile(os.path.join(engine_dir, name)):
                raise EngineError(f"{engine_dir}: file {name} ({role}) listed in {MANIFEST} is missing; "
                                  + REBUILD.format(out=engine_dir))
        return manifest


def _type_ok(value, kind) -> bool:
    """isinstance for the annotations used above: int (bool excluded), float, str, list, dict, X | None."""
    if isinstance(kind, types.UnionType):
        return any(_type_ok(value, k) for k in kind.__args__)
    if kind is type(None):
        return value is None
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_fields(obj, prefix: str, path: str, engine_dir: str) -> None:
    """Every field has its annotated type, and the numbers that size arrays are positive."""
    def bad(name, value, expected):
        raise EngineError(f"{path}: field {prefix}{name} is {value!r}; expected {expected}; "
                          + REBUILD.format(out=engine_dir))

    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(f.type):
            _check_fields(value, f"{prefix}{f.name}.", path, engine_dir)
            continue
        if not _type_ok(value, f.type):
            bad(f.name, value, getattr(f.type, "__name__", str(f.type)))
        if f.type is int and f.name not in POSSIBLY_ZERO + ANY_INT and value < 1:
            bad(f.name, value, "a positive integer")
        if f.name in ("stop_ids", "never_sample") and not all(_type_ok(i, int) and i >= 0 for i in value):
            bad(f.name, value, "a list of token ids (integers >= 0)")
        if f.name in ("mean", "std") and (len(value) != 3 or not all(
                _type_ok(x, float | int) and math.isfinite(x) for x in value) or (f.name == "std" and 0 in value)):
            bad(f.name, value, "3 finite numbers (std non-zero)")
    if isinstance(obj, Manifest) and obj.dtype not in GRAPH_DTYPES:
        bad("dtype", obj.dtype, f"one of {GRAPH_DTYPES}")
    if isinstance(obj, Manifest) and (obj.kv_dtype not in GRAPH_DTYPES or (
            obj.kv_dtype != obj.dtype and obj.build.get("graph") != "fused")):
        # only vila_edge::PagedAttention (fused graphs) reads a pool of another dtype than its graph's;
        # which pairs a fused graph takes, the engine check compares with the graph's inputs
        bad("kv_dtype", obj.kv_dtype, f"dtype ({obj.dtype}), or float16 under a float32 fused graph")
    if isinstance(obj, VisionInfo):
        if not obj.min_tiles <= obj.max_tiles <= MAX_TILES:
            bad("max_tiles", obj.max_tiles, f"min_tiles ({obj.min_tiles}) <= max_tiles <= {MAX_TILES}")
        if obj.multiscale not in MULTISCALE:
            bad("multiscale", obj.multiscale, f"one of {MULTISCALE}")
        if obj.image_mode not in IMAGE_MODES:
            bad("image_mode", obj.image_mode, f"one of {IMAGE_MODES}")


def _major(version: str) -> str:
    return str(version).split(".")[0]


def _check_version(raw: dict, path: str, engine_dir: str) -> None:
    fmt, exporter = raw.get("format_version"), raw.get("exporter_version", "unknown")
    if fmt != FORMAT_VERSION or _major(exporter) != _major(__version__):
        raise EngineError(f"{path}: built by vila_edge {exporter} (manifest format {fmt}); this runtime is "
                          f"vila_edge {__version__} and reads format {FORMAT_VERSION}; "
                          + REBUILD.format(out=engine_dir))
