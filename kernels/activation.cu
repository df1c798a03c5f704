// y = gelu(x + b), the exact erf form (CPU twin: loren-tensor ops/activation.rs), with group
// broadcasting.
//
//   x [gx, rows, N] bf16    b [gb, N] f32    y, dy [G, rows, N] bf16    dx [gx, rows, N] bf16
//   db [gb, N] f32 (two stages: bias_gelu_bwd here, then reduce_partials)
//
// erff and expf are the precise library versions (no fast math: see compile.rs).
#include "common.cuh"

namespace act {
constexpr float FRAC_1_SQRT_2 = 0.70710678118654752f;
constexpr float INV_SQRT_2PI = 0.39894228040143268f;
constexpr int THREADS = 256, WARPS = THREADS / WARP;

__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.0f + erff(z * FRAC_1_SQRT_2)); }

// d gelu / dz = Φ(z) + z·φ(z)
__device__ __forceinline__ float gelu_grad(float z) {
    return 0.5f * (1.0f + erff(z * FRAC_1_SQRT_2)) + z * INV_SQRT_2PI * expf(-0.5f * z * z);
}
}  // namespace act

// Each group of x, y, dy and dx is rows·N < 2^31 elements (the launchers check), so indices within
// a group, and their columns, are 32-bit: no 64-bit division per element. The group is
// blockIdx.y. `vec` (launcher's choice): N is a multiple of 8 and every pointer 16-byte aligned.

// One thread per V elements of an output group, grid-stride. grid (blocks, G), block 256.
template <int V>
__device__ void bias_gelu_fwd_body(const bf16* X, const float* bias, bf16* Y, int gx, int gb, int rows, int N) {
    const int g = blockIdx.y;
    const unsigned per = (unsigned)rows * N;
    const bf16* x = X + (size_t)group_index(g, gx) * per;
    const float* b = bias + (size_t)group_index(g, gb) * N;
    bf16* y = Y + (size_t)g * per;
    for (unsigned e = (blockIdx.x * blockDim.x + threadIdx.x) * V; e < per; e += gridDim.x * blockDim.x * V) {
        float z[V], bv[V];
        load_vec<V>(x + e, z);
        load_vec<V>(b + e % N, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) z[i] = act::gelu(z[i] + bv[i]);
        store_vec<V>(y + e, z);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_fwd(const bf16* X, const float* bias, bf16* Y, int gx, int gb, int rows, int N, int vec) {
    DISPATCH_VEC(vec, bias_gelu_fwd_body, X, bias, Y, gx, gb, rows, N);
}

// dx[x element] = Σ_g dy[g]·gelu'(x + b[g]) over the output groups reading it (one, or all G when
// x is shared). One thread per V elements of an x group. grid (blocks, gx), block 256.
template <int V>
__device__ void bias_gelu_bwd_dx_body(const bf16* dY, const bf16* X, const float* bias, bf16* dX, int gx, int gb,
                                      int G, int rows, int N) {
    const int sg = blockIdx.y;
    const unsigned per = (unsigned)rows * N;
    const int g_begin = gx == G ? sg : 0, g_end = gx == G ? sg + 1 : G;
    for (unsigned e = (blockIdx.x * blockDim.x + threadIdx.x) * V; e < per; e += gridDim.x * blockDim.x * V) {
        float x[V], acc[V] = {};
        load_vec<V>(X + (size_t)sg * per + e, x);
        for (int g = g_begin; g < g_end; ++g) {
            float dy[V], b[V];
            load_vec<V>(dY + (size_t)g * per + e, dy);
            load_vec<V>(bias + (size_t)group_index(g, gb) * N + e % N, b);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += dy[i] * act::gelu_grad(x[i] + b[i]);
        }
        store_vec<V>(dX + (size_t)sg * per + e, acc);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_bwd_dx(const bf16* dY, const bf16* X, const float* bias, bf16* dX, int gx, int gb, int G, int rows,
                     int N, int vec) {
    DISPATCH_VEC(vec, bias_gelu_bwd_dx_body, dY, X, bias, dX, gx, gb, G, rows, N);
}

// db = Σ_rows dy·gelu'(x + b), first stage, per bias row w over the rows that use it, and, when dX
// is not null, dx = dy·gelu'(x + b) in the same pass (x unshared: gx == G, so each dx element has
// one term), which saves the dx kernel's second read of dy and x. The product is formed in f32
// once, rounded to bf16 for dx and summed unrounded for db, so db matches the f32 reference.
// part [gb, chunks, N]. Block (strip of 32·V columns, row chunk, w): lane = V columns, warp =
// rows, warp partials added in order. grid (ceil(N / (32·V)), ceil(rows / chunk_rows), gb).
template <int V>
__device__ void bias_gelu_bwd_body(const bf16* dY, const bf16* X, const float* bias, bf16* dX, float* part,
                                   int gx, int gb, int G, int rows, int N, int chunk_rows,
                                   float (*red)[WARP * VEC]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int strip = blockIdx.x * WARP * V, c = strip + lane * V, chunk = blockIdx.y, w = blockIdx.z;
    const int row_begin = chunk * chunk_rows, row_end = min(rows, row_begin + chunk_rows);
    const int g_begin = gb == G ? w : 0, g_end = gb == G ? w + 1 : G;
    float acc[V] = {};
    if (c < N) {
        float b[V];
        load_vec<V>(bias + (size_t)w * N + c, b);
        for (int g = g_begin; g < g_end; ++g) {
            const int sg = group_index(g, gx);
            for (int row = row_begin + warp; row < row_end; row += act::WARPS) {
                float x[V], dy[V];
                load_vec<V>(X + ((size_t)sg * rows + row) * N + c, x);
                load_vec<V>(dY + ((size_t)g * rows + row) * N + c, dy);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    dy[i] *= act::gelu_grad(x[i] + b[i]);
                    acc[i] += dy[i];
                }
                if (dX) store_vec<V>(dX + ((size_t)g * rows + row) * N + c, dy);
            }
        }
    }
    strip_sums<V>(acc, red, N - strip, part + ((size_t)w * gridDim.y + chunk) * N + strip);
}
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_bwd(const bf16* dY, const bf16* X, const float* bias, bf16* dX, float* part, int gx, int gb, int G,
                  int rows, int N, int chunk_rows, int vec) {
    // Per warp, its column sums.
    __shared__ float red[act::WARPS][WARP * VEC];
    DISPATCH_VEC(vec, bias_gelu_bwd_body, dY, X, bias, dX, part, gx, gb, G, rows, N, chunk_rows, red);
}
