// Softmax cross-entropy over the ensemble's logits (CPU twin: loren-tensor ops/loss.rs).
//
//   logits [M, B, C] f32, targets [B] u32 shared by the members
//   losses [M·B] f32 (per row), dlogits [M, B, C] f32 = (softmax − onehot)/(M·B), in one pass
//   loss [1] f32 = mean of the row losses, summed in f64 in a fixed order (deterministic)
//
// expf is the precise version. Each row's sum of exponentials is in f64, as its CPU twin's is, and
// its loss is (max − z[y]) + ln(sum): max + ln(sum) first would lose ln(sum) to the rounding of
// logits of 1e4 and more. A target >= C cannot be reported from the device, so its
// row's loss and gradient are NaN (training stops on a NaN loss); the host checks targets first.
#include "common.cuh"

// One warp per row. grid ceil(M·B / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    softmax_xent_rows(const float* logits, const unsigned* targets, float* losses,
                      float* dlogits, int rows, int B, int C, float inv) {
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * C;
    float* g = dlogits + (size_t)row * C;
    const unsigned y = targets[row % B];
    if (y >= (unsigned)C) {
        for (int c = lane; c < C; c += WARP) g[c] = __int_as_float(0x7fc00000);
        if (lane == 0) losses[row] = __int_as_float(0x7fc00000);
        return;
    }
    float mx = -INF_F;
    for (int c = lane; c < C; c += WARP) mx = fmaxf(mx, z[c]);
    mx = warp_max(mx);
    double sum = 0.0;
    for (int c = lane; c < C; c += WARP) sum += (double)expf(z[c] - mx);
    sum = warp_sum_f64(sum);
    const float s = (float)sum;
    for (int c = lane; c < C; c += WARP) {
        const float p = expf(z[c] - mx) / s;
        g[c] = p * inv - (c == (int)y ? inv : 0.0f);
    }
    if (lane == 0) losses[row] = (mx - z[y]) + (float)log(sum);
}

// loss[0] = Σ losses / rows, in f64. One block of 256 threads: thread t sums rows t, t+256, ...
// in order, then the 256 partials are added in a fixed tree. grid 1, block 256.
extern "C" __global__ void __launch_bounds__(256)
    softmax_xent_mean(const float* losses, float* loss, int rows) {
    __shared__ double part[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) s += (double)losses[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (float)(part[0] / rows);
}

// probs = softmax(logits) over the last axis. One warp per row. grid ceil(rows / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    softmax_rows(const float* logits, float* probs, int rows, int C) {
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * C;
    float mx = -INF_F;
    for (int c = lane; c < C; c += WARP) mx = fmaxf(mx, z[c]);
    mx = warp_max(mx);
    double sum = 0.0;
    for (int c = lane; c < C; c += WARP) sum += (double)expf(z[c] - mx);
    const float s = (float)warp_sum_f64(sum);
    for (int c = lane; c < C; c += WARP) probs[(size_t)row * C + c] = expf(z[c] - mx) / s;
}
