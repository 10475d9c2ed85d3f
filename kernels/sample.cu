// Token choice on the GPU, so that only token ids cross to the host: greedy rows
// (`argmax_rows`), and sampled rows (`sample_rows`: repetition penalty, temperature, top-k,
// top-p, min-p, then one draw with the row's uniform).
//
// `sample_rows` computes core::sampling's distribution without sorting the vocabulary.
// The tokens top-k, top-p and min-p keep are the first K of the order "probability down,
// index up"; that prefix is "the tokens above a value v, and the first few (by index) equal
// to v", and v is found by a binary search over the probability's bits (non-negative floats
// order as their bits), each probe one pass counting or summing the tokens at or above it.
// src/core/sample_cut.rs is the host twin of each step, tested against the sorting sampler.
// Masses are summed in 2^-60 fixed point: integer sums are exact in any order, so the block
// reductions give the twin's bits and the same uniform picks the same token every time.
//
// One block of 1024 threads per row. Bound by passes over the row (it stays in L2): about
// 6 without truncation, up to ~70 with top-k and top-p both binding.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_BOUNDS __launch_bounds__(SAMPLE_THREADS)
// One in the fixed-point unit of probability mass (2^60).
#define FIXED_ONE 1152921504606846976.0
// `Cut::ties` that keeps every token equal to the threshold.
#define ALL_TIES 0xffffffffu

__device__ __forceinline__ void keep_better(float& v, uint32_t& i, float ov, uint32_t oi) {
    // The larger value wins; on a tie the smaller index (the CPU's `argmax` keeps the first).
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// The first maximum of row[0..n), in thread 0 (0 for a row of NaNs).
__device__ uint32_t block_argmax(const float* __restrict__ row, int n) {
    float best = -INFINITY;
    uint32_t idx = 0xffffffffu;
    for (int i = threadIdx.x; i < n; i += blockDim.x) keep_better(best, idx, row[i], i);
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1)
        keep_better(best, idx, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, idx, o));
    __shared__ float vals[32];
    __shared__ uint32_t idxs[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    __syncthreads();  // a previous call may still read vals / idxs
    if (lane == 0) {
        vals[warp] = best;
        idxs[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < blockDim.x / WARP; w++) keep_better(best, idx, vals[w], idxs[w]);
    return idx == 0xffffffffu ? 0 : idx;
}

// ids[r] = argmax(logits[r, :]). grid: rows, block: 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, uint32_t* __restrict__ ids, int vocab) {
    pdl_start();
    const uint32_t id = block_argmax(logits + (size_t)blockIdx.x * vocab, vocab);
    if (threadIdx.x == 0) ids[blockIdx.x] = id;
}

// The sum of v over the threads before this one; `total` gets the whole block's.
__device__ uint64_t block_exclusive_scan(uint64_t v, uint64_t& total) {
    __shared__ uint64_t warp_total[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    uint64_t inclusive = v;
#pragma unroll
    for (int o = 1; o < WARP; o <<= 1) {
        const uint64_t up = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += up;
    }
    __syncthreads();
    if (lane == WARP - 1) warp_total[warp] = inclusive;
    __syncthreads();
    uint64_t before = 0;
    total = 0;
    for (int w = 0; w < blockDim.x / WARP; w++) {
        if (w < warp) before += warp_total[w];
        total += warp_total[w];
    }
    return before + inclusive - v;
}

// How one row is sampled; `RowParams` in src/backend/cuda/sample.rs (40 bytes).
struct RowParams {
    float temperature;  // 0: greedy
    float top_p;        // 1: off
    float min_p;        // 0: off
    float penalty;      // 1: off
    uint32_t top_k;     // 0: off
    uint32_t hist_start;  // the row's previous tokens: history[hist_start .. + hist_len]
    uint32_t hist_len;
    uint32_t pad;
    double uniform;  // in [0, 1): picks the token
};

// The kept tokens: those above `threshold`, then the first `ties` (by index) equal to it.
struct Cut {
    float threshold;
    uint32_t ties;
};

__device__ __forceinline__ uint64_t fixed(float p) { return (uint64_t)((double)p * FIXED_ONE); }

// p = the logits with the CTRL repetition penalty on the row's previous tokens (positive
// logits divided, negative multiplied). A token seen twice is written twice with the same
// value, read from the untouched logits: no need to remove duplicates.
__device__ void penalize(const float* __restrict__ in, float* p, const RowParams& rp,
                         const uint32_t* __restrict__ history, int vocab) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) p[i] = in[i];
    if (rp.penalty == 1.f) return;
    __syncthreads();
    for (uint32_t j = threadIdx.x; j < rp.hist_len; j += blockDim.x) {
        const uint32_t t = history[rp.hist_start + j];
        if (t < (uint32_t)vocab) {
            const float x = in[t];
            p[t] = x > 0.f ? x / rp.penalty : x * rp.penalty;
        }
    }
}

