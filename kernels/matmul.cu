// The small-step matmul on tensor cores: y[t, m] = scale[m] * sum_k W[m, k] * x[t, k] for 1 to
// 64 tokens t (decode, verification of k + 1 tokens per row, small batches). W is bf16 or FP8
// E4M3 [M, K] row-major, x bf16 [n, K], y f32 [n, M].
//
// Bound by weight bytes. A step of a few tokens reads every weight once and does one
// multiply-add per weight and token; the tensor cores (mma.sync m16n8k16: bf16 in, f32
// accumulate) do 64 tokens' worth of that in the time the weights take to arrive, so the
// kernel stays a weight stream at every token count. Each warp keeps MM_UNROLL k-blocks of
// its weights in flight (16-byte streaming loads) and the first of them are issued before
// the wait for the previous kernel (programmatic dependent launch).
//
// Fragments straight from the checkpoint layout: lane (g = lane / 4, q = lane % 4) loads 16
// bytes of weight rows g and g + 8 of a 16-row tile at k offset c (bf16: 8 values, c = 32 kb +
// 8q; FP8: 16 values, c = 64 kb + 16q) and the same k range of token g's activations. These
// registers are the mma's A and B fragments once A and B agree that the mma's logical k
// index 2q + j (+ 8) stands for the physical k = c + 4s + j (+ 2) in step s: a dot product
// does not care in which order k is visited. No repacking: cuBLAS reads the same bf16
// buffer for prefill.
//
// Batch invariance: the (row, token) accumulator sees the same mma sequence whatever the
// number of tokens: the k-blocks of each K slice in order, then the slices summed in order
// 0..S-1 (S depends on the matrix shape only). An mma computes each output element from its
// own row and column only, so a token's bits depend neither on its neighbours nor on its
// column: verifying k + 1 tokens gives exactly the bits of k + 1 decode steps.
//
// Split K: a matrix with few rows (o, down) would leave most SMs idle, so K is cut into S
// slices (grid.y), one block each per row block; each block writes its partial sums and the
// last to finish (a ticket per row block) adds them in slice order and runs the epilogue.
// The host picks S so that the decode launch fills every SM's block slots in one wave: each
// SM then streams the same share of the weights (a second, partial wave or SMs with one
// block where others have two cost as much as the missing share).
//
// FP8 (W8A16): the hardware converts a pair of E4M3 to a pair of f16, exactly; moving each
// f16's sign, exponent and top mantissa bits into a bf16 gives its value times 2^-112, still
// exact and never subnormal. The per-row scale, stored times 2^56, and a multiplication by
// 2^56 in the epilogue give the factor back (in two steps, so no scale can overflow).
#include "common.cuh"

#ifndef MM_WARPS
#define MM_WARPS 8  // warps per block; they walk the same k-blocks, so x is read once per SM
#endif
#ifndef MM_UNROLL
#define MM_UNROLL 4  // k-blocks of weights in flight per warp
#endif
#ifndef MM_SMALL_UNITS
#define MM_SMALL_UNITS 2  // 16-row units per warp up to 8 tokens
#endif
#ifndef MM_MIN_BLOCKS
#define MM_MIN_BLOCKS 2  // blocks of the decode kernels (up to 16 tokens) resident per SM
#endif
#ifndef MM_X_AHEAD
#define MM_X_AHEAD 0  // load the next k-block's activations before this one's mma
#endif
#ifndef MM_L2_256
#define MM_L2_256 1  // weight loads fetch their whole 256-byte L2 segment
#endif
// (The host's MatmulTuning sets these; its grid depends on them.)

#define EPI_STORE 0   // y = acc (or y += acc when `accumulate`: a residual add)
#define EPI_SWIGLU 1  // W0 = gate, W1 = up: y = silu(gate) * up

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two E4M3 (low byte first) -> a bf16 pair, times 2^-112.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t pair) {
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)pair));
    return (h & 0x80008000u) | ((h >> 3) & 0x0FFF0FFFu);
}

