// The SwiGLU activation between the MLP's up and down projections.
#include "common.cuh"

// out = silu(gate) * up, elementwise, in bf16 (the down projection's input).
extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    __nv_bfloat16* __restrict__ out, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * up[i]);
    }
}
