// The LoRA-Ensemble projection, all members in one launch per kernel:
//
//   forward   Y[m]  = X[g(m)]·Wᵀ + bias + s·(X[g(m)]·A_mᵀ)·B_mᵀ (+ R[m])  U[m] = X[g(m)]·A_mᵀ
//   backward  V[m]  = s·dY[m]·B_m
//             dX[m] = dY[m]·W + V[m]·A_m (+ dXplus[m])
//                                  (shared X: dX = (Σ_m dY[m])·W + Σ_m V[m]·A_m (+ dXplus))
//             dA_m  = V[m]ᵀ·X[g(m)]               dB_m = s·dY[m]ᵀ·U[m]
//
// g(m) = m for a per-member input, 0 for the shared-input prefix. Layouts (row-major):
//   X [gx, rows, K] bf16    W [N, K] bf16     bias [N] bf16     Y, dY [M, rows, N] bf16
//   A [M, r, K] f32         B [M, N, r] f32   U, V [M, rows, r] f32    dA, dB like A, B (f32)
//
// The shared-W product is one tensor-core GEMM over all M·rows rows (tiles never straddle two
// members, so every tile has one B_m). The low-rank term is fused into that GEMM as an extra
// K-segment: after the K loop over [X | W] the same accumulators run over [s·U_m | B_m]
// (forward) or [V_m | A_m] (backward), so Y/dX are written once, with no pass over them.
// U, V, dA and dB are thin products on the tensor cores with the f32 operand split into three
// bf16 planes, so they keep f32 accuracy (they feed the f32 adapter gradients).
#include "common.cuh"

// The 8 elements src[r·lds + col ..] into d (16 contiguous bytes), zero outside rows_valid ×
// cols_valid. `vec`: lds and cols_valid are multiples of 8 and src is 16-byte aligned, so the
// chunk is wholly inside or wholly outside: one 16-byte cp.async; otherwise scalar stores.
__device__ __forceinline__ void copy_chunk(bf16* d, const bf16* src, int lds, int r, int col,
                                           int rows_valid, int cols_valid, bool vec) {
    if (vec) {
        const bool ok = r < rows_valid && col < cols_valid;
        cp_async_16(d, ok ? src + (size_t)r * lds + col : src, ok ? 16 : 0);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
            d[e] = (r < rows_valid && col + e < cols_valid) ? src[(size_t)r * lds + col + e]
                                                            : to_bf16(0.0f);
    }
}

// dst[r][c] = src[r·lds + c] for r < rows_valid, c < cols_valid, zero elsewhere (row stride LD),
// copied by a block of THREADS threads; `vec` as in copy_chunk.
template <int ROWS, int COLS, int LD, int THREADS>
__device__ __forceinline__ void load_tile_async(bf16* dst, const bf16* src, int lds, int rows_valid,
                                                int cols_valid, bool vec) {
    constexpr int CHUNKS = ROWS * COLS / 8;
    for (int c = threadIdx.x; c < CHUNKS; c += THREADS) {
        const int r = c / (COLS / 8), col = (c % (COLS / 8)) * 8;
        copy_chunk(dst + r * LD + col, src, lds, r, col, rows_valid, cols_valid, vec);
    }
}