// 2^56: with the stored scale (times 2^56), the 2^112 the conversion above took away.
#define FP8_RESCALE __int_as_float(0x5b800000)

// v[i] for a run-time i without indexing (which would move the array to local memory).
template <typename T>
__device__ __forceinline__ T pick(const T (&v)[3], int i) {
    return i == 0 ? v[0] : i == 1 ? v[1] : v[2];
}

__device__ __forceinline__ uint4 zero4() { return make_uint4(0, 0, 0, 0); }

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Everything one launch needs. Up to three weights share the input (q, k, v); with
// EPI_SWIGLU, w[0] and w[1] are gate and up of the same m[0] rows and y[0] is bf16.
struct MmArgs {
    const uint8_t* w[3];
    const float* scale[3];  // FP8 only: per row, times 2^56
    void* y[3];
    int m[3];
    int K;
    const __nv_bfloat16* x;
    int n;
    int accumulate;
    float* partial;     // [S][n][rows of all weights], when S > 1
    uint32_t* tickets;  // one per row block, zero between launches
};

// Where tile `tile` (16 rows) lies: tiles run through the weights one after another, or
// (`which` >= 0, SwiGLU) tile `tile` of weight `which`. False past the last row.
__device__ __forceinline__ bool locate(const MmArgs& a, int tile, int which, int& weight, int& row) {
    row = tile * 16;
    weight = which < 0 ? 0 : which;
    if (which < 0)
        while (weight < 2 && row >= pick(a.m, weight)) row -= pick(a.m, weight), weight++;
    return row < pick(a.m, weight);
}

// A row's index among the rows of all weights (the partial sums' layout).
__device__ __forceinline__ int global_row(const MmArgs& a, int weight, int row) {
    return row + (weight > 0 ? a.m[0] : 0) + (weight > 1 ? a.m[1] : 0);
}

// One 16-row tile of one weight as this lane sees it.
struct Tile {
    const uint8_t* lo;  // row g of the tile
    const uint8_t* hi;  // row g + 8
    int weight, row;    // which weight, first row of the tile in it
    bool live;
};

template <bool FP8>
__device__ __forceinline__ Tile tile_at(const MmArgs& a, int tile, int which) {
    Tile t;
    t.live = locate(a, tile, which, t.weight, t.row);
    const size_t row_bytes = (size_t)a.K * (FP8 ? 1 : 2);
    const int g = (threadIdx.x % WARP) / 4;
    t.lo = t.live ? pick(a.w, t.weight) + (size_t)(t.row + g) * row_bytes : nullptr;
    t.hi = t.live ? t.lo + 8 * row_bytes : nullptr;
    return t;
}

__device__ __forceinline__ uint4 load_weights(const uint4* p) {
#if MM_L2_256
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#else
    return load_stream(p);
#endif
}

// The 16 bytes of each of the tile's two rows at k-block kb (64 bytes per row per k-block).
__device__ __forceinline__ void load_tile(const Tile& t, int kb, bool ok, uint4 (&dst)[2]) {
    const size_t off = (size_t)kb * 64 + (threadIdx.x % 4) * 16;
    dst[0] = ok && t.live ? load_weights(reinterpret_cast<const uint4*>(t.lo + off)) : zero4();
    dst[1] = ok && t.live ? load_weights(reinterpret_cast<const uint4*>(t.hi + off)) : zero4();
}

// acc[nt] += tile . x over one k-block whose weights this lane holds in w. bf16: two mma
// steps; x[nt] is token (nt * 8 + g)'s 8 values at c.
template <int NT>
__device__ __forceinline__ void mma_kblock(float (&acc)[NT][4], const uint4 (&w)[2], const uint4 (&x)[NT][2],
                                           bool fp8) {
    if (!fp8) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int s = 0; s < 2; s++)
                mma_bf16(acc[nt], word(w[0], 2 * s), word(w[1], 2 * s), word(w[0], 2 * s + 1), word(w[1], 2 * s + 1),
                         word(x[nt][0], 2 * s), word(x[nt][0], 2 * s + 1));
        return;
    }
    // FP8: four steps over a 64-wide k-block; step s takes weight word s (values c + 4s ..
    // c + 4s + 3) and the matching two words of the token's 16 values.
