// Embedding lookup, row gathering and the dtype conversions around them.
#include "common.cuh"

// out[t, :] = table[tokens[t], :]. grid: tokens, block: 1024.
extern "C" __global__ void embed_rows(const __nv_bfloat16* __restrict__ table, const uint32_t* __restrict__ tokens,
                                      float* __restrict__ out, int hidden) {
    pdl_start();
    const size_t row = tokens[blockIdx.x];
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)blockIdx.x * hidden + i] = bf16_to_f32(table[row * hidden + i]);
}

// A drafting head's input row t, bf16 (`width` wide): [table[tokens[t], :] | features[t, :]
// | 1 | 0 ...], the 1 multiplying the head's bias column and the zeros padding the row to
// a width the matmul takes. grid: tokens, block: 256.
extern "C" __global__ void embed_concat_rows(const __nv_bfloat16* __restrict__ table,
                                             const uint32_t* __restrict__ tokens,
                                             const __nv_bfloat16* __restrict__ features,
                                             __nv_bfloat16* __restrict__ out, int hidden, int width) {
    pdl_start();
    const size_t row = tokens[blockIdx.x];
    const __nv_bfloat16* f = features + (size_t)blockIdx.x * hidden;
    __nv_bfloat16* o = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        if (i < hidden)
            o[i] = table[row * hidden + i];
        else if (i < 2 * hidden)
            o[i] = f[i - hidden];
        else
            o[i] = __float2bfloat16_rn(i == 2 * hidden ? 1.f : 0.f);
    }
}

// out[r, :] = x[index[r], :] (the rows whose logits a step returns), rows of `width` 16-bit
// halves (bf16 values, or f32 values as two halves each). grid: rows, block: 1024.
extern "C" __global__ void gather_rows(const unsigned short* __restrict__ x, const uint32_t* __restrict__ index,
                                       unsigned short* __restrict__ out, int width) {
    pdl_start();
    const size_t src = index[blockIdx.x];
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        out[(size_t)blockIdx.x * width + i] = x[src * width + i];
}

// Round f32 activations to bf16 for the tensor cores.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ out, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Dummy weights: element i is a normal value with standard deviation `std`, a pure
// function of (seed, i) so that any grid gives the same tensor. Box-Muller on two
// hashed uniforms; even and odd elements take the cosine and sine of one pair.
extern "C" __global__ void fill_normal_bf16(__nv_bfloat16* __restrict__ out, size_t n, uint64_t seed, float std) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint64_t pair = i / 2;
        const uint64_t a = splitmix64(seed ^ splitmix64(2 * pair));
        const uint64_t b = splitmix64(seed ^ splitmix64(2 * pair + 1));
        const float u1 = fmaxf((float)((a >> 40) + 1) * (1.0f / 16777217.0f), 1e-7f);  // (0, 1]
        const float u2 = (float)(b >> 40) * (1.0f / 16777216.0f);
        const float r = sqrtf(-2.0f * logf(u1)) * std;
        float s, c;
        sincospif(2.0f * u2, &s, &c);
        out[i] = __float2bfloat16_rn(r * ((i & 1) ? s : c));
    }
}
