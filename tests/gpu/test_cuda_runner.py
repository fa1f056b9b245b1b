"""The device runner on ONNX Runtime's CUDA provider against the numpy runner, on the bundled model's
checkpoint exported --target orin (the device runners' engine; the bundled one is target cpu's fused
graph). Needs onnxruntime-gpu, cuda-python, a GPU and the export extra (torch) (make device-check's
bare machine has no ORT GPU: there it skips)."""
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("onnxruntime has no CUDA execution provider (onnxruntime-gpu)", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")

from vila_edge.cuda import driver  # noqa: E402

_ok, _why = driver.probe()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from vila_edge import Pipeline  # noqa: E402

pytestmark = pytest.mark.gpu
EX = "models/vila-tiny-shapes/examples/"


@pytest.fixture(scope="module")
def orin(tmp_path_factory):
    pytest.importorskip("torch", reason="the --target orin export needs the export extra (torch)")
    from benchmarks.device_fixture import export_orin
    return export_orin(str(tmp_path_factory.mktemp("orin") / "engine"))


def test_cuda_greedy_equals_cpu(orin):
    cpu, gpu = Pipeline(orin), Pipeline(orin, device="cuda")
    assert type(gpu.llm.runner).__name__ == "DeviceLLMRunner"
    for img, q in [("color.png", "What color is the square?"), ("count.png", "How many stars are there?")]:
        assert gpu.chat(EX + img, q, max_new_tokens=12) == cpu.chat(EX + img, q, max_new_tokens=12)


def test_cuda_logits_close(orin):
    cpu, gpu = Pipeline(orin), Pipeline(orin, device="cuda")
    ids = np.array([1, 5, 6, 7, 8, 9], np.int64)
    a = cpu.llm.prefill(0, cpu.embed(ids, [], []), ids)[0]
    b = gpu.llm.prefill(0, gpu.embed(ids, [], []), ids)[0]
    # fp16 engine: CUDA and CPU kernels round differently; within fp16 activations' error.
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).max())
    assert int(np.argmax(a)) == int(np.argmax(b))
