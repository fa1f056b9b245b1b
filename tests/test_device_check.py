"""make device-check (benchmarks/device_check.py) on this machine: it runs what it can, says what it
skipped, fails when a check fails, and needs nothing a bare GPU machine lacks (no ONNX Runtime)."""
import json
import os
import subprocess
import sys

import numpy as np

from benchmarks import device_check
from vila_edge.backend import OrtSession
from vila_edge.cache import bundled_engine
from vila_edge.manifest import Manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_run_reports_skips(tmp_path, capsys):
    assert device_check.main(["--out", str(tmp_path), "--no-build"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["step"]: s for s in summary["steps"]}
    assert status["oracle"]["status"] == "passed"
    assert summary["failed"] == []
    _, no_gpu = device_check.environment()
    if no_gpu:
        assert {"gpu tests", "kernel splice", "benchmark"} <= set(summary["skipped"])
        assert status["kernel splice"]["detail"].startswith("no GPU: ")
    assert "skipped: " in capsys.readouterr().out.splitlines()[-1]


def test_oracle_step_fails_on_a_wrong_engine_output(tmp_path, monkeypatch):
    z = dict(np.load(device_check.FIXTURE))
    z["engine_features"] = (z["engine_features"].astype(np.float32) * 1.05).astype(np.float16)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **z)
    monkeypatch.setattr(device_check, "FIXTURE", bad)
    assert device_check.main(["--out", str(tmp_path / "out"), "--no-build"]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == ["oracle"]


def test_fixture_matches_the_bundled_engine(bundled_orin):
    """The fixture's engine output is what today's export of the bundled checkpoint for the device
    runners (--target orin) computes, and the bundled engine (target cpu) too: the vision graph is the
    target's LLM-independent part (rerun `python -m benchmarks.device_fixture` after an exporter change)."""
    z = np.load(device_check.FIXTURE)
    for engine in (bundled_orin, bundled_engine()):
        m = Manifest.load(engine)
        assert str(z["engine_dtype"]) == m.dtype
        vision = OrtSession(os.path.join(engine, m.files["vision"]), 1)
        got = vision.run({"pixel_values": z["pixels"]})["image_features"].astype(np.float32)
        np.testing.assert_allclose(got, z["engine_features"].astype(np.float32), rtol=1e-3, atol=1e-3)
        assert z["tower"].shape == (len(got), m.vision.grid ** 2, z["ln0_g"].shape[0] // 4)
    assert Manifest.load(bundled_orin).build["graph"] == "standard"


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnxruntime", "tokenizers", "PIL", "llguidance", "jinja2", "vila_edge_export"):
            raise ImportError(f"{name} blocked: a bare GPU machine has none")
sys.meta_path.insert(0, Block())
from benchmarks import device_check
sys.exit(device_check.main(["--out", sys.argv[1], "--no-build"]))
"""


def test_runs_without_onnxruntime(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[passed ] oracle" in proc.stdout
