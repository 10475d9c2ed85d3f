// The attention split kernel on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate):
// the same work and the same results layout as attn_split in kernels/attention.cu (which
// says what a split, a tree row, a window and an FP8 cache are), but each warp scores and
// accumulates a tile of 16 consecutive positions at a time instead of one position per
// instruction sequence. On CUDA cores a position cost ~160 instructions per warp (a dot
// product and 5 shuffles per query head, two expf, the output FMAs): long contexts were
// bound by instruction issue, not by the memory. Here a tile costs ~32 mma and 16 ldmatrix.
//
// Per tile, with the group's query heads as the 8 columns (G = 4 leaves 4 of them unused;
// heads past heads / kv_heads have q = 0 and are never written):
//   scores:  S^T[16 positions x 8 heads] = K[16 x HD] . Q^T[HD x 8]   (HD / 16 k-steps)
//   outputs: O^T[HD x 8 heads] += V^T[HD x 16 positions] . P^T[16 x 8]  (HD / 16 m-tiles)
// K and V tiles come from shared memory in the cache's [position][dim] layout (ldmatrix,
// .trans for V^T); Q^T stays in registers for the whole kernel.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; lane = 4 gr + tg, gr = lane / 4,
// tg = lane % 4; a register holds two bf16, the lower index in the lower half):
//   A (16x16): a0 (row gr, cols 2tg, 2tg+1), a1 (row gr+8, same), a2 (row gr, cols +8),
//              a3 (row gr+8, cols +8)
//   B (16x8):  b0 (rows 2tg, 2tg+1, col gr), b1 (rows 2tg+8, 2tg+9, col gr)
//   C (16x8):  c0, c1 (row gr, cols 2tg, 2tg+1), c2, c3 (row gr+8, same cols)
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i, which lands in
//   register i in the 8x8 layout "row gr, cols 2tg, 2tg+1" (.trans: of the transposed matrix).
// So: K's A fragment for k-step kk is matrix 0 = rows 0-7 x dims 16kk..+7, 1 = rows 8-15,
// 2 = rows 0-7 x dims +8, 3 = rows 8-15 x dims +8: lane gives row lane % 16, chunk 2kk +
// lane / 16. V^T's A fragment for m-tile mt (dims 16mt..+15 as rows, positions as columns)
// is the transpose of V rows 0-7 x dims 16mt..+7 (matrix 0), rows 0-7 x dims +8 (1), rows
// 8-15 x dims 16mt..+7 (2), rows 8-15 x dims +8 (3): lane gives row lane % 8 + 8 (lane / 16),
// chunk 2mt + (lane / 8) % 2. Q's B fragment: head gr's dims 16kk + 2tg (+1) and +8 (+9).
// The scores' C fragment has positions as rows and heads as columns; the outputs need P^T
// as B (positions 2tg.. as rows, head gr): each 8x8 half (rows gr, cols 2tg, 2tg+1 of
// P[position][head]) is transposed in registers by movmatrix into exactly b0 (positions 0-7)
// and b1 (positions 8-15). The O^T accumulator (C: dims gr, gr+8 of each m-tile, heads 2tg,
// 2tg+1) has the same heads per lane as the scores, so a lane's softmax state (max and sum
// of heads 2tg, 2tg+1) rescales its own accumulators; the max over a tile's 16 positions is
// a reduction over the 8 lanes of one tg (shuffles across gr).
//
// Precision: the cache's keys and values are bf16 (FP8 codes are exact in bf16), but q and
// the probabilities are f32; one bf16 would leave 8 bits (scores off by ~4e-3 of their
// size, beyond the CPU parity). Each is split into hi = bf16(x) and lo = bf16(x - hi) and
// both go through the mma into the same f32 accumulator: ~16 bits, as good as the f32
// arithmetic of the CUDA-core kernel at the parity tolerance.
//
// A token's arithmetic depends on its own position only (decode and verification agree
// bitwise): tiles start at fixed offsets from the split's start (warp w takes tiles w,
// w + 4, ...), masked positions score -inf (probability 0) and hold zeros (never garbage
// that 0 * NaN would spread), and the warps merge as in attention.cu.
//
// Pipeline: each warp has a ring of 3 slots, each one tile's keys or values (16 x HD as
// the cache stores them), filled by cp.async in the order K0 V0 K1 V1 ...: while the
// scores of tile n use K(n), V(n) and K(n + 1) are in flight, and while its outputs use
// V(n), K(n + 1) and V(n + 1) are: two tiles' halves in flight per warp in 3 slots, so a
// 4-warp block fits in 48 KiB (bf16, HD 128) and 4 blocks in an SM. bf16 slots are swizzled
// (16-byte chunk c of row r at c ^ (r % 8)) so that the 8 rows of an ldmatrix matrix hit 8
// different bank groups. FP8 slots hold the codes; before use a warp converts a slot into
// its own bf16 tile (ldmatrix moves 16-bit elements), and the per-position scales 2^e
// multiply the score rows and the probabilities, as in attention.cu.
#include "common.cuh"
#include <cuda_fp8.h>
#include "attention_common.cuh"