// ---------------------------------------------------------------------------------------------
// The adapter products beside the fused GEMM, on tensor cores. Each is
//   out(i, j) = scale · Σ_k P(i, k) · Q(j, k)          i < outs, j < J = r, k < red
// with P bf16 and Q f32:
//   U[m]  = X·A_mᵀ      P(i, k) = X[i][k]       Q(j, k) = A_m[j][k]     out [rows][r]
//   V[m]  = s·dY[m]·B_m P(i, k) = dY[i][k]      Q(j, k) = B_m[k][j]     out [rows][r]
//   dA[m] = V[m]ᵀ·X     P(i, k) = X[k][i]       Q(j, k) = V[m][k][j]    out [r][K]
//   dB[m] = s·dY[m]ᵀ·U  P(i, k) = dY[k][i]      Q(j, k) = U[m][k][j]    out [N][r]
// Q is split into three bf16 planes that sum to it exactly (hi = bf16(q), mid = bf16(q − hi),
// lo = bf16(q − hi − mid): 8 + 8 + 8 significand bits), and a bf16 product is exact in the f32
// accumulator, so three mma.sync per tile give the f32 products of U, V, dA and dB (which feed
// the f32 adapter gradients) while P streams at memory speed: on the CUDA cores these passes
// cost one shared-memory load per FMA and ran far below it.
// Block: 4 warps, a 64 (i) × 32 (j) output tile, the reduction in slabs of 32; warp w owns i
// rows 16w..16w+15. P slabs arrive by cp.async, STAGES deep; each Q slab is read into registers
// one slab ahead and split into shared memory. A block sums its whole reduction in a fixed order:
// deterministic, no atomics. Block 128; its output tile (ti, tj) is given by the kernel.
// ---------------------------------------------------------------------------------------------
namespace lowrank {
constexpr int BI = 64, BJ = 32, BK = 32, THREADS = 128;
constexpr int Q_LD = BK + 8;  // Q planes [BJ][BK], rows padded by 16 bytes: conflict-free ldmatrix
constexpr int Q_PLANE = BJ * Q_LD;
constexpr int Q_PER_THREAD = BJ * BK / THREADS;

// P slabs: [BI][BK] (K contiguous), or with P_T, P stored [red][outs]: [BK][BI] (i contiguous),
// read with ldmatrix.trans. The gradients (P_T) have few blocks, one per 64 outputs of a member,
// and long reductions, so each keeps more slabs in flight.
template <bool P_T>
struct Slab {
    static constexpr int ROWS = P_T ? BK : BI, COLS = P_T ? BI : BK, LD = COLS + 8;
    static constexpr int STAGES = P_T ? 6 : 4;
};

__device__ __forceinline__ void split3(float q, bf16& hi, bf16& mid, bf16& lo) {
    hi = to_bf16(q);
    const float r1 = q - to_f32(hi);  // exact: q and hi are within a factor of two
    mid = to_bf16(r1);
    lo = to_bf16(r1 - to_f32(mid));  // exact, and at most 8 significand bits remain
}

// acc += P slab · (hi + mid + lo)ᵀ for this warp's 16 i rows and the first `tiles` 8-wide j tiles.
template <bool P_T>
__device__ __forceinline__ void mma_slab(float acc[BJ / 8][4], const bf16* Ps, const bf16* Qs,
                                         int tiles) {
    constexpr int LD = Slab<P_T>::LD;
    const int lane = threadIdx.x % WARP, i0 = (threadIdx.x / WARP) * 16;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[4];
        if (P_T)  // matrices (i0, kk) (i0+8, kk) (i0, kk+8) (i0+8, kk+8), stored k-major
            ldmatrix_x4_trans(a, Ps + (kk + lane % 8 + (lane / 16) * 8) * LD + i0 +
                                     ((lane / 8) % 2) * 8);
        else
            ldmatrix_x4(a, Ps + (i0 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
        for (int plane = 0; plane < 3; ++plane)
#pragma unroll
            for (int np = 0; np < BJ / 16; ++np) {
                if (2 * np >= tiles) break;
                // matrices (j, kk) (j, kk+8) (j+8, kk) (j+8, kk+8), j = 16·np
                const int j = np * 16 + lane % 8 + (lane / 16) * 8;
                unsigned b[4];
                ldmatrix_x4(b, Qs + plane * Q_PLANE + j * Q_LD + kk + ((lane / 8) % 2) * 8);
                mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
                if (2 * np + 1 < tiles) mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
            }
    }
}

// out[i·oi + j·oj] = scale · Σ_k P(i, k)·Q(j, k) for output tile (ti, tj): i in 64·ti.., j in
// 32·tj... P(i, k) = p[i·ldp + k], or p[k·ldp + i] with P_T; Q(j, k) = q[j·qj + k·qk], read with
// j the fastest thread index when J_FAST (Q stored with j contiguous) so the reads coalesce.
// `vec` as in load_tile_async, for p.
template <bool P_T, bool J_FAST>
__device__ void product(const bf16* __restrict__ p, int ldp, const float* __restrict__ q, int qj,
                        int qk, float* __restrict__ out, int oi, int oj, int outs, int J, int red,
                        float scale, bool vec, int ti, int tj) {
    using S = Slab<P_T>;
    __align__(16) __shared__ bf16 Ps[S::STAGES][S::ROWS * S::LD];
    __align__(16) __shared__ bf16 Qs[2][3 * Q_PLANE];
    const int i0 = ti * BI, j0 = tj * BJ;
    const int iv = min(BI, outs - i0), jv = min(BJ, J - j0);
    const int ktiles = (red + BK - 1) / BK, tiles = (jv + 7) / 8;

    auto load_p = [&](int stage, int kt) {
        const int k0 = kt * BK;
        if (P_T)
            load_tile_async<BK, BI, S::LD, THREADS>(Ps[stage], p + (size_t)k0 * ldp + i0, ldp,
                                                    red - k0, iv, vec);
        else
            load_tile_async<BI, BK, S::LD, THREADS>(Ps[stage], p + (size_t)i0 * ldp + k0, ldp, iv,
                                                    red - k0, vec);
    };
    float qr[Q_PER_THREAD];
    auto q_at = [&](int e, int& j, int& kk) {
        const int idx = threadIdx.x + e * THREADS;
        j = J_FAST ? idx % BJ : idx / BK;
        kk = J_FAST ? idx / BJ : idx % BK;
    };
    auto load_q = [&](int kt) {
#pragma unroll
        for (int e = 0; e < Q_PER_THREAD; ++e) {
            int j, kk;
            q_at(e, j, kk);
            const int k = kt * BK + kk;
            qr[e] = (j < jv && k < red) ? q[(size_t)(j0 + j) * qj + (size_t)k * qk] : 0.0f;
        }
    };
    auto store_q = [&](bf16* planes) {
#pragma unroll
        for (int e = 0; e < Q_PER_THREAD; ++e) {
            int j, kk;
            q_at(e, j, kk);
            const int at = j * Q_LD + kk;
            split3(qr[e], planes[at], planes[Q_PLANE + at], planes[2 * Q_PLANE + at]);
        }
    };

    float acc[BJ / 8][4];
#pragma unroll
    for (int t = 0; t < BJ / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < ktiles) load_p(s, s);
        cp_async_commit();
    }
    if (ktiles > 0) load_q(0);
    for (int kt = 0; kt < ktiles; ++kt) {
        // Qs[kt % 2] was last read in step kt − 2, before the barrier of step kt − 1.
        store_q(Qs[kt % 2]);
        if (kt + 1 < ktiles) load_q(kt + 1);  // in flight during this step's products
        cp_async_wait<S::STAGES - 2>();       // P slab kt has landed (this thread's copies) ...
        __syncthreads();                      // ... for every thread, as has Q slab kt
        const int next = kt + S::STAGES - 1;  // into the stage read in step kt − 1
        if (next < ktiles) load_p(next % S::STAGES, next);
        cp_async_commit();  // possibly empty: keeps the group count in step
        // Tensor cores truncate as they accumulate, so a reduction of thousands of rows summed
        // in one accumulator drifts toward zero by about an ulp per mma; each slab's products
        // are summed apart and added with a rounded FADD, which keeps the drift to a slab's.
        float part[BJ / 8][4] = {};
        mma_slab<P_T>(part, Ps[kt % S::STAGES], Qs[kt % 2], tiles);
#pragma unroll
        for (int t = 0; t < BJ / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][e] += part[t][e];
    }

    const int lane = threadIdx.x % WARP, wi = (threadIdx.x / WARP) * 16;
#pragma unroll
    for (int t = 0; t < BJ / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = wi + lane / 4 + (e / 2) * 8, j = t * 8 + 2 * (lane % 4) + e % 2;
            if (i < iv && j < jv)
                out[(size_t)(i0 + i) * oi + (size_t)(j0 + j) * oj] = scale * acc[t][e];
        }
}
}  // namespace lowrank

