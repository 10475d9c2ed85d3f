// Paged attention over the KV cache for decode (one query per row), verification (k+1
// causal queries per row) and prefill: every query token attends to its row's cached
// positions 0..=position, read through the row's block table.
//
// The step's own keys and values are written to the cache by the same kernel: positions
// the step adds are read from the k and v inputs (rounded to bf16 exactly as the cache
// stores them), so no block reads a cache entry that another block is writing, and one
// launch per layer is saved.
//
// RoPE can happen here too (inv_freq non-null): q and the step's keys arrive unrotated and
// are rotated as they are loaded (before the keys are stored), which saves the rope launch
// of every layer. Lane l holds dimensions l*PL..l*PL+PL-1 of a head, so the partner of each
// (dimension i pairs with i + HD/2, the Hugging Face layout) sits in lane l ^ 16.
//
// With an attention window (the attn_split_win_* kernels), a token at `pos` reads only
// positions p with p < sinks or pos - p < window; the others are neither loaded (their blocks may be back
// in the pool: the table holds NO_BLOCK there) nor scored. A split left with nothing keeps
// its max at -inf, which the merges weigh as 0; the token's own split always has itself.
// WINDOWED is a template flag so that the kernels without a window compile as before.
//
// The sequence is cut into splits of split_len(position) positions; one block handles one
// (kv head, query token, split) and all the query heads that share that kv head (GQA:
// K and V are read once for the group). A second kernel merges the splits. The split
// size is fixed, so a token's arithmetic depends only on its own position: results are
// the same whatever else is in the batch (decode and verification agree bit for bit).
#include "common.cuh"

#define ATTN_WARPS 4
#define ATTN_UNROLL 4
#define MAX_GROUP 8
#define MAX_SPLITS 64  // as batch::MAX_SPLITS

// Positions per split for a token at `pos`: `min_split`, doubled until the token needs at
// most MAX_SPLITS splits. Short splits keep many blocks in flight at short contexts (where
// a step's attention is latency-bound); the cap keeps the merge short at long ones. It
// depends on the token's own position only, so decode and verification still agree bitwise.
__device__ __forceinline__ int split_len(int pos, int min_split) {
    int len = min_split;
    while (pos + 1 > len * MAX_SPLITS) len *= 2;
    return len;
}

template <int PL>
__device__ __forceinline__ void load_bf16(const __nv_bfloat16* p, float* out) {
#pragma unroll
    for (int i = 0; i < PL; i++) out[i] = bf16_to_f32(p[i]);
}

// What the cache would hold for these f32 values.
template <int PL>
__device__ __forceinline__ void load_rounded(const float* p, float* out) {
#pragma unroll
    for (int i = 0; i < PL; i++) out[i] = bf16_to_f32(__float2bfloat16_rn(p[i]));
}

// cos and sin of this lane's dimensions at position `pos`, formed as kernels/rope.cu forms
// them (angle reduced modulo 2*pi in f64, then an f32 sincos).
template <int PL>
__device__ __forceinline__ void rope_angles(int pos, const float* __restrict__ inv_freq, int lane, float* cs, float* sn) {
    constexpr int HALF = PL * WARP / 2;
    const double two_pi = 6.283185307179586;
#pragma unroll
    for (int i = 0; i < PL; i++) {
        double a = (double)pos * (double)inv_freq[(lane * PL + i) % HALF];
        a -= floor(a / two_pi) * two_pi;
        sincosf((float)a, &sn[i], &cs[i]);
    }
}

// Rotates this lane's dimensions of one head, as kernels/rope.cu does; every lane of the
// warp must take part (the partner's values come by shuffle).
template <int PL>
__device__ __forceinline__ void rope_rotate(float* v, const float* cs, const float* sn, int lane) {
#pragma unroll
    for (int i = 0; i < PL; i++) {
        const float other = __shfl_xor_sync(0xffffffffu, v[i], WARP / 2);
        v[i] = lane < WARP / 2 ? v[i] * cs[i] - other * sn[i] : v[i] * cs[i] + other * sn[i];
    }
}

