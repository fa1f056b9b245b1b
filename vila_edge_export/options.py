"""What an export is asked to do: one validated dataclass per concern, and every default in one place.

Torch-free, so the command lines read their defaults from here without loading the exporter:
`vila-edge export` passes only the flags a user gave, `python -m vila_edge_export.stages` makes
one flag per field.
"""
from dataclasses import dataclass, field

DTYPES = {"fp32": "float32", "fp16": "float16"}
TARGETS = ("cpu",)
METHODS = ("none", "rtn", "awq")
DEFAULT_GROUP = 128  # llm-awq --q_group_size 128, ModelOpt INT4_AWQ_CFG block_sizes {-1: 128}
# lm_head bits of a quantized export: int8 keeps the vocab projection (the most error-sensitive layer)
# close to float at half its fp16 size, and ORT runs it as MatMulNBits(bits=8) instead of an fp32 MatMul.
DEFAULT_LM_HEAD_BITS = 8
LM_HEAD_BITS = (8, 4, 0)   # 0: float


@dataclass
class QuantOptions:
    method: str = "none"             # "none" keeps every weight float; "rtn" / "awq": symmetric int4 linears
    group_size: int = DEFAULT_GROUP
    # 8 / 4: lm_head quantized like the linears (groups along K); 0: float. None: DEFAULT_LM_HEAD_BITS
    # for rtn/awq, 0 for none.
    lm_head_bits: int | None = None
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
            raise ValueError(f"quant {self.method!r} unknown; expected one of {METHODS}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.lm_head_bits is None:
            self.lm_head_bits = DEFAULT_LM_HEAD_BITS if self.method != "none" else 0
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise ValueError(f"lm_head_bits {self.lm_head_bits!r} unknown; expected one of {LM_HEAD_BITS}")
        if self.lm_head_bits and self.method == "none":
            raise ValueError(f"lm_head_bits {self.lm_head_bits} needs quant rtn or awq (quant none keeps every "
                             f"weight float)")
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2, got {self.eval_tokens}")

    @property
    def quantized(self) -> bool:
        return self.method != "none"


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    target: str = "cpu"
    template: str | None = None      # chat template; None: from the checkpoint
    token_order: str | None = None   # mlp_downsample token order; None: the checkpoint era's
    progress: bool = True
    quant: QuantOptions = field(default_factory=QuantOptions)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; expected one of {sorted(DTYPES)}")
        if self.target not in TARGETS:
            raise ValueError(f"target {self.target!r}: only {TARGETS} engines can be built (TensorRT engines for "
                             f"Orin are not implemented yet)")
        if not isinstance(self.quant, QuantOptions):
            raise TypeError(f"quant must be a QuantOptions, got {type(self.quant).__name__} "
                            f"(e.g. ExportOptions(quant=QuantOptions(method='awq')))")