// U[m] = X[g(m)]·A_mᵀ: [rows, r]. grid (ceil(rows/64), ceil(r/32), M), block 128.
extern "C" __global__ void __launch_bounds__(128)
    lora_u(const bf16* X, int x_groups, const float* A, float* U, int rows, int K, int r, int vec) {
    const int m = blockIdx.z;
    lowrank::product<false, false>(X + (size_t)group_index(m, x_groups) * rows * K, K,
                                   A + (size_t)m * r * K, K, 1, U + (size_t)m * rows * r, r, 1,
                                   rows, r, K, 1.0f, vec, blockIdx.x, blockIdx.y);
}

// V[m] = s·dY[m]·B_m: [rows, r]. grid (ceil(rows/64), ceil(r/32), M), block 128.
extern "C" __global__ void __launch_bounds__(128)
    lora_v(const bf16* dY, const float* B, float* V, int rows, int N, int r, float s, int vec) {
    const int m = blockIdx.z;
    lowrank::product<false, true>(dY + (size_t)m * rows * N, N, B + (size_t)m * N * r, 1, r,
                                  V + (size_t)m * rows * r, r, 1, rows, r, N, s, vec, blockIdx.x,
                                  blockIdx.y);
}

// ---------------------------------------------------------------------------------------------
// The fused tensor-core GEMM. Block tile 128×128, K step 32, 3-stage cp.async pipeline, 8 warps
// each owning a 64×32 warp tile (4×4 mma tiles of 16×8). A tiles are [BM][BK] (K contiguous).
// B tiles are [BN][BK] when the operand is stored [out][red] (W in the forward: ldmatrix) and
// [BK][BN] when stored [red][out] (W in the backward: ldmatrix.trans). Rows are padded by 8
// elements (16 bytes), which makes every ldmatrix phase conflict-free.
// ---------------------------------------------------------------------------------------------

// y[r·ldy + c..c+1] = bf16(v0, v1 + bias + plus) for the valid part; the two columns are
// neighbours. `plus` (null, or a tile laid out as y's): a gradient dX already had, joined before
// the one rounding. `pairs`: ldy even and y, plus 4-byte aligned, so they go as bf16x2 accesses.
__device__ __forceinline__ void store_pair(bf16* y, int ldy, int r, int c, float v0, float v1,
                                           int rows_valid, int cols_valid, const bf16* bias,
                                           const bf16* plus, bool pairs) {
    if (r >= rows_valid || c >= cols_valid) return;
    const bool two = c + 1 < cols_valid;
    if (bias) {
        v0 += to_f32(bias[c]);
        if (two) v1 += to_f32(bias[c + 1]);
    }
    if (plus) {
        const bf16* p = plus + (size_t)r * ldy + c;
        if (two && pairs) {
            const float2 pv = __bfloat1622float2(*reinterpret_cast<const bf162*>(p));
            v0 += pv.x;
            v1 += pv.y;
        } else {
            v0 += to_f32(p[0]);
            if (two) v1 += to_f32(p[1]);
        }
    }
    bf16* dst = y + (size_t)r * ldy + c;
    if (two && pairs) {
        *reinterpret_cast<bf162*>(dst) = __floats2bfloat162_rn(v0, v1);
    } else {
        dst[0] = to_bf16(v0);
        if (two) dst[1] = to_bf16(v1);
    }
}

// The mma.sync path: tiles, accumulators and the steps the GEMM bodies below call.
struct MmaSync {
    static constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;
    static constexpr int A_LD = BK + 8;
    static constexpr int BNT_LD = BK + 8;  // B stored [BN][BK]
    static constexpr int BT_LD = BN + 8;   // B stored [BK][BN]
    static constexpr int A_STAGE = BM * A_LD;
    static constexpr int B_STAGE = (BN * BNT_LD > BK * BT_LD) ? BN * BNT_LD : BK * BT_LD;
    static constexpr int STAGE = A_STAGE + B_STAGE;
    // Dynamic shared memory per block, in bytes (the launcher uses the same number).
    static constexpr int SMEM_BYTES = STAGES * STAGE * 2;
    static_assert(SMEM_BYTES == 61440, "the launcher (launch/lora.rs) assumes 61440 bytes");

    typedef float Acc[4][4][4];

    // As load_tile_async from an f32 source, times `scale`, rounded to bf16 (register-staged).
    template <int ROWS, int COLS, int LD>
    static __device__ __forceinline__ void load_tile_f32(bf16* dst, const float* src, int lds,
                                                         int rows_valid, int cols_valid,
                                                         float scale) {
        for (int i = threadIdx.x; i < ROWS * COLS; i += THREADS) {
            const int r = i / COLS, c = i % COLS;
            const float v =
                (r < rows_valid && c < cols_valid) ? scale * src[(size_t)r * lds + c] : 0.0f;
            dst[r * LD + c] = to_bf16(v);
        }
    }

    // dst[r][c] = Σ_m src[m·member_stride + r·lds + c], summed in f32 then rounded: the
    // shared-input backward, where every member's dY multiplies the same W.
    template <int ROWS, int COLS, int LD>
    static __device__ __forceinline__ void load_tile_member_sum(bf16* dst, const bf16* src,
                                                                size_t member_stride, int members,
                                                                int lds, int rows_valid,
                                                                int cols_valid) {
        for (int i = threadIdx.x; i < ROWS * COLS; i += THREADS) {
            const int r = i / COLS, c = i % COLS;
            float v = 0.0f;
            if (r < rows_valid && c < cols_valid)
                for (int m = 0; m < members; ++m)
                    v += to_f32(src[m * member_stride + (size_t)r * lds + c]);
            dst[r * LD + c] = to_bf16(v);
        }
    }

