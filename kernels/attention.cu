// Paged attention over the KV cache for decode (one query per row), verification (k+1
// causal queries per row, or a tree of them) and prefill: every query token attends to its
// row's cached positions 0..=position, read through the row's block table.
//
// The step's own keys and values are written to the cache by the same kernel: positions
// the step adds are read from the k and v inputs (rounded exactly as the cache stores
// them), so no block reads a cache entry that another block is writing, and one launch per
// layer is saved.
//
// The cache holds bf16, or (the attn_split_fp8_* kernels) FP8 E4M3 codes with one scale
// per token and KV head, 2^e with e in a signed byte: the smallest power of two that brings
// the head's largest magnitude under 448 (src/tensor/kv.rs says why). The quantization is
// the CPU's (src/backend/cpu/kv.rs) bit for bit: the exponent comes from frexpf, exact;
// dividing by a power of two is exact; the conversion rounds to nearest even and saturates
// as the CPU's encoder does. Half the bytes per position: long contexts read half as much.
//
// RoPE can happen here too (inv_freq non-null): q and the step's keys arrive unrotated and
// are rotated as they are loaded (before the keys are stored), which saves the rope launch
// of every layer. Lane l holds dimensions l*PL..l*PL+PL-1 of a head, so the partner of each
// (dimension i pairs with i + HD/2, the Hugging Face layout) sits in lane l ^ 16.
//
// With an attention window (the *_win_* kernels), a token at `pos` reads only
// positions p with p < sinks or pos - p < window; the others are neither loaded (their blocks may be back
// in the pool: the table holds NO_BLOCK there) nor scored. A split left with nothing keeps
// its max at -inf, which the merges weigh as 0; the token's own split always has itself.
// WINDOWED is a template flag so that the kernels without a window compile as before.
//
// A tree row (tree speculation) reads, for each token, the logical sequence a plain decode
// of it would read: the cache before the tree, then its ancestors and itself in depth order,
// at logical positions prefix + depth (its RoPE position too). The table `tree` says where
// each of those lives (see kv_source); a null table means causal rows only. A token's
// stored key and value go to slots[t], the node's storage slot, rotated at its logical
// position, as the CPU stores them.
//
// The sequence is cut into splits of split_len(position) positions; one block handles one
// (kv head, query token, split) and all the query heads that share that kv head (GQA:
// K and V are read once for the group). A second kernel merges the splits. The split
// size is fixed, so a token's arithmetic depends only on its own position: results are
// the same whatever else is in the batch (decode and verification agree bit for bit).
#include "common.cuh"
#include <cuda_fp8.h>
#include "attention_common.cuh"

#define ATTN_WARPS 4
#define ATTN_STAGES 4     // ring slots per warp: STAGES - 1 stages of loads in flight while one is used
#define ATTN_STAGE_POS 4  // positions per stage

// One position's record in a warp's ring: K then V as the cache stores them; with FP8 also
// the 4-byte words holding the K and V scale exponents and the exponent's byte in them.
template <int HD, bool FP8>
struct KvRecord {
    static constexpr int ELEM = FP8 ? 1 : 2;
    static constexpr int KV_BYTES = 2 * HD * ELEM;
    static constexpr int CHUNK = KV_BYTES / WARP;  // bytes each lane copies
    static constexpr int BYTES = KV_BYTES + (FP8 ? 16 : 0);
};

