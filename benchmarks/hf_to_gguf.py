"""The LLM of a VILA checkpoint as a llama.cpp GGUF, for the llama.cpp side of bench_peers.py.

    python -m benchmarks.hf_to_gguf build/fixtures/vila1.5-3b/llm /tmp/llm.gguf [--type q4_1]

Writes an F16 (or F32) GGUF with the gguf package (same tensor names, metadata and Q/K row
permutation as llama.cpp's convert_hf_to_gguf.py for Llama), then, for a 4-bit type, quantizes it
with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), which keeps
output.weight at a higher precision exactly as `llama-quantize` does. Llama only (VILA1.5; the
Qwen2 of NVILA-Lite is not converted). The vocabulary is written as a SentencePiece-style token
list: the benchmark feeds token ids, never text, so merges are not needed.
"""
import argparse
import ctypes
import json
import os
import sys

import numpy as np

QUANT_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
               "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate_half Q/K rows -> GGML's interleaved RoPE pairs (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokens(llm_dir: str, vocab: int) -> list:
    path = os.path.join(llm_dir, "tokenizer.json")
    by_id = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        by_id = {i: t for t, i in tj["model"]["vocab"].items()}
        by_id.update({a["id"]: a["content"] for a in tj.get("added_tokens", [])})
    return [by_id.get(i, f"<unused{i}>") for i in range(vocab)]


def convert(llm_dir: str, out: str, dtype=np.float16) -> None:
    import gguf
    from safetensors import safe_open

    with open(os.path.join(llm_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{llm_dir}: model_type {cfg.get('model_type')!r}; only Llama LLMs are converted")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    vocab = cfg["vocab_size"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(os.path.basename(os.path.dirname(os.path.abspath(llm_dir))))
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    tokens = _tokens(llm_dir, vocab)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(vocab)])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    files = sorted(f for f in os.listdir(llm_dir) if f.endswith(".safetensors"))
    seen = set()
    for fname in files:
        with safe_open(os.path.join(llm_dir, fname), "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key).float().numpy()
                if key in names:
                    name = names[key]
                else:
                    parts = key.split(".")                     # model.layers.<i>.<module...>.weight
                    i, mod = parts[2], ".".join(parts[3:-1])
                    name = f"blk.{i}.{per_layer[mod]}.weight"
                    if mod == "self_attn.q_proj":
                        t = _permute(t, heads)
                    elif mod == "self_attn.k_proj":
                        t = _permute(t, kv)
                # Norm weights stay f32 (as convert_hf_to_gguf.py does for 1-D tensors).
                w.add_tensor(name, t.astype(np.float32 if t.ndim == 1 else dtype))
                seen.add(key)
    if "lm_head.weight" not in seen and not cfg.get("tie_word_embeddings", False):
        raise ValueError(f"{llm_dir}: no lm_head.weight and tie_word_embeddings is false")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def quantize(src: str, out: str, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {out}, {kind}) returned {rc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llm_dir", help="the checkpoint's llm/ folder (Hugging Face Llama, safetensors)")
    ap.add_argument("out", help="GGUF to write")
    ap.add_argument("--type", default="q4_1", choices=["f32", "f16", *QUANT_TYPES])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    if args.type in ("f32", "f16"):
        convert(args.llm_dir, args.out, np.float32 if args.type == "f32" else np.float16)
        return 0
    tmp = args.out + ".f16.tmp"
    try:
        convert(args.llm_dir, tmp)
        quantize(tmp, args.out, args.type, args.threads)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e9:.2f} GB, {args.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
