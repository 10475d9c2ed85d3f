// How a head's key or value is stored in the KV cache, and RoPE as the attention kernels
// apply it: shared by the kernel files that write the cache. (kernels/attention.cu holds the
// same functions, written first; these must stay bit for bit what it stores.)
//
// bf16: each value rounded to nearest even. FP8: E4M3 codes with one scale per token and KV
// head, 2^e with e in a signed byte: the smallest power of two that brings the head's
// largest magnitude under 448 (src/tensor/kv.rs says why), exactly the CPU's quantization
// (src/backend/cpu/kv.rs): the exponent comes from frexpf, dividing by a power of two is
// exact, and the conversion rounds to nearest even and saturates as the CPU's encoder does.
#include <cuda_fp8.h>

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
