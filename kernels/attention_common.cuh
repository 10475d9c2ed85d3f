// Helpers shared by the attention kernels (kernels/attention.cu: one query head per
// lane group on CUDA cores; kernels/attention_mma.cu: tiles of 16 positions on tensor cores;
// kernels/prefill.cu: tiles of a long row's tokens): the split sizes, where a position's key
// and value live, the FP8 scale exponents and codes, the cache store, asynchronous copies,
// RoPE, the merge of a block's warps, the kernel arguments and the tensor-core wrappers. Pasted after common.cuh into the files that include it (as common.cuh is: see
// src/backend/cuda/kernels.rs), so it includes nothing itself.
#define SHORT_SPLITS 64  // as batch::SHORT_SPLITS
#define LONG_SPLIT 256   // as batch::LONG_SPLIT
#define MAX_SPLITS 256   // as batch::MAX_SPLITS

// Positions per split for a token at `pos`: `min_split`, doubled until the token needs at
// most SHORT_SPLITS splits or the split reaches LONG_SPLIT positions, then doubled again
// only past MAX_SPLITS splits. Short splits keep many blocks in flight at short contexts
// (where a step's attention is latency-bound); past 16k positions the splits grow in number
// instead, so that a batch-1 decode step still has enough blocks to keep the memory busy
// (64 splits of one KV head's 8 groups are fewer blocks than an H100 holds at once, and
// every block of a long split waits on its loads in turn); the cap bounds the merge and
// the partial sums. It depends on the token's own position only, so decode and
// verification still agree bitwise.
__device__ __forceinline__ int split_len(int pos, int min_split) {
    int len = min_split;
    while (pos + 1 > len * SHORT_SPLITS && len < LONG_SPLIT) len *= 2;
    while (pos + 1 > len * MAX_SPLITS) len *= 2;
    return len;
}

#define NOT_TREE 0xffffffffu  // as batch::NOT_TREE

// Where logical position p (at most the token's own) of token t's sequence is: the step token
// whose k_new/v_new row holds it (>= 0), or -1 - s for storage position s of the row's cache.
// Causal rows: positions from first_pos on are this step's, token first_tok + (p - first_pos).
// Tree rows: tree[t] is the offset in `tree` of the token's path entry: the tree's prefix
// (positions before it are stored at their own position), then per depth the step token or
// ~storage position of the ancestor there (batch::tree_table writes it).
__device__ __forceinline__ int kv_source(const uint32_t* __restrict__ tree, int t, int p, int first_tok, int first_pos) {
    const uint32_t at = tree ? tree[t] : NOT_TREE;
    if (at == NOT_TREE) return p >= first_pos ? first_tok + (p - first_pos) : -1 - p;
    const int prefix = (int)tree[at];
    return p < prefix ? -1 - p : (int)tree[at + 1 + p - prefix];
}

// 2^e exactly, for e in [-127, 127] (2^-127 is subnormal), without ldexpf's range handling.
__device__ __forceinline__ float exp2_int(int e) {
    return e >= -126 ? __int_as_float((e + 127) << 23) : __int_as_float(0x00400000);
}

// The smallest e with amax <= 448 * 2^e (448 = 0.875 * 2^9), at least -127; 0 for an
// all-zero or non-finite head: `quantize_head` in src/backend/cpu/kv.rs.
__device__ __forceinline__ int kv_scale_exp(float amax) {
    if (!(amax > 0.f && amax <= 3.4028234663852886e38f)) return 0;  // zero, NaN or infinite
    int ex;
    const float mant = frexpf(amax, &ex);  // amax = mant * 2^ex, mant in [0.5, 1)
    return max(-127, min(127, ex - 9 + (mant > 0.875f ? 1 : 0)));
}

// The scale exponent of one head whose values the warp holds (PL per lane); every lane of
// the warp must take part.
template <int PL>
__device__ __forceinline__ int head_scale_exp(const float* v) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < PL; i++) amax = fmaxf(amax, fabsf(v[i]));
    return kv_scale_exp(warp_max(amax));
}

__device__ __forceinline__ uint32_t e4m3_code(float x, int e) {
    // x / 2^e is exact (a subnormal result would round, but to a code of 0 all the same).
    return (uint32_t)__nv_cvt_float_to_fp8(__fmul_rn(x, exp2_int(-e)), __NV_SATFINITE, __NV_E4M3);
}

// Stores one head (the warp's PL values per lane) at element `at` of the cache; with FP8,
// lane 0 stores the scale exponent at `scale_at`. Every lane of the warp must take part.
template <int PL, bool FP8>
__device__ __forceinline__ void store_head(void* cache, signed char* exps, size_t at, size_t scale_at,
                                           const float* v, int lane) {
    if constexpr (FP8) {
        const int e = head_scale_exp<PL>(v);
        uint8_t* dst = (uint8_t*)cache + at;
#pragma unroll
        for (int i = 0; i < PL; i++) dst[i] = (uint8_t)e4m3_code(v[i], e);
        if (lane == 0) exps[scale_at] = (signed char)e;
    } else {
        __nv_bfloat16* dst = (__nv_bfloat16*)cache + at;
#pragma unroll
        for (int i = 0; i < PL; i++) dst[i] = __float2bfloat16_rn(v[i]);
    }
}


// Asynchronous copies global -> shared (sm_80+): the loads of the coming stages stay in flight
// without holding registers, so a warp keeps (STAGES - 1) * STAGE_POS positions' bytes
// in flight while it scores the current stage.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    if constexpr (BYTES == 16) {  // .cg: the KV cache is read once per step, L1 would only be evicted
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(s), "l"(gmem), "n"(BYTES) : "memory");
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}


