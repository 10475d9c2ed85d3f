// Prefill attention on tensor cores: FlashAttention-2 over the paged KV cache, for the long
// causal rows of a step (prefill chunks; src/backend/cuda/prefill.rs picks them). Decode and
// verification keep the split kernel (kernels/attention.cu), whose results do not depend on
// the batch; this kernel only has to agree with the CPU within the parity tolerance.
//
// Bound by the tensor cores, not by bytes: the split kernel reads a token's whole prefix
// once per query token (O(n^2) bytes for an n-token prompt); here one block takes a tile of
// the row's tokens and the G query heads that share a KV head (PF_ROWS = 64 query rows,
// token-major: row r is token r / G, head r % G) and streams the row's keys and values
// through shared memory once for all of them, PF_KEYS positions at a time: S = Q K^T, an
// online softmax (running max, sum and output per query row), O += P V.
//
// Two passes per layer. kv_store writes the long rows' keys and values into the cache first
// (rotated, rounded or quantized by the split kernel's own code: kernels/attention_common.cuh), then
// `prefill` reads every position it attends to, the chunk's own included, from the cache.
// Simpler than reading the chunk's keys from k and v (one source, one layout), and the
// store is a few percent of the bytes the tiles read.
//
// Precision. The cache's values are exact in bf16 (FP8 codes too: E4M3 has 3 mantissa bits
// and exponents 2^-9..2^8), and so is the per-position scale 2^e applied, as the split kernel
// applies it, to the score (K) and to the probability (V). Q (f32 after RoPE) and P (f32)
// are not: each is split into hi = bf16(x) and lo = bf16(x - hi), and both halves go through
// the mma (2^-16 relative error instead of bf16's 2^-9: the CPU reference is f32). The
// tensor cores accumulate in f32.
//
// Masks. A query at `pos` reads position p if p <= pos and, with an attention window
// (WINDOWED), p < sinks or pos - p < window. A block visits the key tiles that hold a
// position some of its queries read, loads only positions p <= p1 (its last query) that are
// not in the window's gap for its first query p0 (their blocks may be back in the pool: the
// table holds NO_BLOCK there), writes zeros for the others, and masks per (query, key).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type";
// gid = lane / 4, tig = lane % 4; two 16-bit values per register, the lower index in the
// low half), as kernels/matmul.cu uses them:
//   A (16 x 16, row):  a0 = (gid, 2tig..+1)  a1 = (gid+8, 2tig..+1)
//                      a2 = (gid, 2tig+8..+9)  a3 = (gid+8, 2tig+8..+9)
//   B (16 x 8, col):   b0 = (k 2tig..+1, n gid)  b1 = (k 2tig+8..+9, n gid)
//   C (16 x 8, f32):   c0, c1 = (gid, 2tig..+1)  c2, c3 = (gid+8, 2tig..+1)
// S = Q K^T: A is 16 query rows x 16 head dimensions, B is 16 dimensions x 8 keys, i.e. K
// row-major [key][dim] read by ldmatrix (no .trans): thread l gets row l / 4, columns
// 2(l % 4)..+1 of each 8x8 matrix, which is b0 (dims 0-7 of the k-step) or b1 (dims 8-15).
// O += P V: the C fragments of two adjacent key tiles of S are the A fragment of P over
// those 16 keys (c0c1 of tile 2s -> a0, c2c3 -> a1, tile 2s+1 -> a2, a3), with no shuffle.
// B is V [key][dim] read with ldmatrix.trans: thread l gets rows 2(l % 4)..+1, column l / 4
// of each 8x8 matrix: keys 2tig..+1 at dimension gid, b0 (keys 0-7) or b1 (keys 8-15).
//
// Shared memory: K and V tiles as bf16 [PF_KEYS][HD], 16-byte chunk c of key row k stored
// at chunk c ^ (k % 8): the 8 row addresses of one ldmatrix matrix (8 consecutive keys, one
// chunk column) then fall in 8 different 16-byte bank groups, so ldmatrix is conflict-free.
// (src/backend/cuda/prefill.rs emulates these maps in a test.)
#include "common.cuh"
#include <cuda_fp8.h>
#include "attention_common.cuh"