// p = softmax(p / temperature) as core::sampling::softmax computes it: exp in f32, the sum
// in f64, each probability rounded to f32 once. Returns the top probability (e^0 / sum).
__device__ float softmax(float* p, int vocab, float temperature) {
    __syncthreads();
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, p[i]);
    m = block_max(m);
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float e = expf((p[i] - m) / temperature);
        p[i] = e;
        sum += e;
    }
    sum = block_sum(sum);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) p[i] = (float)((double)p[i] / sum);
    __syncthreads();
    return (float)(1.0 / sum);
}

__device__ uint32_t count_at_least(const float* p, int vocab, float t) {
    uint64_t c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += p[i] >= t;
    return (uint32_t)block_sum(c);
}

__device__ uint64_t mass_at_least(const float* p, int vocab, float t) {
    uint64_t m = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m += p[i] >= t ? fixed(p[i]) : 0;
    return block_sum(m);
}

struct CountAtLeast {
    const float* p;
    int vocab;
    uint32_t keep;
    __device__ bool operator()(float t) const { return count_at_least(p, vocab, t) >= keep; }
};

struct MassAtLeast {
    const float* p;
    int vocab;
    uint64_t target;
    __device__ bool operator()(float t) const { return mass_at_least(p, vocab, t) >= target; }
};

// The largest value in [0, hi] where `pred` holds, pred(0) holding and pred falling as the
// value rises: a binary search over the bits (at most 31 probes, the same in every thread).
template <typename Pred>
__device__ float largest_where(float hi, Pred pred) {
    uint32_t lo = 0, h = __float_as_uint(hi);
    while (lo < h) {
        const uint32_t mid = lo + ((h - lo) >> 1) + ((h - lo) & 1);
        if (pred(__uint_as_float(mid)))
            lo = mid;
        else
            h = mid - 1;
    }
    return __uint_as_float(lo);
}

// Tokens above v (count, mass) and equal to it (count).
struct Split {
    uint32_t above, at;
    uint64_t mass_above;
};

__device__ Split split_at(const float* p, int vocab, float v) {
    uint64_t counts = 0, mass = 0;  // above in the high half, at in the low half
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = p[i];
        if (x > v) {
            counts += 1ull << 32;
            mass += fixed(x);
        } else if (x == v) {
            counts += 1;
        }
    }
    counts = block_sum(counts);
    mass = block_sum(mass);
    return Split{(uint32_t)(counts >> 32), (uint32_t)counts, mass};
}

// The shortest prefix of the sorted order whose mass reaches top_p: its length and cut.
struct Prefix {
    uint32_t len;
    Cut cut;
};

// `Prefix` for top_p; the whole row when its mass falls short of top_p (as rounding may make it).
__device__ Prefix top_p_cut(const float* p, int vocab, float top_p, float top) {
    const uint64_t target = fixed(top_p);
    if (mass_at_least(p, vocab, 0.f) < target) return Prefix{(uint32_t)vocab, Cut{-1.f, 0}};
    // The largest value whose tokens and those above reach the target: present in the row.
    const float v = largest_where(top, MassAtLeast{p, vocab, target});
    const Split s = split_at(p, vocab, v);
    const uint64_t step = fixed(v);
    uint64_t ties = s.at;
    if (step > 0) {
        const uint64_t need = target > s.mass_above ? target - s.mass_above : 0;
        ties = min(max((need + step - 1) / step, 1ull), (uint64_t)max(s.at, 1u));
    }
    return Prefix{s.above + (uint32_t)ties, Cut{v, (uint32_t)ties}};
}

