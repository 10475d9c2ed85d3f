// FP8 weights: bf16 rows quantized to E4M3 with one scale per row (amax / 448), the scale
// stored times 2^56 as kernels/matmul.cu reads it. Used for dummy weights made on the GPU.
#include "common.cuh"
#include <cuda_fp8.h>

// grid: rows, block: 256. in bf16 [rows, K]; out E4M3 [rows, K]; scales f32 [rows].
extern "C" __global__ void quantize_rows_fp8(const __nv_bfloat16* __restrict__ in, uint8_t* __restrict__ out,
                                             float* __restrict__ scales, int K) {
    pdl_start();
    const __nv_bfloat16* row = in + (size_t)blockIdx.x * K;
    float amax = 0.f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) amax = fmaxf(amax, fabsf(bf16_to_f32(row[i])));
    amax = block_max(amax);
    const float scale = amax > 0.f ? amax / 448.f : 1.f;
    uint8_t* dst = out + (size_t)blockIdx.x * K;
    for (int i = threadIdx.x; i < K; i += blockDim.x)
        dst[i] = __nv_cvt_float_to_fp8(bf16_to_f32(row[i]) / scale, __NV_SATFINITE, __NV_E4M3);
    if (threadIdx.x == 0) scales[blockIdx.x] = ldexpf(scale, 56);
}
