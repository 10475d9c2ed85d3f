// A row's likeliest tokens on the GPU, so that only k (id, logit) pairs and the row's
// log-sum-exp cross to the host (core::tree::top_log_probs: what a draft tree expands).
//
// One block of 512 threads per row and one pass over it for the top k: each thread keeps
// the best k of the ids it visits in registers, sorted "logit down, id up" (the host's
// `top_k` order), each warp merges its 32 lists into its best k, and the first warp merges
// the warps' lists. A second pass sums the exponentials as the host does: the maximum in
// f32, exp(logit - max) in f64, summed in f64 (in another order, so the last bits of the
// log-sum-exp may differ from the host's). Rows holding NaN are not supported.
#include "common.cuh"

#define TOPK_THREADS 512
#define TOPK_BOUNDS __launch_bounds__(TOPK_THREADS)
// The most tokens per row (core::tree::MAX_TREE_TOP_K).
#define TOPK_MAX 16
// The id of an empty entry: worse than any real one (a real -inf logit included).
#define TOPK_EMPTY 0xffffffffu

// Whether (v, i) comes before (w, j): the larger logit, on a tie the lower id.
__device__ __forceinline__ bool before(float v, uint32_t i, float w, uint32_t j) {
    return v > w || (v == w && i < j);
}

// The best of the warp's (v, i), in every lane.
__device__ __forceinline__ void warp_best(float& v, uint32_t& i) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// A sorted list of at most TOPK_MAX entries with constant indices only, so that it stays
// in registers: an entry is carried down the list, swapping with every worse one.
struct TopList {
    float v[TOPK_MAX];
    uint32_t i[TOPK_MAX];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int j = 0; j < TOPK_MAX; j++) {
            v[j] = -INFINITY;
            i[j] = TOPK_EMPTY;
        }
    }

    __device__ __forceinline__ void insert(float cv, uint32_t ci, int k) {
#pragma unroll
        for (int j = 0; j < TOPK_MAX; j++) {
            if (j < k && before(cv, ci, v[j], i[j])) {
                const float tv = v[j];
                const uint32_t ti = i[j];
                v[j] = cv;
                i[j] = ci;
                cv = tv;
                ci = ti;
            }
        }
    }

    // Entry k - 1: what a newcomer must beat.
    __device__ __forceinline__ void last(int k, float& lv, uint32_t& li) const {
#pragma unroll
        for (int j = 0; j < TOPK_MAX; j++) {
            if (j == k - 1) {
                lv = v[j];
                li = i[j];
            }
        }
    }

    // Drops the first entry.
    __device__ __forceinline__ void pop() {
#pragma unroll
        for (int j = 0; j + 1 < TOPK_MAX; j++) {
            v[j] = v[j + 1];
            i[j] = i[j + 1];
        }
        v[TOPK_MAX - 1] = -INFINITY;
        i[TOPK_MAX - 1] = TOPK_EMPTY;
    }
};

// The warp's best k of its lanes' lists, in order, into (wv, wi) (lane 0 writes them).
__device__ void warp_merge(TopList& l, int k, float* wv, uint32_t* wi) {
    for (int r = 0; r < k; r++) {
        float v = l.v[0];
        uint32_t i = l.i[0];
        warp_best(v, i);
        if (i != TOPK_EMPTY && l.i[0] == i) l.pop();
        if (threadIdx.x % WARP == 0) {
            wv[r] = v;
            wi[r] = i;
        }
    }
}

// (x, t) into the thread's list if it beats entry k - 1 (lv, li), which then moves.
__device__ __forceinline__ void consider(float x, uint32_t t, int k, TopList& l, float& lv, uint32_t& li) {
    if (before(x, t, lv, li)) {
        l.insert(x, t, k);
        l.last(k, lv, li);
    }
}

// Value u (0..7) of two float4 loads, without indexing registers by a variable.
__device__ __forceinline__ float pick(float4 a, float4 b, int u) {
    const float4 v = u < 4 ? a : b;
    const int w = u & 3;
    return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// Each thread's best k of the row, and the row's maximum (every thread gets it). Rows of
// a multiple of 4 are read as float4, two loads in flight per thread (the rest of the
// loop is rolled, so that one copy of `insert` keeps the list in registers).
__device__ float scan_row(const float* __restrict__ row, int vocab, int k, TopList& l) {
    float m = -INFINITY, lv = -INFINITY;
    uint32_t li = TOPK_EMPTY;
    if (vocab % 4 == 0) {
        const float4* row4 = (const float4*)row;
        const int n4 = vocab / 4;
        const float4 none = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        for (int b = threadIdx.x; b < n4; b += 2 * blockDim.x) {
            const int b2 = b + blockDim.x;
            const float4 first = row4[b], second = b2 < n4 ? row4[b2] : none;
#pragma unroll 1
            for (int u = 0; u < (b2 < n4 ? 8 : 4); u++) {
                const float x = pick(first, second, u);
                m = fmaxf(m, x);
                consider(x, 4 * (u < 4 ? b : b2) + (u & 3), k, l, lv, li);
            }
        }
    } else {
        for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
            m = fmaxf(m, row[t]);
            consider(row[t], t, k, l, lv, li);
        }
    }
    return block_max(m);
}

// For each row of `logits`: out[row * (2 + 2k) ..] = its log-sum-exp (an f64 in two
// words), the ids of its k largest logits (largest first, ties to the lower id; TOPK_EMPTY
// past the vocabulary), then those logits' f32 bits. k <= TOPK_MAX. grid: rows, block: 512.
extern "C" __global__ void TOPK_BOUNDS top_log_probs_rows(const float* __restrict__ logits,
                                                          uint32_t* __restrict__ out, int vocab, int k) {
    pdl_start();
    __shared__ float sv[TOPK_THREADS / WARP][TOPK_MAX];
    __shared__ uint32_t si[TOPK_THREADS / WARP][TOPK_MAX];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    TopList l;
    l.clear();
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
    const float m = scan_row(row, vocab, k, l);
    warp_merge(l, k, sv[warp], si[warp]);
    double sum = 0.0;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) sum += exp((double)(row[t] - m));
    sum = block_sum(sum);  // its __syncthreads also publishes sv / si
    uint32_t* o = out + (size_t)blockIdx.x * (2 + 2 * k);
    if (warp != 0) return;
    if (lane == 0) {
        const double lse = (double)m + log(sum);
        o[0] = (uint32_t)__double2loint(lse);
        o[1] = (uint32_t)__double2hiint(lse);
    }
    // Lane w walks warp w's list.
    int at = lane < warps ? 0 : k;
    for (int r = 0; r < k; r++) {
        float v = at < k ? sv[lane][at] : -INFINITY;
        uint32_t i = at < k ? si[lane][at] : TOPK_EMPTY;
        const uint32_t mine = i;
        warp_best(v, i);
        if (i != TOPK_EMPTY && mine == i) at++;
        if (lane == 0) {
            o[2 + r] = i;
            o[2 + k + r] = __float_as_uint(v);
        }
    }
}
