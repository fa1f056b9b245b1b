"""What an export is asked to do: one validated dataclass per concern, and every default in one place.

Torch-free, so the command lines read their defaults from here without loading the exporter:
`vila-edge export` passes only the flags a user gave, `python -m vila_edge_export.stages` makes
one flag per field.
"""
from dataclasses import dataclass, field, fields, replace

from vila_edge.errors import ExportOptionError
from vila_edge.targets import TARGETS

DTYPES = {"fp32": "float32", "fp16": "float16"}
METHODS = ("none", "rtn", "awq", "gptq")
# G = 32 (4.5 bits per weight with fp16 scales): llm-awq and ModelOpt default to 128, but on SmolLM2-135M
# AWQ at G = 64/128 falls short of the export's quality gate and G = 32 passes it
# (benchmarks/results/smollm2-vila/quality_peers.md); ORT GenAI's int4 and llama.cpp's Q4 use 32 too.
DEFAULT_GROUP = 32
# With a zero point per group (+4/G bits) G = 64: 4.3125 bits per weight, better than symmetric G = 32
# (4.5) on SmolLM2, leaving room under the 4.5 budget for int8 outer down_projs (int8_linears).
DEFAULT_ZERO_POINT_GROUP = 64
# Mixed group sizes, the default of a zero-point rtn export whose G is not given (QuantOptions.group_plan):
# G per linear kind, "kind=G,...". G = 32 (4.625 bits per weight) where SmolLM2 gains most from small
# groups, o_proj at 64 (4.3125) and down_proj at 128 (4.15625): 4.4785 bits per decoder weight at
# SmolLM2's shapes, so no int8 down_proj fits the budget beside it (benchmarks/results/smollm2-vila-mixed-1k).
DEFAULT_GROUP_PLAN = "q_proj=32,k_proj=32,v_proj=32,o_proj=64,gate_proj=32,up_proj=32,down_proj=128"
# Linears the LLM graphs run as one MatMulNBits (vila_edge_export/onnx_llm.py _concat_linears): one G each.
FUSED_KINDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# group_plan "auto", the default of a zero-point awq / gptq export whose G is not given: G (and int8) per
# decoder linear chosen on calibration data under max_bpw (vila_edge_export/bit_alloc.py; it needs
# calibration inputs). With the same rounding (range search, no AWQ scales) on SmolLM2 it measured
# 0.831 / +9.25 % at 4.499 bits per decoder weight against DEFAULT_GROUP_PLAN's 0.810 / +13.2 % at 4.479
# over the export's 4,095 held-out positions (benchmarks/results/smollm2-vila-range).
AUTO_PLAN = "auto"
CALIBRATED = ("awq", "gptq")
# awq's codes picked by GPTQ (QuantOptions.gptq_rounding) unless asked otherwise: after the AWQ scales, inside
# the searched ranges. On SmolLM2's default int4 export (allocated plan, 4.499 bits per decoder weight, the same
# scales, ranges and int8 linears) it measured top-1 0.8571 / +7.11 % perplexity against round-to-nearest's
# 0.8435 / +10.12 % over the export's 4,095 held-out positions (benchmarks/results/smollm2-vila-quality5).
DEFAULT_AWQ_GPTQ = True
# ... in act-order (QuantOptions.act_order): the same export with act-order measured 0.8728 / +6.29 % there
# (plain column order 0.8571 / +7.11 %).
DEFAULT_ACT_ORDER = True
ZERO_POINT_TARGETS = ("cpu",)     # engines run by ONNX Runtime (MatMulNBits takes uint4 zero points)
DEFAULT_MAX_BPW = 4.5             # decoder bits per weight: the allocated plan's budget, or the int8 down_projs'
                                  # (int8_linears) beside a fixed plan