    // acc += As·Bsᵀ over one BK slab of shared memory, for this warp's 64×32 tile.
    template <bool B_TRANS>
    static __device__ __forceinline__ void mma_slab(Acc acc, const bf16* As, const bf16* Bs) {
        const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
        const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(a[mt], As + (wm + mt * 16 + lane % 16) * A_LD + kk + (lane / 16) * 8);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int n0 = wn + np * 16;
                unsigned r[4];
                if (!B_TRANS) {
                    // matrices: (n0, kk) (n0, kk+8) (n0+8, kk) (n0+8, kk+8)
                    ldmatrix_x4(r, Bs + (n0 + lane % 8 + (lane / 16) * 8) * BNT_LD + kk +
                                       ((lane / 8) % 2) * 8);
                } else {
                    // matrices: (kk, n0) (kk+8, n0) (kk, n0+8) (kk+8, n0+8), transposed on load
                    ldmatrix_x4_trans(r, Bs + (kk + lane % 8 + ((lane / 8) % 2) * 8) * BT_LD + n0 +
                                             (lane / 16) * 8);
                }
                b[np * 2][0] = r[0];
                b[np * 2][1] = r[1];
                b[np * 2 + 1][0] = r[2];
                b[np * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_bf16_16816(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
    }

    // The main K loop: acc += A_tile·B_tileᵀ over `kred`. A rows start at `a` (row stride lda; with
    // SUM_A the tile is the sum over `members` copies `a_member_stride` apart). B starts at the
    // tile's first output column: b[n·ldb + k] when !B_TRANS, b[k·ldb + n] when B_TRANS.
    template <bool B_TRANS, bool SUM_A>
    static __device__ void main_loop(Acc acc, bf16* smem, const bf16* a, int lda,
                                     size_t a_member_stride, int members, int rows_valid,
                                     const bf16* b, int ldb, int cols_valid, int kred, bool vec) {
        const int ktiles = (kred + BK - 1) / BK;
        auto load = [&](int stage, int kt) {
            bf16* As = smem + stage * STAGE;
            bf16* Bs = As + A_STAGE;
            const int k0 = kt * BK;
            if (SUM_A)
                load_tile_member_sum<BM, BK, A_LD>(As, a + k0, a_member_stride, members, lda,
                                                   rows_valid, kred - k0);
            else
                load_tile_async<BM, BK, A_LD, THREADS>(As, a + k0, lda, rows_valid, kred - k0, vec);
            if (!B_TRANS)
                load_tile_async<BN, BK, BNT_LD, THREADS>(Bs, b + k0, ldb, cols_valid, kred - k0,
                                                         vec);
            else
                load_tile_async<BK, BN, BT_LD, THREADS>(Bs, b + (size_t)k0 * ldb, ldb, kred - k0,
                                                        cols_valid, vec);
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < ktiles) load(s, s);
            cp_async_commit();
        }
        for (int kt = 0; kt < ktiles; ++kt) {
            cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
            __syncthreads();              // ... for every thread; and stage kt-1 is free again
            const int next = kt + STAGES - 1;
            if (next < ktiles) load(next % STAGES, next);
            cp_async_commit();  // possibly empty: keeps the group count in step
            const bf16* As = smem + (kt % STAGES) * STAGE;
            mma_slab<B_TRANS>(acc, As, As + A_STAGE);
        }
        cp_async_wait<0>();
        __syncthreads();  // shared memory is free for the low-rank segment
    }

    // The low-rank K-segment: acc += (a_scale·P)·Qᵀ over the rank, both operands f32 in memory and
    // rounded to bf16 in shared memory. P rows start at `p` ([rows, r], row stride r); Q starts at
    // the tile's first output column: q[n·ldq + j] when !B_TRANS, q[j·ldq + n] when B_TRANS.
    template <bool B_TRANS>
    static __device__ void lowrank_segment(Acc acc, bf16* smem, const float* p, int rows_valid,
                                           float p_scale, const float* q, int ldq, int cols_valid,
                                           int r) {
        bf16* As = smem;
        bf16* Bs = smem + A_STAGE;
        for (int j0 = 0; j0 < r; j0 += BK) {
            load_tile_f32<BM, BK, A_LD>(As, p + j0, r, rows_valid, r - j0, p_scale);
            if (!B_TRANS)
                load_tile_f32<BN, BK, BNT_LD>(Bs, q + j0, ldq, cols_valid, r - j0, 1.0f);
            else
                load_tile_f32<BK, BN, BT_LD>(Bs, q + (size_t)j0 * ldq, ldq, r - j0, cols_valid,
                                             1.0f);
            __syncthreads();
            mma_slab<B_TRANS>(acc, As, Bs);
            __syncthreads();
        }
    }

    // y[r·ldy + c] = bf16(acc + bias[c] + plus[r·ldy + c]) for the valid part of the tile.
    static __device__ __forceinline__ void store_tile(bf16* y, int ldy, int rows_valid,
                                                      int cols_valid, const Acc acc,
                                                      const bf16* bias, const bf16* plus,
                                                      bool pairs) {
        const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
        const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    store_pair(y, ldy, wm + mt * 16 + lane / 4 + h * 8,
                               wn + nt * 8 + (lane % 4) * 2, acc[mt][nt][2 * h],
                               acc[mt][nt][2 * h + 1], rows_valid, cols_valid, bias, plus,
                               pairs);
    }

    static __device__ __forceinline__ void zero(Acc acc) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.0f;
    }

