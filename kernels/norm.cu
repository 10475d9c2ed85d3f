// RMSNorm, alone and fused with the residual add that precedes it in every layer.
//
// One block per row, each thread holding its float4s of the row in registers: every load
// of the row is issued before the first is used (a strided loop that accumulates as it
// loads waits one full memory round trip per iteration: ~10 us for a 4096-wide row).
// The normed rows feed matmuls, whose tensor cores take bf16: they are written as bf16.
#include "common.cuh"

#define NORM_MAX_VEC 4  // float4s per thread: rows up to 4 * 4 * 1024 = 16384 wide

// ADD: res += delta first (res is the residual stream, updated in place).
// grid: rows, block: min(1024, d / 4 rounded up to a warp); d % 4 == 0.
template <bool ADD>
__device__ void norm_row(float* __restrict__ res, const float* __restrict__ delta, const float* __restrict__ weight,
                         __nv_bfloat16* __restrict__ out, int d, float eps) {
    const int n4 = d / 4;
    float4* r4 = reinterpret_cast<float4*>(res);
    float4 v[NORM_MAX_VEC];
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_MAX_VEC; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n4) {
            v[i] = r4[c];
            if (ADD) {
                const float4 e = reinterpret_cast<const float4*>(delta)[c];
                v[i].x += e.x, v[i].y += e.y, v[i].z += e.z, v[i].w += e.w;
                r4[c] = v[i];
            }
            sq = fmaf(v[i].x, v[i].x, sq);
            sq = fmaf(v[i].y, v[i].y, sq);
            sq = fmaf(v[i].z, v[i].z, sq);
            sq = fmaf(v[i].w, v[i].w, sq);
        }
    }
    const float scale = rsqrtf(block_sum(sq) / d + eps);
#pragma unroll
    for (int i = 0; i < NORM_MAX_VEC; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n4) {
            const float4 w = reinterpret_cast<const float4*>(weight)[c];
            __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out) + 2 * c;
            o[0] = __floats2bfloat162_rn(v[i].x * scale * w.x, v[i].y * scale * w.y);
            o[1] = __floats2bfloat162_rn(v[i].z * scale * w.z, v[i].w * scale * w.w);
        }
    }
}

// out = rms_norm(x) * weight.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    __nv_bfloat16* __restrict__ out, int d, float eps) {
    pdl_start();
    const size_t off = (size_t)blockIdx.x * d;
    norm_row<false>(const_cast<float*>(x) + off, nullptr, weight, out + off, d, eps);
}

// residual += delta; out = rms_norm(residual) * weight: one read of each input, one write
// of each output, so the add costs no extra pass over memory.
extern "C" __global__ void add_rms_norm(float* __restrict__ residual, const float* __restrict__ delta,
                                        const float* __restrict__ weight, __nv_bfloat16* __restrict__ out, int d,
                                        float eps) {
    pdl_start();
    const size_t off = (size_t)blockIdx.x * d;
    norm_row<true>(residual + off, delta + off, weight, out + off, d, eps);
}
