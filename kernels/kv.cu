// Moves of KV cache entries between slots: after a tree verification step, the accepted
// path's keys and values move from their tree storage slots onto consecutive positions.
//
// The moves run in the order given, as the CPU's copy_kv runs them (src/backend/cpu/kv.rs):
// a move whose source an earlier move wrote reads the new entry. One block does every move
// of a cache, one after the other with a barrier between them (a path is a handful of
// slots: there is nothing to parallelize but the bytes of a row).
#include "common.cuh"

// For each move m, slot moves[2m] → slot moves[2m + 1]: the row's `row_bytes` bytes of
// `cache` (bf16 values, or FP8 codes) and, with an FP8 cache (exps non-null), its
// `heads` scale exponents. grid: 1, block: 256.
extern "C" __global__ void kv_copy(uint8_t* cache, signed char* exps,
                                   const uint32_t* __restrict__ moves, int n_moves, int row_bytes, int heads) {
    pdl_start();
    for (int m = 0; m < n_moves; m++) {
        const size_t from = moves[2 * m], to = moves[2 * m + 1];
        if (from != to) {
            // Rows are whole heads of 64 or 128 dimensions: 4-byte words unless the row is odd.
            if (row_bytes % 4 == 0) {
                const uint32_t* src = (const uint32_t*)(cache + from * row_bytes);
                uint32_t* dst = (uint32_t*)(cache + to * row_bytes);
                for (int i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) dst[i] = src[i];
            } else {
                for (int i = threadIdx.x; i < row_bytes; i += blockDim.x)
                    cache[to * row_bytes + i] = cache[from * row_bytes + i];
            }
            if (exps)
                for (int i = threadIdx.x; i < heads; i += blockDim.x) exps[to * heads + i] = exps[from * heads + i];
        }
        __syncthreads();  // the next move may read what this one wrote
    }
}