    static __device__ __forceinline__ void copy(Acc dst, const Acc src) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int k = 0; k < 4; ++k) dst[i][j][k] = src[i][j][k];
    }

    static __device__ __forceinline__ bf16* tiles(unsigned char* smem_raw) {
        return reinterpret_cast<bf16*>(smem_raw);
    }
};

// The four fused GEMMs, written once for both tensor-core paths P (MmaSync here, Wgmma on
// Hopper): where the block's tile lies, the main loop, the low-rank segment(s), the store. P
// gives the tile sizes, the accumulator type and shared-memory layout, and those four steps.

// This block's dynamic shared memory, laid out as the path P wants it.
template <class P>
__device__ __forceinline__ bf16* block_smem() {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    return P::tiles(smem_raw);
}

// Where this block's tile lies: blockIdx.x is the column tile, blockIdx.y = member·row tiles +
// row tile (member 0 on a shared-input grid, which has the row tiles alone).
struct BlockTile {
    int m, row0, n0, rows_valid;
};
template <class P>
__device__ __forceinline__ BlockTile block_tile(int rows) {
    const int row_tiles = (rows + P::BM - 1) / P::BM;
    const int row0 = (blockIdx.y % row_tiles) * P::BM;
    return {(int)(blockIdx.y / row_tiles), row0, (int)blockIdx.x * P::BN, min(P::BM, rows - row0)};
}

// Forward Y[m] = X[m]·Wᵀ + bias + s·U[m]·B_mᵀ (+ R[m], when not null: the residual stream the
// projection's output joins, read in the store instead of a pass of its own; R_step is 0 for a
// residual the members share, rows·N for one per member). grid (ceil(N/128), M·ceil(rows/128)),
// block 256, dynamic smem P::SMEM_BYTES; blockIdx.y = member·row tiles + row tile. X is
// [M, rows, K].
template <class P>
__device__ __forceinline__ void fwd_gemm(const bf16* X, const bf16* W, const bf16* bias,
                                         const float* U, const float* B, const bf16* R,
                                         u64 R_step, bf16* Y, int rows, int N, int K, int r,
                                         float s, int vec) {
    bf16* smem = block_smem<P>();
    const auto [m, row0, n0, rows_valid] = block_tile<P>(rows);
    const size_t row_base = (size_t)m * rows + row0;
    typename P::Acc acc;
    P::zero(acc);
    P::template main_loop<false, false>(acc, smem, X + row_base * K, K, 0, 1, rows_valid,
                                        W + (size_t)n0 * K, K, N - n0, K, vec);
    P::template lowrank_segment<false>(acc, smem, U + row_base * r, rows_valid, s,
                                       B + ((size_t)m * N + n0) * r, r, N - n0, r);
    P::store_tile(Y + row_base * N + n0, N, rows_valid, N - n0, acc, bias ? bias + n0 : nullptr,
                  R ? R + m * R_step + (size_t)row0 * N + n0 : nullptr, vec);
}

// Forward with one shared input X [1, rows, K]: the X·Wᵀ tile is computed once and kept in
// registers, then each member adds its own low-rank segment (and R[m]) and stores its Y[m].
// grid (ceil(N/128), ceil(rows/128)), block 256, dynamic smem P::SMEM_BYTES.
template <class P>
__device__ __forceinline__ void fwd_gemm_prefix(const bf16* X, const bf16* W, const bf16* bias,
                                                const float* U, const float* B, const bf16* R,
                                                u64 R_step, bf16* Y, int members, int rows,
                                                int N, int K, int r, float s, int vec) {
    bf16* smem = block_smem<P>();
    const auto [m0, row0, n0, rows_valid] = block_tile<P>(rows);  // m0 = 0: one shared input
    typename P::Acc base, acc;
    P::zero(base);
    P::template main_loop<false, false>(base, smem, X + (size_t)row0 * K, K, 0, 1, rows_valid,
                                        W + (size_t)n0 * K, K, N - n0, K, vec);
    for (int m = 0; m < members; ++m) {
        const size_t row_base = (size_t)m * rows + row0;
        P::copy(acc, base);
        P::template lowrank_segment<false>(acc, smem, U + row_base * r, rows_valid, s,
                                           B + ((size_t)m * N + n0) * r, r, N - n0, r);
        P::store_tile(Y + row_base * N + n0, N, rows_valid, N - n0, acc, bias ? bias + n0 : nullptr,
                      R ? R + m * R_step + (size_t)row0 * N + n0 : nullptr, vec);
    }
}

// Backward dX[m] = dY[m]·W + V[m]·A_m (+ dXplus[m], when not null: the gradient X already had
// from its other readers, so the q, k and v projections of one input need no adds between them).
// grid (ceil(K/128), M·ceil(rows/128)), block 256, dynamic smem P::SMEM_BYTES.
template <class P>
__device__ __forceinline__ void bwd_dx_gemm(const bf16* dY, const bf16* W, const float* V,
                                            const float* A, const bf16* dXplus, bf16* dX, int rows,
                                            int N, int K, int r, int vec) {
    bf16* smem = block_smem<P>();
    const auto [m, row0, n0, rows_valid] = block_tile<P>(rows);
    const size_t row_base = (size_t)m * rows + row0;
    typename P::Acc acc;
    P::zero(acc);
    P::template main_loop<true, false>(acc, smem, dY + row_base * N, N, 0, 1, rows_valid, W + n0, K,
                                       K - n0, N, vec);
    P::template lowrank_segment<true>(acc, smem, V + row_base * r, rows_valid, 1.0f,
                                      A + (size_t)m * r * K + n0, K, K - n0, r);
    P::store_tile(dX + row_base * K + n0, K, rows_valid, K - n0, acc, nullptr,
                  dXplus ? dXplus + row_base * K + n0 : nullptr, vec);
}