// The angle of dimension `dim` (< head_dim / 2) at position `pos`, as kernels/rope.cu forms
// it: the product and its reduction modulo 2*pi in f64, then an f32 sincos.
__device__ __forceinline__ void rope_angle(int pos, const float* __restrict__ inv_freq, int dim, float& cs, float& sn) {
    const double two_pi = 6.283185307179586;
    double a = (double)pos * (double)inv_freq[dim];
    a -= floor(a / two_pi) * two_pi;
    sincosf((float)a, &sn, &cs);
}

// cos and sin of this lane's dimensions at position `pos` when lane l holds dimensions
// l*PL..l*PL+PL-1 of a head (its partner, i + HD/2, sits in lane l ^ 16).
template <int PL>
__device__ __forceinline__ void rope_angles(int pos, const float* __restrict__ inv_freq, int lane, float* cs, float* sn) {
    constexpr int HALF = PL * WARP / 2;
#pragma unroll
    for (int i = 0; i < PL; i++) rope_angle(pos, inv_freq, (lane * PL + i) % HALF, cs[i], sn[i]);
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

// Token t's key (rotated with cs and sn when inv_freq is set) and value for KV head kvh, from
// the step's k and v into the caches at `slot`: done by one warp of one block per token and
// KV head. Every lane of the warp must take part.
template <int HD, bool FP8>
__device__ __forceinline__ void store_own_kv(const float* k_new, const float* v_new, void* k_cache, void* v_cache,
                                             signed char* k_exps, signed char* v_exps, int t, uint32_t slot, int kvh,
                                             int kv_heads, const float* inv_freq, const float* cs, const float* sn,
                                             int lane) {
    constexpr int PL = HD / WARP;
    const size_t kv_dim = (size_t)kv_heads * HD, off = kvh * HD + lane * PL;
    const size_t src = t * kv_dim + off, dst = slot * kv_dim + off, scale_at = (size_t)slot * kv_heads + kvh;
    float kr[PL], vr[PL];
#pragma unroll
    for (int i = 0; i < PL; i++) {
        kr[i] = k_new[src + i];
        vr[i] = v_new[src + i];
    }
    if (inv_freq) rope_rotate<PL>(kr, cs, sn, lane);
    store_head<PL, FP8>(k_cache, k_exps, dst, scale_at, kr, lane);
    store_head<PL, FP8>(v_cache, v_exps, dst, scale_at, vr, lane);
}

// The split's partial result for each of the g heads (`head_stride` floats apart: max, sum,
// then the HD outputs) from the WARPS warps' online softmax states staged in `smem`:
// sm[WARPS][G] maxima, sl[WARPS][G] sums, then sacc[WARPS][G][HD] outputs. A warp that saw no
// position has max -inf and weighs 0. Call after a __syncthreads that follows the staging.
template <int HD, int WARPS, int G>
__device__ __forceinline__ void merge_warps(const unsigned char* smem, float* partial, size_t head_stride, int g) {
    const float(*sm)[G] = (const float(*)[G])smem;
    const float(*sl)[G] = (const float(*)[G])(smem + WARPS * G * 4);
    const float(*sacc)[G][HD] = (const float(*)[G][HD])(smem + 2 * WARPS * G * 4);
    for (int e = threadIdx.x; e < g * HD; e += blockDim.x) {
        const int j = e / HD, d = e % HD;
        float mx = -INFINITY;
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w][j]);
        float sum = 0.f, out = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float c = sm[w][j] == -INFINITY ? 0.f : expf(sm[w][j] - mx);
            sum = fmaf(sl[w][j], c, sum);
            out = fmaf(sacc[w][j][d], c, out);
        }
        float* dst = partial + j * head_stride;
        if (d == 0) {
            dst[0] = mx;
            dst[1] = sum;
        }
        dst[2 + d] = out;
    }
}

#define ATTN_ARGS                                                                                             \
    const float *q, const float *k, const float *v, void *kc, void *vc, signed char *ke, signed char *ve,    \
        const uint32_t *positions, const uint32_t *slots, const uint32_t *token_row, const uint32_t *row_first, \
        const uint32_t *tree, const uint32_t *block_tables, int max_blocks, int block_size, int heads,         \
        int kv_heads, int max_splits, float *partial, const float *inv_freq, int min_split, int window, int sinks
#define ATTN_PASS                                                                                                 \
    q, k, v, kc, vc, ke, ve, positions, slots, token_row, row_first, tree, block_tables, max_blocks, block_size, \
        heads, kv_heads, max_splits, partial, inv_freq, min_split, window, sinks

// Tensor cores (kernels/attention_mma.cu, prefill.cu): shared-memory addresses, ldmatrix,
// the bf16 mma and the split of f32 pairs into two bf16 halves. The mma is a pure function of
// its registers (not volatile: the compiler may schedule it freely); the ldmatrix are
// volatile and clobber memory: their address repeats from tile to tile, the data does not,
// and they must stay between the barriers.
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// The transpose of the 8x8 b16 matrix the warp holds in the "row gr, cols 2tg, 2tg+1" layout.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
    uint32_t r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

// c += a . b for one m16n8k16 tile.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16x2_bits(__nv_bfloat162 v) { return *(const uint32_t*)&v; }

// (x, y) as bf16 pairs hi = bf16(x, y) and lo = bf16 of the remainders (exact in f32): hi + lo
// carries ~16 bits of each, enough for the scores and the weights (see the top).
__device__ __forceinline__ void split_bf16(float x, float y, uint32_t& hi, uint32_t& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const float2 back = __bfloat1622float2(h);
    hi = bf16x2_bits(h);
    lo = bf16x2_bits(__floats2bfloat162_rn(x - back.x, y - back.y));
}
