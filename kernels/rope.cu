// Rotary position embedding (Hugging Face layout: dimension i pairs with i + head_dim/2).
// The inverse frequencies arrive with llama3 scaling already applied (ModelConfig::rope_inv_freq).
#include "common.cuh"

// x: [tokens, heads * head_dim], rotated in place; blockIdx.z is the head.
// grid: (tokens, 1, heads), block: head_dim / 2 (one pair per thread, so every load is in
// flight at once).
// The angle is formed and reduced modulo 2*pi in f64, like the CPU reference forms it in f64:
// positions reach 131072, where an f32 product would already be off by ~0.01 rad. Only the
// reduced angle goes to the f32 sincos, which keeps the f64 work to one multiply-add (a
// full f64 sincos on large arguments takes a slow path that dominated this kernel).
extern "C" __global__ void rope(float* __restrict__ x, const uint32_t* __restrict__ positions,
                                const float* __restrict__ inv_freq, int heads, int head_dim) {
    pdl_start();
    const int h = blockIdx.z, half = head_dim / 2;
    if (h >= heads) return;
    const double pos = positions[blockIdx.x];
    const double two_pi = 6.283185307179586;
    float* head = x + ((size_t)blockIdx.x * heads + h) * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double a = pos * (double)inv_freq[i];
        a -= floor(a / two_pi) * two_pi;
        float sn, cs;
        sincosf((float)a, &sn, &cs);
        const float u = head[i], v = head[i + half];
        head[i] = u * cs - v * sn;
        head[i + half] = v * cs + u * sn;
    }
}
