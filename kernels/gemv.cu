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
#include "common.cuh"

#define GEMV_WARPS 4
// Bytes of each row prefetched before waiting for the previous kernel: 2 KiB x the
// resident rows (~8k) stays well inside the 50 MB L2.
#define PREFETCH_BYTES 2048

// acc[r][t] += row r . x[t] over all chunks of the rows. ROWS rows per warp, UNROLL
// chunks per row loaded before any is used (ROWS * UNROLL loads in flight per lane).
template <int T, int ROWS, int UNROLL>
__device__ __forceinline__ void rows_dot(const uint4* const* w, const float* __restrict__ x, int K, int n,
                                         float (&acc)[ROWS][T]) {
    const int lane = threadIdx.x % WARP, chunks = K / 8;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.f;
        prefetch_l2(w[r], min(K * 2, PREFETCH_BYTES), lane);  // weights: safe before the wait
    }
    pdl_wait();
    int c = lane;
    for (; c < chunks; c += UNROLL * WARP) {
        uint4 wv[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int r = 0; r < ROWS; r++)
                wv[u][r] = c + u * WARP < chunks ? load_stream(w[r] + c + u * WARP) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int cu = c + u * WARP;
            if (cu >= chunks) break;
            float wf[ROWS][8];
#pragma unroll
            for (int r = 0; r < ROWS; r++) unpack8(wv[u][r], wf[r]);
#pragma unroll
            for (int t = 0; t < T; t++) {
                if (t < n) {
                    const float4* xp = reinterpret_cast<const float4*>(x + t * (size_t)K + (size_t)cu * 8);
                    const float4 a = xp[0], b = xp[1];
                    const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
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
}

// Up to three matrices sharing x: rows 0..M0 of the launch are W0's, then W1's, then W2's
// (unused ones have M = 0). Each M is a multiple of ROWS. grid: sum(M) / (GEMV_WARPS * ROWS).
template <int T, int ROWS, int UNROLL>
__device__ void gemv(const __nv_bfloat16* W0, const __nv_bfloat16* W1, const __nv_bfloat16* W2, float* Y0, float* Y1,
                     float* Y2, int M0, int M1, int M2, int K, const float* __restrict__ x, int n) {
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
    rows_dot<T, ROWS, UNROLL>(w, x, K, n, acc);
    if (threadIdx.x % WARP == 0)
#pragma unroll
        for (int r = 0; r < ROWS; r++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (t < n) Y[(size_t)t * M + row + r] = acc[r][t];
}

#define GEMV_ARGS                                                                                                \
    const __nv_bfloat16 *W0, const __nv_bfloat16 *W1, const __nv_bfloat16 *W2, float *Y0, float *Y1, float *Y2, \
        int M0, int M1, int M2, int K, const float *x, int n
#define GEMV_PASS W0, W1, W2, Y0, Y1, Y2, M0, M1, M2, K, x, n

// One token: one row per warp, four chunks in flight. Several tokens: four rows per warp,
// so that one activation load from L1 serves four weight chunks.
extern "C" __global__ void gemv_t1(GEMV_ARGS) { gemv<1, 1, 4>(GEMV_PASS); }
extern "C" __global__ void gemv_t4(GEMV_ARGS) { gemv<4, 4, 1>(GEMV_PASS); }
extern "C" __global__ void gemv_t8(GEMV_ARGS) { gemv<8, 4, 1>(GEMV_PASS); }
extern "C" __global__ void gemv_t16(GEMV_ARGS) { gemv<16, 4, 1>(GEMV_PASS); }

// The MLP's first half: y[t, m] = silu(x[t] . Wg[m]) * (x[t] . Wu[m]). A warp owns PAIRS
// rows of both matrices. grid: M / (GEMV_WARPS * PAIRS).
template <int T, int PAIRS, int UNROLL>
__device__ void swiglu(const __nv_bfloat16* Wg, const __nv_bfloat16* Wu, float* Y, int M, int K,
                       const float* __restrict__ x, int n) {
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
    rows_dot<T, 2 * PAIRS, UNROLL>(w, x, K, n, acc);
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

#define SWIGLU_ARGS const __nv_bfloat16 *Wg, const __nv_bfloat16 *Wu, float *Y, int M, int K, const float *x, int n
#define SWIGLU_PASS Wg, Wu, Y, M, K, x, n
extern "C" __global__ void swiglu_t1(SWIGLU_ARGS) { swiglu<1, 1, 2>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t4(SWIGLU_ARGS) { swiglu<4, 2, 1>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t8(SWIGLU_ARGS) { swiglu<8, 2, 1>(SWIGLU_PASS); }
extern "C" __global__ void swiglu_t16(SWIGLU_ARGS) { swiglu<16, 2, 1>(SWIGLU_PASS); }
