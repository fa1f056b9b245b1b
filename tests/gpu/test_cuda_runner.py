"""The device runner on ONNX Runtime's CUDA provider against the numpy runner on the bundled engine.
Needs onnxruntime-gpu, cuda-python and a GPU (make device-check's bare machine has no ORT GPU: there
it skips)."""
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


def test_cuda_greedy_equals_cpu():
    cpu, gpu = Pipeline(), Pipeline(device="cuda")
    assert type(gpu.llm.runner).__name__ == "DeviceLLMRunner"
    for img, q in [("color.png", "What color is the square?"), ("count.png", "How many stars are there?")]:
        assert gpu.chat(EX + img, q, max_new_tokens=12) == cpu.chat(EX + img, q, max_new_tokens=12)


def test_cuda_logits_close():
    cpu, gpu = Pipeline(), Pipeline(device="cuda")
    ids = np.array([1, 5, 6, 7, 8, 9], np.int64)
    a = cpu.llm.prefill(0, cpu.embed(ids, [], []), ids)[0]
    b = gpu.llm.prefill(0, gpu.embed(ids, [], []), ids)[0]
    # fp16 engine: CUDA and CPU kernels round differently; within fp16 activations' error.
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).max())
    assert int(np.argmax(a)) == int(np.argmax(b))