// One position's key and value as a lane holds them between their load and their use: for
// a bf16 cache the PL bf16 values themselves, packed (two per register), so that the loads
// of many positions fit in flight at once.
template <int PL, bool FP8>
struct KvPos {
    static_assert(PL == 2 || PL == 4, "heads of 64 or 128 dimensions");
    __nv_bfloat162 k[PL / 2], v[PL / 2];
    // The step's own key and value: what the cache will hold for them. Every lane of the
    // warp must take part (as for FP8 below).
    __device__ __forceinline__ void set(const float* kf, const float* vf) {
#pragma unroll
        for (int i = 0; i < PL / 2; i++) {
            k[i] = __floats2bfloat162_rn(kf[2 * i], kf[2 * i + 1]);
            v[i] = __floats2bfloat162_rn(vf[2 * i], vf[2 * i + 1]);
        }
    }
    // Element `at` of the caches (a multiple of PL: 4- or 8-byte aligned).
    __device__ __forceinline__ void load(const void* kc, const void* vc, const signed char*, const signed char*,
                                         size_t at, size_t) {
        const __nv_bfloat162* ks = (const __nv_bfloat162*)((const __nv_bfloat16*)kc + at);
        const __nv_bfloat162* vs = (const __nv_bfloat162*)((const __nv_bfloat16*)vc + at);
        if constexpr (PL == 4) {
            const uint2 kw = *(const uint2*)ks, vw = *(const uint2*)vs;
            k[0] = *(const __nv_bfloat162*)&kw.x;
            k[1] = *(const __nv_bfloat162*)&kw.y;
            v[0] = *(const __nv_bfloat162*)&vw.x;
            v[1] = *(const __nv_bfloat162*)&vw.y;
        } else {
            k[0] = ks[0];
            v[0] = vs[0];
        }
    }
    __device__ __forceinline__ static void unpack(const __nv_bfloat162* w, float* out) {
#pragma unroll
        for (int i = 0; i < PL / 2; i++) {
            const float2 f = __bfloat1622float2(w[i]);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
    // The values, and the scales the key's dot product and the value's weight take (1).
    __device__ __forceinline__ void get(float* kf, float* vf, float& ks, float& vs) const {
        unpack(k, kf);
        unpack(v, vf);
        ks = vs = 1.f;
    }
};

// FP8: the PL codes packed in a word and the scale exponent, decoded at use (two codes per
// instruction, exactly: every E4M3 value is an f16), in half the registers of a bf16
// position. The scale 2^e is applied to the key's dot product and to
// the value's softmax weight rather than to each value: multiplying by a power of two is
// exact, so this is the CPU's code value times 2^e, with one multiply instead of PL.
template <int PL>
struct KvPos<PL, true> {
    static_assert(PL == 2 || PL == 4, "FP8 heads of 64 or 128 dimensions");
    uint32_t k, v;
    int ke, ve;
    __device__ __forceinline__ static uint32_t pack(const float* x, int e) {
        uint32_t w = 0;
#pragma unroll
        for (int i = 0; i < PL; i++) w |= e4m3_code(x[i], e) << (8 * i);
        return w;
    }
    __device__ __forceinline__ void set(const float* kf, const float* vf) {
        ke = head_scale_exp<PL>(kf);
        ve = head_scale_exp<PL>(vf);
        k = pack(kf, ke);
        v = pack(vf, ve);
    }
    __device__ __forceinline__ static uint32_t load_codes(const void* cache, size_t at) {
        const uint8_t* src = (const uint8_t*)cache + at;  // `at` is a multiple of PL: aligned
        if constexpr (PL == 4) {
            return *(const uint32_t*)src;
        } else {
            return (uint32_t)(*(const unsigned short*)src);
        }
    }
    __device__ __forceinline__ void load(const void* kc, const void* vc, const signed char* kx,
                                         const signed char* vx, size_t at, size_t scale_at) {
        k = load_codes(kc, at);
        v = load_codes(vc, at);
        ke = kx[scale_at];
        ve = vx[scale_at];
    }
    __device__ __forceinline__ static void decode(uint32_t w, float* out) {
#pragma unroll
        for (int i = 0; i < PL; i += 2) {
            const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w >> (8 * i)), __NV_E4M3);
            const float2 f = __half22float2(__half2(h));  // .x from the lower byte
            out[i] = f.x;
            out[i + 1] = f.y;
        }
    }
    __device__ __forceinline__ void get(float* kf, float* vf, float& ks, float& vs) const {
        decode(k, kf);
        decode(v, vf);
        ks = exp2_int(ke);
        vs = exp2_int(ve);
    }
};


// What one block of the split kernel knows about its token's sequence: where each position
// it reads lives (the step's k and v, or a cache slot through the block table) and which
// positions the window leaves out.
template <int HD, bool WINDOWED, bool FP8>
struct SplitView {
    static constexpr int PL = HD / WARP;  // head dimensions per lane
    using Rec = KvRecord<HD, FP8>;
    static constexpr int STAGE_BYTES = ATTN_STAGE_POS * Rec::BYTES;
    const float *k_new, *v_new, *inv_freq;
    const void *k_cache, *v_cache;
    const signed char *k_exps, *v_exps;
    const uint32_t *table, *tree;
    int t, kvh, kv_heads, kv_dim, block_size, bs_shift, pos, start, end, first_tok, first_pos, window, sinks, lane, warp;