#pragma unroll
    for (int s = 0; s < 4; s++) {
        const uint32_t lo = word(w[0], s), hi = word(w[1], s);
        const uint32_t a0 = e4m3x2_to_bf16x2(lo), a1 = e4m3x2_to_bf16x2(hi);
        const uint32_t a2 = e4m3x2_to_bf16x2(lo >> 16), a3 = e4m3x2_to_bf16x2(hi >> 16);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            mma_bf16(acc[nt], a0, a1, a2, a3, word(x[nt][s / 2], (s % 2) * 2), word(x[nt][s / 2], (s % 2) * 2 + 1));
    }
}

// Token t's activations this lane needs at k offset c (8 values for bf16 weights, 16 for FP8).
template <bool FP8, int NT>
__device__ __forceinline__ void load_x(const MmArgs& a, size_t c, uint4 (&x)[NT][2]) {
    const int g = (threadIdx.x % WARP) / 4;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int t = nt * 8 + g;
        const uint4* p = reinterpret_cast<const uint4*>(a.x + (size_t)t * a.K + c);
        x[nt][0] = t < a.n ? p[0] : zero4();
        x[nt][1] = FP8 && t < a.n ? p[1] : zero4();
    }
}

// The result for (weight, row, token t), from the sums v of each weight of the unit.
template <bool FP8, int EPI, int NW>
__device__ __forceinline__ void epilogue(const MmArgs& a, int weight, int row, int t, const float (&v)[NW]) {
    if (EPI == EPI_SWIGLU) {
        const float gate = FP8 ? v[0] * FP8_RESCALE * a.scale[0][row] : v[0];
        const float up = FP8 ? v[NW - 1] * FP8_RESCALE * a.scale[1][row] : v[NW - 1];
        const float out = gate / (1.0f + expf(-gate)) * up;  // as silu_mul in activation.cu
        reinterpret_cast<__nv_bfloat16*>(a.y[0])[(size_t)t * a.m[0] + row] = __float2bfloat16_rn(out);
    } else {
        const float val = FP8 ? v[0] * FP8_RESCALE * pick(a.scale, weight)[row] : v[0];
        float* y = reinterpret_cast<float*>(pick(a.y, weight)) + (size_t)t * pick(a.m, weight) + row;
        *y = a.accumulate ? *y + val : val;
    }
}

// Split K: store this slice's sums; the block that finishes its row block last adds the
// slices in order 0..S-1 and runs the epilogue for every row of the row block.
template <bool FP8, int NT, int R, int EPI, int NW>
__device__ void split_k_finish(const MmArgs& a, const Tile (&tiles)[R][NW], const float (&acc)[R][NW][NT][4]) {
    const int g = (threadIdx.x % WARP) / 4, q = threadIdx.x % 4;
    const int rows = a.m[0] + a.m[1] + a.m[2];
    float* mine = a.partial + (size_t)blockIdx.y * a.n * rows;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int w = 0; w < NW; w++) {
            if (!tiles[r][w].live) continue;
            const int base = global_row(a, tiles[r][w].weight, tiles[r][w].row);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int t = nt * 8 + 2 * q + (i & 1);
                    if (t < a.n) mine[(size_t)t * rows + base + g + (i >= 2 ? 8 : 0)] = acc[r][w][nt][i];
                }
        }
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(a.tickets + blockIdx.x, 1u) == gridDim.y - 1;
        if (last) a.tickets[blockIdx.x] = 0;  // every slice has arrived: ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    constexpr int UNITS = MM_WARPS * R;
    for (int e = threadIdx.x; e < UNITS * 16 * a.n; e += blockDim.x) {
        const int t = e / (UNITS * 16), unit = blockIdx.x * UNITS + (e / 16) % UNITS, r16 = e % 16;
        int weight[NW], row[NW];
        bool live = true;
#pragma unroll
        for (int w = 0; w < NW; w++) live = locate(a, unit, NW == 1 ? -1 : w, weight[w], row[w]) && live;
        if (!live) continue;
        float v[NW];
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float* p = a.partial + (size_t)t * rows + global_row(a, weight[w], row[w] + r16);
            float sum = 0.f;
            for (int s = 0; s < (int)gridDim.y; s++) sum += __ldcg(p + (size_t)s * a.n * rows);
            v[w] = sum;
        }
        epilogue<FP8, EPI, NW>(a, weight[0], row[0] + r16, t, v);
    }
}

