// Matrix-vector products for decode and verification: y[t, m] = sum_k W[m, k] * x[t, k]
// for a handful of tokens, W bf16 [M, K] (the checkpoint's layout), x and y f32.
//
// Batch-1 decoding reads every weight once per token, so these kernels are weight streams:
// each warp owns whole weight rows, 16-byte streaming loads, several loads in flight per
// lane. The activations are tiny and stay in L1/L2.
//
// Launch count matters as much as bandwidth at these sizes (each kernel boundary costs a
// few microseconds), so one launch covers up to three matrices that share the input
// (q, k and v), and the MLP's gate and up projections are one launch that writes
// silu(gate) * up directly.
//
// Batch invariance: every (row, token) accumulator sees the chunks of its row in the same
// order (lane, lane + 32, ...; the 8 values of a chunk in order; then the same shuffle
// tree) whatever the kernel, the tokens sharing the pass or the rows sharing the warp. A
// verification forward over k+1 tokens therefore gives the very bits of k+1 decode steps.
//
// The seams between sub-layers cost no launch of their own: the output projections (o and
// down) add into the residual stream in their epilogue (`accumulate`), and the projections
// that read a normalised residual (q/k/v, gate/up: the `_norm` kernels) apply the RMSNorm
// as they load it: y = rsqrt(mean(x^2) + eps) * sum_k (W[m,k] * gamma[k]) * x[k], the
// norm's value up to f32 rounding, with no extra pass over x and no grid-wide dependency.
// gamma scales each weight chunk once (not each token's activations), and the sum of
// squares is split between the block's warps (every warp streams the whole row anyway;
// warp w squares the chunks of iterations i with i % GEMV_WARPS == w) and combined in
// shared memory in a fixed order, so its cost does not grow with the rows per block. The
// `_norm` kernels therefore need every warp of every block to own rows (the host checks).
#include "common.cuh"

#define GEMV_WARPS 4
// Bytes of each row prefetched before waiting for the previous kernel: 2 KiB x the
// resident rows (~8k) stays well inside the 50 MB L2.
#define PREFETCH_BYTES 2048

// acc[r][t] = row r . x[t] over all chunks of the rows. ROWS rows per warp, UNROLL
// chunks per row loaded before any is used (ROWS * UNROLL loads in flight per lane).
// Up to 8 tokens (T = 4, 8): the arithmetic on a group of chunks takes long enough that
// the next group's weights are loaded before it starts (double buffering in registers),
// so the memory stream does not stop while the warp computes; the order of the arithmetic
// is unchanged, so the bits are too. At T = 16 the extra registers cost more occupancy
// than the overlap gains (bench/NOTES.md, run 9).
// NORM: x[t] is a residual row, normalised on the fly (gamma, eps): see the top of the file.
template <int T, int ROWS, int UNROLL, bool NORM>
__device__ __forceinline__ void rows_dot(const uint4* const* w, const float* __restrict__ x,
                                         const float* __restrict__ gamma, float eps, int K, int n,
                                         float (&acc)[ROWS][T]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, chunks = K / 8;
    float sq[T];  // NORM: this lane's share of each token's sum of squares
#pragma unroll
    for (int t = 0; t < T; t++) sq[t] = 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.f;
        prefetch_l2(w[r], min(K * 2, PREFETCH_BYTES), lane);  // weights: safe before the wait
    }
    pdl_wait();
    constexpr bool PIPE = T > 1 && T <= 8;
    constexpr int STEP = UNROLL * WARP;
    auto load = [&](int c0, uint4(&wv)[UNROLL][ROWS]) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int r = 0; r < ROWS; r++)
                wv[u][r] = c0 + u * WARP < chunks ? load_stream(w[r] + c0 + u * WARP) : make_uint4(0, 0, 0, 0);
    };
    uint4 next[UNROLL][ROWS];
    if (PIPE) load(lane, next);
    for (int c = lane; c < chunks; c += STEP) {
        uint4 wv[UNROLL][ROWS];
        if (PIPE) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
#pragma unroll
                for (int r = 0; r < ROWS; r++) wv[u][r] = next[u][r];
            load(c + STEP, next);
        } else {
            load(c, wv);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int cu = c + u * WARP;
            if (cu >= chunks) break;
            float wf[ROWS][8];
#pragma unroll
            for (int r = 0; r < ROWS; r++) unpack8(wv[u][r], wf[r]);
            if (NORM) {
                const float4* gp = reinterpret_cast<const float4*>(gamma + (size_t)cu * 8);
                const float4 a = gp[0], b = gp[1];
                const float gv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int r = 0; r < ROWS; r++)
#pragma unroll
                    for (int j = 0; j < 8; j++) wf[r][j] *= gv[j];
            }
            const bool squares = NORM && (cu / WARP) % GEMV_WARPS == warp;  // uniform in the warp
