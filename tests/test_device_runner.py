"""The device runner (vila_edge/ort_device_runner.py) on ORT's CPU provider against the numpy runner.

The CUDA/TensorRT devices run the same code with device buffers; here "cpu-iobinding" proves the
pointer arithmetic, the bindings, the gather of scattered tables, the scatter of scattered slots and
copy_block: every pass's logits must match the numpy runner's and the pool rows written must be
bit-identical (same graph, same inputs; only masked rows may differ). The device runners take
--target orin engines (the standard-op graph): the bundled model's checkpoint exported so (conftest
`bundled_orin`, fp16 like the bundled engine); the bundled engine itself (target cpu, fused graph with
vila_edge::PagedAttention) is refused.
"""
import ctypes

import numpy as np
import pytest

from vila_edge import Pipeline, ort_device_runner, ort_runner
from vila_edge.cache import bundled_engine
from vila_edge.cli import main
from vila_edge.errors import EngineError
from vila_edge.manifest import Manifest
from vila_edge.ort_device_runner import runs
from vila_edge.runner import RunnerOptions, Tokens

EX = "models/vila-tiny-shapes/examples/"
BS, NB, CTX = 4, 24, 64


def device_pool(runner) -> np.ndarray:
    """A numpy view of the device runner's pool (host memory on this device)."""
    p = runner.pool
    raw = (ctypes.c_char * p.nbytes).from_address(p.ptr)
    return np.frombuffer(raw, p.dtype).reshape(p.shape)


def runner_pair(engine_dir):
    m = Manifest.load(engine_dir)
    cpu = ort_runner.llm(engine_dir, m, NB, BS, CTX, RunnerOptions(threads=1))
    dev = ort_device_runner.llm(engine_dir, m, NB, BS, CTX, RunnerOptions(threads=1, device="cpu-iobinding"))
    return cpu, dev