// ---- The register variant: weights go straight from global memory into fragments.
template <bool FP8, int NT, int R, int NW>
__device__ void stream_registers(const MmArgs& a, const Tile (&tiles)[R][NW], float (&acc)[R][NW][NT][4]) {
    constexpr int KB = FP8 ? 64 : 32;  // k per k-block: 16 bytes per lane and row
    constexpr int U = NT >= 8 ? 2 : MM_UNROLL;  // at 64 tokens the accumulators need the registers
    const int q = threadIdx.x % 4, nkb = a.K / KB;
    const int kb0 = blockIdx.y * nkb / gridDim.y, kb1 = (blockIdx.y + 1) * nkb / gridDim.y;
    // U k-blocks in flight: slot u holds k-block kb + u and is refilled with kb + U + u as
    // soon as it has been used. The first loads go out before the wait for the previous
    // kernel (they read weights only).
    uint4 wv[U][R][NW][2];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int w = 0; w < NW; w++) load_tile(tiles[r][w], kb0 + u, kb0 + u < kb1, wv[u][r][w]);
    pdl_wait();

#if MM_X_AHEAD
    // The activations of the next k-block are loaded while this one's mma run.
    uint4 x[NT][2];
    load_x<FP8, NT>(a, (size_t)kb0 * KB + q * (KB / 4), x);
#endif
    for (int kb = kb0; kb < kb1; kb += U) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (kb + u >= kb1) break;
#if MM_X_AHEAD
            uint4 x_next[NT][2];
            load_x<FP8, NT>(a, (size_t)min(kb + u + 1, kb1 - 1) * KB + q * (KB / 4), x_next);
#else
            uint4 x[NT][2];
            load_x<FP8, NT>(a, (size_t)(kb + u) * KB + q * (KB / 4), x);
#endif
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int w = 0; w < NW; w++) {
                    mma_kblock<NT>(acc[r][w], wv[u][r][w], x, FP8);
                    load_tile(tiles[r][w], kb + U + u, kb + U + u < kb1, wv[u][r][w]);
                }
#if MM_X_AHEAD
#pragma unroll
            for (int nt = 0; nt < NT; nt++) x[nt][0] = x_next[nt][0], x[nt][1] = x_next[nt][1];
#endif
        }
    }

}

// One block: MM_WARPS warps x R units (a unit is one 16-row tile, or a gate and an up tile
// with EPI_SWIGLU) over K slice blockIdx.y of gridDim.y.
template <bool FP8, int NT, int R, int EPI>
__device__ void matmul_block(const MmArgs& a) {
    constexpr int NW = EPI == EPI_SWIGLU ? 2 : 1;
    pdl_trigger();
    const int warp = threadIdx.x / WARP, q = threadIdx.x % 4, slices = gridDim.y;
    const int unit0 = (blockIdx.x * MM_WARPS + warp) * R;

    Tile tiles[R][NW];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int w = 0; w < NW; w++) tiles[r][w] = tile_at<FP8>(a, unit0 + r, NW == 1 ? -1 : w);

    float acc[R][NW][NT][4];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int w = 0; w < NW; w++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][w][nt][i] = 0.f;

    stream_registers<FP8, NT, R, NW>(a, tiles, acc);

    if (slices > 1) {
        split_k_finish<FP8, NT, R, EPI, NW>(a, tiles, acc);
        return;
    }
    // acc[..][i]: row g (+ 8 for i >= 2) of the tile, token nt * 8 + 2q + (i & 1).
    const int g = (threadIdx.x % WARP) / 4;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (!tiles[r][0].live) continue;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int t = nt * 8 + 2 * q + (i & 1);
                if (t >= a.n) continue;
                float v[NW];