#define MMA_WARPS 4
#define MMA_TILE 16  // positions per tile: the mma's M
#define MMA_SLOTS 3  // ring slots per warp
#define FULL 0xffffffffu
#define HIDDEN (-0x7fffffff - 1)  // a masked position's source (see MmaView::row_source)

// Two E4M3 codes (low byte first) -> a bf16 pair, exactly: the hardware's f16 pair with sign,
// exponent and top mantissa bits moved into bf16 places is the value times 2^-112 (never
// subnormal: kernels/matmul.cu), and multiplying by 2^112 (a bf16) is exact.
__device__ __forceinline__ uint32_t e4m3x2_bf16x2(uint32_t codes) {
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)codes));
    const uint32_t b = (h & 0x80008000u) | ((h >> 3) & 0x0fff0fffu);
    const __nv_bfloat162 two112 = __halves2bfloat162(__ushort_as_bfloat16(0x7780), __ushort_as_bfloat16(0x7780));
    return bf16x2_bits(__hmul2(*(const __nv_bfloat162*)&b, two112));
}

// Shared memory per warp: MMA_SLOTS ring slots (one tile's K or V as the cache stores it),
// plus for FP8 the bf16 tile the codes are converted into.
template <int HD, bool FP8>
struct MmaLayout {
    static constexpr int ELEM = FP8 ? 1 : 2;
    static constexpr int ROW = HD * 2;                 // bytes of a bf16 tile row
    static constexpr int TILE = MMA_TILE * ROW;        // a bf16 tile
    static constexpr int SLOT = MMA_TILE * HD * ELEM;  // a ring slot
    static constexpr int CHUNKS = HD * ELEM / 16;      // 16-byte chunks per slot row
    static constexpr int WARP_BYTES = MMA_SLOTS * SLOT + (FP8 ? TILE : 0);
    // Byte offset of 16-byte chunk c of row r in a bf16 tile (swizzled, see the top).
    __device__ static int swz(int r, int c) { return r * ROW + ((c ^ (r & 7)) << 4); }
    // Byte offset of chunk c of row r in a slot: bf16 slots are tiles; FP8 rows are plain.
    __device__ static int slot_at(int r, int c) { return FP8 ? r * HD + c * 16 : swz(r, c); }
};

// FP8: a slot's codes into the warp's bf16 tile; lane handles half of row lane / 2. The
// chunk order is rotated by row so that 8 consecutive lanes read different bank groups.
template <int HD>
__device__ __forceinline__ void codes_to_tile(const unsigned char* codes, unsigned char* tile, int lane) {
    constexpr int NC = HD / 32;  // 16-code chunks per half row
    const int r = lane / 2, h = lane % 2;
#pragma unroll
    for (int i = 0; i < NC; i++) {
        const int c = h * NC + (i + r) % NC;
        const uint4 w = *(const uint4*)(codes + r * HD + c * 16);
        const uint4 lo = make_uint4(e4m3x2_bf16x2(w.x), e4m3x2_bf16x2(w.x >> 16), e4m3x2_bf16x2(w.y),
                                    e4m3x2_bf16x2(w.y >> 16));
        const uint4 hi = make_uint4(e4m3x2_bf16x2(w.z), e4m3x2_bf16x2(w.z >> 16), e4m3x2_bf16x2(w.w),
                                    e4m3x2_bf16x2(w.w >> 16));
        *(uint4*)(tile + MmaLayout<HD, true>::swz(r, 2 * c)) = lo;
        *(uint4*)(tile + MmaLayout<HD, true>::swz(r, 2 * c + 1)) = hi;
    }
}

