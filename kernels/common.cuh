// Shared helpers for every kernel file. Prepended to each .cu file before NVRTC compiles
// it, so a kernel file never depends on another one.
//
// Conventions: activations are f32, row-major [tokens, features]; weights and the KV
// cache are bf16; ids, positions, slots and block tables are u32. Every kernel is
// `extern "C"` so that the host finds it by name.
#pragma once
#include <cuda_bf16.h>
// NVRTC has no libc headers; these are the only fixed-width types we use.
typedef unsigned char uint8_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;

#define WARP 32
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Programmatic dependent launch (Hopper): every kernel is launched allowed to start while
// the previous one drains. `pdl_start` lets the next kernel be scheduled and then waits
// until the previous kernel has finished and its writes are visible; nothing produced by
// an earlier kernel may be read, and nothing may be written, before it. Work that only
// reads weights (prefetching them) may go before it. No-ops without PDL or before sm_90.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_start() {
    pdl_trigger();
    pdl_wait();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), in the same order in every
// thread and every run; every thread gets it. T: float, double or an integer.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T partial[32];
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    T total = 0;
    for (int w = 0; w < warps; w++) total += partial[w];  // same order in every thread
    return total;
}

// Max over the block (as block_sum); every thread gets it.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < warps; w++) m = fmaxf(m, partial[w]);
    return m;
}

__device__ __forceinline__ float bf16_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Eight bf16 packed in 16 bytes -> eight floats (a bf16 is the high half of an f32).
__device__ __forceinline__ void unpack8(uint4 p, float* f) {
    const uint32_t w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// A 16-byte load that streams through L1 without keeping the line: weights are read
// once per step, so caching them would only evict activations.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