// Backward with a shared input: dX = (Σ_m dY[m])·W + Σ_m V[m]·A_m (+ dXplus). The member sum
// of dY happens while loading the A tiles, so the big product runs once.
// grid (ceil(K/128), ceil(rows/128)).
template <class P>
__device__ __forceinline__ void bwd_dx_gemm_prefix(const bf16* dY, const bf16* W, const float* V,
                                                   const float* A, const bf16* dXplus, bf16* dX,
                                                   int members, int rows, int N, int K, int r,
                                                   int vec) {
    bf16* smem = block_smem<P>();
    const auto [m0, row0, n0, rows_valid] = block_tile<P>(rows);  // m0 = 0: one shared input
    typename P::Acc acc;
    P::zero(acc);
    P::template main_loop<true, true>(acc, smem, dY + (size_t)row0 * N, N, (size_t)rows * N,
                                      members, rows_valid, W + n0, K, K - n0, N, vec);
    for (int m = 0; m < members; ++m)
        P::template lowrank_segment<true>(acc, smem, V + ((size_t)m * rows + row0) * r, rows_valid,
                                          1.0f, A + (size_t)m * r * K + n0, K, K - n0, r);
    P::store_tile(dX + (size_t)row0 * K + n0, K, rows_valid, K - n0, acc, nullptr,
                  dXplus ? dXplus + (size_t)row0 * K + n0 : nullptr, vec);
}

// The four GEMM entry points of a tensor-core path P: lora_fwd_NAME, lora_fwd_NAME_prefix,
// lora_bwd_dx_NAME and lora_bwd_dx_NAME_prefix, grids as above, dynamic smem P::SMEM_BYTES.
#define LORA_GEMM_ENTRIES(NAME, P)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        lora_fwd_##NAME(const bf16* X, const bf16* W, const bf16* bias, const float* U,            \
                        const float* B, const bf16* R, u64 R_step, bf16* Y, int rows, int N,       \
                        int K, int r, float s, int vec) {                                          \
        fwd_gemm<P>(X, W, bias, U, B, R, R_step, Y, rows, N, K, r, s, vec);                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) lora_fwd_##NAME##_prefix(                    \
        const bf16* X, const bf16* W, const bf16* bias, const float* U, const float* B,            \
        const bf16* R, u64 R_step, bf16* Y, int members, int rows, int N, int K, int r,            \
        float s, int vec) {                                                                        \
        fwd_gemm_prefix<P>(X, W, bias, U, B, R, R_step, Y, members, rows, N, K, r, s, vec);        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        lora_bwd_dx_##NAME(const bf16* dY, const bf16* W, const float* V, const float* A,          \
                           const bf16* dXplus, bf16* dX, int rows, int N, int K, int r, int vec) { \
        bwd_dx_gemm<P>(dY, W, V, A, dXplus, dX, rows, N, K, r, vec);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) lora_bwd_dx_##NAME##_prefix(                 \
        const bf16* dY, const bf16* W, const float* V, const float* A, const bf16* dXplus,         \
        bf16* dX, int members, int rows, int N, int K, int r, int vec) {                           \
        bwd_dx_gemm_prefix<P>(dY, W, V, A, dXplus, dX, members, rows, N, K, r, vec);               \
    }

// On mma.sync: any arch from sm_80.
LORA_GEMM_ENTRIES(gemm, MmaSync)

// dA[m] = V[m]ᵀ·X[g(m)] ([r, K]) and dB[m] = s·dY[m]ᵀ·U[m] ([N, r]), both summed over rows, in
// one launch. Their output tiles are few when M is (12 + 12 for a 768-wide projection at M = 1),
// so the rows are cut into `splits` ranges of `split_rows` (a multiple of the slab): a block sums
// one range of one tile in a fixed order. With one range it writes dA and dB; with more it writes
// the range's partial sums, `part` [splits][M, r, K] then [splits][M, N, r], which the launcher
// adds in range order (reduce_partials): deterministic, no atomics. The cut depends on the shapes
// alone, so every device gives the same sums.
// 1-D grid: ceil(K/64)·M·splits dA tiles, then ceil(N/64)·M·splits dB tiles, each index tile
// fastest, then member, then range; y: ceil(r/32). Block 128.
extern "C" __global__ void __launch_bounds__(128)
    lora_grads(const float* V, const bf16* X, int x_groups, const bf16* dY, const float* U, float s,
               float* dA, float* dB, float* part, int members, int rows, int K, int N, int r,
               int split_rows, int splits, int vec_x, int vec_dy) {
    using lowrank::BI;
    const int a_tiles = (K + BI - 1) / BI, b_tiles = (N + BI - 1) / BI;
    const int a_blocks = a_tiles * members * splits;
    const bool is_a = (int)blockIdx.x < a_blocks;
    const int id = is_a ? blockIdx.x : blockIdx.x - a_blocks, tiles = is_a ? a_tiles : b_tiles;
    const int ti = id % tiles, m = (id / tiles) % members, range = id / (tiles * members);
    const int row0 = range * split_rows, red = min(split_rows, rows - row0);
    const size_t a_len = (size_t)members * r * K, b_len = (size_t)members * N * r;
    const size_t u_at = ((size_t)m * rows + row0) * r;
    if (is_a) {
        float* out = splits == 1 ? dA : part + range * a_len;
        lowrank::product<true, true>(X + ((size_t)group_index(m, x_groups) * rows + row0) * K, K,
                                     V + u_at, 1, r, out + (size_t)m * r * K, 1, K, K, r, red,
                                     1.0f, vec_x, ti, blockIdx.y);
    } else {
        float* out = splits == 1 ? dB : part + splits * a_len + range * b_len;
        lowrank::product<true, true>(dY + ((size_t)m * rows + row0) * N, N, U + u_at, 1, r,
                                     out + (size_t)m * N * r, r, 1, N, r, red, s, vec_dy, ti,
                                     blockIdx.y);
    }
}

