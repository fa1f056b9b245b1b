"""Write the projector + splice fixture `make device-check` compares the CUDA kernel with.

    python -m benchmarks.device_fixture [--out tests/data/projector_bundled.npz] [--engine DIR]

For the bundled model's example images (same pixels everywhere): the SigLIP tower's features from
the torch reference (vila_edge_export/reference.py, the projector's input), the projector weights
of the checkpoint, and the vision output of the engine the device runners take: the checkpoint
exported --target orin (fp16, --quant none, like the bundled engine; vision.onnx: tower + projector
on ONNX Runtime's CPU provider). The vision graph does not depend on the target, so the bundled
(target cpu) engine gives the same features (tests/test_device_check.py checks both). The GPU machine
has neither ONNX Runtime nor the exporter, so the file carries both sides. Needs the export extra
(torch); rerun after a vision graph or exporter change.
"""
import argparse
import os
import tempfile

import numpy as np

CHECKPOINT = "models/vila-tiny-shapes"
IMAGES = ("color.png", "count.png", "shape.png", "where.png")
DEFAULT_OUT = os.path.join("tests", "data", "projector_bundled.npz")
# mlp_downsample checkpoint keys -> the kernel's names (vila_edge/cuda/reference.py ProjectorWeights)
KEYS = {"layers.1.weight": "ln0_g", "layers.1.bias": "ln0_b", "layers.2.weight": "fc1_w", "layers.2.bias": "fc1_b",
        "layers.4.weight": "fc2_w", "layers.4.bias": "fc2_b"}


def export_orin(out: str, progress: bool = False) -> str:
    """The bundled model's checkpoint as a --target orin engine (the standard-op LLM graph the device
    runners bind), fp16 and unquantized like the bundled engine; `out` is reused when it is one."""
    from vila_edge_export.build import ExportOptions, export_engine
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        export_engine(CHECKPOINT, out, ExportOptions.flat(dtype="fp16", quant="none", target="orin",
                                                          progress=progress))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--engine", help="an existing --target orin export of the checkpoint (default: export one "
                                     "into a temporary directory)")
    args = ap.parse_args(argv)
    if args.engine:
        return write(args.out, args.engine)
    with tempfile.TemporaryDirectory(prefix="device-fixture-") as tmp:
        return write(args.out, export_orin(os.path.join(tmp, "engine"), progress=True))


def write(out: str, engine: str) -> int:
    import torch

    from vila_edge.backend import OrtSession
    from vila_edge.manifest import Manifest
    from vila_edge.preprocess import load_image
    from vila_edge_export.checkpoint import load_weights, read_checkpoint
    from vila_edge_export.reference import ReferenceVLM, hf_pixels

    spec = read_checkpoint(CHECKPOINT)
    if spec.projector.kind != "mlp_downsample":
        raise SystemExit(f"{CHECKPOINT}: projector {spec.projector.kind}; this fixture maps mlp_downsample's keys")
    m = Manifest.load(engine)
    if m.build.get("target") != "orin":
        raise SystemExit(f"{engine}: target {m.build.get('target')!r}; the fixture is the device runners' engine "
                         f"(--target orin)")
    # Rounded to the engine's input dtype once: tower and engine see the same values; stored, so a
    # test can rerun the engine on them (tests/test_device_check.py).
    pixels = np.concatenate([hf_pixels(spec, load_image(os.path.join(CHECKPOINT, "examples", n)))
                             for n in IMAGES]).astype(m.dtype)
    with torch.no_grad():
        tower = ReferenceVLM(spec).tower_features(torch.from_numpy(pixels.astype(np.float32))).numpy()  # [N, S*S, C]
    vision = OrtSession(os.path.join(engine, m.files["vision"]), 1)
    features = vision.run({"pixel_values": pixels})["image_features"]   # [N, T, H]
    weights = {KEYS[k]: v.float().numpy().astype(np.float16)
               for k, v in load_weights(spec.path("mm_projector")).items()}
    np.savez_compressed(out, pixels=pixels, tower=tower.astype(np.float16), engine_features=features.astype(np.float16),
                        merge=spec.projector.merge, order=spec.projector.token_order, engine_dtype=m.dtype, **weights)
    print(f"wrote {out}: {len(IMAGES)} images, tower {list(tower.shape)}, features {list(features.shape)} "
          f"(engine {engine}, target orin)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