// partial: [tokens, heads, max_splits, HD + 2] holding (max score, sum of exp, unnormalised
// output) per split. grid: (kv_heads, tokens, max_splits), block: 32 * ATTN_WARPS.
template <int HD, bool WINDOWED>
__device__ void attn_split(const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,
                           __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
                           const uint32_t* __restrict__ positions, const uint32_t* __restrict__ slots,
                           const uint32_t* __restrict__ token_row, const uint32_t* __restrict__ row_first,
                           const uint32_t* __restrict__ block_tables, int max_blocks, int block_size, int heads,
                           int kv_heads, int max_splits, float* __restrict__ partial,
                           const float* __restrict__ inv_freq, int min_split, int window, int sinks) {
    constexpr int PL = HD / WARP;  // head dimensions per lane
    pdl_start();
    const int kvh = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
    const int pos = positions[t], ctx = pos + 1, len = split_len(pos, min_split);
    const int start = split * len;
    if (start >= ctx) return;
    const int end = min(ctx, start + len);
    const int g = heads / kv_heads, lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int kv_dim = kv_heads * HD;
    const uint32_t* table = block_tables + (size_t)token_row[t] * max_blocks;
    const float scale = 1.0f / sqrtf((float)HD);
    // Positions from first_pos on are this step's: token first_tok + (p - first_pos).
    const int first_tok = row_first[t], first_pos = positions[first_tok];
    float cs[PL], sn[PL];  // token t's rotation
    if (inv_freq) rope_angles<PL>(positions[t], inv_freq, lane, cs, sn);
    if (split == 0 && warp == 0) {  // the one block that stores token t's key and value for this head
        const size_t src = (size_t)t * kv_dim + kvh * HD + lane * PL, dst = (size_t)slots[t] * kv_dim + kvh * HD + lane * PL;
        float kr[PL];
#pragma unroll
        for (int i = 0; i < PL; i++) kr[i] = k_new[src + i];
        if (inv_freq) rope_rotate<PL>(kr, cs, sn, lane);
#pragma unroll
        for (int i = 0; i < PL; i++) {
            k_cache[dst + i] = __float2bfloat16_rn(kr[i]);
            v_cache[dst + i] = __float2bfloat16_rn(v_new[src + i]);
        }
    }

    float qr[MAX_GROUP][PL], m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][PL];