// ---------------------------------------------------------------------------------------------
// The fused GEMMs on Hopper tensor cores (sm_90a): lora_fwd_wgmma, lora_fwd_wgmma_prefix,
// lora_bwd_dx_wgmma and lora_bwd_dx_wgmma_prefix compute what their mma.sync twins above compute,
// with the same parameters and grids, on wgmma. Block tile 128×128, K steps of 64 (one 128-byte
// swizzle row), a 3-stage cp.async pipeline; the two warpgroups of the block own 64 rows × 128
// columns each (m64n128k16, 64 f32 accumulators per thread). The low-rank term is again one more
// K segment, over [s·U_m | B_m] or [V_m | A_m] rounded to bf16, padded with zeros to a multiple
// of 16.
//
// Shared-memory layouts, all in the 128-byte swizzle (common.cuh):
// - A, and B in the forward (W [N, K]: K contiguous), are K-major: a row per M or N index, its 64
//   K values the swizzled 128 bytes (`sw`).
// - B in the backward (W [N, K] with N the reduction: the output index contiguous) is MN-major:
//   two halves of 64 output columns, each 64 K rows whose 64 columns are the swizzled 128 bytes
//   (`sw_mn`); the descriptor's leading byte offset steps from one half to the other.
// ---------------------------------------------------------------------------------------------
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
// The wgmma path: the same interface as MmaSync.
struct Wgmma {
    static constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256, WG_ROWS = 64;
    static constexpr int TILE_A = BM * BK, TILE_B = BN * BK;  // elements
    static constexpr int STAGE = TILE_A + TILE_B;
    static constexpr int HALF = BK * 64;  // elements of one 64-column half of an MN-major B tile
    // Dynamic shared memory per block: the stages, and up to 1024 bytes to align them.
    static constexpr int SMEM_BYTES = STAGES * STAGE * 2 + 1024;
    static_assert(SMEM_BYTES == 99328, "the launcher (launch/lora.rs) assumes 99328 bytes");

    typedef float Acc[64];

    // Where element (row, col), col < 64, of a K-major tile sits.
    static __device__ __forceinline__ int sw(int row, int col) {
        return row * BK + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
    }

    // Where element (k, n), n < 128, of an MN-major B tile sits.
    static __device__ __forceinline__ int sw_mn(int k, int n) {
        return (n / 64) * HALF + sw(k, n % 64);
    }