#define PF_WARPS 4
#define PF_ROWS (16 * PF_WARPS)  // query rows (token, head) per block: one m16 tile per warp; as prefill::ROWS
#define PF_KEYS 64               // key positions per tile
#define PF_THREADS (WARP * PF_WARPS)
#define LOG2E 1.4426950408889634f
#define PF_BOUNDS __launch_bounds__(PF_THREADS)

// The tile'th tile of the long rows (`rows`: (first token, tokens) pairs), `tok` tokens a
// tile: its first token and token count; false past the last.
__device__ __forceinline__ bool find_tile(const uint32_t* __restrict__ rows, int n_rows, int tok, int tile, int& t0,
                                          int& count) {
    for (int r = 0; r < n_rows; r++) {
        const int start = rows[2 * r], len = rows[2 * r + 1], tiles = (len + tok - 1) / tok;
        if (tile < tiles) {
            t0 = start + tile * tok;
            count = min(tok, len - tile * tok);
            return true;
        }
        tile -= tiles;
    }
    return false;
}

// kv_store: the long rows' keys (rotated at their position when inv_freq is given) and values
// into the cache at their slots, as the split kernel stores a step's token. grid: (tokens of
// the long rows, kv_heads), block: one warp (lane l holds dimensions l*PL..l*PL+PL-1).
template <int HD, bool FP8>
__device__ void kv_store(const float* __restrict__ k_new, const float* __restrict__ v_new, void* __restrict__ k_cache,
                         void* __restrict__ v_cache, signed char* __restrict__ k_exps, signed char* __restrict__ v_exps,
                         const uint32_t* __restrict__ positions, const uint32_t* __restrict__ slots,
                         const uint32_t* __restrict__ rows, int n_rows, int kv_heads, const float* __restrict__ inv_freq) {
    constexpr int PL = HD / WARP;
    pdl_start();
    int t, one;
    if (!find_tile(rows, n_rows, 1, blockIdx.x, t, one)) return;
    const int kvh = blockIdx.y, lane = threadIdx.x;
    float cs[PL], sn[PL];
    if (inv_freq) rope_angles<PL>(positions[t], inv_freq, lane, cs, sn);
    store_own_kv<HD, FP8>(k_new, v_new, k_cache, v_cache, k_exps, v_exps, t, slots[t], kvh, kv_heads, inv_freq, cs, sn,
                          lane);
}

#define KV_STORE_ARGS                                                                                            \
    const float *k, const float *v, void *kc, void *vc, signed char *ke, signed char *ve, const uint32_t *positions, \
        const uint32_t *slots, const uint32_t *rows, int n_rows, int kv_heads, const float *inv_freq
#define KV_STORE_PASS k, v, kc, vc, ke, ve, positions, slots, rows, n_rows, kv_heads, inv_freq
extern "C" __global__ void kv_store_hd64(KV_STORE_ARGS) { kv_store<64, false>(KV_STORE_PASS); }
extern "C" __global__ void kv_store_hd128(KV_STORE_ARGS) { kv_store<128, false>(KV_STORE_PASS); }
extern "C" __global__ void kv_store_fp8_hd64(KV_STORE_ARGS) { kv_store<64, true>(KV_STORE_PASS); }
extern "C" __global__ void kv_store_fp8_hd128(KV_STORE_ARGS) { kv_store<128, true>(KV_STORE_PASS); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}

// Byte offset of 16-byte chunk c of key row `key` in a swizzled [PF_KEYS][HD] bf16 tile.
template <int HD>
__device__ __forceinline__ uint32_t tile_offset(int key, int c) {
    return (uint32_t)((key * (HD / 8) + (c ^ (key & 7))) * 16);
}

// What a block knows about its tile of queries and the row's cache.
template <int HD, bool WINDOWED, bool FP8>
struct PrefillTile {
    const void *k_cache, *v_cache;
    const signed char *k_exps, *v_exps;
    const uint32_t* table;
    int kvh, kv_heads, block_size, p0, p1, window, sinks;

