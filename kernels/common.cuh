// Helpers shared by every kernel file: bf16 conversions, warp reductions, the sm_80 tensor-core
// primitives (mma.sync m16n8k16, ldmatrix, cp.async) as inline PTX, and, when compiling for
// sm_90a (Hopper's arch-specific target), the wgmma primitives.
//
// loren-kernels hands this file to NVRTC as the in-memory header "common.cuh"; the .cu files
// include it and nothing else but cuda_bf16.h.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;
typedef unsigned long long u64;

#define WARP 32
#define FULL_MASK 0xffffffffu
#define INF_F __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Two bf16 packed into one 32-bit register: `lo` in bits 0..15 (the lower k or column index),
// which is the operand order mma.sync expects.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    bf162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// D = A·B + D for one 16x8x16 tile. A: 16x16 row-major fragment (4 regs), B: 16x8 "col"
// fragment (2 regs), D: 16x8 f32 (4 regs). Fragment layouts (lane l, g = l/4, q = l%4):
//   a0 = A[g][2q..2q+1]   a1 = A[g+8][2q..]   a2 = A[g][2q+8..]   a3 = A[g+8][2q+8..]
//   b0 = B[2q..2q+1][g]   b1 = B[2q+8..][g]
//   d0,d1 = D[g][2q..2q+1]   d2,d3 = D[g+8][2q..2q+1]
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4],
                                                      unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
// Register i of lane l holds row l/4, columns 2(l%4)..2(l%4)+1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// As ldmatrix_x4, transposed: register i of lane l holds rows 2(l%4)..2(l%4)+1, column l/4.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 16-byte asynchronous global->shared copy that bypasses L1. `src_bytes` < 16 zero-fills the
// rest (0 reads nothing: the out-of-bounds case; `src` must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

// The "memory" clobber keeps the compiler from moving this thread's shared-memory reads of the
// landed data above the wait (the barriers after each wait do too, but this holds without them).
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ int group_index(int g, int groups) { return groups == 1 ? 0 : g; }

// ---- Eight elements per access --------------------------------------------------------------------
//
// The memory-bound kernels (elementwise, bias + GELU, LayerNorm) move V consecutive elements per
// thread access: V = 8 is one 16-byte load or store for bf16 and two for f32, which is what lets
// them run at memory speed; V = 1 is the scalar path for widths that are not a multiple of 8 or
// pointers not 16-byte aligned. The launchers choose (their `vec` argument), so every kernel has
// both paths and the arithmetic is the same in each.
constexpr int VEC = 8;

// Run `body<VEC>` or `body<1>` as the launcher chose (its `vec` argument).
#define DISPATCH_VEC(vec, body, ...) \
    do {                             \
        if (vec)                     \
            body<VEC>(__VA_ARGS__);  \
        else                         \
            body<1>(__VA_ARGS__);    \
    } while (0)

template <int V> __device__ __forceinline__ void load_vec(const bf16* p, float (&v)[V]) {
    if constexpr (V == 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const bf162* h = reinterpret_cast<const bf162*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(h[i]);
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = to_f32(p[i]);
    }
}

template <int V> __device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {
    if constexpr (V == 8) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = p[i];
    }
}

template <int V> __device__ __forceinline__ void store_vec(bf16* p, const float (&v)[V]) {
    if constexpr (V == 8) {
        uint4 u;
        bf162* h = reinterpret_cast<bf162*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        *reinterpret_cast<uint4*>(p) = u;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = to_bf16(v[i]);
    }
}

template <int V> __device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
    if constexpr (V == 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = v[i];
    }
}

// The first stage's store of a column sum over a strip of 32·V columns (the bias-gradient,
// LayerNorm-parameter and bias + GELU partials): each warp's `acc` (lane l holds strip columns
// V·l .. V·l + V − 1, summed over that warp's rows) goes to `red`, then one thread per column adds
// the warps in order and writes out[col] for the `cols` strip columns that exist. Every thread of
// the block must call it. There is no barrier before the stores into `red`, so two calls in one
// kernel need two buffers (a slow thread may still be reading the first sums).
template <int V>
__device__ __forceinline__ void strip_sums(const float (&acc)[V], float (*red)[WARP * VEC], int cols, float* out) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
#pragma unroll
    for (int i = 0; i < V; ++i) red[warp][lane * V + i] = acc[i];
    __syncthreads();
    const int col = threadIdx.x;
    if (col < WARP * V && col < cols) {
        float t = 0.0f;
        for (int i = 0; i < warps; ++i) t += red[i][col];
        out[col] = t;
    }
}

// ---- Hopper: wgmma on shared-memory operands (sm_90a only) ----------------------------------
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) issues wgmma together; it reads
// both operands from shared memory through 64-bit matrix descriptors and accumulates in
// registers, asynchronously, until wgmma_wait. The tiles here are K-major rows of 64 bf16 (128
// bytes) in the 128-byte swizzle: 16-byte chunk c of row r sits at chunk c ^ (r % 8) of that row.
// The hardware applies the swizzle to address bits 4-6 from bits 7-9, so a tile must start on a
// 1024-byte boundary (align_1024).
#ifdef __CUDA_ARCH_FEAT_SM90_ALL

// p rounded up to the next 1024-byte boundary of the shared address space.
__device__ __forceinline__ unsigned char* align_1024(unsigned char* p) {
    return p + ((1024u - (smem_addr(p) & 1023u)) & 1023u);
}

// The descriptor of a 128-byte-swizzled tile starting at `tile` (1024-byte aligned): start
// address >> 4 in bits 0-13; leading byte offset >> 4 in bits 16-29; stride byte offset >> 4 in
// bits 32-45; swizzle mode 1 (128 bytes) in bits 62-63. K-major: the stride byte offset 1024
// steps from one 8-row group to the next, the leading one is unused (16, "assumed 1"); adding 2
// advances one K step of 16 (32 bytes). MN-major: `lbo` steps from one 64-column half to the
// next, the stride byte offset 1024 from one 8-row K group to the next.
__device__ __forceinline__ u64 sw128_desc(const void* tile, unsigned lbo = 16) {
    return (u64)((smem_addr(tile) & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) |
           ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

// Make this thread's ordinary shared-memory writes (stores, cp.async) visible to the async proxy
// that wgmma reads through; then a barrier makes every thread's visible.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Orders register and shared-memory accesses before the wgmma that follow it.
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Wait until at most N committed wgmma groups are still running.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins the accumulators at this point of the program: the compiler may not move their reads or
// writes across it, and so not across the wgmma_fence/wgmma_wait it stands beside.
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64x128] (+)= A[64x16]·B[16x128] for one warpgroup, both operands in shared memory behind
// descriptors: A K-major; B K-major, or MN-major (its 128 columns contiguous) with B_MN.
// `scale_d` 0 overwrites D, 1 accumulates. Asynchronous: D is neither read nor written by other
// code until wgmma_wait says its group is done.
template <bool B_MN = false>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 desc_a, u64 desc_b,
                                                 int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(B_MN ? 1 : 0));
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
