// Fused multi-head attention for short sequences (T <= 256), FlashAttention-2 style on mma.sync.
//
//   O = softmax(Q·Kᵀ·scale)·V  per (group g, batch b, head h), scale = 1/sqrt(dh)
//
// Q, K, V [Gx, B, T, D] bf16 with the heads side by side in D = H·dh; each of Q, K, V has 1 or G
// groups (a group-1 tensor is read by every output group). O, dO [G, B, T, D] bf16.
// LSE, DELTA [G, B, H, T] f32. dQ, dK, dV are written per output group, [G, B, T, D] bf16; the
// sum over groups for a broadcast input is a separate reduction (elementwise.cu sum_groups_bf16).
//
// Every block owns 64 rows (4 warps × 16) of one (g, b, h) and walks the other side in tiles of
// 64, so nothing T×T is ever stored. The forward keeps only LSE. The backward recomputes
// P = exp(S − LSE) and runs as two deterministic kernels (no atomics): dQ over query tiles (it also
// computes DELTA = rowsum(dO∘O), which the dK/dV kernel reads), then dK, dV over key tiles.
// Scores are carried in log2 units (scale·log2 e folded in) so exponentials are exp2f.
//
// DropKey (MC Dropout), the *_dropkey_* entries: a score whose hash of (drop_seed, g, item, h,
// query, key) is below drop_threshold drops before the softmax. The item of batch row b is
// drop_items[b] (a prediction keys each image by its content, so an image draws its masks in any
// batch), or b itself where drop_items is null (a training step). The hashes are those of
// loren_tensor::ops::dropkey bit for bit, so the backward draws the forward's mask again. A row
// with every key dropped averages V and gets LSE = −inf, which tells the backward its scores have
// no gradient. G may then exceed the inputs' groups: each output group is a member with masks of
// its own.
#include "common.cuh"

namespace attn {
constexpr int TILE = 64, THREADS = 128;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Shared-memory row stride LD: +8 elements (16 bytes) keeps ldmatrix conflict-free. The dynamic
// shared memory of each kernel (bytes) is mirrored by launch/attention.rs.
template <int DH> struct Smem {
    static constexpr int LD = DH + 8;
    static constexpr int FWD = 3 * TILE * LD * 2;
    static constexpr int DQ = 4 * TILE * LD * 2 + TILE * 4;
    static constexpr int DKV = 4 * TILE * LD * 2 + 3 * TILE * 4;
};
template <int DH> __device__ __forceinline__ constexpr int ld() { return Smem<DH>::LD; }

struct Dims {
    // gb0: the launch's first sequence (g·B + b), as G·B may pass the 65535 of grid z.
    int B, T, H, gq, gk, gv, gb0;
    unsigned drop_threshold;
    unsigned long long drop_seed;
    const unsigned long long* drop_items;
};

// A dropped score in log2 units: exp2f of it minus any kept score's maximum is exactly 0.
constexpr float DROPPED = -1e30f;

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ unsigned hash32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

// DropKey::head_stream, DropKey::row and DropKey::dropped. Without DROP nothing drops, and the
// compiler removes the hashing: the plain entries are the kernels as they were without DropKey.
__device__ __forceinline__ unsigned drop_stream(const Dims& d, int g, int b, int h) {
    unsigned long long s = mix64(d.drop_seed ^ mix64((unsigned long long)g ^ 0x6D656D6265720000ull));
    const unsigned long long item = d.drop_items ? d.drop_items[b] : (unsigned long long)b;
    s = mix64(s ^ mix64(item ^ 0x6261746368000000ull));
    return (unsigned)mix64(s ^ mix64((unsigned long long)h ^ 0x6865616400000000ull));
}
__device__ __forceinline__ unsigned drop_row(unsigned stream, int i) {
    return hash32(stream ^ ((unsigned)i * 0x9E3779B9u));
}
template <bool DROP>
__device__ __forceinline__ bool dropped(const Dims& d, unsigned row, int j) {
    return DROP && hash32(row ^ (unsigned)j) < d.drop_threshold;
}
// Whether an LSE says every key of its row was dropped.
template <bool DROP>
__device__ __forceinline__ bool all_dropped(float lse) {
    return DROP && lse == -INF_F;
}

// Offset of (group g, batch b) in a [groups, B, T, D] tensor.
__device__ __forceinline__ size_t seq_offset(int g, int groups, int b, const Dims& d, int D) {
    return ((size_t)group_index(g, groups) * d.B + b) * d.T * D;
}

// Rows [row0, row0+64) of one head, [T, DH] with row stride D, into shared [64][DH+8]; rows past
// T are zero-filled (so masked keys and padded queries contribute exact zeros, never NaN).
template <int DH>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int D, int row0, int T) {
    constexpr int CH = DH / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < TILE * CH; c += THREADS) {
        const int r = c / CH, col = (c % CH) * 8;
        const bool ok = row0 + r < T;
        cp_async_16(dst + r * ld<DH>() + col, ok ? src + (size_t)(row0 + r) * D + col : src,
                    ok ? 16 : 0);
    }
}