// Scores of one tile: s = S^T's C fragment (positions gr, gr + 8; heads 2tg, 2tg + 1),
// q hi and lo parts both accumulated (see the top).
template <int HD>
__device__ __forceinline__ void tile_scores(float (&s)[4], uint32_t tile, const uint32_t (&qh)[HD / 16][2],
                                            const uint32_t (&ql)[HD / 16][2], int lane) {
    const int r = lane % 16, c = lane / 16;
    s[0] = s[1] = s[2] = s[3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t a[4];
        ldsm_x4(a, tile + MmaLayout<HD, false>::swz(r, 2 * kk + c));
        mma_bf16(s, a, qh[kk][0], qh[kk][1]);
        mma_bf16(s, a, ql[kk][0], ql[kk][1]);
    }
}

// o += V^T . P^T for one tile; ph, pl: P^T's B fragment, hi and lo parts.
template <int HD>
__device__ __forceinline__ void tile_outputs(float (&o)[HD / 16][4], uint32_t tile, const uint32_t (&ph)[2],
                                             const uint32_t (&pl)[2], int lane) {
    const int r = lane % 8 + 8 * (lane / 16), c = (lane / 8) % 2;
#pragma unroll
    for (int mt = 0; mt < HD / 16; mt++) {
        uint32_t a[4];
        ldsm_x4_trans(a, tile + MmaLayout<HD, false>::swz(r, 2 * mt + c));
        mma_bf16(o[mt], a, ph[0], ph[1]);
        mma_bf16(o[mt], a, pl[0], pl[1]);
    }
}

// The online softmax of a lane's two heads (2tg, 2tg + 1) over the warp's tiles: the running
// max (the same in the 8 lanes of a tg) and this lane's share of the sum (its rows only;
// summed over the 8 lanes at the end: scaling a sum by corr commutes with splitting it).
struct MmaSoftmax {
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    // The tile's scores (masked ones -inf) become probabilities in place; corr[j] is the
    // factor head 2tg + j's earlier outputs take.
    __device__ __forceinline__ void update(float (&s)[4], float (&corr)[2]) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float mx = fmaxf(s[j], s[j + 2]);
#pragma unroll
            for (int o = 4; o < WARP; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));
            const float mn = fmaxf(m[j], mx);
            const float base = mn == -INFINITY ? 0.f : mn;  // nothing visible yet: exp(-inf), not NaN
            corr[j] = expf(m[j] - base);
            s[j] = expf(s[j] - base);
            s[j + 2] = expf(s[j + 2] - base);
            l[j] = l[j] * corr[j] + (s[j] + s[j + 2]);
            m[j] = mn;
        }
    }
};

// P^T's B fragment from the probabilities p (C layout) times the value scales of rows gr
// and gr + 8: each 8-row half, packed as bf16 pairs of heads, is transposed by movmatrix.
__device__ __forceinline__ void probs_fragment(const float (&p)[4], float v0, float v8, uint32_t (&ph)[2],
                                               uint32_t (&pl)[2]) {
    uint32_t h0, l0, h8, l8;
    split_bf16(p[0] * v0, p[1] * v0, h0, l0);
    split_bf16(p[2] * v8, p[3] * v8, h8, l8);
    ph[0] = transpose8x8(h0);
    ph[1] = transpose8x8(h8);
    pl[0] = transpose8x8(l0);
    pl[1] = transpose8x8(l8);
}

// What one block knows about its token's sequence (as SplitView in attention.cu), and how a
// warp fills its ring with a tile's keys or values.
template <int HD, bool WINDOWED, bool FP8>
struct MmaView {
    using Lay = MmaLayout<HD, FP8>;
    static constexpr int PL = HD / WARP;  // dimensions per lane when a warp handles one row
    const float *k_new, *v_new, *inv_freq;
    const void *k_cache, *v_cache;
    const signed char *k_exps, *v_exps;
    const uint32_t *table, *tree;
    int t, kvh, kv_heads, kv_dim, block_size, bs_shift, pos, start, end, first_tok, first_pos, window, sinks, lane, warp;