# The quality gate of a 4-bit export: perplexity within +15 % of float, top-1 agreement >= 0.85 (issue 14's
# figures). The default export of SmolLM2 (AWQ + GPTQ rounding in act-order, allocated plan) measures 0.873 /
# +6.3 % over the export's own 4,095 held-out positions (benchmarks/results/smollm2-vila-quality5); the floor was
# 0.80 while round-to-nearest after AWQ measured 0.8435 / +10.1 % there. vila_edge_export/quality.py DEFAULT_FLOOR.
DEFAULT_MAX_PPL_INCREASE_PCT = 15.0
DEFAULT_MIN_TOP1 = 0.85
# lm_head bits of a quantized export: int8 keeps the vocab projection (the most error-sensitive layer)
# close to float at half its fp16 size, and ORT runs it as MatMulNBits(bits=8) instead of an fp32 MatMul.
DEFAULT_LM_HEAD_BITS = 8
LM_HEAD_BITS = (8, 4, 0)   # 0: float
# VILA-U's depth transformer blocks in quantized engines (onnx_vila_u.DepthQuant; its input / output
# projections follow lm_head_bits). int8 by default: on the bundled tiny VILA-U, int4 blocks cost the
# int4 engine 3.4 points of held-out shape faithfulness against fp16 (int8: +0.9), 1,320 pictures
# (benchmarks/results/vila-u-tiny-shapes/README.md). At the 7B-256 widths int8 blocks hold ~470 M
# weights, ~230 MB more than int4: --depth-bits 4 for the smallest modules, at that measured cost.
DEFAULT_DEPTH_BITS = 8
DEPTH_BITS = (8, 4, 0)     # 0: float
EMBED_BITS = (0, 8, 4)     # 0: float table (.npy); 8 / 4: group-quantized codes (.npz, vila_edge/embeddings.py)
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)   # MatMulNBits accuracy_level (ONNX Runtime contrib op)
# KV pool rows of an fp32 fused graph (target cpu) when kv_dtype is not given: fp16 halves the KV bytes every
# decode step reads, and vila_edge::PagedAttention converts the rows. Measured idle on SmolLM2 int4, 2 threads:
# 168 / 142 tok/s decode at 128 / 512 context against 157.7 / 125.4 with fp32 rows
# (benchmarks/results/smollm2-vila-stop25-idle); numerics against the torch reference: tests/test_kv_dtype.py.
# Standard graphs (orin: TensorRT's parser) keep kv_dtype == dtype; --kv-dtype fp32 gives the fp32 pool back.
FUSED_KV_DTYPE = "fp16"
# Screened int8 lm_head of fused fp32 graphs (onnx_llm_fused.screened_head): candidates rescored exactly
MAX_LM_HEAD_SCREEN = 1024
# The default where a screen applies (fused fp32 graph, int8 lm_head): the head is the decode step's second
# largest read (28 MB at SmolLM2's 49k x 576) and the screen reads half of it. Measured on SmolLM2 int4
# (benchmarks/results/stop33-idle, one process, two runs): decode 1.06x at 128 context, 0.98-1.09x at 512
# against the plain int8 head; greedy = the int8 head's argmax with float activations (top-1 vs float
# 0.8623 against 0.8637 over 2,040 held-out positions), and logits outside the K candidates are int4
# (perplexity of the engine's own logits +6.3 % -> +9.1 %). 64 rather than 32: the same speed within the
# runs' spread, and a sampler's or grammar's choice more often among exact logits (K 32: +10.1 %).
# --lm-head-screen 0 restores the plain head.
DEFAULT_LM_HEAD_SCREEN = 64


