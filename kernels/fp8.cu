// FP8 weights: bf16 rows quantized to E4M3 with one scale per row (amax / 448), the scale
// stored times 2^56 as kernels/matmul.cu reads it. Used for dummy weights made on the GPU.
#include "common.cuh"
#include <cuda_fp8.h>

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float m = 0.f;
    for (int w = 0; w < warps; w++) m = fmaxf(m, partial[w]);
    return m;
}

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