#pragma unroll
            for (int t = 0; t < T; t++) {
                if (t < n) {
                    const float4* xp = reinterpret_cast<const float4*>(x + t * (size_t)K + (size_t)cu * 8);
                    const float4 a = xp[0], b = xp[1];
                    const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                    if (squares)
#pragma unroll
                        for (int j = 0; j < 8; j++) sq[t] = fmaf(xv[j], xv[j], sq[t]);
#pragma unroll
                    for (int r = 0; r < ROWS; r++) {
                        float s = acc[r][t];
#pragma unroll
                        for (int j = 0; j < 8; j++) s = fmaf(wf[r][j], xv[j], s);
                        acc[r][t] = s;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++)
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = warp_sum(acc[r][t]);
    if (NORM) {
        __shared__ float part[GEMV_WARPS][T];
#pragma unroll
        for (int t = 0; t < T; t++) {
            const float s = warp_sum(sq[t]);
            if (lane == 0) part[warp][t] = s;
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < T; t++) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; w++) total += part[w][t];  // the same order everywhere
            const float scale = rsqrtf(total / K + eps);               // as norm_row in norm.cu
#pragma unroll
            for (int r = 0; r < ROWS; r++) acc[r][t] *= scale;
        }
    }
}

// Up to three matrices sharing x: rows 0..M0 of the launch are W0's, then W1's, then W2's
// (unused ones have M = 0). Each M is a multiple of ROWS. grid: sum(M) / (GEMV_WARPS * ROWS).
// accumulate: Y += W x (the residual add of an output projection) instead of Y = W x.
template <int T, int ROWS, int UNROLL, bool NORM>
__device__ void gemv(const __nv_bfloat16* W0, const __nv_bfloat16* W1, const __nv_bfloat16* W2, float* Y0, float* Y1,
                     float* Y2, int M0, int M1, int M2, int K, const float* __restrict__ x, int n,
                     const float* __restrict__ gamma, float eps, int accumulate) {
    pdl_trigger();
    int row = (blockIdx.x * GEMV_WARPS + threadIdx.x / WARP) * ROWS;
    const __nv_bfloat16* W = W0;
    float* Y = Y0;
    int M = M0;
    if (row >= M0) {
        row -= M0, W = W1, Y = Y1, M = M1;
        if (row >= M1) row -= M1, W = W2, Y = Y2, M = M2;
    }
    if (row >= M) return;
    const uint4* w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) w[r] = reinterpret_cast<const uint4*>(W + (size_t)(row + r) * K);
    float acc[ROWS][T];
    rows_dot<T, ROWS, UNROLL, NORM>(w, x, gamma, eps, K, n, acc);
    if (threadIdx.x % WARP == 0)
#pragma unroll
        for (int r = 0; r < ROWS; r++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (t < n) {
                    float* y = Y + (size_t)t * M + row + r;
                    *y = accumulate ? *y + acc[r][t] : acc[r][t];
                }
}

#define GEMV_ARGS                                                                                                \
    const __nv_bfloat16 *W0, const __nv_bfloat16 *W1, const __nv_bfloat16 *W2, float *Y0, float *Y1, float *Y2, \
        int M0, int M1, int M2, int K, const float *x, int n, const float *gamma, float eps, int accumulate
