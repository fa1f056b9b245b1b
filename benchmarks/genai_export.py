"""ORT GenAI's own int4 export of a checkpoint's LLM (its model builder), for bench_peers.py.

    python -m benchmarks.genai_export build/fixtures/smollm2-vila/llm build/genai/smollm2-vila-int4

Runs `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (its defaults: RTN, block 32,
accuracy level 4, GroupQueryAttention, int4 embedding gather when tied) on a view of the llm/
directory whose config.json drops a `quantization_config` (a checkpoint written from a GGUF keeps
one although its tensors are dequantized fp32, and the builder then refuses it).
"""
import json
import os
import subprocess
import sys
import tempfile


def export(llm_dir: str, out: str) -> str:
    if os.path.isfile(os.path.join(out, "genai_config.json")):
        return out
    with tempfile.TemporaryDirectory(prefix="genai-src-") as src:
        for name in os.listdir(llm_dir):
            if name != "config.json":
                os.symlink(os.path.abspath(os.path.join(llm_dir, name)), os.path.join(src, name))
        with open(os.path.join(llm_dir, "config.json")) as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", out,
                        "-p", "int4", "-e", "cpu", "-c", os.path.join(os.path.dirname(os.path.abspath(out)),
                                                                      "genai-cache")], check=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    export(sys.argv[1], sys.argv[2])