@dataclass
class QuantOptions:
    # "none" keeps every weight float; int4 linears: "rtn" rounds to nearest, "awq" searches scales and
    # ranges on calibration data first (then rounds as gptq_rounding says), "gptq" rounds with error feedback
    # on calibration data (gptq.py)
    method: str = "none"
    # None: DEFAULT_ZERO_POINT_GROUP with zero points, DEFAULT_GROUP without (quant_options)
    group_size: int | None = None
    # G per decoder linear kind ("q_proj=32,down_proj=128"; a kind not named gets group_size; "": every
    # linear at group_size; "auto": allocated, bit_alloc.py). None, with zero points and no group_size
    # given: AUTO_PLAN for awq / gptq, DEFAULT_GROUP_PLAN for rtn; else "".
    group_plan: str | None = None
    # 8 / 4: lm_head quantized like the linears (groups along K); 0: float. None: DEFAULT_LM_HEAD_BITS
    # for rtn/awq, 0 for none.
    lm_head_bits: int | None = None
    # int4 decoder linears with a zero point per group (lm_head stays symmetric); None: on for the
    # ZERO_POINT_TARGETS (quant_options)
    zero_point: bool | None = None
    # int8 for the outermost layers' down_proj while the decoder stays <= this many bits per weight;
    # None: every decoder linear int4
    max_bpw: float | None = DEFAULT_MAX_BPW
    # awq / gptq: every group's scale (and zero point) searched on the calibration inputs of its linear
    # (vila_edge_export/range_search.py) in place of llm-awq's symmetric clip search; False: llm-awq's clip
    range_search: bool = True
    # GPTQ error feedback picks each decoder linear's codes on its calibration inputs (gptq.py): for awq after
    # the scale search, on the scaled inputs and inside the searched ranges. None: DEFAULT_AWQ_GPTQ for awq,
    # always on for gptq, off for rtn / none (resolved here, so build.options records it).
    gptq_rounding: bool | None = None
    # GPTQ's columns in act-order (descending H_kk, gptq.ordered_inverse_hessian) within the searched ranges, which
    # keeps each group contiguous. None: DEFAULT_ACT_ORDER for awq with gptq_rounding and range_search, else off.
    act_order: bool | None = None
    embed_bits: int = 0              # 8 / 4: the token embedding table group-quantized (rtn/awq only); 0: float
    # VILA-U: the depth transformer's blocks, 8 / 4 / 0 (float); None: DEFAULT_DEPTH_BITS with quant, 0 without.
    # Other families have no depth transformer and ignore it.
    depth_bits: int | None = None
    calib_dir: str | None = None     # AWQ calibration images + optional prompts.txt; default: synthetic scenes
    n_images: int = 8
    n_text: int = 8                  # text calibration blocks of text_seqlen tokens
    text_seqlen: int = 256
    eval_tokens: int = 4096          # held-out text tokens of the quality report (a float and a 4-bit pass)
    # Quality floor on held-out text: the export stops when perplexity rises more than this % over
    # float, or top-1 agreement falls below min_top1_agreement. None: report only, never stop.
    max_ppl_increase_pct: float | None = DEFAULT_MAX_PPL_INCREASE_PCT
    min_top1_agreement: float = DEFAULT_MIN_TOP1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ExportOptionError(f"quant {self.method!r} unknown; expected one of {METHODS}")
        if self.group_size is not None and self.group_size < 1:
            raise ExportOptionError(f"group_size must be >= 1, got {self.group_size}")
        if self.group_plan not in (None, AUTO_PLAN):
            parse_group_plan(self.group_plan)        # raises on a malformed plan
        if self.group_plan == AUTO_PLAN and (self.method not in CALIBRATED or self.max_bpw is None):
            raise ExportOptionError(f"group_plan {AUTO_PLAN!r} allocates bits on calibration data under max_bpw: it "
                                    f"needs quant awq or gptq and a max_bpw (got {self.method!r}, {self.max_bpw})")
        self._check_rounding()
        if self.lm_head_bits is None:
            self.lm_head_bits = DEFAULT_LM_HEAD_BITS if self.method != "none" else 0
        if self.lm_head_bits not in LM_HEAD_BITS:
            raise ExportOptionError(f"lm_head_bits {self.lm_head_bits!r} unknown; expected one of {LM_HEAD_BITS}")
        if self.lm_head_bits and self.method == "none":
            raise ExportOptionError(f"lm_head_bits {self.lm_head_bits} needs quant rtn or awq (quant none keeps every "
                             f"weight float)")
        if self.depth_bits is None:
            self.depth_bits = DEFAULT_DEPTH_BITS if self.method != "none" else 0
        if self.depth_bits not in DEPTH_BITS or (self.depth_bits and self.method == "none"):
            raise ExportOptionError(f"depth_bits {self.depth_bits!r}: expected 0 (float), or 8 / 4 with quant rtn or awq")
        if self.embed_bits not in EMBED_BITS or (self.embed_bits and self.method == "none"):
            raise ExportOptionError(f"embed_bits {self.embed_bits!r}: expected 0 (float), or 8 / 4 with quant rtn or awq")
        if self.max_bpw is not None and self.max_bpw <= 0:
            raise ExportOptionError(f"max_bpw must be > 0 (or None: every decoder linear int4), got {self.max_bpw}")
        if self.eval_tokens < 2:
            raise ExportOptionError(f"eval_tokens must be >= 2, got {self.eval_tokens}")

    def _check_rounding(self) -> None:
        """gptq_rounding and act_order resolved for the method (so build.options records what ran), and the
        combinations that cannot run refused."""
        if self.gptq_rounding is None:
            self.gptq_rounding = self.method == "gptq" or (self.method == "awq" and DEFAULT_AWQ_GPTQ)
        if self.gptq_rounding not in (True, False):
            raise ExportOptionError(f"gptq_rounding {self.gptq_rounding!r}: expected True, False or None (the "
                                    f"method's default)")
        if self.gptq_rounding and self.method not in CALIBRATED:
            raise ExportOptionError(f"gptq_rounding rounds on calibration inputs: it needs quant awq or gptq (got "
                                    f"{self.method!r})")
        if not self.gptq_rounding and self.method == "gptq":
            raise ExportOptionError("quant gptq is GPTQ rounding: gptq_rounding False contradicts it (quant awq "
                                    "rounds to nearest with gptq_rounding False)")
        if self.act_order is None:
            self.act_order = DEFAULT_ACT_ORDER and self.method == "awq" and self.gptq_rounding and self.range_search
        if self.act_order not in (True, False):
            raise ExportOptionError(f"act_order {self.act_order!r}: expected True, False or None (the default)")
        if self.act_order and not (self.gptq_rounding and self.range_search):
            raise ExportOptionError("act_order orders GPTQ's columns within searched ranges: it needs gptq_rounding "
                                    "and range_search")

    @property
    def quantized(self) -> bool:
        return self.method != "none"


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    target: str = "cpu"              # vila_edge/targets.py: which LLM graph (fused contrib ops / standard ops)
    int4_accuracy_level: int = 4     # fused graphs: MatMulNBits activations (4: int8 per block; 0: float)
    # KV pool rows; None: FUSED_KV_DTYPE under an fp32 fused graph (half the KV bytes every decode step reads),
    # else dtype (kv_dtype_default)
    kv_dtype: str | None = None
    # K > 0: the int8 lm_head as an int4 screen over the vocabulary + TopK K + the K candidates rescored
    # from their int8 rows (fused fp32 graphs; logits outside the K candidates are the int4 screen's);
    # 0: the int8 MatMulNBits over every row. None: DEFAULT_LM_HEAD_SCREEN where a screen applies, else 0.
    lm_head_screen: int | None = None
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
        if self.kv_dtype is None:
            self.kv_dtype = kv_dtype_default(self.dtype, self.target)
        if self.kv_dtype not in DTYPES:
            raise ExportOptionError(f"kv_dtype {self.kv_dtype!r} unknown; expected one of {sorted(DTYPES)}")
        if self.kv_dtype != self.dtype and not (self.graph == "fused" and self.dtype == "fp32"):
            raise ExportOptionError(f"kv_dtype {self.kv_dtype} with dtype {self.dtype}, target {self.target}: a KV pool "
                                    f"of another dtype than the graph's needs dtype fp32 and a fused-graph target "
                                    f"(kv_dtype fp16 there)")
        if not isinstance(self.quant, QuantOptions):
            raise TypeError(f"quant must be a QuantOptions, got {type(self.quant).__name__} "
                            f"(e.g. ExportOptions(quant=QuantOptions(method='awq')))")
        self.quant = quant_options(self.quant, self.target)
        self._check_screen()

    def _check_screen(self) -> None:
        if self.lm_head_screen is None:
            self.lm_head_screen = DEFAULT_LM_HEAD_SCREEN if self._screens() else 0
        if not isinstance(self.lm_head_screen, int) or not 0 <= self.lm_head_screen <= MAX_LM_HEAD_SCREEN:
            raise ExportOptionError(f"lm_head_screen {self.lm_head_screen!r}: expected 0 (off) or a candidate count "
                                    f"in 1..{MAX_LM_HEAD_SCREEN}")
        if self.lm_head_screen and not self._screens():
            raise ExportOptionError(f"lm_head_screen {self.lm_head_screen} screens an int8 lm_head in a fused fp32 "
                                    f"graph: it needs --target cpu, --dtype fp32, --quant rtn/awq/gptq and "
                                    f"--lm-head-bits 8 (got target {self.target}, dtype {self.dtype}, quant "
                                    f"{self.quant.method}, lm_head_bits {self.quant.lm_head_bits})")

    def _screens(self) -> bool:
        """Whether the LLM graph can screen its lm_head: fused fp32, an int8 head."""
        return self.graph == "fused" and self.dtype == "fp32" and self.quant.quantized and self.quant.lm_head_bits == 8

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


