"""The memory ledger: every loaded file and every runner buffer counted, the pool sized to the rest."""
import os

import numpy as np
import pytest

from vila_edge import KVConfig, Pipeline
from vila_edge.cli import main
from vila_edge.kv_budget import GiB, MiB, TARGETS, KVBudgetError, Target
from vila_edge.manifest import FORMAT_VERSION, LLMInfo, Manifest, TokenInfo, VisionInfo
from vila_edge.memory import plan
from vila_edge.version import __version__

# VILA1.5-3B int4 (fp16 activations): file sizes of an export at that shape; written as sparse
# files, so the test costs no disk and no export.
FILES_3B = {"llm.onnx": 2 * MiB, "llm.onnx.data": 1_690 * MiB, "vision.onnx": 4 * MiB,
            "vision.onnx.data": 830 * MiB, "embed_tokens.npy": 164 * MiB, "tokenizer.json": 2 * MiB,
            "export_report.json": 4096}
ROLES = {"llm": "llm.onnx", "llm_data": "llm.onnx.data", "vision": "vision.onnx",
         "embeddings": "embed_tokens.npy", "tokenizer": "tokenizer.json", "report": "export_report.json"}


def _engine_3b(path) -> str:
    os.makedirs(path)
    for name, size in FILES_3B.items():
        with open(os.path.join(path, name), "wb") as f:
            f.truncate(size)
    Manifest(format_version=FORMAT_VERSION, exporter_version=__version__, family="vila1.5", template="vicuna_v1",
             dtype="float16", kv_dtype="float16", quant={"method": "rtn", "group_size": 64}, num_video_frames=8,
             llm=LLMInfo(2560, 32, 32, 32, 80, 32000, 32000, 4096, 6912),
             vision=VisionInfo(384, 196, [0.5] * 3, [0.5] * 3, "resize", 1, 1, "column"),
             tokens=TokenInfo(1, [2], None, []), files=ROLES, build={"target": "cpu"}).write(path)
    return path


def test_3b_int4_pool_fills_orin_nano_to_the_block(tmp_path):
    eng = _engine_3b(str(tmp_path / "vila1.5-3b-int4"))
    p = plan(eng, Manifest.load(eng), "orin-nano", 16, 4096)
    nano = TARGETS["orin-nano-8gb"]
    # every file the runtime loads, external data included; the report is never loaded
    assert p.weights == {k: v for k, v in FILES_3B.items() if k != "export_report.json"}
    assert p.block_bytes == 2 * 32 * 32 * 80 * 2 * 16 == 5 * MiB
    rows = {b.name: b.nbytes for b in p.rows}
    assert rows["kv staging"] == 4096 * 2 * 32 * 32 * 80 * 2      # one full fp16 context of K and V
    left = nano.dram_bytes - nano.reserve_bytes - p.total_bytes
    assert 0 <= left < p.block_bytes
    assert p.total_bytes == sum(FILES_3B.values()) - 4096 + sum(rows.values()) + p.num_blocks * 5 * MiB
    assert p.num_blocks >= 256                                      # at least one 4096-token context
    assert "llm.onnx.data" in p.table() and "orin-nano-8gb DRAM" in p.table()


def test_3b_fp16_on_orin_nano_is_refused_with_the_plan(tmp_path):
    eng = _engine_3b(str(tmp_path / "big"))
    with open(os.path.join(eng, "llm.onnx.data"), "wb") as f:
        f.truncate(5_400 * MiB)                                      # fp16 weights
    with pytest.raises(KVBudgetError, match=r"orin-nano-8gb.*buys 0 KV blocks(.|\n)*llm.onnx.data"):
        plan(eng, Manifest.load(eng), "orin-nano", 16, 4096)


@pytest.mark.parametrize("target", ["cpu", "orin"])
def test_runner_allocates_what_the_ledger_counts(engine, target):
    """A small board preset: the pool the runner allocates plus its staging buffer (standard graph;
    the fused graph reads and writes the pool in place: none) are the ledger's rows, and with
    weights, activations and vision they fill the board to within one block."""
    eng = engine("vila1.5-3b-downsample", target=target)
    board = Target("test-board", 64 * MiB, 16 * MiB)
    pipe = Pipeline(eng, max_context=256, kv=KVConfig(budget=board))
    runner, p = pipe.llm.runner, pipe.memory
    rows = {b.name: b.nbytes for b in p.rows}
    assert runner.pool.data.nbytes == p.pool_bytes == p.num_blocks * runner.layout.bytes_per_block
    if target == "orin":
        stage = runner._staging.get()
        assert stage.nbytes == rows["kv staging"]
        runner._staging.put(stage)
    else:
        assert "kv staging" not in rows and not hasattr(runner, "_staging")
    assert pipe.llm.blocks.num_blocks == p.num_blocks
    assert p.weights["llm.onnx"] == os.path.getsize(os.path.join(eng, "llm.onnx"))
    assert 0 <= board.dram_bytes - board.reserve_bytes - p.total_bytes < runner.layout.bytes_per_block


def test_plan_cli(engine, capsys):
    eng = engine("vila1.5-3b-downsample")
    assert main(["plan", eng, "--device", "orin-nano", "--max-context", "512"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "llm.onnx", "activations", "vision buffers", "kv pool", "unplanned"):
        assert row in out
    assert main(["plan", eng, "--device", "12 bananas"]) == 2