    // Whether a query of the block reads position p (it may then be loaded).
    __device__ __forceinline__ bool loadable(int p) const {
        return p <= p1 && (!WINDOWED || p < sinks || p > p0 - window);
    }
    // Whether key tile kt holds a position some query of the block reads.
    __device__ __forceinline__ bool wanted(int kt) const {
        const int a = kt * PF_KEYS;
        return !WINDOWED || a < sinks || a + PF_KEYS - 1 > p0 - window;
    }
    __device__ __forceinline__ size_t slot(int p) const {
        const int blk = p / block_size;
        return (size_t)table[blk] * block_size + (p - blk * block_size);
    }

    // Key tile kt into ks and vs (bf16, swizzled) and, with FP8, the positions' scales into
    // kscale and vscale (0 where not loaded). Every thread of the block takes part.
    __device__ __forceinline__ void load(int kt, unsigned char* ks, unsigned char* vs, float* kscale,
                                         float* vscale) const {
        // Thread i loads 16-byte chunk i % CHUNKS of the K and V rows of keys i / CHUNKS,
        // + PF_THREADS / CHUNKS, ...: one table lookup per key for both, and loops of a fixed
        // trip count, unrolled, so that every lookup, then every load, is in flight at once.
        constexpr int CHUNKS = FP8 ? HD / 16 : HD / 8;  // 16 codes or 8 bf16 a chunk
        constexpr int STRIDE = PF_THREADS / CHUNKS, KEYS = PF_KEYS / STRIDE;
        static_assert(STRIDE * CHUNKS == PF_THREADS && KEYS * STRIDE == PF_KEYS, "whole key rows per pass");
        const int a = kt * PF_KEYS, c = threadIdx.x % CHUNKS, key0 = threadIdx.x / CHUNKS;
        const size_t head = (size_t)kvh * HD, kv_dim = (size_t)kv_heads * HD;
        if constexpr (FP8) {
            uint4 kw[KEYS], vw[KEYS];
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                kw[u] = vw[u] = make_uint4(0, 0, 0, 0);  // zero codes: bf16 zeros
                const int key = key0 + u * STRIDE;
                if (loadable(a + key)) {
                    const size_t at = slot(a + key) * kv_dim + head + 16 * c;
                    kw[u] = *(const uint4*)((const uint8_t*)k_cache + at);
                    vw[u] = *(const uint4*)((const uint8_t*)v_cache + at);
                }
            }
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                const int key = key0 + u * STRIDE;
                store_codes(ks, key, c, kw[u]);
                store_codes(vs, key, c, vw[u]);
            }
            static_assert(2 * PF_KEYS == PF_THREADS, "one scale per thread");
            const int which = threadIdx.x / PF_KEYS, key = threadIdx.x % PF_KEYS;
            float e = 0.f;
            if (loadable(a + key)) e = exp2_int((which ? v_exps : k_exps)[slot(a + key) * kv_heads + kvh]);
            (which ? vscale : kscale)[key] = e;
        } else {
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                const int key = key0 + u * STRIDE;
                unsigned char *kd = ks + tile_offset<HD>(key, c), *vd = vs + tile_offset<HD>(key, c);
                if (loadable(a + key)) {
                    const size_t at = slot(a + key) * kv_dim + head + 8 * c;
                    cp_async16(kd, (const __nv_bfloat16*)k_cache + at);
                    cp_async16(vd, (const __nv_bfloat16*)v_cache + at);
                } else {
                    *(uint4*)kd = *(uint4*)vd = make_uint4(0, 0, 0, 0);
                }
            }
            cp_async_wait_all();
        }
    }

    // 16 E4M3 codes (chunk c of a key row's codes) as bf16 chunks 2c and 2c + 1 of the tile.
    __device__ __forceinline__ static void store_codes(unsigned char* tile, int key, int c, uint4 w) {
        *(uint4*)(tile + tile_offset<HD>(key, 2 * c)) =
            make_uint4(e4m3x2_bf16(w.x), e4m3x2_bf16(w.x >> 16), e4m3x2_bf16(w.y), e4m3x2_bf16(w.y >> 16));
        *(uint4*)(tile + tile_offset<HD>(key, 2 * c + 1)) =
            make_uint4(e4m3x2_bf16(w.z), e4m3x2_bf16(w.z >> 16), e4m3x2_bf16(w.w), e4m3x2_bf16(w.w >> 16));
    }

    // Two E4M3 codes (low byte first) as a bf16 pair, exactly.
    __device__ __forceinline__ static uint32_t e4m3x2_bf16(uint32_t pair) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(pair & 0xffffu), __NV_E4M3);
        const float2 f = __half22float2(__half2(h));
        const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
        return *(const uint32_t*)&b;
    }
};