def kv_dtype_default(dtype: str, target: str) -> str:
    """The KV pool's dtype when none is given: FUSED_KV_DTYPE under an fp32 fused graph (the only graph whose
    attention op reads another dtype than its activations), dtype elsewhere."""
    return FUSED_KV_DTYPE if TARGETS[target] == "fused" and dtype == "fp32" else dtype


def parse_group_plan(plan: str | None) -> dict[str, int]:
    """"q_proj=32,down_proj=128" -> {"q_proj": 32, "down_proj": 128}; None or "" -> {}."""
    out = {}
    for item in filter(None, (p.strip() for p in (plan or "").split(","))):
        kind, _, g = item.partition("=")
        if not kind.strip() or not g.strip().isdigit() or int(g) < 1:
            raise ExportOptionError(f"group_plan item {item!r}: expected KIND=G with G >= 1 (e.g. down_proj=128)")
        out[kind.strip()] = int(g)
    return out


def quant_defaults(target: str, zero_point: bool | None, group: int | None) -> tuple[bool, int]:
    """(zero_point, G) of a 4-bit export: zero points where the target's runtime takes them (ORT's
    MatMulNBits does; TensorRT's int4 does not, docs/contracts.md), G by that choice."""
    zp = target in ZERO_POINT_TARGETS if zero_point is None else zero_point
    return zp, group or (DEFAULT_ZERO_POINT_GROUP if zp else DEFAULT_GROUP)


def quant_options(quant: QuantOptions, target: str = "cpu") -> QuantOptions:
    """The one place export options become quantizer settings: `quant` with the target's zero-point
    choice, group size and group plan filled in (unchanged when all three are given). An explicit
    group_size means every linear at that G unless a group_plan is given too."""
    zero_point, group = quant_defaults(target, quant.zero_point, quant.group_size)
    plan = quant.group_plan
    if plan is None:
        plan = "" if not zero_point or quant.group_size is not None else \
            AUTO_PLAN if quant.method in CALIBRATED and quant.max_bpw is not None else DEFAULT_GROUP_PLAN
    given = {} if plan == AUTO_PLAN else parse_group_plan(plan)
    for kinds in FUSED_KINDS:
        if len({given.get(k, group) for k in kinds}) > 1:
            raise ExportOptionError(f"group_plan {plan!r}: {', '.join(kinds)} run as one fused linear and need one "
                                    f"group size")
    return replace(quant, zero_point=zero_point, group_size=group, group_plan=plan)
