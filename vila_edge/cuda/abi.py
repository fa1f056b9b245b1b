"""What the Python side must agree on with kernels/csrc/vila_kernels.h: launch geometry and
kernel names. Pure Python (no cuda import) so CPU tests can compare it with the header."""

from vila_edge.families import COLUMN_MAJOR, ROW_MAJOR

WARP = 32
# Each VK_* below equals the #define of the same name in vila_kernels.h.
VK_GEMV_WARPS = 4
VK_GEMV_MAX_M = 4
VK_ATTN_WARPS = 8
VK_ATTN_D_SMALL = 64
VK_ATTN_D_LARGE = 128
VK_LN_THREADS = 256
VK_GEMM_BM = 64
VK_GEMM_BN = 64
VK_GEMM_THREADS = 256
VK_ORDER_ROW_MAJOR = 0
VK_ORDER_COL_MAJOR = 1

ORDER_CODES = {ROW_MAJOR: VK_ORDER_ROW_MAJOR, COLUMN_MAJOR: VK_ORDER_COL_MAJOR}
ATTN_HEAD_DIMS = (VK_ATTN_D_SMALL, VK_ATTN_D_LARGE)
# Group sizes vk_int4_gemv takes (int4_gemv.cuh: VK_REQUIRE(G == 32 || G == 64 || G == 128)).
GEMV_GROUPS = (32, 64, 128)
# The projector's LayerNorm eps (projector.cuh VK_PROJECTOR_LN_EPS): nn.LayerNorm's default, used by
# every VILA projector (NVlabs/VILA@1c88211:llava/model/multimodal_projector/base_projector.py).
LN_EPS = 1e-5
# CUDA limits grid y to 65535 blocks (GEMM row tiles, attention batch).
MAX_GRID_Y = 65535

FATBIN_NAME = "vila_kernels.fatbin"
SHARED_NAME = "libvila_kernels.so"
KERNEL_NAMES = (
    *(f"vk_int4_gemv_m{m}" for m in range(1, VK_GEMV_MAX_M + 1)),
    *(f"vk_paged_attention_decode_d{d}" for d in ATTN_HEAD_DIMS),
    "vk_merge_layernorm_kernel",
    "vk_layernorm_kernel",
    "vk_gemm_bias_act_kernel",
)
