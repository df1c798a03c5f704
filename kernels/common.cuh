// Helpers shared by every kernel file: bf16 conversions, warp reductions, and the sm_80 tensor-core
// primitives (mma.sync m16n8k16, ldmatrix, cp.async) as inline PTX.
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

// Store an f32 value as T (f32 or bf16, rounding to nearest even).
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return to_bf16(x); }

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

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Sum of one float per thread over the block, in a fixed order (deterministic). `scratch` holds
// one float per warp. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int warps = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < warps; ++i) t += scratch[i];
    return t;
}

__device__ __forceinline__ int group_index(int g, int groups) { return groups == 1 ? 0 : g; }
