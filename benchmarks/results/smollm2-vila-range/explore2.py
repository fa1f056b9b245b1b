"""Raw (unfolded) model: H on calib, Fisher, variants."""
import time, torch, sys, copy, json, math, os
from vila_edge_export.build import read_spec
from vila_edge_export.options import ExportOptions, QuantOptions, parse_group_plan
from vila_edge_export.reference import ReferenceVLM
from vila_edge_export.awq import _capture_first_inputs, _run_layer
from vila_edge_export.quantize import quantize_linears, apply_quantized, linear_groups, decoder_linears, quantize_group
from vila_edge_export.range_search import search_ranges, blocks_of_hessian
from vila_edge_export.gptq import gptq_quantize, inverse_hessian
from vila_edge_export.quality import forward_windows, EVAL_WINDOW, bits_per_weight
torch.set_num_threads(1)
T0 = time.time()
def log(*a): print(f"[{time.time()-T0:7.1f}s]", *a, flush=True)
ck = "build/fixtures/smollm2-vila"
opts = ExportOptions(quant=QuantOptions(method="awq"))
ref = ReferenceVLM(read_spec(ck, opts), torch.float32)
prep = torch.load("build/q3/prep.pt")
model = ref.llm
q = opts.quant
PLAN = parse_group_plan(q.group_plan)

@torch.no_grad()
def hessians(model, calib):
    samples = _capture_first_inputs(model, calib)
    H = {}
    for i, layer in enumerate(model.model.layers):
        feats, outs = _run_layer(layer, samples)
        for name, xs in feats.items():
            x = torch.cat(xs).double()
            H[f"model.layers.{i}.{name}"] = (x.T @ x / x.shape[0]).float()
        for s, o in zip(samples, outs):
            s.hidden = o
    return H

def evaluate(qllm, n_tokens, label):
    ids = prep["ids"][:n_tokens]
    m = apply_quantized(model, qllm)
    p = forward_windows(m, ids, EVAL_WINDOW, EVAL_WINDOW // 2)
    fpn, fpt = prep["fp_nll"][:p.nll.numel()], prep["fp_top1"][:p.nll.numel()]
    ppl, ppl_ref = math.exp(p.nll.mean()), math.exp(fpn.mean())
    top1 = (p.top1 == fpt).double().mean().item()
    r = dict(label=label, top1=top1, ppl_pct=100 * (ppl / ppl_ref - 1), n=p.nll.numel(), bpw=bits_per_weight(qllm),
             t=time.time() - T0)
    log("RESULT", json.dumps(r))
    with open("build/q3/results.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")

def build(variant, H, gbits, lm_head_bits=8):
    """gbits: {name: (bits, G)}"""
    rounded = {}
    for name, lin in decoder_linears(model).items():
        bits, g = gbits[name]
        zp = bits == 4
        w = lin.weight.data
        if variant == "rtn":
            rounded[name] = quantize_group(w, g, bits, zp)
        elif variant == "range":
            rounded[name] = search_ranges(w, blocks_of_hessian(H[name], g), g, bits, zp)
        elif variant == "range+gptq":
            rq = search_ranges(w, blocks_of_hessian(H[name], g), g, bits, zp)
            rounded[name] = gptq_quantize(w, H[name].double() * 2, g, bits, zp, ranges=rq)
        elif variant == "gptq":
            rounded[name] = gptq_quantize(w, H[name].double() * 2, g, bits, zp)
    return quantize_linears(model, q.group_size, True, method=variant, lm_head_bits=lm_head_bits, zero_point=True,
                            rounded=rounded, plan=PLAN)

if __name__ == "__main__":
    if not os.path.exists("build/q3/H_raw.pt"):
        H = hessians(model, prep["calib"]); torch.save(H, "build/q3/H_raw.pt"); log("H saved")
        sys.exit(0)
    H = torch.load("build/q3/H_raw.pt")
    n_tok, variant, plan = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if plan == "default":
        gbits = {n: (4, g) for n, g in linear_groups(model, q.group_size, True, PLAN).items()}
    else:
        gbits = {k: tuple(v) for k, v in json.load(open(plan)).items()}
    qllm = build(variant, H, gbits)
    log("built", variant, plan)
    evaluate(qllm, n_tok, f"raw {variant} {plan}")