// One warp's 16 query rows: Q as hi and lo A fragments per k-step of 16 dimensions, the
// running max (log2 units) and sum of each of its two rows (gid, gid + 8), the output.
template <int HD>
struct WarpRows {
    uint32_t qh[HD / 16][4], ql[HD / 16][4];
    float o[HD / 8][4];
    float m[2], l[2];
    int pos[2];  // each row's query position; -1 for a padding row

    // Q of rows (token t0 + r / g, head kvh * g + r % g), rotated at their position when
    // inv_freq is given, split into hi and lo. Dimension d and its RoPE partner d + HD/2
    // sit in k-steps s and s + HD/32 at the same place of this lane's fragments.
    __device__ __forceinline__ void load_q(const float* __restrict__ q, const float* __restrict__ inv_freq, int t0,
                                           int count, int p0, int g, int kvh, int heads, int warp, int lane) {
        const int gid = lane / 4, tig = lane % 4;
        float x[2][HD / 16][2][2];  // [row half][k-step][column half][element]
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = warp * 16 + gid + 8 * h, tl = r / g;
            pos[h] = tl < count ? p0 + tl : -1;
            const float* src = q + ((size_t)(t0 + tl) * heads + kvh * g + r % g) * HD;
#pragma unroll
            for (int s = 0; s < HD / 16; s++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float2 v = pos[h] >= 0 ? *(const float2*)(src + 16 * s + 8 * c + 2 * tig) : make_float2(0.f, 0.f);
                    x[h][s][c][0] = v.x;
                    x[h][s][c][1] = v.y;
                }
            if (inv_freq && pos[h] >= 0) {
#pragma unroll
                for (int s = 0; s < HD / 32; s++)
#pragma unroll
                    for (int c = 0; c < 2; c++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float cs, sn;
                            rope_angle(pos[h], inv_freq, 16 * s + 8 * c + 2 * tig + e, cs, sn);
                            const float u = x[h][s][c][e], w = x[h][s + HD / 32][c][e];
                            x[h][s][c][e] = u * cs - w * sn;
                            x[h][s + HD / 32][c][e] = w * cs + u * sn;
                        }
            }
            m[h] = -INFINITY;
            l[h] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < HD / 16; s++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int c = 0; c < 2; c++)  // a0 = (gid, lo cols), a1 = (gid+8, lo), a2 = (gid, hi), a3 = (gid+8, hi)
                    split_bf16(x[h][s][c][0], x[h][s][c][1], qh[s][h + 2 * c], ql[s][h + 2 * c]);
#pragma unroll
        for (int d = 0; d < HD / 8; d++)
#pragma unroll
            for (int i = 0; i < 4; i++) o[d][i] = 0.f;
    }

    // S = Q K^T for the tile's PF_KEYS keys: s[j] is keys 8j..8j+7 (C layout).
    __device__ __forceinline__ void scores(float (&s)[PF_KEYS / 8][4], uint32_t ks, int lane) const {
#pragma unroll
        for (int j = 0; j < PF_KEYS / 8; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) s[j][i] = 0.f;
#pragma unroll
            for (int sp = 0; sp < HD / 32; sp++) {
                // Matrix i: keys 8j..8j+7, dimensions 32sp + 8i..+7: b0, b1 of k-steps 2sp, 2sp+1.
                uint32_t b[4];
                ldsm_x4(b, ks + tile_offset<HD>(8 * j + lane % 8, 4 * sp + lane / 8));
                mma_bf16(s[j], qh[2 * sp], b[0], b[1]);
                mma_bf16(s[j], ql[2 * sp], b[0], b[1]);
                mma_bf16(s[j], qh[2 * sp + 1], b[2], b[3]);
                mma_bf16(s[j], ql[2 * sp + 1], b[2], b[3]);
            }
        }
    }

    // The online softmax over the tile's scores (masked per query and key; FP8: the key
    // scales), then O += P V (FP8: P times the value scales). scale2: 1/sqrt(HD) * log2(e).
    template <bool WINDOWED, bool FP8>
    __device__ __forceinline__ void add_tile(float (&s)[PF_KEYS / 8][4], int a, uint32_t vs, const float* kscale,
                                             const float* vscale, float scale2, int window, int sinks, int lane) {
        const int tig = lane % 4;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < PF_KEYS / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = 8 * j + 2 * tig + (i & 1), p = a + key, at = pos[i / 2];
                const bool seen = p <= at && (!WINDOWED || p < sinks || at - p < window);
                const float ksc = FP8 ? kscale[key] : 1.f;
                s[j][i] = seen ? s[j][i] * ksc * scale2 : -INFINITY;
                mx[i / 2] = fmaxf(mx[i / 2], s[j][i]);
            }
        float corr[2], base[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {  // a row's 16 values per lane, 4 lanes (a quad) per row
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float mn = fmaxf(m[h], mx[h]);
            base[h] = mn == -INFINITY ? 0.f : mn;  // nothing seen yet: every p is 0, no NaN
            corr[h] = exp2f(m[h] - base[h]);
            m[h] = mn;
            l[h] *= corr[h];
        }
#pragma unroll
        for (int j = 0; j < PF_KEYS / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float p = exp2f(s[j][i] - base[i / 2]);
                l[i / 2] += p;  // this lane's share of the row's sum
                s[j][i] = FP8 ? p * vscale[8 * j + 2 * tig + (i & 1)] : p;
            }
#pragma unroll
        for (int d = 0; d < HD / 8; d++)
#pragma unroll
            for (int i = 0; i < 4; i++) o[d][i] *= corr[i / 2];
#pragma unroll
        for (int kk = 0; kk < PF_KEYS / 16; kk++) {
            uint32_t ph[4], pl[4];  // P over keys 16kk..16kk+15 as an A fragment
            split_bf16(s[2 * kk][0], s[2 * kk][1], ph[0], pl[0]);
            split_bf16(s[2 * kk][2], s[2 * kk][3], ph[1], pl[1]);
            split_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1], ph[2], pl[2]);
            split_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3], ph[3], pl[3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                // Matrix i: keys 16kk + 8(i % 2)..+7, dimensions 16dp + 8(i / 2)..+7 (.trans):
                // b0, b1 of dimension tiles 2dp and 2dp + 1.
                uint32_t b[4];
                ldsm_x4_trans(b, vs + tile_offset<HD>(16 * kk + lane % 8 + 8 * ((lane / 8) % 2), 2 * dp + lane / 16));
                mma_bf16(o[2 * dp], ph, b[0], b[1]);
                mma_bf16(o[2 * dp], pl, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], ph, b[2], b[3]);
                mma_bf16(o[2 * dp + 1], pl, b[2], b[3]);
            }
        }
    }

    // out[token, head * HD + d] = O / sum, bf16, for the warp's real rows.
    __device__ __forceinline__ void write(__nv_bfloat16* __restrict__ out, int t0, int g, int kvh, int heads, int warp,
                                          int lane) {
        const int gid = lane / 4, tig = lane % 4;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float sum = l[h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (pos[h] < 0) continue;
            const int r = warp * 16 + gid + 8 * h;
            __nv_bfloat16* dst = out + ((size_t)(t0 + r / g) * heads + kvh * g + r % g) * HD + 2 * tig;
#pragma unroll
            for (int d = 0; d < HD / 8; d++)
                *(__nv_bfloat162*)(dst + 8 * d) = __floats2bfloat162_rn(o[d][2 * h] / sum, o[d][2 * h + 1] / sum);
        }
    }
};

