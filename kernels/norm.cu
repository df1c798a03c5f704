// LayerNorm over the last axis, with group broadcasting (CPU twin: loren-tensor ops/norm.rs).
//
//   x [gx, rows, D] bf16    gamma, beta [gw, D] f32    y, dy [G, rows, D] bf16
//   mean, rstd [gx, rows] f32 (statistics of x, shared by every output group that reads it)
//   dx [gx, rows, D] bf16   dgamma, dbeta [gw, D] f32
//
// One warp per x row. The statistics are two f32 passes (mean, then the centred sum of squares,
// the second reading the row again from cache), which is as accurate as the CPU's f64 at f32.
#include "common.cuh"

namespace ln {
constexpr int THREADS = 256, WARPS = THREADS / WARP;
// The largest group count the backward accepts (per-warp scratch for the per-group constants).
constexpr int MAX_GROUPS = 64;
}  // namespace ln

// Lane l of a row's warp takes columns [V·(l + 32j), V·(l + 32j) + V) for j = 0, 1, ...: with
// V = 8 each access is 16 bytes and a warp reads 512 contiguous bytes (`vec` from the launcher: D
// a multiple of 8, pointers 16-byte aligned).
#define ROW_VECTORS(c, D, V) for (int c = lane * (V); c < (D); c += WARP * (V))

