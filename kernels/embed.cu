// The ViT's input and output ends (CPU twin: loren-tensor ops/embed.rs).
//
//   patchify       images [B, C, H, W] f32 (or bf16: patchify_bf16) -> patches [1, B, P, C·p·p]
//                  bf16, features (c, i, j)
//   embed_tokens   x[g,b,0] = cls[g] + pos[g,0];  x[g,b,1+p] = pe[g,b,p] + pos[g,1+p]
//                  pe [ge, B, P, D] bf16, cls [gc, D] f32, pos [gp, T, D] f32 -> x [G, B, T, D] bf16
//   class_token    x [G, B, T, D] -> y [G, B, D] (token 0), and back (zeros elsewhere)
//
// dcls and dpos are row sums of dx (elementwise.cu sum_rows_partial_bf16 with row stride T·D).
// Every kernel: one thread per output element, grid-stride, block 256.
#include "common.cuh"

#define GRID_STRIDE(i, total)                                                                 \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (total);               \
         i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ bf16 as_bf16(float v) { return to_bf16(v); }
__device__ __forceinline__ bf16 as_bf16(bf16 v) { return v; }

template <typename T>
__device__ void patchify_impl(const T* images, bf16* out, int B, int C, int H, int W, int p) {
    const int gw = W / p, patches = (H / p) * gw, feat = C * p * p;
    GRID_STRIDE(i, (size_t)B * patches * feat) {
        const int f = (int)(i % feat);
        const size_t bp = i / feat;
        const int patch = (int)(bp % patches), b = (int)(bp / patches);
        const int py = patch / gw, px = patch % gw;
        const int ch = f / (p * p), ii = (f / p) % p, jj = f % p;
        out[i] = as_bf16(images[(((size_t)b * C + ch) * H + py * p + ii) * W + px * p + jj]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    patchify(const float* images, bf16* out, int B, int C, int H, int W, int p) {
    patchify_impl(images, out, B, C, H, W, p);
}

// Images rounded to bf16 on the host, as a GPU batch is staged: the patches round to bf16 anyway,
// so the copy up is half the bytes and the patches the same bits.
extern "C" __global__ void __launch_bounds__(256)
    patchify_bf16(const bf16* images, bf16* out, int B, int C, int H, int W, int p) {
    patchify_impl(images, out, B, C, H, W, p);
}

extern "C" __global__ void __launch_bounds__(256)
    embed_tokens_fwd(const bf16* pe, const float* cls, const float* pos, bf16* x, int ge, int gc,
                     int gp, int G, int B, int P, int D) {
    const int T = P + 1;
    GRID_STRIDE(i, (size_t)G * B * T * D) {
        const int c = (int)(i % D);
        const size_t r = i / D;
        const int t = (int)(r % T);
        const size_t gb = r / T;
        const int b = (int)(gb % B), g = (int)(gb / B);
        const float pv = pos[((size_t)group_index(g, gp) * T + t) * D + c];
        const float v = t == 0 ? cls[(size_t)group_index(g, gc) * D + c]
                               : to_f32(pe[(((size_t)group_index(g, ge) * B + b) * P + t - 1) * D + c]);
        x[i] = to_bf16(v + pv);
    }
}

// dpe[e, b, p] = Σ_g dx[g, b, 1+p] over the output groups g reading pe group e.
extern "C" __global__ void __launch_bounds__(256)
    embed_tokens_bwd_patches(const bf16* dx, bf16* dpe, int ge, int G, int B, int P, int D) {
    const int T = P + 1;
    GRID_STRIDE(i, (size_t)ge * B * P * D) {
        const int c = (int)(i % D);
        const size_t r = i / D;
        const int p = (int)(r % P);
        const size_t eb = r / P;
        const int b = (int)(eb % B), e = (int)(eb / B);
        const int g_begin = ge == G ? e : 0, g_end = ge == G ? e + 1 : G;
        float acc = 0.0f;
        for (int g = g_begin; g < g_end; ++g)
            acc += to_f32(dx[(((size_t)g * B + b) * T + 1 + p) * D + c]);
        dpe[i] = to_bf16(acc);
    }
}

// y[gb, c] = x[gb, 0, c] over the G·B sequences.
extern "C" __global__ void __launch_bounds__(256)
    class_token_fwd(const bf16* x, bf16* y, int GB, int T, int D) {
    GRID_STRIDE(i, (size_t)GB * D) {
        y[i] = x[(i / D) * T * D + i % D];
    }
}

// dx[gb, t, c] = t == 0 ? dy[gb, c] : 0 (every element written).
extern "C" __global__ void __launch_bounds__(256)
    class_token_bwd(const bf16* dy, bf16* dx, int GB, int T, int D) {
    GRID_STRIDE(i, (size_t)GB * T * D) {
        const int c = (int)(i % D);
        const size_t r = i / D;
        const int t = (int)(r % T);
        dx[i] = t == 0 ? dy[(r / T) * D + c] : to_bf16(0.0f);
    }
}