// The first `keep` tokens of the sorted order: above the keep-th largest value, and as many
// of its ties as fill the count.
__device__ Cut kth_cut(const float* p, int vocab, uint32_t keep, float top) {
    const float v = largest_where(top, CountAtLeast{p, vocab, keep});
    return Cut{v, keep - split_at(p, vocab, v).above};
}

// What top-k, top-p and min-p keep (core::sample_cut::cut).
__device__ Cut find_cut(const float* p, int vocab, const RowParams& rp, float top) {
    const Cut all = Cut{-1.f, 0};
    if (rp.top_k == 0 && rp.top_p >= 1.f && rp.min_p <= 0.f) return all;
    const uint32_t n = vocab;
    const uint32_t k = rp.top_k > 0 ? min(rp.top_k, n) : n;
    const float floor_p = rp.min_p * top;
    const uint32_t n_min = rp.min_p > 0.f ? count_at_least(p, vocab, floor_p) : n;
    const Prefix top_p = rp.top_p < 1.f ? top_p_cut(p, vocab, rp.top_p, top) : Prefix{n, all};
    const uint32_t keep = max(min(min(k, n_min), top_p.len), 1u);
    if (rp.top_p < 1.f && top_p.len == keep) return top_p.cut;
    if (rp.min_p > 0.f && n_min == keep) return Cut{floor_p, ALL_TIES};
    if (keep < n) return kth_cut(p, vocab, keep, top);
    return all;
}

// A token's mass if the cut keeps it, else 0; `rank` counts the ties met so far.
__device__ __forceinline__ uint64_t kept_mass(float x, Cut cut, uint64_t& rank) {
    if (x != cut.threshold) return x > cut.threshold ? fixed(x) : 0;
    const bool keep = cut.ties == ALL_TIES || rank < cut.ties;
    rank++;
    return keep ? fixed(x) : 0;
}

// The kept token where the running mass (in index order) passes u times the kept mass
// (core::sample_cut::draw), in every thread. Each thread owns a contiguous chunk of the
// row: scans over the chunks give each its ties and its mass before it, and the one chunk
// holding the target is walked by its thread.
__device__ uint32_t draw(const float* p, int vocab, Cut cut, double u) {
    const uint32_t chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const uint32_t from = min(threadIdx.x * chunk, (uint32_t)vocab), to = min(from + chunk, (uint32_t)vocab);
    uint64_t tied = 0, total = 0;
    if (cut.ties != ALL_TIES)
        for (uint32_t i = from; i < to; i++) tied += p[i] == cut.threshold;
    const uint64_t rank0 = block_exclusive_scan(tied, total);
    uint64_t mass = 0, rank = rank0;
    for (uint32_t i = from; i < to; i++) mass += kept_mass(p[i], cut, rank);
    const uint64_t before = block_exclusive_scan(mass, total);
    __shared__ uint32_t picked;
    if (threadIdx.x == 0) picked = 0;
    __syncthreads();
    if (total > 0) {
        const uint64_t target = min((uint64_t)((double)total * u), total - 1);
        if (before <= target && target < before + mass) {
            uint64_t acc = before;
            rank = rank0;
            for (uint32_t i = from; i < to; i++) {
                acc += kept_mass(p[i], cut, rank);
                if (acc > target) {
                    picked = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    return picked;
}

// ids[r] = the token row r of `logits` samples as params[r] says (core::sampling::
// sample_row); `work` holds [rows, vocab] f32 of scratch. grid: rows, block: 1024.
extern "C" __global__ void SAMPLE_BOUNDS sample_rows(const float* __restrict__ logits, float* __restrict__ work,
                                                     const RowParams* __restrict__ params,
                                                     const uint32_t* __restrict__ history,
                                                     uint32_t* __restrict__ ids, int vocab) {
    pdl_start();
    const RowParams rp = params[blockIdx.x];
    float* p = work + (size_t)blockIdx.x * vocab;
    penalize(logits + (size_t)blockIdx.x * vocab, p, rp, history, vocab);
    uint32_t id;
    if (rp.temperature == 0.f || rp.top_k == 1) {
        __syncthreads();
        id = block_argmax(p, vocab);
    } else {
        const float top = softmax(p, vocab, rp.temperature);
        id = draw(p, vocab, find_cut(p, vocab, rp, top), rp.uniform);
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = id;
}