def slots_of(table, start, T):
    return np.array([table[p // BS] * BS + p % BS for p in range(start, start + T)], np.int64)


def run_both(cpu, dev, table, lengths, seed=0):
    """A prefill of lengths[0] positions then one pass per further length, on both runners."""
    rng = np.random.default_rng(seed)
    start = 0
    for T in lengths:
        ids = rng.integers(3, cpu.vocab_rows, T)
        toks = Tokens(ids)
        slots = slots_of(table, start, T)
        a = cpu.forward(toks, start, table, slots)
        b = dev.forward(toks, start, table, slots)
        # Same graph and inputs: equal up to float reassociation (ORT's kernels may split work differently).
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
        assert int(np.argmax(a)) == int(np.argmax(b))
        start += T
    used = slots_of(table, 0, start)
    L, _, nb, bs, H, D = cpu.pool.data.shape
    want = cpu.pool.data.reshape(L, 2, nb * bs, H, D)[:, :, used]
    got = device_pool(dev).reshape(L, 2, nb * bs, H, D)[:, :, used]
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def bundled_pair(bundled_orin):
    return runner_pair(bundled_orin)


def test_runs():
    assert runs([]) == []
    assert runs([4, 5, 9]) == [(0, 4, 2), (2, 9, 1)]
    assert runs([3, 2, 3, 4]) == [(0, 3, 1), (1, 2, 3)]


@pytest.mark.parametrize("table,lengths", [
    ([0, 1, 2, 3, 4, 5], [7, 1, 1, 1, 1, 6, 1]),     # consecutive: past and new rows bound in the pool
    ([9, 2, 14, 5, 11, 20], [6, 1, 1, 3, 1, 1]),     # scattered: gathered past, scattered new rows
    ([7, 8, 3, 4, 5, 15], [9, 1, 2, 1]),             # runs of consecutive blocks
])
def test_device_runner_equals_numpy_runner(bundled_pair, table, lengths):
    cpu, dev = bundled_pair
    run_both(cpu, dev, table, lengths, seed=len(lengths))


def test_copy_block(bundled_pair):
    cpu, dev = bundled_pair
    run_both(cpu, dev, [16, 17, 18], [10])
    dev.copy_block(17, 21)
    pool = device_pool(dev)
    np.testing.assert_array_equal(pool[:, :, 21], pool[:, :, 17])
    np.testing.assert_array_equal(pool[:, :, 21], cpu.pool.data[:, :, 17])


def test_feature_spans_reach_the_graph(bundled_pair):
    """Image rows given as spans go into the bound input buffer at their offsets."""
    cpu, dev = bundled_pair
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4, cpu.embeddings.width)).astype(np.float32)
    ids = np.array([5, 6, -1, -1, -1, -1, 7], np.int64)
    toks = Tokens(ids, ((2, rows),))
    table = [10, 11]
    slots = slots_of(table, 0, 7)
    np.testing.assert_allclose(dev.forward(toks, 0, table, slots), cpu.forward(toks, 0, table, slots),
                               rtol=1e-5, atol=1e-5)


def test_standard_graph_on_device_runner(engine):
    """The standard-op graph of --target orin (TensorRT's form) through the same bindings."""
    cpu, dev = runner_pair(engine("vila1.5-3b-downsample", target="orin"))
    run_both(cpu, dev, [3, 1, 8, 0, 2], [5, 1, 1, 4, 1])


def test_pipeline_greedy_identical(bundled_orin):
    a, b = Pipeline(bundled_orin, threads=1), Pipeline(bundled_orin, threads=1, device="cpu-iobinding")
    assert type(b.llm.runner).__name__ == "DeviceLLMRunner"
    for img, q in [("color.png", "What color is the square?"), ("where.png", "Where is the circle?")]:
        assert b.chat(EX + img, q, max_new_tokens=12) == a.chat(EX + img, q, max_new_tokens=12)
    with a.conversation() as ca, b.conversation() as cb:      # second turn: prefix blocks reused
        for q in ["What color is the square?", "How many stars are there?"]:
            assert cb.send(EX + "color.png", q) == ca.send(EX + "color.png", q)
            assert cb.last_ids == ca.last_ids


def test_device_image_spans_are_projected_into_the_bound_buffer(bundled_pair):
    """The projector + splice launch path: a DeviceImage span (tower features in device memory) gives
    the logits of the same image's projected rows passed from the host, whole and cut by a chunk.
    HostProjector is GpuProjector's numpy twin (same call), so on a GPU only the kernel differs."""
    from vila_edge.cuda import reference as ref
    from vila_edge.device_splice import DeviceImage, HostProjector
    z = np.load("tests/data/projector_bundled.npz")
    w = ref.ProjectorWeights(int(z["merge"]), *[z[k] for k in ("ln0_g", "ln0_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")])
    tower = z["tower"][1:2]                                               # [1, S*S, C]
    proj = HostProjector(w, int(np.sqrt(tower.shape[1])), str(z["order"]))
    rows = ref.projector(tower, w, str(z["order"]), fp16_intermediates=True).astype(np.float16)[0]
    _, dev = bundled_pair
    x = dev.memory.alloc(tower.shape, np.float16)
    dev.memory.upload(x.ptr, tower)
    ids = np.array([1, 5, 6] + [-1] * len(rows) + [7, 8], np.int64)
    on_host, on_device = Tokens(ids, ((3, rows),)), Tokens(ids, ((3, DeviceImage(x, proj)),))
    for cuts in ([0, len(ids)], [0, 6, len(ids)]):                       # whole; cut inside the image
        logits = []
        for toks, table in ((on_host, [0, 1, 2, 3]), (on_device, [4, 5, 6, 7])):
            for lo, hi in zip(cuts, cuts[1:]):
                out = dev.forward(toks.slice(lo, hi), lo, table, slots_of(table, lo, hi - lo))
            logits.append(out)
        np.testing.assert_array_equal(logits[1], logits[0])
    assert len(DeviceImage(x, proj)[2:5]) == 3 and DeviceImage(x, proj)[2:5].lo == 2


REFUSED = ("device 'cpu-iobinding' needs the standard-op LLM graph TensorRT parses; this engine's is 'fused' "
           "\\(target cpu: its vila_edge::PagedAttention op runs on ORT's CPU provider only\\): export the "
           "checkpoint with --target orin")


def test_fused_graph_engine_is_refused(capsys):
    """A target cpu engine (the bundled one) on a device runner: one EngineError naming the graph and
    the export that fixes it, from the runners, the Pipeline and the CLI (one line, exit 2)."""
    engine = bundled_engine()
    m = Manifest.load(engine)
    assert m.build["graph"] == "fused"
    opts = RunnerOptions(threads=1, device="cpu-iobinding")
    with pytest.raises(EngineError, match=REFUSED):
        ort_device_runner.llm(engine, m, NB, BS, CTX, opts)
    with pytest.raises(EngineError, match=REFUSED):
        ort_device_runner.vision(engine, m, opts)
    with pytest.raises(EngineError, match=REFUSED):
        Pipeline(device="cpu-iobinding")
    assert main(["chat", "bundled", "What color is the square?", "--device", "cpu-iobinding"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vila-edge: error: ") and "--target orin" in err
