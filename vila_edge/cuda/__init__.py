"""CUDA kernels of the Orin hot path (kernels/csrc), loaded with cuda-python.

`reference` is pure numpy (the oracles, importable anywhere); `driver` and `kernels` need
cuda-python and an NVIDIA driver and are imported only by code that runs on a GPU.
"""