// acc[16 × 8N] = Xrows·Yᵀ over DH: X = this warp's 16 rows of `xs`, Y = the first 8N rows of
// `ys` (both [rows][DH+8], DH contiguous). acc is N n-tiles of 8 columns.
template <int DH, int N>
__device__ __forceinline__ void rows_dot_rows(float (&acc)[N][4], const bf16* xs, const bf16* ys,
                                              int warp, int lane) {
    static_assert(N % 2 == 0, "n-tiles come in pairs, one ldmatrix_x4 each");
#pragma unroll
    for (int nt = 0; nt < N; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DH / 16; ++ks) {
        unsigned a[4];
        ldmatrix_x4(a, xs + (warp * 16 + lane % 16) * ld<DH>() + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < N / 2; ++np) {
            unsigned b[4];
            ldmatrix_x4(b, ys + (np * 16 + lane % 8 + (lane / 16) * 8) * ld<DH>() + ks * 16 +
                               ((lane / 8) % 2) * 8);
            mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
            mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// out[16 × DH] += P·Z: P = 16 × 8N in the mma accumulator layout (f32, rounded to bf16 here),
// Z = shared [8N][DH+8] whose rows are P's columns (ldmatrix.trans gives the B operand).
template <int DH, int N>
__device__ __forceinline__ void probs_times_rows(float out[DH / 8][4], const float (&p)[N][4],
                                                 const bf16* zs, int lane) {
    static_assert(N % 2 == 0, "a 16-wide k step takes two 8-column tiles");
#pragma unroll
    for (int kk = 0; kk < N / 2; ++kk) {
        // The accumulator layout of two 8-column tiles is the A layout of one 16-wide k step.
        const unsigned a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]),
                               pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                               pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < DH / 16; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(b, zs + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * ld<DH>() +
                                     dp * 16 + (lane / 16) * 8);
            mma_bf16_16816(out[2 * dp], a, b[0], b[1]);
            mma_bf16_16816(out[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

template <int N>
__device__ __forceinline__ void zero(float a[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Forward. grid (ceil(T/64), H, sequences from gb0), block 128, dynamic smem Smem<DH>::FWD.
// ---------------------------------------------------------------------------------------------
template <int DH, bool DROP>
__device__ void forward(const bf16* Q, const bf16* K, const bf16* V, bf16* O, float* LSE, Dims d,
                        float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* Ks = Qs + TILE * ld<DH>();
    bf16* Vs = Ks + TILE * ld<DH>();
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int q0 = blockIdx.x * TILE, h = blockIdx.y, gb = d.gb0 + blockIdx.z;
    const int g = gb / d.B, b = gb % d.B, D = d.H * DH;
    const bf16* q = Q + seq_offset(g, d.gq, b, d, D) + h * DH;
    const bf16* k = K + seq_offset(g, d.gk, b, d, D) + h * DH;
    const bf16* v = V + seq_offset(g, d.gv, b, d, D) + h * DH;
    const float sl2 = scale * LOG2E;
    const unsigned stream = drop_stream(d, g, b, h);
    unsigned row_hash[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) row_hash[hr] = drop_row(stream, q0 + warp * 16 + lane / 4 + hr * 8);

    load_tile<DH>(Qs, q, D, q0, d.T);
    cp_async_commit();

    float o[DH / 8][4];
    zero<DH / 8>(o);
    float m_run[2] = {-INF_F, -INF_F}, l_run[2] = {0.0f, 0.0f};
    for (int k0 = 0; k0 < d.T; k0 += TILE) {
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_tile<DH>(Ks, k, D, k0, d.T);
        cp_async_commit();
        load_tile<DH>(Vs, v, D, k0, d.T);
        cp_async_commit();
        cp_async_wait<1>();  // Q and K have landed; V may still be in flight
        __syncthreads();

        float s[8][4];
        rows_dot_rows<DH>(s, Qs, Ks, warp, lane);
        // Thread holds rows lane/4 (elements 0,1) and lane/4+8 (2,3), columns 2(lane%4)+{0,1}.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = -INF_F;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = k0 + nt * 8 + (lane % 4) * 2 + e;
                    float& x = s[nt][2 * hr + e];
                    x = key >= d.T                        ? -INF_F
                        : dropped<DROP>(d, row_hash[hr], key) ? DROPPED
                                                        : x * sl2;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            // Each tile has a valid key, so mx is finite; exp2f(-inf) = 0 on the first tile.
            const float m_new = fmaxf(m_run[hr], mx);
            const float alpha = exp2f(m_run[hr] - m_new);
            m_run[hr] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[nt][2 * hr + e];
                    x = exp2f(x - m_new);
                    sum += x;
                }
            // l_run is this thread's partial row sum; the quad's partials are added at the end.
            l_run[hr] = l_run[hr] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DH / 8; ++dt) {
                o[dt][2 * hr] *= alpha;
                o[dt][2 * hr + 1] *= alpha;
            }
        }
        cp_async_wait<0>();
        __syncthreads();
        probs_times_rows<DH>(o, s, Vs, lane);
    }

    bf16* out = O + ((size_t)gb * d.T) * D + h * DH;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float l = l_run[hr];
        l += __shfl_xor_sync(FULL_MASK, l, 1);
        l += __shfl_xor_sync(FULL_MASK, l, 2);
        const int row = q0 + warp * 16 + lane / 4 + hr * 8;
        if (row >= d.T) continue;
        const float inv = 1.0f / l;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt)
            *reinterpret_cast<bf162*>(out + (size_t)row * D + dt * 8 + (lane % 4) * 2) =
                __floats2bfloat162_rn(o[dt][2 * hr] * inv, o[dt][2 * hr + 1] * inv);
        // Every key dropped: the row averaged V (each weight exp2f(0) = 1, over l = T).
        const float lse = DROP && m_run[hr] == DROPPED ? -INF_F : (m_run[hr] + log2f(l)) * LN2;
        if (lane % 4 == 0) LSE[((size_t)gb * d.H + h) * d.T + row] = lse;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dQ (and DELTA). grid (ceil(T/64), H, sequences from gb0), block 128, dynamic smem Smem<DH>::DQ.
//   DELTA_i = Σ_d dO_id·O_id;  dS = P∘(dO·Vᵀ − DELTA);  dQ = scale·dS·K
// ---------------------------------------------------------------------------------------------
template <int DH, bool DROP>
__device__ void backward_dq(const bf16* dO, const bf16* Q, const bf16* K, const bf16* V,
                            const bf16* O, const float* LSE, float* DELTA, bf16* dQ, Dims d,
                            float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* dOs = Qs + TILE * ld<DH>();
    bf16* Ks = dOs + TILE * ld<DH>();
    bf16* Vs = Ks + TILE * ld<DH>();
    float* delta_s = reinterpret_cast<float*>(Vs + TILE * ld<DH>());
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int q0 = blockIdx.x * TILE, h = blockIdx.y, gb = d.gb0 + blockIdx.z;
    const int g = gb / d.B, b = gb % d.B, D = d.H * DH;
    const bf16* q = Q + seq_offset(g, d.gq, b, d, D) + h * DH;
    const bf16* k = K + seq_offset(g, d.gk, b, d, D) + h * DH;
    const bf16* v = V + seq_offset(g, d.gv, b, d, D) + h * DH;
    const size_t own = (size_t)gb * d.T * D + h * DH;  // this (g, b, h) in O, dO, dQ
    const size_t stat = ((size_t)gb * d.H + h) * d.T;  // ... and in LSE, DELTA
    const float sl2 = scale * LOG2E;

    load_tile<DH>(Qs, q, D, q0, d.T);
    load_tile<DH>(dOs, dO + own, D, q0, d.T);
    cp_async_commit();

    // DELTA for this warp's 16 rows, straight from global memory.
    for (int i = 0; i < 16; ++i) {
        const int r = warp * 16 + i, row = q0 + r;
        float acc = 0.0f;
        if (row < d.T)
            for (int c = lane; c < DH; c += WARP)
                acc += to_f32(dO[own + (size_t)row * D + c]) * to_f32(O[own + (size_t)row * D + c]);
        acc = warp_sum(acc);
        if (lane == 0) {
            delta_s[r] = acc;
            if (row < d.T) DELTA[stat + row] = acc;
        }
    }
    float lse2[2], delta[2];
    unsigned row_hash[2];
    const unsigned stream = drop_stream(d, g, b, h);
    __syncwarp();
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = warp * 16 + lane / 4 + hr * 8, row = q0 + r;
        lse2[hr] = row < d.T ? LSE[stat + row] * LOG2E : 0.0f;
        delta[hr] = delta_s[r];
        row_hash[hr] = drop_row(stream, row);
    }

    float dq[DH / 8][4];
    zero<DH / 8>(dq);
    for (int k0 = 0; k0 < d.T; k0 += TILE) {
        __syncthreads();
        load_tile<DH>(Ks, k, D, k0, d.T);
        load_tile<DH>(Vs, v, D, k0, d.T);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float p[8][4], dp[8][4];
        rows_dot_rows<DH>(p, Qs, Ks, warp, lane);
        rows_dot_rows<DH>(dp, dOs, Vs, warp, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + (lane % 4) * 2 + (e & 1);
                // A dropped score, or any score of a row with every key dropped, is a constant.
                const bool live = key < d.T && !all_dropped<DROP>(lse2[e / 2]) &&
                                  !dropped<DROP>(d, row_hash[e / 2], key);
                const float pr = live ? exp2f(p[nt][e] * sl2 - lse2[e / 2]) : 0.0f;
                p[nt][e] = pr * (dp[nt][e] - delta[e / 2]);  // dS, reusing p
            }
        probs_times_rows<DH>(dq, p, Ks, lane);
    }

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int row = q0 + warp * 16 + lane / 4 + hr * 8;
        if (row >= d.T) continue;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt)
            *reinterpret_cast<bf162*>(dQ + own + (size_t)row * D + dt * 8 + (lane % 4) * 2) =
                __floats2bfloat162_rn(dq[dt][2 * hr] * scale, dq[dt][2 * hr + 1] * scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dK and dV. grid (ceil(T/64) key tiles, H, sequences from gb0), block 128, dynamic smem
// Smem<DH>::DKV. Each warp owns 16 keys and works with transposed scores:
//   Pᵀ = exp(K·Qᵀ − LSE),  dV = Pᵀ·dO,  dSᵀ = Pᵀ∘(V·dOᵀ − DELTA),  dK = scale·dSᵀ·Q
// ---------------------------------------------------------------------------------------------
template <int DH, bool DROP>
__device__ void backward_dkv(const bf16* dO, const bf16* Q, const bf16* K, const bf16* V,
                             const float* LSE, const float* DELTA, bf16* dK, bf16* dV, Dims d,
                             float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
    bf16* Vs = Ks + TILE * ld<DH>();
    bf16* Qs = Vs + TILE * ld<DH>();
    bf16* dOs = Qs + TILE * ld<DH>();
    float* lse_s = reinterpret_cast<float*>(dOs + TILE * ld<DH>());
    float* delta_s = lse_s + TILE;
    unsigned* row_hash_s = reinterpret_cast<unsigned*>(delta_s + TILE);  // per query
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int k0 = blockIdx.x * TILE, h = blockIdx.y, gb = d.gb0 + blockIdx.z;
    const int g = gb / d.B, b = gb % d.B, D = d.H * DH;
    const bf16* q = Q + seq_offset(g, d.gq, b, d, D) + h * DH;
    const bf16* k = K + seq_offset(g, d.gk, b, d, D) + h * DH;
    const bf16* v = V + seq_offset(g, d.gv, b, d, D) + h * DH;
    const size_t own = (size_t)gb * d.T * D + h * DH;
    const size_t stat = ((size_t)gb * d.H + h) * d.T;
    const float sl2 = scale * LOG2E;
    const unsigned stream = drop_stream(d, g, b, h);
    // Out of the loop: IEEE division calls a slow-path routine whose call saves registers.
    const float uniform = 1.0f / d.T;

    load_tile<DH>(Ks, k, D, k0, d.T);
    load_tile<DH>(Vs, v, D, k0, d.T);
    cp_async_commit();

    // At DH = 128, dK and dV hold 128 accumulator registers; Pᵀ and dPᵀ over all 64 queries
    // would take 64 more and spill. The query tile then goes in two parts of 32, 32 registers
    // each, one after the other: unrolled, ptxas overlaps them and takes every register again
    // (255, at the edge of a spill; 236 to 250 rolled). Each accumulator still takes its mma k
    // steps in query order, so the sums are those of one pass, bit for bit.
    constexpr int PARTS = DH >= 128 ? 2 : 1, NQ = TILE / 8 / PARTS;  // n-tiles of 8 per part
    float dk[DH / 8][4], dv[DH / 8][4];
    zero<DH / 8>(dk);
    zero<DH / 8>(dv);
    for (int q0 = 0; q0 < d.T; q0 += TILE) {
        __syncthreads();
        load_tile<DH>(Qs, q, D, q0, d.T);
        load_tile<DH>(dOs, dO + own, D, q0, d.T);
        cp_async_commit();
        if (threadIdx.x < TILE) {
            const int row = q0 + threadIdx.x;
            lse_s[threadIdx.x] = row < d.T ? LSE[stat + row] * LOG2E : 0.0f;
            delta_s[threadIdx.x] = row < d.T ? DELTA[stat + row] : 0.0f;
            if (DROP) row_hash_s[threadIdx.x] = drop_row(stream, row);
        }
        cp_async_wait<0>();
        __syncthreads();

#pragma unroll 1
        for (int part = 0; part < PARTS; ++part) {
            const int c0 = part * TILE / PARTS;  // this part's first query in the tile
            const bf16 *Qp = Qs + c0 * ld<DH>(), *dOp = dOs + c0 * ld<DH>();
            float p[NQ][4], dp[NQ][4];
            rows_dot_rows<DH>(p, Ks, Qp, warp, lane);   // Sᵀ: rows = keys, columns = queries
            rows_dot_rows<DH>(dp, Vs, dOp, warp, lane);  // dPᵀ
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = c0 + nt * 8 + (lane % 4) * 2 + (e & 1);
                    const int key = k0 + warp * 16 + lane / 4 + (e / 2) * 8;
                    const bool query = q0 + c < d.T, none = all_dropped<DROP>(lse_s[c]);
                    // Short-circuited so the plain kernel never reads row_hash_s, which it
                    // leaves unset.
                    const bool live =
                        query && !none && !(DROP && dropped<DROP>(d, row_hash_s[c], key));
                    // A row with every key dropped weighs each alike, and none has a gradient.
                    const float pr = live           ? exp2f(p[nt][e] * sl2 - lse_s[c])
                                     : query && none ? uniform
                                                     : 0.0f;
                    p[nt][e] = pr;
                    dp[nt][e] = DROP && !live ? 0.0f : pr * (dp[nt][e] - delta_s[c]);  // dSᵀ
                }
            probs_times_rows<DH>(dv, p, dOp, lane);
            probs_times_rows<DH>(dk, dp, Qp, lane);
        }
    }

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int row = k0 + warp * 16 + lane / 4 + hr * 8;
        if (row >= d.T) continue;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt) {
            const size_t at = own + (size_t)row * D + dt * 8 + (lane % 4) * 2;
            *reinterpret_cast<bf162*>(dK + at) =
                __floats2bfloat162_rn(dk[dt][2 * hr] * scale, dk[dt][2 * hr + 1] * scale);
            *reinterpret_cast<bf162*>(dV + at) = __floats2bfloat162_rn(dv[dt][2 * hr], dv[dt][2 * hr + 1]);
        }
    }
}
}  // namespace attn

