"""Write the projector + splice fixture `make device-check` compares the CUDA kernel with.

    python -m benchmarks.device_fixture [--out tests/data/projector_bundled.npz]

For the bundled model's example images (same pixels everywhere): the SigLIP tower's features from
the torch reference (vila_edge_export/reference.py, the projector's input), the projector weights
of the checkpoint, and the CPU engine's vision output (vision.onnx: tower + projector, fp16, on ONNX
Runtime's CPU provider). The GPU machine has neither ONNX Runtime nor the exporter, so the file
carries both sides. Needs the export extra (torch); rerun after `make bundled-engine`.
"""
import argparse
import os

import numpy as np

CHECKPOINT = "models/vila-tiny-shapes"
IMAGES = ("color.png", "count.png", "shape.png", "where.png")
DEFAULT_OUT = os.path.join("tests", "data", "projector_bundled.npz")
# mlp_downsample checkpoint keys -> the kernel's names (vila_edge/cuda/reference.py ProjectorWeights)
KEYS = {"layers.1.weight": "ln0_g", "layers.1.bias": "ln0_b", "layers.2.weight": "fc1_w", "layers.2.bias": "fc1_b",
        "layers.4.weight": "fc2_w", "layers.4.bias": "fc2_b"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    import torch

    from vila_edge.backend import OrtSession
    from vila_edge.cache import bundled_engine
    from vila_edge.manifest import Manifest
    from vila_edge.preprocess import load_image
    from vila_edge_export.checkpoint import load_weights, read_checkpoint
    from vila_edge_export.reference import ReferenceVLM, hf_pixels

    spec = read_checkpoint(CHECKPOINT)
    if spec.projector.kind != "mlp_downsample":
        raise SystemExit(f"{CHECKPOINT}: projector {spec.projector.kind}; this fixture maps mlp_downsample's keys")
    engine = bundled_engine()
    m = Manifest.load(engine)
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
    np.savez_compressed(args.out, pixels=pixels, tower=tower.astype(np.float16),
                        engine_features=features.astype(np.float16), merge=spec.projector.merge, order=spec.projector.token_order, engine_dtype=m.dtype, **weights)
    print(f"wrote {args.out}: {len(IMAGES)} images, tower {list(tower.shape)}, features {list(features.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