#pragma unroll
    for (int j = 0; j < MAX_GROUP; j++) {
        m[j] = -INFINITY;
        l[j] = 0.f;
#pragma unroll
        for (int i = 0; i < PL; i++) {
            acc[j][i] = 0.f;
            qr[j][i] = j < g ? q[((size_t)t * heads + kvh * g + j) * HD + lane * PL + i] : 0.f;
        }
        if (inv_freq && j < g) rope_rotate<PL>(qr[j], cs, sn, lane);
    }
    // Each warp takes positions start + warp, + ATTN_WARPS, ...; ATTN_UNROLL of them are
    // loaded before any is used, so that the loads' latency overlaps (one at a time, the
    // loop was a chain of dependent memory round trips).
    for (int p0 = start + warp; p0 < end; p0 += ATTN_WARPS * ATTN_UNROLL) {
        float kf[ATTN_UNROLL][PL], vf[ATTN_UNROLL][PL];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            const int p = p0 + u * ATTN_WARPS;
            const bool read = p < end && (!WINDOWED || p < sinks || pos - p < window);  // uniform in the warp
            if (read && p >= first_pos) {
                const size_t off = (size_t)(first_tok + p - first_pos) * kv_dim + kvh * HD + lane * PL;
                if (inv_freq) {
                    float pc[PL], ps[PL];
                    rope_angles<PL>(p, inv_freq, lane, pc, ps);
#pragma unroll
                    for (int i = 0; i < PL; i++) kf[u][i] = k_new[off + i];
                    rope_rotate<PL>(kf[u], pc, ps, lane);
#pragma unroll
                    for (int i = 0; i < PL; i++) kf[u][i] = bf16_to_f32(__float2bfloat16_rn(kf[u][i]));
                } else {
                    load_rounded<PL>(k_new + off, kf[u]);
                }
                load_rounded<PL>(v_new + off, vf[u]);
            } else if (read) {
                const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
                const size_t off = slot * kv_dim + kvh * HD + lane * PL;
                load_bf16<PL>(k_cache + off, kf[u]);
                load_bf16<PL>(v_cache + off, vf[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            const int p = p0 + u * ATTN_WARPS;
            if (p >= end) break;
            if (WINDOWED && p >= sinks && pos - p >= window) continue;  // left out by the window
#pragma unroll
            for (int j = 0; j < MAX_GROUP; j++) {
                if (j < g) {
                    float d = 0.f;
#pragma unroll
                    for (int i = 0; i < PL; i++) d = fmaf(qr[j][i], kf[u][i], d);
                    const float s = warp_sum(d) * scale;
                    const float mn = fmaxf(m[j], s);
                    const float corr = expf(m[j] - mn), e = expf(s - mn);
                    l[j] = l[j] * corr + e;
#pragma unroll
                    for (int i = 0; i < PL; i++) acc[j][i] = fmaf(e, vf[u][i], acc[j][i] * corr);
                    m[j] = mn;
                }
            }
        }
    }
    // Merge the warps of this block.
    __shared__ float sm[ATTN_WARPS][MAX_GROUP], sl[ATTN_WARPS][MAX_GROUP], sacc[ATTN_WARPS][MAX_GROUP][HD];
#pragma unroll
    for (int j = 0; j < MAX_GROUP; j++) {
        if (j < g) {
            if (lane == 0) {
                sm[warp][j] = m[j];
                sl[warp][j] = l[j];
            }
#pragma unroll
            for (int i = 0; i < PL; i++) sacc[warp][j][lane * PL + i] = acc[j][i];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < g * HD; e += blockDim.x) {
        const int j = e / HD, d = e % HD;
        float mx = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, sm[w][j]);
        float sum = 0.f, out = 0.f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            const float c = sm[w][j] == -INFINITY ? 0.f : expf(sm[w][j] - mx);
            sum = fmaf(sl[w][j], c, sum);
            out = fmaf(sacc[w][j][d], c, out);
        }
        float* dst = partial + (((size_t)t * heads + kvh * g + j) * max_splits + split) * (HD + 2);
        if (d == 0) {
            dst[0] = mx;
            dst[1] = sum;
        }
        dst[2 + d] = out;
    }
}

#define ATTN_ARGS                                                                                            \
    const float *q, const float *k, const float *v, __nv_bfloat16 *kc, __nv_bfloat16 *vc,                   \
        const uint32_t *positions, const uint32_t *slots, const uint32_t *token_row, const uint32_t *row_first, \
        const uint32_t *block_tables, int max_blocks, int block_size, int heads, int kv_heads, int max_splits,  \
        float *partial, const float *inv_freq, int min_split, int window, int sinks
#define ATTN_PASS                                                                                                \
    q, k, v, kc, vc, positions, slots, token_row, row_first, block_tables, max_blocks, block_size, heads, kv_heads, \
        max_splits, partial, inv_freq, min_split, window, sinks
extern "C" __global__ void attn_split_hd64(ATTN_ARGS) { attn_split<64, false>(ATTN_PASS); }
extern "C" __global__ void attn_split_hd128(ATTN_ARGS) { attn_split<128, false>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd64(ATTN_ARGS) { attn_split<64, true>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd128(ATTN_ARGS) { attn_split<128, true>(ATTN_PASS); }

// out[t, h * head_dim + d] from the splits that token t used. grid: (heads, tokens), block: head_dim.
extern "C" __global__ void attn_merge(const float* __restrict__ partial, const uint32_t* __restrict__ positions,
                                      __nv_bfloat16* __restrict__ out, int heads, int head_dim, int max_splits,
                                      int min_split) {
    pdl_start();
    const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    const int len = split_len(positions[t], min_split);
    const int splits = (positions[t] + len) / len;  // ceil((position + 1) / len)
    const float* src = partial + ((size_t)t * heads + h) * max_splits * (head_dim + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, src[s * (head_dim + 2)]);
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < splits; s++) {
        const float* p = src + s * (head_dim + 2);
        const float c = expf(p[0] - mx);
        sum = fmaf(p[1], c, sum);
        acc = fmaf(p[2 + d], c, acc);
    }
    out[((size_t)t * heads + h) * head_dim + d] = __float2bfloat16_rn(acc / sum);  // o's input: bf16
}
