"""Device selection: a device that is not usable fails in one clear line naming what is missing;
TensorRT's provider options and optimisation profile (manifest build.tensorrt, target orin)."""
import os
import types

import onnxruntime as ort
import pytest

from vila_edge import Pipeline, devices, targets
from vila_edge.cache import bundled_engine
from vila_edge.cli import main
from vila_edge.errors import DeviceUnavailable, EngineError, UsageError
from vila_edge.manifest import Manifest
from vila_edge.trt_profile import check_context, engine_profile, profiles, provider_shapes

NO_CUDA_EP = "CUDAExecutionProvider" not in ort.get_available_providers()
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.skipif(not NO_CUDA_EP, reason="this onnxruntime has a CUDA provider")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_gpu_device_without_onnxruntime_gpu(device):
    with pytest.raises(DeviceUnavailable, match=f"device '{device}': this onnxruntime .* no CUDA execution provider"
                                                f".*install onnxruntime-gpu"):
        Pipeline(device=device)


def test_unknown_device():
    with pytest.raises(UsageError, match="device 'gpu' unknown; expected one of cpu, cpu-iobinding, cuda, tensorrt"):
        Pipeline(device="gpu")


def test_tensorrt_libraries_missing(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_PROVIDERS)
    monkeypatch.setattr(devices, "tensorrt_found", lambda: False)
    with pytest.raises(DeviceUnavailable, match="TensorRT's libraries .*libnvinfer.so.10.* are not found"):
        devices.require("tensorrt")


def test_tensorrt_provider_missing(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_PROVIDERS[1:])
    with pytest.raises(DeviceUnavailable, match="no TensorRT execution provider"):
        devices.require("tensorrt")


def test_cuda_python_missing(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_PROVIDERS)
    monkeypatch.setitem(__import__("sys").modules, "vila_edge.cuda.driver", None)     # import fails
    with pytest.raises(DeviceUnavailable, match="device 'cuda': cuda-python is not installed.*vila-edge\\[cuda\\]"):
        devices.require("cuda")


def test_silent_cpu_fallback_is_refused():
    fell_back = types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceUnavailable,
                       match="did not start CUDAExecutionProvider .*running on CPUExecutionProvider"):
        devices.check_active(fell_back, "cuda", "llm.onnx")
    devices.check_active(types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                         "cuda", "llm.onnx")


@pytest.mark.skipif(not NO_CUDA_EP, reason="this onnxruntime has a CUDA provider")
def test_cli_device_cuda_one_line_exit_2(capsys, bundled_orin):
    rc = main(["chat", bundled_orin, "What color is the square?", "--device", "cuda"])     # an engine it takes
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "onnxruntime-gpu" in err and err.startswith("vila-edge: error: device 'cuda'")


def test_profile_shapes_by_hand():
    m = Manifest.load(bundled_engine())          # 4 layers, 2 KV heads x 64, hidden 256, 96 px, resize
    p = profiles(m, max_context=1000, prefill_chunk=512, block_size=16)
    assert p["llm"]["inputs_embeds"] == {"min": [1, 1, 256], "opt": [1, 1, 256], "max": [1, 512, 256]}
    assert p["llm"]["position_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 512]}
    # P: whole blocks; round_up(1000, 16) = 1008 at most, opt round_up(500, 16) = 512.
    assert p["llm"]["past_v_3"] == {"min": [1, 2, 64], "opt": [512, 2, 64], "max": [1008, 2, 64]}
    assert len(p["llm"]) == 2 + 2 * 4
    assert p["vision"] == {"pixel_values": {"min": [1, 3, 96, 96], "opt": [1, 3, 96, 96], "max": [1, 3, 96, 96]}}
    assert profiles(m, 100, 512, 16)["llm"]["inputs_embeds"]["max"] == [1, 100, 256]   # chunk <= context
    opts = provider_shapes({"a": {"min": [1, 2], "opt": [3, 2], "max": [9, 2]},
                            "b": {"min": [1], "opt": [1], "max": [4]}})
    assert opts == {"trt_profile_min_shapes": "a:1x2,b:1", "trt_profile_opt_shapes": "a:3x2,b:1",
                    "trt_profile_max_shapes": "a:9x2,b:4"}


def test_orin_engine_manifest_has_profile(engine):
    eng = engine("vila1.5-3b-downsample", target="orin")
    m = Manifest.load(eng)
    p = engine_profile(eng, m)
    # Fixture: hidden 64, 2 layers, 2 KV heads x 16, max_positions 4096; runtime defaults 4096 / 512 / 16.
    assert (p["max_context"], p["prefill_chunk"], p["block_size"]) == (4096, 512, 16)
    assert p["llm"]["inputs_embeds"]["max"] == [1, 512, 64]
    assert p["llm"]["past_k_1"] == {"min": [1, 2, 16], "opt": [2048, 2, 16], "max": [4096, 2, 16]}
    assert m.build["graph"] == "standard"
    check_context(eng, p, 4096, 16)
    with pytest.raises(EngineError, match="covers 4096 past positions; max_context 4100 .* needs 4112"):
        check_context(eng, p, 4100, 16)
    with pytest.raises(EngineError, match="no build.tensorrt profile.*--target orin"):
        engine_profile(bundled_engine(), Manifest.load(bundled_engine()))


def test_tensorrt_provider_options(engine, tmp_path):
    eng = engine("vila1.5-3b-downsample", target="orin")
    m = Manifest.load(eng)
    trt, cuda = devices.providers("tensorrt", eng, m, engine_profile(eng, m)["llm"], stream=1234)
    assert trt[0] == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider",
                                                               {"device_id": "0", "user_compute_stream": "1234"})
    o = trt[1]
    assert o["trt_engine_cache_enable"] == "True" and o["trt_engine_cache_path"] == os.path.join(eng, "trt_cache")
    assert os.path.isdir(o["trt_engine_cache_path"]) and o["trt_fp16_enable"] == "False"
    assert "past_k_1:4096x2x16" in o["trt_profile_max_shapes"]
    with pytest.raises(EngineError, match="needs the standard-op LLM graph.*--target orin"):
        devices.providers("tensorrt", bundled_engine(), Manifest.load(bundled_engine()))
    assert devices.providers("cpu-iobinding", eng, m) == ["CPUExecutionProvider"]


def test_export_notice(monkeypatch):
    monkeypatch.setattr(devices, "trt_builder_missing", lambda: "TensorRT is not installed here (no `import tensorrt`)")
    line = targets.notice("orin")
    assert "\n" not in line and "engine cache is built on first load on the device" in line
    monkeypatch.setattr(devices, "trt_builder_missing", lambda: None)
    assert "building the TensorRT engine cache" in targets.notice("orin")
    assert targets.notice("cpu") is None