    // The first position of this warp's n-th tile: fixed offsets from the split's start.
    __device__ __forceinline__ int tile_base(int n) const { return start + MMA_TILE * (warp + MMA_WARPS * n); }
    __device__ __forceinline__ bool visible(int p) const {
        return p < end && (!WINDOWED || p < sinks || pos - p < window);
    }
    __device__ __forceinline__ int slot(int sp) const {
        const int blk = bs_shift >= 0 ? sp >> bs_shift : sp / block_size;
        return (int)table[blk] * block_size + (sp - blk * block_size);
    }
    // Position p's row: its cache slot (>= 0), -1 - the step token whose k and v hold it, or
    // HIDDEN (masked: never loaded, its block may be back in the pool).
    __device__ __forceinline__ int row_source(int p) const {
        if (!visible(p)) return HIDDEN;
        const int src = kv_source(tree, t, p, first_tok, first_pos);
        return src >= 0 ? -1 - src : slot(-1 - src);
    }

    // Row r of slot `dst` for step token `tok` (its key rotated at position p), rounded as
    // the cache will hold it (store_own_kv stores the same bits); tok < 0: a masked row,
    // zeros. Every lane takes part. Returns the FP8 scale exponent (0 for bf16).
    template <bool V>
    __device__ __forceinline__ int own_row(unsigned char* dst, int r, int tok, int p) const {
        float x[PL];
#pragma unroll
        for (int i = 0; i < PL; i++) x[i] = 0.f;
        if (tok >= 0) {
            const float* src = (V ? v_new : k_new) + (size_t)tok * kv_dim + kvh * HD + lane * PL;
#pragma unroll
            for (int i = 0; i < PL; i++) x[i] = src[i];
            if (!V && inv_freq) {
                float cs[PL], sn[PL];
                rope_angles<PL>(p, inv_freq, lane, cs, sn);
                rope_rotate<PL>(x, cs, sn, lane);
            }
        }
        if constexpr (FP8) {
            const int e = head_scale_exp<PL>(x);
            uint32_t w = 0;
#pragma unroll
            for (int i = 0; i < PL; i++) w |= e4m3_code(x[i], e) << (8 * i);
            unsigned char* at = dst + r * HD + lane * PL;
            if constexpr (PL == 4) *(uint32_t*)at = w;
            else *(unsigned short*)at = (unsigned short)w;
            return e;
        } else {
            uint32_t w[PL / 2];
#pragma unroll
            for (int i = 0; i < PL / 2; i++) w[i] = bf16x2_bits(__floats2bfloat162_rn(x[2 * i], x[2 * i + 1]));
            unsigned char* at = dst + Lay::swz(r, lane * PL / 8) + (lane * PL % 8) * 2;
            if constexpr (PL == 4) *(uint2*)at = make_uint2(w[0], w[1]);
            else *(uint32_t*)at = w[0];
            return 0;
        }
    }

    // Starts filling slot `dst` with the keys (V false) or values of the tile at `base` (one
    // commit group, empty or not): cached rows by cp.async, the step's own rows and masked
    // rows written here. Lane l holds row l % 16's source in `src`; lane r < 16 gets row r's
    // scale exponent back (FP8; a plain load, used only when the tile is scored).
    template <bool V>
    __device__ __forceinline__ int issue(unsigned char* dst, int base, int src) const {
        int e = 0;
        if (base < end) {
            const unsigned char* cache = (const unsigned char*)(V ? v_cache : k_cache);
            constexpr int RPI = WARP / Lay::CHUNKS;  // rows per pass of the warp
#pragma unroll
            for (int i = 0; i < MMA_TILE / RPI; i++) {
                const int r = i * RPI + lane / Lay::CHUNKS, c = lane % Lay::CHUNKS;
                const int s = __shfl_sync(FULL, src, r);
                if (s >= 0)
                    cp_async<16>(dst + Lay::slot_at(r, c), cache + ((size_t)s * kv_dim + kvh * HD) * Lay::ELEM + c * 16);
            }
            if (FP8 && src >= 0) e = (V ? v_exps : k_exps)[(size_t)src * kv_heads + kvh];
            for (uint32_t own = __ballot_sync(FULL, src < 0) & 0xffffu; own; own &= own - 1) {
                const int r = __ffs(own) - 1, s = __shfl_sync(FULL, src, r);
                const int er = own_row<V>(dst, r, s == HIDDEN ? -1 : -1 - s, base + r);
                if (lane == r) e = er;
            }
        }
        cp_async_commit();
        return e;
    }

