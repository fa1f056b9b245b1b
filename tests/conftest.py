"""Shared fixtures: tiny random-weight checkpoints in the real VILA layout, and their engines.

Built once per test session under pytest's temp dir; every family and projector type the runtime
supports has one.
"""
import os
import sys

# torch's intra-op pool (and numpy's OpenBLAS) on one thread, here and in the export/CLI processes
# the tests start; set before either is imported. The tests' models are tiny, so each op is
# microseconds of work behind an OpenMP fork/join: on 2 cores the torch reference drew a VILA-U
# video in 1.7-3 s on one thread and 40 s on two (host under load; vila_edge_export/gptq.py measured
# the same). Tests of real-size models set their own count for their module (restored below).
# `OMP_NUM_THREADS=2 make test` overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")
TORCH_THREADS = int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 1)     # "4,2": nested OpenMP levels

import pytest  # noqa: E402

from vila_edge_export.build import ExportOptions, export_engine  # noqa: E402
from vila_edge_export.fixtures import write_fixture  # noqa: E402

# name: (fixture kind, projector, shape, extra write options)
CHECKPOINTS = {
    "vila1.5-3b-downsample": ("vila1.5", "mlp_downsample", "tiny", {}),
    "vila1.5-3b-linear": ("vila1.5", "linear", "tiny", {}),
    "vila1.5-3b-mlp2x": ("vila1.5", "mlp2x_gelu", "tiny", {"dtype": "float16"}),
    "vila1.5-8b-llama3": ("vila1.5-llama3", "mlp_downsample", "tiny", {"dtype": "float32"}),
    "nvila-lite-3x3": ("nvila-lite", "mlp_downsample_3x3_fix", "tiny-448", {"shard": True}),
    "nvila-s2": ("nvila", "mlp_downsample", "tiny-448", {}),          # dynamic_s2, scales 112,224,336
    "vila1.5-3b-s2": ("vila1.5-s2", "mlp_downsample", "tiny", {}),    # s2wrapper, scales 104,208
}


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_restored():
    """A module that sets torch's thread count for a real-size model (test_awq_smollm2, test_tiny_model's
    slice) leaves the next modules on the count set above."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vila_edge")


@pytest.fixture(scope="session")
def bundled_pipeline():
    """Pipeline() on the shipped engine, loaded once for every module that only asks it questions."""
    from vila_edge import Pipeline
    return Pipeline()


@pytest.fixture(scope="session")
def bundled_orin(workdir):
    """The bundled model's checkpoint exported --target orin (the standard-op graph the device runners
    take; the bundled engine is target cpu's fused graph), fp16 and --quant none like the bundled one
    (the projector + splice kernel writes fp16 rows). Once per session, a few seconds."""
    from benchmarks.device_fixture import export_orin
    return export_orin(str(workdir / "engines" / "vila-tiny-shapes-orin"))


@pytest.fixture(scope="session")
def checkpoint(workdir):
    """checkpoint(name) -> path, written on first use."""
    made = {}

    def get(name):
        if name not in made:
            kind, proj, shape, extra = CHECKPOINTS[name]
            made[name] = write_fixture(str(workdir / "ckpt" / name), kind, proj, shape, seed=len(made), **extra)
        return made[name]
    return get


@pytest.fixture(scope="session")
def engine(workdir, checkpoint):
    """engine(name, dtype="fp32", **export options) -> engine dir, exported on first use; the options
    are flat (quant="rtn", group_size=64, target="orin", ...: ExportOptions.flat)."""
    made = {}

    def get(name, dtype="fp32", **opts):
        key = (name, dtype, tuple(sorted(opts.items())))
        if key not in made:
            out = str(workdir / "engines" / f"{name}-{dtype}-{len(made)}")
            opts = ExportOptions.flat(dtype=dtype, progress=False, **opts)
            export_engine(checkpoint(name), out, opts)
            made[key] = out
        return made[key]
    return get


def env_without(tmp_path, *modules: str) -> dict:
    """An environment for a child process in which `modules` cannot be imported (stub packages that
    raise ImportError, first on PYTHONPATH) and this checkout's code can."""
    stubs = tmp_path / "stubs"
    for module in modules:
        (stubs / module).mkdir(parents=True, exist_ok=True)
        (stubs / module / "__init__.py").write_text(f"raise ImportError('{module} hidden by the test')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(stubs), root]))


def data(name: str) -> str:
    return os.path.join(os.path.dirname(__file__), "data", name)


def scene_images() -> list:
    """A real photo and a non-square noise image (tiles and padding differ from the square case)."""
    import numpy as np
    from PIL import Image

    from vila_edge.preprocess import load_image

    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (70, 150, 3), dtype=np.uint8))
    return [load_image(data("robot_scene.png")), noise]


def reference_inputs(spec, ref, prompt_text, images, pipe):
    """Prompt embeddings built by the reference alone (its tokenizer, its splice, HF preprocessing);
    only the rendered chat template is the pipeline's."""
    import numpy as np

    from vila_edge_export.reference import hf_pixels
    from vila_edge.families import DYNAMIC
    from vila_edge.preprocess import dynamic_tiles

    rendered = pipe.template.render([("user", prompt_text)])
    if spec.scales is not None:      # multi-scale: one unit per image, VILA's own merge (reference_s2.py)
        from vila_edge_export.reference_s2 import image_features
        return ref.embed(ref.tokenize(rendered), image_features(ref, spec, images))
    tiles_per_image = []
    feats = []
    for img in images:
        tiles = (dynamic_tiles(img, spec.vision.image_size, spec.min_tiles, spec.max_tiles)
                 if spec.image_mode == DYNAMIC else [img])
        tiles_per_image.append(len(tiles))
        feats += list(ref.encode_images(np.concatenate([hf_pixels(spec, t) for t in tiles])))
    if spec.image_mode == DYNAMIC:
        pieces = rendered.split("<image>")
        rendered = pieces[0] + "".join("<image>\n" * n + p for n, p in zip(tiles_per_image, pieces[1:]))
    return ref.embed(ref.tokenize(rendered), feats)