// NAME##_d##DH takes the plain arguments; with DROP, DropKey's threshold, seed and item keys follow.
#define ATTENTION_ENTRY_SET(DH, DROP, SUFFIX, EXTRA_PARAMS, EXTRA_DIMS)                             \
    extern "C" __global__ void __launch_bounds__(attn::THREADS)                                   \
        attention_fwd##SUFFIX##_d##DH(const bf16* Q, const bf16* K, const bf16* V, bf16* O,       \
                                      float* LSE, int B, int T, int H, int gq, int gk, int gv,    \
                                      int gb0, float scale EXTRA_PARAMS) {                        \
        attn::forward<DH, DROP>(Q, K, V, O, LSE,                                                  \
                                attn::Dims{B, T, H, gq, gk, gv, gb0 EXTRA_DIMS}, scale);          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(attn::THREADS)                                   \
        attention_bwd_dq##SUFFIX##_d##DH(const bf16* dO, const bf16* Q, const bf16* K,            \
                                         const bf16* V, const bf16* O, const float* LSE,          \
                                         float* DELTA, bf16* dQ, int B, int T, int H, int gq,     \
                                         int gk, int gv, int gb0, float scale EXTRA_PARAMS) {     \
        attn::backward_dq<DH, DROP>(dO, Q, K, V, O, LSE, DELTA, dQ,                               \
                                    attn::Dims{B, T, H, gq, gk, gv, gb0 EXTRA_DIMS}, scale);      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(attn::THREADS)                                   \
        attention_bwd_dkv##SUFFIX##_d##DH(const bf16* dO, const bf16* Q, const bf16* K,           \
                                          const bf16* V, const float* LSE, const float* DELTA,    \
                                          bf16* dK, bf16* dV, int B, int T, int H, int gq,        \
                                          int gk, int gv, int gb0, float scale EXTRA_PARAMS) {    \
        attn::backward_dkv<DH, DROP>(dO, Q, K, V, LSE, DELTA, dK, dV,                             \
                                     attn::Dims{B, T, H, gq, gk, gv, gb0 EXTRA_DIMS}, scale);     \
    }

#define ATTN_COMMA ,
#define ATTENTION_ENTRIES(DH)                                                                     \
    ATTENTION_ENTRY_SET(DH, false, , , ATTN_COMMA 0u ATTN_COMMA 0ull ATTN_COMMA nullptr)          \
    ATTENTION_ENTRY_SET(DH, true, _dropkey,                                                       \
                        ATTN_COMMA unsigned drop_threshold ATTN_COMMA unsigned long long drop_seed \
                            ATTN_COMMA const unsigned long long* drop_items,                      \
                        ATTN_COMMA drop_threshold ATTN_COMMA drop_seed ATTN_COMMA drop_items)

ATTENTION_ENTRIES(16)
ATTENTION_ENTRIES(32)
ATTENTION_ENTRIES(64)
ATTENTION_ENTRIES(128)

static_assert(attn::Smem<128>::FWD == 52224, "launch/attention.rs mirrors these sizes");
static_assert(attn::Smem<128>::DQ == 69888, "launch/attention.rs mirrors these sizes");
static_assert(attn::Smem<128>::DKV == 70400, "launch/attention.rs mirrors these sizes");