    // The bf16 tile of slot `at` for ldmatrix: the slot itself, or (FP8) its codes converted
    // into the warp's tile once the slot's copies have landed.
    __device__ __forceinline__ uint32_t tile(unsigned char* ring, int at) const {
        cp_async_wait<MMA_SLOTS - 1>();  // all but the two newest groups: this slot's
        __syncwarp();
        if constexpr (FP8) {
            unsigned char* conv = ring + MMA_SLOTS * Lay::SLOT;
            codes_to_tile<HD>(ring + at * Lay::SLOT, conv, lane);
            __syncwarp();
            return smem_u32(conv);
        }
        return smem_u32(ring + at * Lay::SLOT);
    }
};

// The score factor (FP8: the key scale 2^e) and mask of rows gr and gr + 8 applied to s.
template <bool FP8, typename View>
__device__ __forceinline__ void scale_scores(float (&s)[4], const View& view, int base, int ke, float scale, int lane) {
    const int gr = lane / 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = gr + 8 * h;
        const float ks = FP8 ? exp2_int(__shfl_sync(FULL, ke, row)) : 1.f;
        const bool seen = view.visible(base + row);
        // As attention.cu: (dot * ks) * scale.
        s[2 * h] = seen ? s[2 * h] * ks * scale : -INFINITY;
        s[2 * h + 1] = seen ? s[2 * h + 1] * ks * scale : -INFINITY;
    }
}

// Q^T's B fragments (hi and lo parts) of the 8 columns: head kvh * gq + gr's dims 16kk + 2tg
// (+1) and +8 (+9), rotated when inv_freq is set (cs, sn: token t's angles, lane layout of
// rope_angles). Staged through `smem` (8 x HD floats) so that each head is rotated once by a
// warp, as attention.cu rotates it. Heads from gq on are zero.
template <int HD>
__device__ __forceinline__ void load_q(unsigned char* smem, const float* q, int gq, const float* inv_freq,
                                       const float* cs, const float* sn, uint32_t (&qh)[HD / 16][2],
                                       uint32_t (&ql)[HD / 16][2], int lane, int warp) {
    constexpr int PL = HD / WARP;
    float(*qs)[HD] = (float(*)[HD])smem;
    for (int j = warp; j < 8; j += MMA_WARPS) {
        float x[PL];
#pragma unroll
        for (int i = 0; i < PL; i++) x[i] = j < gq ? q[j * HD + lane * PL + i] : 0.f;
        if (inv_freq && j < gq) rope_rotate<PL>(x, cs, sn, lane);
#pragma unroll
        for (int i = 0; i < PL; i++) qs[j][lane * PL + i] = x[i];
    }
    __syncthreads();
    const float* mine = qs[lane / 4] + 2 * (lane % 4);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        split_bf16(mine[16 * kk], mine[16 * kk + 1], qh[kk][0], ql[kk][0]);
        split_bf16(mine[16 * kk + 8], mine[16 * kk + 9], qh[kk][1], ql[kk][1]);
    }
    __syncthreads();  // the ring takes the space next
}