    // A K-major tile of ROWS rows × 64 from src (row stride lds).
    template <int ROWS>
    static __device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int lds,
                                                     int rows_valid, int cols_valid, bool vec) {
        for (int i = threadIdx.x; i < ROWS * 8; i += THREADS) {
            const int r = i / 8, col = (i % 8) * 8;
            copy_chunk(dst + sw(r, col), src, lds, r, col, rows_valid, cols_valid, vec);
        }
    }

    // An MN-major B tile of 64 K rows × 128 output columns from src stored [K][out] (stride lds).
    static __device__ __forceinline__ void load_tile_mn(bf16* dst, const bf16* src, int lds,
                                                        int rows_valid, int cols_valid, bool vec) {
        for (int i = threadIdx.x; i < BK * (BN / 8); i += THREADS) {
            const int r = i / (BN / 8), col = (i % (BN / 8)) * 8;
            copy_chunk(dst + sw_mn(r, col), src, lds, r, col, rows_valid, cols_valid, vec);
        }
    }

    // A K-major A tile of Σ_m src[m·member_stride + ..] (summed in f32, then rounded): the
    // shared-input backward, where every member's dY multiplies the same W.
    static __device__ __forceinline__ void load_tile_member_sum(bf16* dst, const bf16* src,
                                                                size_t member_stride, int members,
                                                                int lds, int rows_valid,
                                                                int cols_valid) {
        for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
            const int r = i / BK, c = i % BK;
            float v = 0.0f;
            if (r < rows_valid && c < cols_valid)
                for (int m = 0; m < members; ++m)
                    v += to_f32(src[m * member_stride + (size_t)r * lds + c]);
            dst[sw(r, c)] = to_bf16(v);
        }
    }

    // scale·src rounded to bf16 into a K-major tile of ROWS rows over its first `cols` columns,
    // from an f32 matrix [rows][cols] with row stride lds; zero outside rows_valid × cols_valid.
    template <int ROWS>
    static __device__ __forceinline__ void load_tile_f32(bf16* dst, const float* src, int lds,
                                                         int rows_valid, int cols_valid, int cols,
                                                         float scale) {
        for (int i = threadIdx.x; i < ROWS * cols; i += THREADS) {
            const int r = i / cols, c = i % cols;
            const float v =
                (r < rows_valid && c < cols_valid) ? scale * src[(size_t)r * lds + c] : 0.0f;
            dst[sw(r, c)] = to_bf16(v);
        }
    }

    // src rounded to bf16 into the first `rows` K rows of an MN-major B tile, from an f32 matrix
    // stored [K][out] with row stride lds; zero outside rows_valid × cols_valid.
    static __device__ __forceinline__ void load_tile_f32_mn(bf16* dst, const float* src, int lds,
                                                            int rows_valid, int cols_valid,
                                                            int rows) {
        for (int i = threadIdx.x; i < rows * BN; i += THREADS) {
            const int r = i / BN, c = i % BN;
            const float v = (r < rows_valid && c < cols_valid) ? src[(size_t)r * lds + c] : 0.0f;
            dst[sw_mn(r, c)] = to_bf16(v);
        }
    }

    // acc += (this warpgroup's 64 rows of As)·Bs over KSTEPS K steps of 16, then wait for it. Bs is
    // K-major, or MN-major with B_MN. KSTEPS is a constant: a wgmma under a run-time condition
    // makes ptxas serialise them all.
    template <int KSTEPS, bool B_MN>
    static __device__ __forceinline__ void mma_slab(Acc& acc, const bf16* As, const bf16* Bs) {
        const u64 da = sw128_desc(As + (threadIdx.x / 128) * WG_ROWS * BK);
        // One K step of 16 is 32 bytes along a K-major row, 16 rows of 128 bytes down an MN-major
        // tile: +2 or +128 in the descriptor's address field (bytes >> 4).
        const u64 db = B_MN ? sw128_desc(Bs, HALF * 2) : sw128_desc(Bs);
        wgmma_fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
            wgmma_m64n128k16<B_MN>(acc, da + 2 * ks, db + (B_MN ? 128 : 2) * ks, 1);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc);
    }

    // The main K loop: acc += A_tile·B_tile over `kred`. A rows from `a` (stride lda; with SUM_A
    // the sum over `members` copies a_member_stride apart). B from `b` at the tile's first output
    // column: b[n·ldb + k] (K-major), or b[k·ldb + n] with B_MN.
    template <bool B_MN, bool SUM_A>
    static __device__ void main_loop(Acc& acc, bf16* tiles, const bf16* a, int lda,
                                     size_t a_member_stride, int members, int rows_valid,
                                     const bf16* b, int ldb, int cols_valid, int kred, bool vec) {
        const int ktiles = (kred + BK - 1) / BK;
        auto load = [&](int stage, int kt) {
            bf16* As = tiles + stage * STAGE;
            const int k0 = kt * BK;
            if (SUM_A)
                load_tile_member_sum(As, a + k0, a_member_stride, members, lda, rows_valid,
                                     kred - k0);
            else
                load_tile<BM>(As, a + k0, lda, rows_valid, kred - k0, vec);
            if (B_MN)
                load_tile_mn(As + TILE_A, b + (size_t)k0 * ldb, ldb, kred - k0, cols_valid, vec);
            else
                load_tile<BN>(As + TILE_A, b + k0, ldb, cols_valid, kred - k0, vec);
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < ktiles) load(s, s);
            cp_async_commit();
        }
        for (int kt = 0; kt < ktiles; ++kt) {
            cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
            fence_proxy_async();          // ... where the tensor cores look ...
            __syncthreads();  // ... for every thread; and every warpgroup is done with tile kt-1
            const int next = kt + STAGES - 1;
            if (next < ktiles) load(next % STAGES, next);  // into tile kt-1's stage
            cp_async_commit();  // possibly empty: keeps the group count in step
            const bf16* As = tiles + (kt % STAGES) * STAGE;
            mma_slab<BK / 16, B_MN>(acc, As, As + TILE_A);
        }
        cp_async_wait<0>();
        __syncthreads();  // shared memory is free for the low-rank segment
    }

    // acc += (p_scale·P)·Q over the rank: P [rows, r] f32 (row stride r); Q f32 at the tile's first
    // output column, q[n·ldq + j] (K-major, the forward's B_m [N, r]) or q[j·ldq + n] with B_MN
    // (the backward's A_m [r, K]).
    template <bool B_MN>
    static __device__ void lowrank_segment(Acc& acc, bf16* tiles, const float* p, int rows_valid,
                                           float p_scale, const float* q, int ldq, int cols_valid,
                                           int r) {
        for (int j0 = 0; j0 < r; j0 += BK) {
            const int width = min(BK, r - j0), cols = (width + 15) / 16 * 16;
            load_tile_f32<BM>(tiles, p + j0, r, rows_valid, width, cols, p_scale);
            if (B_MN)
                load_tile_f32_mn(tiles + TILE_A, q + (size_t)j0 * ldq, ldq, width, cols_valid,
                                 cols);
            else
                load_tile_f32<BN>(tiles + TILE_A, q + j0, ldq, cols_valid, width, cols, 1.0f);
            fence_proxy_async();
            __syncthreads();
            switch (cols / 16) {
                case 1:
                    mma_slab<1, B_MN>(acc, tiles, tiles + TILE_A);
                    break;
                case 2:
                    mma_slab<2, B_MN>(acc, tiles, tiles + TILE_A);
                    break;
                case 3:
                    mma_slab<3, B_MN>(acc, tiles, tiles + TILE_A);
                    break;
                default:
                    mma_slab<4, B_MN>(acc, tiles, tiles + TILE_A);
                    break;
            }
            __syncthreads();
        }
    }

    // Y tile = bf16(acc + bias + plus). Thread t of warpgroup g holds, for each 8-column block j
    // and h in {0, 1}, row 64g + 16·(t/32 % 4) + (t%32)/4 + 8h, columns 8j + 2(t%4) and the
    // next, in acc[4j + 2h] and acc[4j + 2h + 1].
    static __device__ __forceinline__ void store_tile(bf16* y, int ldy, int rows_valid,
                                                      int cols_valid, const Acc& acc,
                                                      const bf16* bias, const bf16* plus,
                                                      bool pairs) {
        const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
        const int r0 = (warp / 4) * WG_ROWS + (warp % 4) * 16 + lane / 4;
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                store_pair(y, ldy, r0 + 8 * h, 8 * j + 2 * (lane % 4), acc[4 * j + 2 * h],
                           acc[4 * j + 2 * h + 1], rows_valid, cols_valid, bias, plus, pairs);
    }

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    }

    static __device__ __forceinline__ void copy(Acc& dst, const Acc& src) {
#pragma unroll
        for (int i = 0; i < 64; ++i) dst[i] = src[i];
    }

    static __device__ __forceinline__ bf16* tiles(unsigned char* smem_raw) {
        return reinterpret_cast<bf16*>(align_1024(smem_raw));
    }
};

// On wgmma: sm_90a.
LORA_GEMM_ENTRIES(wgmma, Wgmma)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