#pragma unroll
                for (int w = 0; w < NW; w++) v[w] = acc[r][w][nt][i];
                epilogue<FP8, EPI, NW>(a, tiles[r][0].weight, tiles[r][0].row + g + (i >= 2 ? 8 : 0), t, v);
            }
    }
}

// Launch: block MM_WARPS * 32 threads; grid (row blocks, S) with row blocks = units /
// (MM_WARPS * R) rounded up; the kernel's name gives the weight type and the tokens it
// takes at most (8 per mma column tile).
#define MM_PARAMS                                                                                             \
    const uint8_t *w0, const uint8_t *w1, const uint8_t *w2, const float *s0, const float *s1, const float *s2, \
        void *y0, void *y1, void *y2, int m0, int m1, int m2, int K, const __nv_bfloat16 *x, int n,            \
        int accumulate, float *partial, uint32_t *tickets
#define MM_ARGS MmArgs{{w0, w1, w2}, {s0, s1, s2}, {y0, y1, y2}, {m0, m1, m2}, K, x, n, accumulate, partial, tickets}
#define MM_BOUNDS __launch_bounds__(MM_WARPS * WARP)
// The decode kernels keep MM_MIN_BLOCKS blocks on every SM: the host's K split counts on it
// to fill the GPU in one wave.
#define MM_BOUNDS_SMALL __launch_bounds__(MM_WARPS * WARP, MM_MIN_BLOCKS)

// MM_SMALL_UNITS units per warp up to 8 tokens (more weight bytes in flight per activation
// load), one beyond (from 9 tokens the second mma column tile makes the warp bound by
// issue, and more warps stream faster: run 30). SwiGLU's units are pairs already. Which
// warp takes a tile never changes its bits: those depend on the K split alone.
#define SMALL MM_SMALL_UNITS
extern "C" __global__ void MM_BOUNDS_SMALL mm_bf16_t8(MM_PARAMS) { matmul_block<false, 1, SMALL, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL mm_bf16_t16(MM_PARAMS) { matmul_block<false, 2, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS mm_bf16_t32(MM_PARAMS) { matmul_block<false, 4, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS mm_bf16_t64(MM_PARAMS) { matmul_block<false, 8, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL mm_fp8_t8(MM_PARAMS) { matmul_block<true, 1, SMALL, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL mm_fp8_t16(MM_PARAMS) { matmul_block<true, 2, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS mm_fp8_t32(MM_PARAMS) { matmul_block<true, 4, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS mm_fp8_t64(MM_PARAMS) { matmul_block<true, 8, 1, EPI_STORE>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL swiglu_bf16_t8(MM_PARAMS) { matmul_block<false, 1, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL swiglu_bf16_t16(MM_PARAMS) { matmul_block<false, 2, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS swiglu_bf16_t32(MM_PARAMS) { matmul_block<false, 4, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS swiglu_bf16_t64(MM_PARAMS) { matmul_block<false, 8, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL swiglu_fp8_t8(MM_PARAMS) { matmul_block<true, 1, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS_SMALL swiglu_fp8_t16(MM_PARAMS) { matmul_block<true, 2, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS swiglu_fp8_t32(MM_PARAMS) { matmul_block<true, 4, 1, EPI_SWIGLU>(MM_ARGS); }
extern "C" __global__ void MM_BOUNDS swiglu_fp8_t64(MM_PARAMS) { matmul_block<true, 8, 1, EPI_SWIGLU>(MM_ARGS); }