    // Each warp takes positions start + warp, + ATTN_WARPS, ..., STAGE_POS of them a stage.
    __device__ __forceinline__ int position(int s, int u) const {
        return start + warp + (s * ATTN_STAGE_POS + u) * ATTN_WARPS;
    }
    __device__ __forceinline__ bool visible(int p) const {
        return p < end && (!WINDOWED || p < sinks || pos - p < window);
    }
    // The cache slot of storage position sp. Block sizes are powers of two in practice: a
    // shift rather than a division.
    __device__ __forceinline__ size_t slot(int sp) const {
        const int blk = bs_shift >= 0 ? sp >> bs_shift : sp / block_size;
        return (size_t)table[blk] * block_size + (sp - blk * block_size);
    }

    // Starts copying stage s's cached positions into the ring (one commit group per stage,
    // empty or not): K from lanes 0-15, V from 16-31, one chunk each.
    __device__ __forceinline__ void issue(unsigned char* ring, int s) const {
        unsigned char* rec = ring + (s % ATTN_STAGES) * STAGE_BYTES;
#pragma unroll
        for (int u = 0; u < ATTN_STAGE_POS; u++, rec += Rec::BYTES) {
            const int p = position(s, u);  // uniform in the warp
            if (!visible(p)) continue;
            const int src = kv_source(tree, t, p, first_tok, first_pos);
            if (src >= 0) continue;  // a step token's: read as it is scored
            const size_t at = slot(-1 - src);
            const int half = lane / (WARP / 2), chunk = lane % (WARP / 2);
            const unsigned char* from = (const unsigned char*)(half ? v_cache : k_cache);
            cp_async<Rec::CHUNK>(rec + lane * Rec::CHUNK, from + (at * kv_dim + kvh * HD) * Rec::ELEM + chunk * Rec::CHUNK);
            if constexpr (FP8) {  // the words holding the exponents, and where in them
                const size_t scale_at = at * kv_heads + kvh;
                if (lane < 2) cp_async<4>(rec + Rec::KV_BYTES + 4 * lane, (lane ? v_exps : k_exps) + (scale_at & ~(size_t)3));
                if (lane == 2) *(int*)(rec + Rec::KV_BYTES + 8) = (int)(scale_at & 3);
            }
        }
        cp_async_commit();
    }

    // Stage s's positions into registers: from the ring, or a step token's from k and v
    // (rotated, rounded as the cache will hold them).
    __device__ __forceinline__ void fill(const unsigned char* ring, int s, KvPos<PL, FP8>* kv) const {
        const unsigned char* rec = ring + (s % ATTN_STAGES) * STAGE_BYTES;
#pragma unroll
        for (int u = 0; u < ATTN_STAGE_POS; u++, rec += Rec::BYTES) {
            const int p = position(s, u);
            if (!visible(p)) continue;
            const int src = kv_source(tree, t, p, first_tok, first_pos);
            if (src < 0) {
                const signed char* exps = (const signed char*)(rec + Rec::KV_BYTES);
                kv[u].load(rec, rec + HD * Rec::ELEM, exps, exps + 4, lane * PL, FP8 ? *(const int*)(exps + 8) : 0);
                continue;
            }
            const size_t off = (size_t)src * kv_dim + kvh * HD + lane * PL;
            float kf[PL], vf[PL];
#pragma unroll
            for (int i = 0; i < PL; i++) {
                kf[i] = k_new[off + i];
                vf[i] = v_new[off + i];
            }
            if (inv_freq) {
                float pc[PL], ps[PL];
                rope_angles<PL>(p, inv_freq, lane, pc, ps);
                rope_rotate<PL>(kf, pc, ps, lane);
            }
            kv[u].set(kf, vf);
        }
    }
};

// The online softmax of the G query heads that share a KV head, over the positions one warp
// scores: running max, sum of exponentials and unnormalised output per head.
template <int PL, int G>
struct Scores {
    float q[G][PL], m[G], l[G], acc[G][PL];

    __device__ __forceinline__ void add(const float* kf, const float* vf, float ks, float vs, float scale, int g) {
#pragma unroll
        for (int j = 0; j < G; j++) {
            if (j < g) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < PL; i++) d = fmaf(q[j][i], kf[i], d);
                const float s = warp_sum(d) * ks * scale;
                const float mn = fmaxf(m[j], s);
                const float corr = expf(m[j] - mn), e = expf(s - mn), ev = e * vs;
                l[j] = l[j] * corr + e;
#pragma unroll
                for (int i = 0; i < PL; i++) acc[j][i] = fmaf(ev, vf[i], acc[j][i] * corr);
                m[j] = mn;
            }
        }
    }

    // Merges the block's warps (through `smem`) and writes the split's partial result for
    // each of the g heads (`head_stride` floats apart): max, sum, then the HD outputs.
    template <int HD, int WARPS>
    __device__ __forceinline__ void write(unsigned char* smem, float* partial, size_t head_stride, int g, int lane,
                                          int warp) const {
        float(*sm)[G] = (float(*)[G])smem;
        float(*sl)[G] = (float(*)[G])(smem + WARPS * G * 4);
        float(*sacc)[G][HD] = (float(*)[G][HD])(smem + 2 * WARPS * G * 4);
#pragma unroll
        for (int j = 0; j < G; j++) {
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
        merge_warps<HD, WARPS, G>(smem, partial, head_stride, g);
    }
};

