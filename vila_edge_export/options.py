"""What an export is asked to do: one validated dataclass per concern, and every default in one place.

Torch-free, so the command lines read their defaults from here without loading the exporter:
`vila-edge export` passes only the flags a user gave, `python -m vila_edge_export.stages` makes
one flag per field.
"""
from dataclasses import dataclass, field, fields

from vila_edge.errors import ExportOptionError
from vila_edge.targets import TARGETS

DTYPES = {"fp32": "float32", "fp16": "float16"}
METHODS = ("none", "rtn", "awq")
DEFAULT_GROUP = 128  # llm-awq --q_group_size 128, ModelOpt INT4_AWQ_CFG block_sizes {-1: 128}
# lm_head bits of a quantized export: int8 keeps the vocab projection (the most error-sensitive layer)
# close to float at half its fp16 size, and ORT runs it as MatMulNBits(bits=8) instead of an fp32 MatMul.
DEFAULT_LM_HEAD_BITS = 8
LM_HEAD_BITS = (8, 4, 0)   # 0: float
EMBED_BITS = (0, 8, 4)     # 0: float table (.npy); 8 / 4: group-quantized codes (.npz, vila_edge/embeddings.py)
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)   # MatMulNBits accuracy_level (ONNX Runtime contrib op)


@dataclass
class QuantOptions:
    method: str = "none"             # "none" keeps every weight float; "rtn" / "awq": symmetric int4 linears
    group_size: int = DEFAULT_GROUP
    # 8 / 4: lm_head quantized like the linears (groups along K); 0: float. None: DEFAULT_LM_HEAD_BITS
    # for rtn/awq, 0 for none.
    lm_head_bits: int | None = None
    embed_bits: int = 0              # 8 / 4: the token embedding table group-quantized (rtn/awq only); 0: float
    calib_dir: str | None = None     # AWQ calibration images + optional prompts.txt; default: synthetic scenes
    n_images: int = 8
    n_text: int = 8                  # text calibration blocks of text_seqlen tokens
    text_seqlen: int = 256
    eval_tokens: int = 4096          # held-out text tokens of the quality report (a float and a 4-bit pass)
    # Quality floor on held-out text: the export stops when perplexity rises more than this % over
    # float, or top-1 agreement falls below min_top1_agreement. None: report only, never stop.
    max_ppl_increase_pct: float | None = 25.0
    min_top1_agreement: float = 0.80

    def __post_init__(self):
        if self.method not in METHODS:
            raise ExportOptionError(f"quant {self.method!r} unknown; expected one of {METHODS}")
        if self.group_size < 1:
            raise ExportOptionError(f"group_size must be >= 1, got {self.group_size}")
        if self.lm_head_bits is None:
            self.lm_head_bits = DEFAULT_LM_HEAD_BITS if self.method != "none" else 0
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise ExportOptionError(f"lm_head_bits {self.lm_head_bits!r} unknown; expected one of {LM_HEAD_BITS}")
        if self.lm_head_bits and self.method == "none":
            raise ExportOptionError(f"lm_head_bits {self.lm_head_bits} needs quant rtn or awq (quant none keeps every "
                             f"weight float)")
        if self.embed_bits not in EMBED_BITS or (self.embed_bits and self.method == "none"):
            raise ExportOptionError(f"embed_bits {self.embed_bits!r}: expected 0 (float), or 8 / 4 with quant rtn or awq")
        if self.eval_tokens < 2:
            raise ExportOptionError(f"eval_tokens must be >= 2, got {self.eval_tokens}")

    @property
    def quantized(self) -> bool:
        return self.method != "none"


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    target: str = "cpu"              # vila_edge/targets.py: which LLM graph (fused contrib ops / standard ops)
    int4_accuracy_level: int = 4     # fused graphs: MatMulNBits activations (4: int8 per block; 0: float)
    template: str | None = None      # chat template; None: from the checkpoint
    token_order: str | None = None   # mlp_downsample token order; None: the checkpoint era's
    progress: bool = True
    quant: QuantOptions = field(default_factory=QuantOptions)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ExportOptionError(f"dtype {self.dtype!r} unknown; expected one of {sorted(DTYPES)}")
        if self.target not in TARGETS:
            raise ExportOptionError(f"target {self.target!r} unknown; expected one of {sorted(TARGETS)}")
        if self.int4_accuracy_level not in INT4_ACCURACY_LEVELS:
            raise ExportOptionError(f"int4_accuracy_level {self.int4_accuracy_level!r} unknown; expected one of "
                                    f"{INT4_ACCURACY_LEVELS}")
        if not isinstance(self.quant, QuantOptions):
            raise TypeError(f"quant must be a QuantOptions, got {type(self.quant).__name__} "
                            f"(e.g. ExportOptions(quant=QuantOptions(method='awq')))")

    @property
    def graph(self) -> str:
        """The LLM graph variant the target builds: "fused" or "standard"."""
        return TARGETS[self.target]

    @classmethod
    def flat(cls, **given) -> "ExportOptions":
        """Options from one flat dict, as the cache key and the bundle hold them ({"quant": "rtn",
        "group_size": 64, "dtype": "fp16"}): QuantOptions' fields go to `quant` ("quant" is its method)."""
        given = dict(given)
        inner = {f.name for f in fields(QuantOptions)} - {"method"}
        quant = {k: given.pop(k) for k in list(given) if k in inner}
        if isinstance(given.get("quant"), str):
            quant["method"] = given.pop("quant")
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ExportOptionError(f"export options {unknown} unknown; expected fields of ExportOptions or QuantOptions")
        if quant:
            given["quant"] = QuantOptions(**quant)
        return cls(**given)
