import sys, json, torch, time
sys.argv = [sys.argv[0]] + sys.argv[1:]
T0 = time.time()
from vila_edge_export.build import read_spec
from vila_edge_export.options import ExportOptions, QuantOptions
from vila_edge_export.reference import ReferenceVLM
from vila_edge_export.calib_text import split_texts
from vila_edge_export.bit_alloc import output_fisher, unit_table, allocate
torch.set_num_threads(1)
ref = ReferenceVLM(read_spec("build/fixtures/smollm2-vila", ExportOptions(quant=QuantOptions(method="awq"))), torch.float32)
ids = [i for t in split_texts("calib") for i in ref.tokenizer(t, add_special_tokens=False)["input_ids"]]
blocks = list(torch.tensor(ids[:8 * 256]).reshape(8, 256))
F = output_fisher(ref.llm, blocks); print("fisher", time.time() - T0, flush=True)
torch.save(F, "build/q3/F_raw.pt")
H = torch.load("build/q3/H_raw.pt")
table = unit_table(ref.llm, H, F, True); print("table", time.time() - T0, flush=True)
torch.save(table, "build/q3/table_raw.pt")
for budget in (4.5,):
    plan, bpw = allocate(table, budget)
    print(budget, bpw, flush=True)
    json.dump(plan, open(f"build/q3/plan_raw_{budget}.json", "w"))
    from collections import Counter
    print(Counter((k.split(".")[-1], v) for k, v in plan.items()))