// grid: (query tiles of the long rows, kv_heads), block: PF_THREADS. q: [tokens, heads * HD]
// f32 (unrotated when inv_freq is given); out: [tokens, heads * HD] bf16, the long rows'
// tokens written. k_cache, v_cache: [slots, kv_heads * HD], bf16 or E4M3; k_exps, v_exps
// (FP8 only): [slots, kv_heads]. rows: (first token, tokens) of each long row.
template <int HD, bool WINDOWED, bool FP8>
__device__ void prefill(const float* __restrict__ q, const void* __restrict__ k_cache, const void* __restrict__ v_cache,
                        const signed char* __restrict__ k_exps, const signed char* __restrict__ v_exps,
                        const uint32_t* __restrict__ positions, const uint32_t* __restrict__ token_row,
                        const uint32_t* __restrict__ block_tables, int max_blocks, int block_size,
                        const uint32_t* __restrict__ rows, int n_rows, int heads, int kv_heads,
                        const float* __restrict__ inv_freq, int window, int sinks, __nv_bfloat16* __restrict__ out) {
    __shared__ __align__(128) unsigned char ks[PF_KEYS * HD * 2], vs[PF_KEYS * HD * 2];
    __shared__ float kscale[FP8 ? PF_KEYS : 1], vscale[FP8 ? PF_KEYS : 1];
    pdl_start();
    const int g = heads / kv_heads, tok = PF_ROWS / g;
    int t0, count;
    if (!find_tile(rows, n_rows, tok, blockIdx.x, t0, count)) return;
    const int kvh = blockIdx.y, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int p0 = positions[t0], p1 = p0 + count - 1;
    const PrefillTile<HD, WINDOWED, FP8> tile{k_cache, v_cache, k_exps, v_exps,
                                              block_tables + (size_t)token_row[t0] * max_blocks,
                                              kvh, kv_heads, block_size, p0, p1, window, sinks};
    WarpRows<HD> w;
    w.load_q(q, inv_freq, t0, count, p0, g, kvh, heads, warp, lane);
    const float scale2 = LOG2E / sqrtf((float)HD);
    const uint32_t ks_at = (uint32_t)__cvta_generic_to_shared(ks), vs_at = (uint32_t)__cvta_generic_to_shared(vs);
    for (int kt = 0; kt <= p1 / PF_KEYS; kt++) {
        if (!tile.wanted(kt)) continue;  // uniform in the block
        __syncthreads();                 // the previous tile is read
        tile.load(kt, ks, vs, kscale, vscale);
        __syncthreads();
        float s[PF_KEYS / 8][4];
        w.scores(s, ks_at, lane);
        w.template add_tile<WINDOWED, FP8>(s, kt * PF_KEYS, vs_at, kscale, vscale, scale2, window, sinks, lane);
    }
    w.write(out, t0, g, kvh, heads, warp, lane);
}

