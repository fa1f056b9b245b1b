"""The int4 screen's recall on SmolLM2 (float hidden states of 1024 held-out positions, numpy): is the
exact int8 head's top-1 / top-5 among the screen's top K? (Also a low-rank screen, rejected.)
    PYTHONPATH=. python benchmarks/results/lmhead/screen_recall.py
"""
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vila_edge_export.llm_quant import eval_ids
llm = "/work/main/build/fixtures/smollm2-vila/llm"
tok = AutoTokenizer.from_pretrained(llm)
ids = eval_ids(tok, 1024)
m = AutoModelForCausalLM.from_pretrained(llm, torch_dtype=torch.float32).eval()
H = []
with torch.no_grad():
    for s in range(0, 1024, 256):
        H.append(m.model(ids[None, s:s+256]).last_hidden_state[0].numpy())
H = np.concatenate(H)                                  # (1024, 576)
W = m.lm_head.weight.detach().numpy().astype(np.float32)  # (V, 576)
V, C = W.shape
def q(W, G, bits):
    qmax = (1 << (bits - 1)) - 1
    Wg = W.reshape(V, C // G, G); s = np.abs(Wg).max(-1, keepdims=True) / qmax
    return (np.clip(np.round(Wg / s), -qmax - 1, qmax) * s).reshape(V, C)
W8 = q(W, 64, 8)
exact = H @ W8.T
top1 = exact.argmax(-1)
top5 = np.argsort(-exact, -1)[:, :5]
def recall(screen, K):
    cand = np.argpartition(-screen, K, -1)[:, :K]
    r1 = np.mean([top1[i] in cand[i] for i in range(len(H))])
    r5 = np.mean([np.isin(top5[i], cand[i]).all() for i in range(len(H))])
    return r1, r5
W4 = q(W8, 64, 4)
s4 = H @ W4.T
for K in (8, 16, 32, 64):
    print("int4 G64 K", K, recall(s4, K))
U, S, Vt = np.linalg.svd(W8, full_matrices=False)
for r in (64, 128, 192, 256):
    A = U[:, :r] * S[:r]            # (V, r)
    scr = (H @ Vt[:r].T) @ A.T
    for K in (64, 256):
        print("lowrank r", r, "K", K, recall(scr, K))
