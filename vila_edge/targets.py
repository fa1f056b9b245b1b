"""Engine targets `vila-edge export --target` builds, and the ones it names but cannot build yet."""

TARGETS = ("cpu",)      # ONNX Runtime graphs; they also run on Orin's CPU under ONNX Runtime
UNSUPPORTED = {
    "orin": "TensorRT engines for Jetson Orin are not built by this version; export with --target cpu "
            "(the ONNX engine runs on Orin under ONNX Runtime)",
}