#define PREFILL_ARGS                                                                                              \
    const float *q, const void *kc, const void *vc, const signed char *ke, const signed char *ve,                 \
        const uint32_t *positions, const uint32_t *token_row, const uint32_t *block_tables, int max_blocks,       \
        int block_size, const uint32_t *rows, int n_rows, int heads, int kv_heads, const float *inv_freq, int window, \
        int sinks, __nv_bfloat16 *out
#define PREFILL_PASS                                                                                             \
    q, kc, vc, ke, ve, positions, token_row, block_tables, max_blocks, block_size, rows, n_rows, heads, kv_heads, \
        inv_freq, window, sinks, out
// By head size, window and KV storage; any number of query heads per KV head up to PF_ROWS.
extern "C" __global__ void PF_BOUNDS prefill_hd64(PREFILL_ARGS) { prefill<64, false, false>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_hd128(PREFILL_ARGS) { prefill<128, false, false>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_win_hd64(PREFILL_ARGS) { prefill<64, true, false>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_win_hd128(PREFILL_ARGS) { prefill<128, true, false>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_fp8_hd64(PREFILL_ARGS) { prefill<64, false, true>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_fp8_hd128(PREFILL_ARGS) { prefill<128, false, true>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_fp8_win_hd64(PREFILL_ARGS) { prefill<64, true, true>(PREFILL_PASS); }
extern "C" __global__ void PF_BOUNDS prefill_fp8_win_hd128(PREFILL_ARGS) { prefill<128, true, true>(PREFILL_PASS); }