// Stages the warp's state for merge_warps: per head (< gq) the max, the sum (the lanes'
// shares added over the 8 lanes of a tg, in a fixed order) and the HD outputs.
template <int HD, int G>
__device__ __forceinline__ void stage_state(unsigned char* smem, MmaSoftmax& sm, const float (&o)[HD / 16][4], int gq,
                                            int lane, int warp) {
    float(*sm_max)[G] = (float(*)[G])smem;
    float(*sm_sum)[G] = (float(*)[G])(smem + MMA_WARPS * G * 4);
    float(*sacc)[G][HD] = (float(*)[G][HD])(smem + 2 * MMA_WARPS * G * 4);
    const int gr = lane / 4, tg = lane % 4;
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int o = 4; o < WARP; o *= 2) sm.l[j] += __shfl_xor_sync(FULL, sm.l[j], o);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int head = 2 * tg + j;
        if (head >= gq) continue;
        if (gr == 0) {
            sm_max[warp][head] = sm.m[j];
            sm_sum[warp][head] = sm.l[j];
        }
#pragma unroll
        for (int mt = 0; mt < HD / 16; mt++) {
            sacc[warp][head][16 * mt + gr] = o[mt][j];
            sacc[warp][head][16 * mt + gr + 8] = o[mt][j + 2];
        }
    }
}

// One tile: scores from K(n) in slot `ks`, the softmax, outputs from V(n) in slot `ks + 1`;
// issues K and V of the warp's next tile (`next`, sources `src`) into the slots freed.
// ke, ve: this tile's scale exponents (FP8), replaced by the next tile's.
template <int HD, bool WINDOWED, bool FP8>
__device__ __forceinline__ void mma_tile(const MmaView<HD, WINDOWED, FP8>& view, unsigned char* ring, int ks, int base,
                                         int next, int src, int& ke, int& ve, const uint32_t (&qh)[HD / 16][2],
                                         const uint32_t (&ql)[HD / 16][2], float (&o)[HD / 16][4], MmaSoftmax& sm,
                                         float scale) {
    using Lay = MmaLayout<HD, FP8>;
    const int lane = view.lane;
    const int ke_next = view.template issue<false>(ring + (ks + 2) % MMA_SLOTS * Lay::SLOT, next, src);
    float s[4];
    tile_scores<HD>(s, view.tile(ring, ks), qh, ql, lane);
    __syncwarp();  // slot ks is read: the next issue refills it
    scale_scores<FP8>(s, view, base, ke, scale, lane);
    float corr[2];
    sm.update(s, corr);
#pragma unroll
    for (int mt = 0; mt < HD / 16; mt++) {
        o[mt][0] *= corr[0];
        o[mt][1] *= corr[1];
        o[mt][2] *= corr[0];
        o[mt][3] *= corr[1];
    }
    const int gr = lane / 4;
    const float v0 = FP8 ? exp2_int(__shfl_sync(FULL, ve, gr)) : 1.f;
    const float v8 = FP8 ? exp2_int(__shfl_sync(FULL, ve, gr + 8)) : 1.f;
    uint32_t ph[2], pl[2];
    probs_fragment(s, v0, v8, ph, pl);
    const int ve_next = view.template issue<true>(ring + ks * Lay::SLOT, next, src);
    tile_outputs<HD>(o, view.tile(ring, (ks + 1) % MMA_SLOTS), ph, pl, lane);
    __syncwarp();
    ke = ke_next;
    ve = ve_next;
}

