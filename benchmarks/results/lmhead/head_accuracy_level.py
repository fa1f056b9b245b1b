"""The head alone on SmolLM2's float final hidden states (256 held-out positions), the engine's own int8
codes (build/stages/q): int8 MatMulNBits at accuracy level 4 / 0 and the screen K=32, against the int8
head with float activations and against the float model's argmax.
    PYTHONPATH=. python benchmarks/results/lmhead/head_accuracy_level.py   (from the worktree root)
"""
import numpy as np, torch, onnxruntime as ort
from transformers import AutoModelForCausalLM, AutoTokenizer
from vila_edge_export.llm_quant import eval_ids
from vila_edge_export.stage_quantize import read_quantized
from vila_edge_export.onnx_graph import Graph
from vila_edge_export.onnx_llm_fused import MS, linear, screened_head
llm = "/work/main/build/fixtures/smollm2-vila/llm"
ids = eval_ids(AutoTokenizer.from_pretrained(llm), 512)
m = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
with torch.no_grad():
    out = m(ids[None, :256], output_hidden_states=True)
H = out.hidden_states[-1][0].numpy()     # final-norm output
ref = out.logits[0].numpy()
weights, quant, info = read_quantized("build/stages/q")
q = quant["lm_head"]
def sess(level, k=0):
    g = Graph("t", "float32"); x = g.input("x", "float32", [1, "B", 576])
    y = screened_head(g, x, q, k, level) if k else linear(g, x, "lm_head", None, None, q, level)
    g.output(y, "y", "float32", [1, "B", q[0].shape[0]]); g.opsets = {MS: 1}
    return ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
W8 = q[0].astype(np.float32) * np.repeat(q[1], q[2], axis=1)
exact = H @ W8.T
for name, s in [("int8 L4", sess(4)), ("int8 L0", sess(0)), ("screen32 L4", sess(4, 32))]:
    y = s.run(None, {"x": H[None]})[0][0]
    print(name, "max|d| vs float-act int8", np.abs(y - exact).max(), "argmax eq", (y.argmax(-1) == exact.argmax(-1)).mean(),
          "top1 vs float model", (y.argmax(-1) == ref.argmax(-1)).mean())
print("exact int8 top1 vs float model", (exact.argmax(-1) == ref.argmax(-1)).mean())
print("H absmax", np.abs(H).max(), "H rms", np.sqrt((H**2).mean()))