// partial: [tokens, heads, max_splits, HD + 2] holding (max score, sum of exp, unnormalised
// output) per split. grid: (kv_heads, tokens, max_splits), block: 32 * ATTN_WARPS.
// k_cache, v_cache: [slots, kv_heads * HD], bf16 or E4M3; k_exps, v_exps (FP8 only):
// [slots, kv_heads] scale exponents.
template <int HD, bool WINDOWED, bool FP8, int G>
__device__ void attn_split(const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,
                           void* __restrict__ k_cache, void* __restrict__ v_cache, signed char* __restrict__ k_exps,
                           signed char* __restrict__ v_exps,
                           const uint32_t* __restrict__ positions, const uint32_t* __restrict__ slots,
                           const uint32_t* __restrict__ token_row, const uint32_t* __restrict__ row_first,
                           const uint32_t* __restrict__ tree, const uint32_t* __restrict__ block_tables,
                           int max_blocks, int block_size, int heads, int kv_heads, int max_splits,
                           float* __restrict__ partial, const float* __restrict__ inv_freq, int min_split, int window,
                           int sinks) {
    using View = SplitView<HD, WINDOWED, FP8>;
    constexpr int PL = View::PL;
    pdl_start();
    const int kvh = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
    const int pos = positions[t], len = split_len(pos, min_split), start = split * len;
    if (start > pos) return;
    const int g = heads / kv_heads, lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    // Positions from first_pos on are this step's (causal rows; see kv_source).
    const int first_tok = row_first[t];
    const View view{k_new, v_new, inv_freq, k_cache, v_cache, k_exps, v_exps,
                    block_tables + (size_t)token_row[t] * max_blocks, tree, t, kvh, kv_heads, kv_heads * HD,
                    block_size, (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1, pos, start,
                    min(pos + 1, start + len), first_tok, (int)positions[first_tok], window, sinks, lane, warp};
    float cs[PL], sn[PL];  // token t's rotation
    if (inv_freq) rope_angles<PL>(pos, inv_freq, lane, cs, sn);
    if (split == 0 && warp == 0)  // the one block that stores token t's key and value for this head
        store_own_kv<HD, FP8>(k_new, v_new, k_cache, v_cache, k_exps, v_exps, t, slots[t], kvh, kv_heads, inv_freq, cs,
                              sn, lane);
    Scores<PL, G> sc;
#pragma unroll
    for (int j = 0; j < G; j++) {
        sc.m[j] = -INFINITY;
        sc.l[j] = 0.f;
#pragma unroll
        for (int i = 0; i < PL; i++) {
            sc.acc[j][i] = 0.f;
            sc.q[j][i] = j < g ? q[((size_t)t * heads + kvh * g + j) * HD + lane * PL + i] : 0.f;
        }
        if (inv_freq && j < g) rope_rotate<PL>(sc.q[j], cs, sn, lane);
    }
    // Each warp copies the cache's bytes of its next STAGES - 1 stages into its ring
    // (cp.async) while it scores this one: enough bytes in flight to keep the memory busy,
    // without the registers that held them before (occupancy was what limited long contexts).
    constexpr int RING_BYTES = ATTN_WARPS * ATTN_STAGES * View::STAGE_BYTES;
    constexpr int MERGE_BYTES = ATTN_WARPS * G * (HD + 2) * 4;
    __shared__ __align__(16) unsigned char smem[RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES];
    unsigned char* ring = smem + warp * ATTN_STAGES * View::STAGE_BYTES;
    const float scale = 1.0f / sqrtf((float)HD);
#pragma unroll
    for (int s = 0; s < ATTN_STAGES - 1; s++) view.issue(ring, s);
    for (int s = 0; view.position(s, 0) < view.end; s++) {
        view.issue(ring, s + ATTN_STAGES - 1);  // into the slot stage s - 1 used
        cp_async_wait<ATTN_STAGES - 1>();
        __syncwarp();  // every lane's copies of stage s have landed
        KvPos<PL, FP8> kv[ATTN_STAGE_POS];
        view.fill(ring, s, kv);
        __syncwarp();  // the slot is read: the next issue may refill it
#pragma unroll
        for (int u = 0; u < ATTN_STAGE_POS; u++) {
            if (!view.visible(view.position(s, u))) continue;
            float kf[PL], vf[PL], ks, vs;
            kv[u].get(kf, vf, ks, vs);
            sc.add(kf, vf, ks, vs, scale, g);
        }
    }
    cp_async_wait<0>();  // the stages past the end were empty, but the ring becomes the merge's
    __syncthreads();
    float* out = partial + (((size_t)t * heads + kvh * g) * max_splits + split) * (HD + 2);
    sc.template write<HD, ATTN_WARPS>(smem, out, (size_t)max_splits * (HD + 2), g, lane, warp);
}

// By head size, window, KV storage and the query heads per KV head it holds registers for
// (G: 4 for the Llama 3 8B and 1B shapes, 8 for the 70B; fewer registers, more blocks per SM).
extern "C" __global__ void attn_split_hd64_g4(ATTN_ARGS) { attn_split<64, false, false, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_hd64_g8(ATTN_ARGS) { attn_split<64, false, false, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_hd128_g4(ATTN_ARGS) { attn_split<128, false, false, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_hd128_g8(ATTN_ARGS) { attn_split<128, false, false, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd64_g4(ATTN_ARGS) { attn_split<64, true, false, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd64_g8(ATTN_ARGS) { attn_split<64, true, false, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd128_g4(ATTN_ARGS) { attn_split<128, true, false, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_win_hd128_g8(ATTN_ARGS) { attn_split<128, true, false, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_hd64_g4(ATTN_ARGS) { attn_split<64, false, true, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_hd64_g8(ATTN_ARGS) { attn_split<64, false, true, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_hd128_g4(ATTN_ARGS) { attn_split<128, false, true, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_hd128_g8(ATTN_ARGS) { attn_split<128, false, true, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_win_hd64_g4(ATTN_ARGS) { attn_split<64, true, true, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_win_hd64_g8(ATTN_ARGS) { attn_split<64, true, true, 8>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_win_hd128_g4(ATTN_ARGS) { attn_split<128, true, true, 4>(ATTN_PASS); }
extern "C" __global__ void attn_split_fp8_win_hd128_g8(ATTN_ARGS) { attn_split<128, true, true, 8>(ATTN_PASS); }

// out[t, h * head_dim + d] from the splits that token t used. grid: (heads, tokens), block:
// head_dim * MERGE_GROUPS: group r weighs the splits r, r + MERGE_GROUPS, ..., so that a long
// context's 128-256 splits are read MERGE_GROUPS at a time (one thread per dimension took
// them one by one: 36 us per layer at 32k positions); the groups' sums are added in a fixed
// order, so a token's result still depends on its own position only.
#define MERGE_GROUPS 4
extern "C" __global__ void attn_merge(const float* __restrict__ partial, const uint32_t* __restrict__ positions,
                                      __nv_bfloat16* __restrict__ out, int heads, int head_dim, int max_splits,
                                      int min_split) {
    pdl_start();
    const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x % head_dim, r = threadIdx.x / head_dim;
    const int len = split_len(positions[t], min_split);
    const int splits = (positions[t] + len) / len;  // ceil((position + 1) / len)
    const float* src = partial + ((size_t)t * heads + h) * max_splits * (head_dim + 2);
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, src[s * (head_dim + 2)]);
    mx = block_max(mx);
    float sum = 0.f, acc = 0.f;
    // Unrolled so that the loads of several splits are in flight at once.
#pragma unroll 8
    for (int s = r; s < splits; s += MERGE_GROUPS) {
        const float* p = src + s * (head_dim + 2);
        const float c = expf(p[0] - mx);
        sum = fmaf(p[1], c, sum);
        acc = fmaf(p[2 + d], c, acc);
    }
    __shared__ float group_sum[MERGE_GROUPS][128], group_acc[MERGE_GROUPS][128];  // head_dim <= 128
    group_sum[r][d] = sum;
    group_acc[r][d] = acc;
    __syncthreads();
    if (r > 0) return;
#pragma unroll
    for (int g = 1; g < MERGE_GROUPS; g++) {
        sum += group_sum[g][d];
        acc += group_acc[g][d];
    }
    out[((size_t)t * heads + h) * head_dim + d] = __float2bfloat16_rn(acc / sum);  // o's input: bf16
}
