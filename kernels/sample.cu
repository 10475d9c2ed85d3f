// Greedy token choice on the GPU, so that only token ids cross to the host.
#include "common.cuh"

__device__ __forceinline__ void keep_better(float& v, uint32_t& i, float ov, uint32_t oi) {
    // The larger value wins; on a tie the smaller index (the CPU's `argmax` keeps the first).
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// ids[r] = argmax(logits[r, :]). grid: rows, block: 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, uint32_t* __restrict__ ids, int vocab) {
    pdl_start();
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float best = -INFINITY;
    uint32_t idx = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) keep_better(best, idx, row[i], i);
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1)
        keep_better(best, idx, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, idx, o));
    __shared__ float vals[32];
    __shared__ uint32_t idxs[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) {
        vals[warp] = best;
        idxs[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < blockDim.x / WARP; w++) keep_better(best, idx, vals[w], idxs[w]);
        ids[blockIdx.x] = idx == 0xffffffffu ? 0 : idx;
    }
}
