// The one translation unit of the kernel library (llm.c's way: ops live in headers, one .cu
// includes them). Built into build/kernels/vila_kernels.fatbin (sm_87 + sm_90, loaded from
// Python with cuModuleLoadData) and libvila_kernels.so (the C ABI of vila_kernels.h).
#include "int4_gemv.cuh"
#include "paged_attention.cuh"
#include "projector.cuh"