// grid ceil(gx·rows / 8), block 256.
template <int V>
__device__ void layernorm_fwd_body(const bf16* X, const float* gamma, const float* beta, bf16* Y, float* mean,
                                   float* rstd, int gx, int gw, int G, int rows, int D, float eps) {
    const int lane = threadIdx.x % WARP;
    const int src = blockIdx.x * ln::WARPS + threadIdx.x / WARP;  // x row in [0, gx·rows)
    if (src >= gx * rows) return;
    const bf16* x = X + (size_t)src * D;
    float s = 0.0f;
    ROW_VECTORS(c, D, V) {
        float v[V];
        load_vec<V>(x + c, v);
#pragma unroll
        for (int i = 0; i < V; ++i) s += v[i];
    }
    const float mu = warp_sum(s) / D;
    float var = 0.0f;
    ROW_VECTORS(c, D, V) {
        float v[V];
        load_vec<V>(x + c, v);
#pragma unroll
        for (int i = 0; i < V; ++i) var = fmaf(v[i] - mu, v[i] - mu, var);
    }
    const float r = 1.0f / sqrtf(warp_sum(var) / D + eps);
    if (lane == 0) {
        mean[src] = mu;
        rstd[src] = r;
    }
    // Output groups that read this row: its own, or all G when x is shared.
    const int sg = src / rows, row = src % rows;
    const int g_begin = gx == G ? sg : 0, g_end = gx == G ? sg + 1 : G;
    for (int g = g_begin; g < g_end; ++g) {
        const float* gm = gamma + (size_t)group_index(g, gw) * D;
        const float* bt = beta + (size_t)group_index(g, gw) * D;
        bf16* y = Y + ((size_t)g * rows + row) * D;
        ROW_VECTORS(c, D, V) {
            float v[V], gv[V], bv[V];
            load_vec<V>(x + c, v);
            load_vec<V>(gm + c, gv);
            load_vec<V>(bt + c, bv);
#pragma unroll
            for (int i = 0; i < V; ++i) v[i] = (v[i] - mu) * r * gv[i] + bv[i];
            store_vec<V>(y + c, v);
        }
    }
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_fwd(const bf16* X, const float* gamma, const float* beta, bf16* Y, float* mean, float* rstd, int gx,
                  int gw, int G, int rows, int D, float eps, int vec) {
    DISPATCH_VEC(vec, layernorm_fwd_body, X, gamma, beta, Y, mean, rstd, gx, gw, G, rows, D, eps);
}

// dx = Σ_g rstd·(dŷ_g − mean(dŷ_g) − x̂·mean(dŷ_g·x̂)) + dplus,  dŷ_g = dy[g]·gamma[g], over the
// output groups g that read the x row (one, or all G when x is shared: the sum stays in the
// kernel). dplus [gx, rows, D] bf16, or null: the gradient x already has from the residual
// stream, joined here so that no separate pass adds it. It starts the sum (no live registers
// beyond the accumulator); with one output group that is the CPU's sum exactly.
// grid ceil(gx·rows / 8), block 256. G <= 64 when gx == 1.
template <int V>
__device__ void layernorm_bwd_dx_body(const bf16* dY, const bf16* X, const float* gamma, const float* mean,
                                      const float* rstd, const bf16* dPlus, bf16* dX, int gx, int gw, int G,
                                      int rows, int D, float (*consts)[ln::MAX_GROUPS][2]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int src = blockIdx.x * ln::WARPS + warp;
    if (src >= gx * rows) return;
    const bf16* x = X + (size_t)src * D;
    const float mu = mean[src], r = rstd[src];
    const int sg = src / rows, row = src % rows;
    const int g_begin = gx == G ? sg : 0, g_end = gx == G ? sg + 1 : G;
    // Pass 1: the two row means per output group.
    for (int g = g_begin; g < g_end; ++g) {
        const float* gm = gamma + (size_t)group_index(g, gw) * D;
        const bf16* dy = dY + ((size_t)g * rows + row) * D;
        float s1 = 0.0f, s2 = 0.0f;
        ROW_VECTORS(c, D, V) {
            float xv[V], dv[V], gv[V];
            load_vec<V>(x + c, xv);
            load_vec<V>(dy + c, dv);
            load_vec<V>(gm + c, gv);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const float dxh = dv[i] * gv[i];
                s1 += dxh;
                s2 = fmaf(dxh, (xv[i] - mu) * r, s2);
            }
        }
        s1 = warp_sum(s1);
        s2 = warp_sum(s2);
        if (lane == 0) {
            consts[warp][g - g_begin][0] = s1 / D;
            consts[warp][g - g_begin][1] = s2 / D;
        }
    }
    __syncwarp();
    // Pass 2: the gradient, summed over groups in order.
    const bf16* dy0 = dY + ((size_t)g_begin * rows + row) * D;
    const size_t dy_step = (size_t)rows * D;
    ROW_VECTORS(c, D, V) {
        float xh[V], acc[V] = {};
        if (dPlus) load_vec<V>(dPlus + (size_t)src * D + c, acc);
        load_vec<V>(x + c, xh);
#pragma unroll
        for (int i = 0; i < V; ++i) xh[i] = (xh[i] - mu) * r;
        const bf16* dy = dy0 + c;
        for (int g = g_begin; g < g_end; ++g, dy += dy_step) {
            const float m1 = consts[warp][g - g_begin][0], m2 = consts[warp][g - g_begin][1];
            float dv[V], gv[V];
            load_vec<V>(dy, dv);
            load_vec<V>(gamma + (size_t)group_index(g, gw) * D + c, gv);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += r * (dv[i] * gv[i] - m1 - xh[i] * m2);
        }
        store_vec<V>(dX + (size_t)src * D + c, acc);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_bwd_dx(const bf16* dY, const bf16* X, const float* gamma, const float* mean, const float* rstd,
                     const bf16* dPlus, bf16* dX, int gx, int gw, int G, int rows, int D, int vec) {
    // Per warp, the two row means of each output group.
    __shared__ float consts[ln::WARPS][ln::MAX_GROUPS][2];
    DISPATCH_VEC(vec, layernorm_bwd_dx_body, dY, X, gamma, mean, rstd, dPlus, dX, gx, gw, G, rows, D, consts);
}

// First stage of dgamma = Σ dy·x̂ and dbeta = Σ dy over the rows that use each affine row w (its
// own group's rows, or every group's when gamma is shared). Block (column strip of 32·V, row
// chunk, w): lane = V columns, warp = rows; warp partials are added in warp order.
//   part[which][w][chunk][c], which 0 = dgamma, 1 = dbeta; part is [2, gw, chunks, D].
// The second stage (elementwise.cu reduce_partials) adds the chunks in order: deterministic.
// grid (ceil(D / (32·V)), chunks = ceil(rows/chunk_rows), gw), block 256.
template <int V>
__device__ void layernorm_bwd_params_body(const bf16* dY, const bf16* X, const float* mean, const float* rstd,
                                          float* part, int gx, int gw, int G, int rows, int D, int chunk_rows,
                                          float (*red)[ln::WARPS][WARP * VEC]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int strip = blockIdx.x * WARP * V, c = strip + lane * V, chunk = blockIdx.y, w = blockIdx.z;
    const int chunks = gridDim.y;
    const int row_begin = chunk * chunk_rows, row_end = min(rows, row_begin + chunk_rows);
    const int g_begin = gw == G ? w : 0, g_end = gw == G ? w + 1 : G;
    float dg[V] = {}, db[V] = {};
    if (c < D) {
        for (int g = g_begin; g < g_end; ++g) {
            const int sg = group_index(g, gx);
            for (int row = row_begin + warp; row < row_end; row += ln::WARPS) {
                const size_t s = (size_t)sg * rows + row;
                const float mu = mean[s], r = rstd[s];
                float dy[V], x[V];
                load_vec<V>(dY + ((size_t)g * rows + row) * D + c, dy);
                load_vec<V>(X + s * D + c, x);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    dg[i] = fmaf(dy[i], (x[i] - mu) * r, dg[i]);
                    db[i] += dy[i];
                }
            }
        }
    }
    strip_sums<V>(dg, red[0], D - strip, part + ((size_t)w * chunks + chunk) * D + strip);
    strip_sums<V>(db, red[1], D - strip, part + (((size_t)gw + w) * chunks + chunk) * D + strip);
}
extern "C" __global__ void __launch_bounds__(256)
    layernorm_bwd_params_partial(const bf16* dY, const bf16* X, const float* mean, const float* rstd, float* part,
                                 int gx, int gw, int G, int rows, int D, int chunk_rows, int vec) {
    __shared__ float red[2][ln::WARPS][WARP * VEC];
    DISPATCH_VEC(vec, layernorm_bwd_params_body, dY, X, mean, rstd, part, gx, gw, G, rows, D, chunk_rows, red);
}
