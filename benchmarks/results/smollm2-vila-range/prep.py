"""Stage 1: calib embeds, fp32 eval pass (4096), AWQ scale-only fold (default plan), Hessians."""
import time, torch, sys
from vila_edge_export.build import read_spec, chat_template_source
from vila_edge_export.options import ExportOptions, QuantOptions, parse_group_plan
from vila_edge_export.reference import ReferenceVLM
from vila_edge_export import llm_quant as lq
from vila_edge_export.awq import _transform, text_calibration_embeds, _capture_first_inputs, _run_layer
from vila_edge_export.calib_text import split_texts
from vila_edge_export.quality import forward_windows, EVAL_WINDOW
from vila_edge.templates import get_template
torch.set_num_threads(2)
t0 = time.time()
ck = "build/fixtures/smollm2-vila"
opts = ExportOptions(quant=QuantOptions(method="awq"))
spec = read_spec(ck, opts)
ref = ReferenceVLM(spec, torch.float32)
q = opts.quant
print(q, flush=True)
template = get_template(ref.spec.template, chat_template_source(spec))
images, prompts = lq._calib_inputs(q)
calib = lq.multimodal_embeds(ref, template, images[:q.n_images], prompts)
calib += text_calibration_embeds(ref.llm, ref.tokenizer, split_texts("calib"), q.text_seqlen, q.n_text)
print("calib", len(calib), [c.shape[1] for c in calib], time.time() - t0, flush=True)
import os
if not os.path.exists("build/q3/prep.pt"):
    ids = lq.eval_ids(ref.tokenizer, q.eval_tokens)
    fp = forward_windows(ref.llm, ids, EVAL_WINDOW, EVAL_WINDOW // 2)
    print("fp eval", time.time() - t0, flush=True)
    torch.save({"calib": calib, "ids": ids, "fp_nll": fp.nll, "fp_top1": fp.top1}, "build/q3/prep.pt")
import copy
plan = parse_group_plan(q.group_plan)
folded, _ = _transform(copy.deepcopy(ref.llm), calib, q.group_size, True, False, True, True, None, True, plan)
print("awq fold", time.time() - t0, flush=True)
torch.save(folded.state_dict(), "build/q3/folded.pt")
