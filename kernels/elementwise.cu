// Residual adds, gradient accumulation, reductions over groups and rows, conversions, fills
// (CPU twin: loren-tensor ops/elementwise.rs). Every reduction runs in a fixed order, with no
// atomics, so results are bit-reproducible run to run.
//
// Elementwise kernels: grid-stride, block 256, 8 elements per thread where the launcher allows
// (VEC_STRIDE); sizes are 64-bit.
#include "common.cuh"

#define GRID_STRIDE(i, total)                                                                 \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (total);                     \
         i += (u64)gridDim.x * blockDim.x)

// Each thread takes V elements (VEC = 8 when the launcher passes `vec`: sizes a multiple of 8,
// pointers 16-byte aligned; else 1), grid-stride from element `i`.
#define VEC_STRIDE(i, total, V)                                                               \
    for (u64 i = (blockIdx.x * (u64)blockDim.x + threadIdx.x) * (V); i < (total);             \
         i += (u64)gridDim.x * blockDim.x * (V))

// out[g] = a[ga(g)] + b[gb(g)] for g < G, each group `per` elements (group broadcasting: a group-1
// operand is read by every output group). grid (blocks, G): the group is blockIdx.y. `out` may be
// `a` (dst += src is this with one group), as each element is read before it is written, by
// the one thread that writes it.
template <int V, typename T>
__device__ void add(const T* a, const T* b, T* out, u64 per, int ga, int gb) {
    const int g = blockIdx.y;
    a += group_index(g, ga) * per;
    b += group_index(g, gb) * per;
    out += g * per;
    VEC_STRIDE(i, per, V) {
        float x[V], y[V];
        load_vec<V>(a + i, x);
        load_vec<V>(b + i, y);
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] += y[k];
        store_vec<V>(out + i, x);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    add_bf16(const bf16* a, const bf16* b, bf16* out, u64 per, int ga, int gb, int vec) {
    DISPATCH_VEC(vec, add, a, b, out, per, ga, gb);
}
extern "C" __global__ void __launch_bounds__(256)
    add_f32(const float* a, const float* b, float* out, u64 per, int ga, int gb, int vec) {
    DISPATCH_VEC(vec, add, a, b, out, per, ga, gb);
}

// x *= alpha
template <int V, typename T> __device__ void scale(T* x, u64 n, float alpha) {
    VEC_STRIDE(i, n, V) {
        float v[V];
        load_vec<V>(x + i, v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] *= alpha;
        store_vec<V>(x + i, v);
    }
}
extern "C" __global__ void __launch_bounds__(256) scale_bf16(bf16* x, u64 n, float alpha, int vec) {
    DISPATCH_VEC(vec, scale, x, n, alpha);
}
extern "C" __global__ void __launch_bounds__(256) scale_f32(float* x, u64 n, float alpha, int vec) {
    DISPATCH_VEC(vec, scale, x, n, alpha);
}

// out[e] = Σ_g src[g·per + e], g = 0..G-1 in order, in f32: the gradient of a broadcast input.
template <int V, typename T>
__device__ void sum_groups(const T* src, T* out, u64 per, int G) {
    VEC_STRIDE(i, per, V) {
        float acc[V] = {};
        for (int g = 0; g < G; ++g) {
            float v[V];
            load_vec<V>(src + g * per + i, v);
#pragma unroll
            for (int k = 0; k < V; ++k) acc[k] += v[k];
        }
        store_vec<V>(out + i, acc);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    sum_groups_bf16(const bf16* src, bf16* out, u64 per, int G, int vec) {
    DISPATCH_VEC(vec, sum_groups, src, out, per, G);
}
extern "C" __global__ void __launch_bounds__(256)
    sum_groups_f32(const float* src, float* out, u64 per, int G, int vec) {
    DISPATCH_VEC(vec, sum_groups, src, out, per, G);
}

// First stage of column sums (bias gradients, dcls, dpos): for output group o,
//   part[o][chunk][c] = Σ_{g → o} Σ_{row in chunk} src[(g·rows + row)·ld + c],  c < n <= ld
// where g → o means g == o when out_groups == groups, every g when out_groups == 1.
// Block (column strip of 32·V, chunk, o): lane = V columns, warp = rows, warp partials added in
// order (`vec`: n and ld multiples of 8, src 16-byte aligned). grid (ceil(n / (32·V)),
// ceil(rows/chunk_rows), out_groups), block 256.
template <int V, typename T>
__device__ void sum_rows_partial(const T* src, float* part, int groups, int rows, int n, u64 ld, int out_groups,
                                 int chunk_rows, float (*red)[WARP * VEC]) {
    constexpr int WARPS = 8;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int strip = blockIdx.x * WARP * V, c = strip + lane * V, chunk = blockIdx.y, o = blockIdx.z;
    const int row_begin = chunk * chunk_rows, row_end = min(rows, row_begin + chunk_rows);
    const int g_begin = out_groups == groups ? o : 0, g_end = out_groups == groups ? o + 1 : groups;
    float acc[V] = {};
    if (c < n)
        for (int g = g_begin; g < g_end; ++g)
            for (int row = row_begin + warp; row < row_end; row += WARPS) {
                float v[V];
                load_vec<V>(src + ((u64)g * rows + row) * ld + c, v);
#pragma unroll
                for (int i = 0; i < V; ++i) acc[i] += v[i];
            }
    strip_sums<V>(acc, red, n - strip, part + ((u64)o * gridDim.y + chunk) * n + strip);
}
extern "C" __global__ void __launch_bounds__(256)
    sum_rows_partial_bf16(const bf16* src, float* part, int groups, int rows, int n, u64 ld,
                          int out_groups, int chunk_rows, int vec) {
    __shared__ float red[8][WARP * VEC];
    DISPATCH_VEC(vec, sum_rows_partial, src, part, groups, rows, n, ld, out_groups, chunk_rows, red);
}
extern "C" __global__ void __launch_bounds__(256)
    sum_rows_partial_f32(const float* src, float* part, int groups, int rows, int n, u64 ld,
                         int out_groups, int chunk_rows, int vec) {
    __shared__ float red[8][WARP * VEC];
    DISPATCH_VEC(vec, sum_rows_partial, src, part, groups, rows, n, ld, out_groups, chunk_rows, red);
}

// Second stage: out[o][c] (+)= Σ_chunk part[o][chunk][c], chunks in order. `accumulate` adds to
// out (gradient accumulation) instead of overwriting it. One thread per output element.
extern "C" __global__ void __launch_bounds__(256)
    reduce_partials(const float* part, float* out, int outs, int chunks, int n, int accumulate) {
    GRID_STRIDE(i, (u64)outs * n) {
        const u64 o = i / n, c = i % n;
        float acc = 0.0f;
        for (int k = 0; k < chunks; ++k) acc += part[(o * chunks + k) * n + c];
        out[i] = accumulate ? out[i] + acc : acc;
    }
}

// partials[b] = Σ x² over the elements b, b + grid·256, ... (f64). The launcher fixes the grid
// from n alone, so the partition, and with it the rounding, never changes. block 256.
extern "C" __global__ void __launch_bounds__(256) sumsq_partial_f32(const float* x, u64 n, double* partials) {
    __shared__ double red[256];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        const double v = x[i];
        acc += v * v;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

// out[0] = Σ partials in a fixed order (each thread a strided run, then a tree). grid 1, block 256.
extern "C" __global__ void __launch_bounds__(256) sumsq_finish(const double* partials, int n, double* out) {
    __shared__ double red[256];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = red[0];
}

// dst = src in dst's type (bf16: rounded to nearest even)
template <int V, typename S, typename D> __device__ void convert(const S* src, D* dst, u64 n) {
    VEC_STRIDE(i, n, V) {
        float v[V];
        load_vec<V>(src + i, v);
        store_vec<V>(dst + i, v);
    }
}
extern "C" __global__ void __launch_bounds__(256) f32_to_bf16(const float* src, bf16* dst, u64 n, int vec) {
    DISPATCH_VEC(vec, convert, src, dst, n);
}
extern "C" __global__ void __launch_bounds__(256) bf16_to_f32(const bf16* src, float* dst, u64 n, int vec) {
    DISPATCH_VEC(vec, convert, src, dst, n);
}

template <int V, typename T> __device__ void fill(T* dst, u64 n, float value) {
    float v[V];
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = value;
    VEC_STRIDE(i, n, V) store_vec<V>(dst + i, v);
}
extern "C" __global__ void __launch_bounds__(256) fill_f32(float* dst, u64 n, float value, int vec) {
    DISPATCH_VEC(vec, fill, dst, n, value);
}
extern "C" __global__ void __launch_bounds__(256) fill_bf16(bf16* dst, u64 n, float value, int vec) {
    DISPATCH_VEC(vec, fill, dst, n, value);
}

// Y[g][row][c] = X[gx(g)][row][c] + bias[gb(g)][c]: the bias of a cuBLAS product, in place
// (X = Y, gx = G), or joined to the residual stream X before the product accumulates onto Y
// (beta = 1), so the stream costs no pass of its own. bias is f32, or null (a broadcast copy).
// The hand-written kernels fuse their biases. grid (blocks, G); a group is rows·n < 2^31
// elements (the launcher checks), so the column is a 32-bit remainder.
template <int V, typename T>
__device__ void add_bias_rows(const T* X, T* Y, const float* bias, int rows, int n, int gx, int gb) {
    const int g = blockIdx.y;
    const unsigned per = (unsigned)rows * n;
    X += (u64)group_index(g, gx) * per;
    Y += (u64)g * per;
    if (bias) bias += (u64)group_index(g, gb) * n;
    for (unsigned e = (blockIdx.x * blockDim.x + threadIdx.x) * V; e < per; e += gridDim.x * blockDim.x * V) {
        float v[V];
        load_vec<V>(X + e, v);
        if (bias) {
            float b[V];
            load_vec<V>(bias + e % n, b);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] += b[k];
        }
        store_vec<V>(Y + e, v);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    add_bias_rows_bf16(const bf16* X, bf16* Y, const float* bias, int rows, int n, int gx, int gb, int vec) {
    DISPATCH_VEC(vec, add_bias_rows, X, Y, bias, rows, n, gx, gb);
}
extern "C" __global__ void __launch_bounds__(256)
    add_bias_rows_f32(const float* X, float* Y, const float* bias, int rows, int n, int gx, int gb, int vec) {
    DISPATCH_VEC(vec, add_bias_rows, X, Y, bias, rows, n, gx, gb);
}