// As attn_split in attention.cu (same arguments, grid and partial layout), on tensor cores.
// grid: (kv_heads, tokens, max_splits), block: 32 * MMA_WARPS.
template <int HD, bool WINDOWED, bool FP8, int G>
__device__ void attn_mma(const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,
                         void* __restrict__ k_cache, void* __restrict__ v_cache, signed char* __restrict__ k_exps,
                         signed char* __restrict__ v_exps, const uint32_t* __restrict__ positions,
                         const uint32_t* __restrict__ slots, const uint32_t* __restrict__ token_row,
                         const uint32_t* __restrict__ row_first, const uint32_t* __restrict__ tree,
                         const uint32_t* __restrict__ block_tables, int max_blocks, int block_size, int heads,
                         int kv_heads, int max_splits, float* __restrict__ partial, const float* __restrict__ inv_freq,
                         int min_split, int window, int sinks) {
    using View = MmaView<HD, WINDOWED, FP8>;
    using Lay = MmaLayout<HD, FP8>;
    constexpr int PL = HD / WARP;
    pdl_start();
    const int kvh = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
    const int pos = positions[t], len = split_len(pos, min_split), start = split * len;
    if (start > pos) return;
    const int gq = heads / kv_heads, lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
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
    constexpr int RING_BYTES = MMA_WARPS * Lay::WARP_BYTES;
    constexpr int MERGE_BYTES = MMA_WARPS * G * (HD + 2) * 4;
    static_assert(RING_BYTES >= 8 * HD * 4, "q is staged in the ring");
    __shared__ __align__(16) unsigned char smem[RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES];
    uint32_t qh[HD / 16][2], ql[HD / 16][2];
    load_q<HD>(smem, q + ((size_t)t * heads + kvh * gq) * HD, gq, inv_freq, cs, sn, qh, ql, lane, warp);

    unsigned char* ring = smem + warp * Lay::WARP_BYTES;
    MmaSoftmax sm;
    float o[HD / 16][4];
#pragma unroll
    for (int mt = 0; mt < HD / 16; mt++) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
    const float scale = 1.0f / sqrtf((float)HD);
    // A tile's row sources (block table lookups) are loaded a tile ahead of its copies, so
    // that the copies do not wait on them.
    const auto sources = [&](int n) {
        const int base = view.tile_base(n);
        return base < view.end ? view.row_source(base + lane % MMA_TILE) : HIDDEN;
    };
    int src = sources(0);
    int ke = view.template issue<false>(ring, view.tile_base(0), src);
    int ve = view.template issue<true>(ring + Lay::SLOT, view.tile_base(0), src);
    src = sources(1);
    for (int n = 0, ks = 0; view.tile_base(n) < view.end; n++, ks = (ks + 2) % MMA_SLOTS) {
        const int ahead = sources(n + 2);
        mma_tile<HD, WINDOWED, FP8>(view, ring, ks, view.tile_base(n), view.tile_base(n + 1), src, ke, ve, qh, ql, o,
                                    sm, scale);
        src = ahead;
    }
    cp_async_wait<0>();  // the groups past the end were empty, but the ring becomes the merge's
    __syncthreads();
    stage_state<HD, G>(smem, sm, o, gq, lane, warp);
    __syncthreads();
    float* out = partial + (((size_t)t * heads + kvh * gq) * max_splits + split) * (HD + 2);
    merge_warps<HD, MMA_WARPS, G>(smem, out, (size_t)max_splits * (HD + 2), gq);
}

// By head size, window, KV storage and the query heads per KV head (as attention.cu's; the
// mma's 8 columns hold up to 8 heads either way, G sizes the merge).
// At most 128 registers, so that 4 blocks fit in an SM (see the ring above).
#define MMA_BOUNDS __launch_bounds__(MMA_WARPS * WARP, 4)
extern "C" __global__ void MMA_BOUNDS attn_mma_hd64_g4(ATTN_ARGS) { attn_mma<64, false, false, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_hd64_g8(ATTN_ARGS) { attn_mma<64, false, false, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_hd128_g4(ATTN_ARGS) { attn_mma<128, false, false, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_hd128_g8(ATTN_ARGS) { attn_mma<128, false, false, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_win_hd64_g4(ATTN_ARGS) { attn_mma<64, true, false, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_win_hd64_g8(ATTN_ARGS) { attn_mma<64, true, false, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_win_hd128_g4(ATTN_ARGS) { attn_mma<128, true, false, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_win_hd128_g8(ATTN_ARGS) { attn_mma<128, true, false, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_hd64_g4(ATTN_ARGS) { attn_mma<64, false, true, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_hd64_g8(ATTN_ARGS) { attn_mma<64, false, true, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_hd128_g4(ATTN_ARGS) { attn_mma<128, false, true, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_hd128_g8(ATTN_ARGS) { attn_mma<128, false, true, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_win_hd64_g4(ATTN_ARGS) { attn_mma<64, true, true, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_win_hd64_g8(ATTN_ARGS) { attn_mma<64, true, true, 8>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_win_hd128_g4(ATTN_ARGS) { attn_mma<128, true, true, 4>(ATTN_PASS); }
extern "C" __global__ void MMA_BOUNDS attn_mma_fp8_win_hd128_g8(ATTN_ARGS) { attn_mma<128, true, true, 8>(ATTN_PASS); }