#define GEMV_PASS W0, W1, W2, Y0, Y1, Y2, M0, M1, M2, K, x, n, gamma, eps, accumulate

// One token: one row per warp, four chunks in flight. Several tokens: four rows per warp,
// so that one activation load from L1 serves four weight chunks.
extern "C" __global__ void gemv_t1(GEMV_ARGS) { gemv<1, 1, 4, false>(GEMV_PASS); }
extern "C" __global__ void gemv_t4(GEMV_ARGS) { gemv<4, 4, 1, false>(GEMV_PASS); }
extern "C" __global__ void gemv_t8(GEMV_ARGS) { gemv<8, 4, 1, false>(GEMV_PASS); }
extern "C" __global__ void gemv_t16(GEMV_ARGS) { gemv<16, 4, 1, false>(GEMV_PASS); }
// With the norm, one token takes two rows per warp: gamma's loads serve both.
extern "C" __global__ void gemv_norm_t1(GEMV_ARGS) { gemv<1, 2, 4, true>(GEMV_PASS); }
extern "C" __global__ void gemv_norm_t4(GEMV_ARGS) { gemv<4, 4, 1, true>(GEMV_PASS); }
extern "C" __global__ void gemv_norm_t8(GEMV_ARGS) { gemv<8, 4, 1, true>(GEMV_PASS); }
extern "C" __global__ void gemv_norm_t16(GEMV_ARGS) { gemv<16, 4, 1, true>(GEMV_PASS); }

// The MLP's first half: y[t, m] = silu(x[t] . Wg[m]) * (x[t] . Wu[m]). A warp owns PAIRS
// rows of both matrices. grid: M / (GEMV_WARPS * PAIRS).
template <int T, int PAIRS, int UNROLL, bool NORM>
__device__ void swiglu(const __nv_bfloat16* Wg, const __nv_bfloat16* Wu, float* Y, int M, int K,
                       const float* __restrict__ x, int n, const float* __restrict__ gamma, float eps) {
    pdl_trigger();
    const int row = (blockIdx.x * GEMV_WARPS + threadIdx.x / WARP) * PAIRS;
    if (row >= M) return;
    const uint4* w[2 * PAIRS];
#pragma unroll
    for (int p = 0; p < PAIRS; p++) {
        w[p] = reinterpret_cast<const uint4*>(Wg + (size_t)(row + p) * K);
        w[PAIRS + p] = reinterpret_cast<const uint4*>(Wu + (size_t)(row + p) * K);
    }
    float acc[2 * PAIRS][T];
    rows_dot<T, 2 * PAIRS, UNROLL, NORM>(w, x, gamma, eps, K, n, acc);
    if (threadIdx.x % WARP == 0)
#pragma unroll
        for (int p = 0; p < PAIRS; p++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (t < n) {
                    const float g = acc[p][t], u = acc[PAIRS + p][t];
                    Y[(size_t)t * M + row + p] = g / (1.0f + expf(-g)) * u;  // as silu_mul in activation.cu
                }
}

#define SWIGLU_ARGS                                                                                     \
    const __nv_bfloat16 *Wg, const __nv_bfloat16 *Wu, float *Y, int M, int K, const float *x, int n, \
        const float *gamma, float eps
#define SWIGLU_PASS Wg, Wu, Y, M, K, x, n, gamma, eps
extern "C" __global__ void swiglu_t1(SWIGLU_ARGS) { swiglu<1, 1, 2, false>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t4(SWIGLU_ARGS) { swiglu<4, 2, 1, false>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t8(SWIGLU_ARGS) { swiglu<8, 2, 1, false>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t16(SWIGLU_ARGS) { swiglu<16, 2, 1, false>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_norm_t1(SWIGLU_ARGS) { swiglu<1, 1, 2, true>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_norm_t4(SWIGLU_ARGS) { swiglu<4, 2, 1, true>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_norm_t8(SWIGLU_ARGS) { swiglu<8, 2, 1, true>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_norm_t16(SWIGLU_ARGS) { swiglu<16, 2, 1, true>(SWIGLU_PASS); }
