// y = gelu(x + b), the exact erf form (CPU twin: loren-tensor ops/activation.rs), with group
// broadcasting.
//
//   x [gx, rows, N] bf16    b [gb, N] f32    y, dy [G, rows, N] bf16    dx [gx, rows, N] bf16
//   db [gb, N] f32 (two stages: bias_gelu_bwd_db_partial here, then reduce_partials)
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

// One thread per output element, grid-stride. grid ceil(G·rows·N / 256) (capped), block 256.
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_fwd(const bf16* X, const float* bias, bf16* Y, int gx, int gb, int G, int rows,
                  int N) {
    const size_t per = (size_t)rows * N, total = (size_t)G * per;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int g = (int)(i / per);
        const size_t e = i % per;
        const float z = to_f32(X[group_index(g, gx) * per + e]) + bias[(size_t)group_index(g, gb) * N + e % N];
        Y[i] = to_bf16(act::gelu(z));
    }
}

// dx[x element] = Σ_g dy[g]·gelu'(x + b[g]) over the output groups reading it (one, or all G when
// x is shared). One thread per x element. grid ceil(gx·rows·N / 256) (capped), block 256.
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_bwd_dx(const bf16* dY, const bf16* X, const float* bias, bf16* dX, int gx, int gb,
                     int G, int rows, int N) {
    const size_t per = (size_t)rows * N, total = (size_t)gx * per;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int sg = (int)(i / per);
        const size_t e = i % per;
        const float x = to_f32(X[i]);
        const int g_begin = gx == G ? sg : 0, g_end = gx == G ? sg + 1 : G;
        float acc = 0.0f;
        for (int g = g_begin; g < g_end; ++g)
            acc += to_f32(dY[g * per + e]) *
                   act::gelu_grad(x + bias[(size_t)group_index(g, gb) * N + e % N]);
        dX[i] = to_bf16(acc);
    }
}

// First stage of db = Σ_rows dy·gelu'(x + b), per bias row w over the rows that use it. The
// product is recomputed in f32 here (not read back from the rounded bf16 dx), so db matches the
// f32 reference. part [gb, chunks, N]. Block (column strip of 32, row chunk, w): lane = column,
// warp = rows, warp partials added in order. grid (ceil(N/32), ceil(rows/chunk_rows), gb).
extern "C" __global__ void __launch_bounds__(256)
    bias_gelu_bwd_db_partial(const bf16* dY, const bf16* X, const float* bias, float* part,
                             int gx, int gb, int G, int rows, int N, int chunk_rows) {
    __shared__ float red[act::WARPS][WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int c = blockIdx.x * WARP + lane, chunk = blockIdx.y, w = blockIdx.z;
    const int row_begin = chunk * chunk_rows, row_end = min(rows, row_begin + chunk_rows);
    const int g_begin = gb == G ? w : 0, g_end = gb == G ? w + 1 : G;
    float acc = 0.0f;
    if (c < N) {
        const float bc = bias[(size_t)w * N + c];
        for (int g = g_begin; g < g_end; ++g) {
            const int sg = group_index(g, gx);
            for (int row = row_begin + warp; row < row_end; row += act::WARPS) {
                const float z = to_f32(X[((size_t)sg * rows + row) * N + c]) + bc;
                acc = fmaf(to_f32(dY[((size_t)g * rows + row) * N + c]), act::gelu_grad(z), acc);
            }
        }
    }
    red[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && c < N) {
        float t = 0.0f;
        for (int i = 0; i < act::WARPS; ++i) t += red[i][lane];
        part[((size_t)w * gridDim.y + chunk) * N + c] = t;
    }
}
