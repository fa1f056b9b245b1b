"""Quality of the default int4 SmolLM2 export with a different number of calibration text blocks."""
import json, sys, time
import torch
from vila_edge_export.checkpoint import read_checkpoint
from vila_edge_export.llm_quant import quantize_llm
from vila_edge_export.options import QuantOptions

n_text, eval_tokens = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
spec = read_checkpoint("/work/main/build/fixtures/smollm2-vila", None, None)
t0 = time.perf_counter()
opts = QuantOptions(method="awq", n_text=n_text, eval_tokens=eval_tokens, max_ppl_increase_pct=None)
_, _, report = quantize_llm(spec, opts, None, progress=True)
report["seconds"] = time.perf_counter() - t0
report["n_text"] = n_text
print(json.dumps(report, default=str))
with open(f"/tmp/q4/n{n_text}_e{eval_tokens}.json", "w") as f:
    json.dump(report, f, default=str, indent=1)
