"""Quality of AWQ-rounding variants of the default int4 SmolLM2 export, in one process.

The calibration inputs, the allocated plan (bit_alloc.auto_plan) and the fp32 pass over the held-out text
are computed once, as llm_quant.quantize_model / _quality compute them; each variant then quantizes a copy
of the float model with awq_quantize and is scored by quality.compare on the export's own eval ids. For
each variant also: the decoder quantized with a float lm_head, and the float decoder with the variant's
int8 lm_head (where the top-1 loss comes from).

    python benchmarks/results/smollm2-vila-quality5/variants.py EVAL_TOKENS OUT_DIR VARIANT...
    VARIANT: awq (AWQ scales + range search + round to nearest) | awq+gptq (+ GPTQ codes in those ranges),
    with suffixes ":act" (GPTQ in act-order, gptq.ordered_inverse_hessian), ":damp=X" (gptq.DAMP = X, 0.01
    upstream), ":int8rtn" (int8 linears keep their searched ranges rounded to nearest: GPTQ for int4 only),
    ":nosplit" (no decoder-only / head-only passes)
"""
import copy
import json
import sys
import time
from dataclasses import asdict

import torch
from torch import nn

import vila_edge_export.awq as awq_module
import vila_edge_export.gptq as gptq_module
from vila_edge_export.gptq import gptq_quantize
from vila_edge_export.awq import awq_quantize, text_calibration_ids
from vila_edge_export.bit_alloc import auto_plan
from vila_edge_export.calib_text import split_texts
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.llm_quant import _calib_inputs, eval_ids, multimodal_embeds
from vila_edge_export.options import QuantOptions, quant_options
from vila_edge_export.quality import (EVAL_WINDOW, bits_per_weight, compare, float_size_bytes, forward_windows,
                                      quantized_size_bytes)
from vila_edge_export.quantize import apply_quantized, dequantize
from vila_edge_export.reference import ReferenceVLM
from vila_edge.templates import get_template

eval_tokens, out_dir, variants = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
t0 = time.perf_counter()
spec = read_checkpoint("/work/main/build/fixtures/smollm2-vila", None, None)
ref = ReferenceVLM(spec, torch.float32)
opts = quant_options(QuantOptions(method="awq", eval_tokens=eval_tokens, max_ppl_increase_pct=None))
model = ref.llm
images, prompts = _calib_inputs(opts)
calib = multimodal_embeds(ref, get_template(spec.template, None), images[: opts.n_images], prompts)
text = text_calibration_ids(ref.tokenizer, split_texts("calib"), opts.text_seqlen, opts.n_text)
with torch.no_grad():
    calib += [model.get_input_embeddings()(ids.unsqueeze(0)) for ids in text]
alloc, _ = auto_plan(model, calib, text, opts.zero_point, opts.max_bpw)
plan = {name: g for name, (bits, g) in alloc.items()}
int8 = tuple(name for name, (bits, g) in alloc.items() if bits == 8)
window = min(EVAL_WINDOW, spec.llm.max_positions)
ids = eval_ids(ref.tokenizer, eval_tokens)
fp = forward_windows(model, ids, window, window // 2)
float_bytes = float_size_bytes(model)
print(f"prep {time.perf_counter() - t0:.0f} s", flush=True)


def score(m: nn.Module, qllm, label: str) -> dict:
    return asdict(compare(label, forward_windows(m, ids, window, window // 2), fp, quantized_size_bytes(qllm),
                          float_bytes, window, window // 2))


def int4_only_gptq(w, h, group, bits, zero_point, ranges=None):
    """GPTQ for the int4 linears only: an int8 one keeps its searched ranges rounded to nearest (plain AWQ's)."""
    return ranges if bits == 8 else gptq_quantize(w, h, group, bits, zero_point, ranges=ranges)


for v in variants:
    t1 = time.perf_counter()
    base, *mods = v.split(":")
    gptq_module.DAMP = float(next((m[5:] for m in mods if m.startswith("damp=")), 0.01))
    awq_module.gptq_quantize = int4_only_gptq if "int8rtn" in mods else gptq_quantize
    qllm = awq_quantize(model, calib, opts.group_size, progress=True, auto_group=True,
                        lm_head_bits=opts.lm_head_bits, zero_point=opts.zero_point, int8=int8,
                        gptq=base == "awq+gptq", search=True, plan=plan, ranges=True, act_order="act" in mods)
    t_quant = time.perf_counter() - t1
    full = apply_quantized(model, qllm)
    res = {"variant": v, "eval_tokens": eval_tokens, "quantize_s": t_quant, "bits_per_weight": bits_per_weight(qllm),
           "int8_linears": sorted(n for n, q in qllm.linears.items() if q.bits == 8 and n != "lm_head"),
           "full": score(full, qllm, v)}
    print(json.dumps({k: res[k] for k in ("variant", "quantize_s", "full")}), flush=True)
    if "nosplit" not in mods:
        full.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        res["decoder_only"] = score(full, qllm, v + " decoder, float lm_head")
        head = copy.deepcopy(model)
        qh = qllm.linears["lm_head"]
        head.lm_head.weight = nn.Parameter(dequantize(qh.codes, qh.scales, qh.zeros).float(), requires_grad=False)
        res["head_only"] = score(head, qllm, v + " lm_head, float decoder")
        del head
    del full
    res["seconds"] = time.perf_counter() - t1
    print(json.dumps(res), flush=True)
    with open(f"{out_dir}/{v.replace(':', '_')}_e{eval_tokens}.json", "w") as f:
        json.dump(res, f, indent=1)
