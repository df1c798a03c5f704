// Multi-tensor optimizer steps over every trainable tensor in one launch (CPU twin:
// loren-tensor ops/optim.rs), and the global gradient norm for clipping.
//
// The tensors are described by a device array of TensorSlot (mirrored by launch/optim.rs as a
// #[repr(C)] struct). Block b works on CHUNK elements of the slot whose [block_start,
// block_start + ceil(numel / CHUNK)) range holds b; slots are sorted by block_start. The table is
// built once and stays on the device: a step uploads nothing, the hyper-parameters are arguments.
#include "common.cuh"

struct TensorSlot {
    float* param;       // f32 master weights
    float* grad;        // f32 gradient
    float* m;           // Adam's first moment / SGD's momentum buffer
    float* v;           // Adam's second moment (null for SGD)
    bf16* param_bf16;   // optional bf16 copy of the updated parameter for the GEMMs (null: none)
    u64 numel;
    unsigned block_start;
    unsigned decay;     // 1: weight decay applies
};

namespace optim {
constexpr int THREADS = 256;
constexpr int CHUNK = 4096;  // elements per block (launch/optim.rs uses the same)

// Whether a device value (nullable: absent) lets the step update: it is finite. The comparison
// is false for NaN as for ±inf.
__device__ __forceinline__ bool finite_or_null(const float* x) {
    return x == nullptr || fabsf(*x) <= 3.402823466e38f;
}

// Whether the step may update. The guard (the step's loss) and the clipping factor (clip_coef's,
// NaN where the gradients' norm is not finite) are read on the device, so that a step whose loss
// or gradients hold a NaN or an infinity leaves every parameter and moment as it was, with nothing
// read back in the middle of the step to find out.
__device__ __forceinline__ bool step_open(const float* guard, const float* grad_scale) {
    return finite_or_null(guard) && finite_or_null(grad_scale);
}

// The slot that block `b` belongs to (binary search over block_start).
__device__ __forceinline__ int find_slot(const TensorSlot* slots, int n, unsigned b) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (slots[mid].block_start <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// This block's element range [begin, end) within its slot.
__device__ __forceinline__ void block_range(const TensorSlot& s, unsigned b, u64* begin, u64* end) {
    *begin = (u64)(b - s.block_start) * CHUNK;
    *end = min(s.numel, *begin + CHUNK);
}
}  // namespace optim

// PyTorch AdamW: p ← p·(1 − lr·wd·decay) − step_size·m / (sqrt(v)/sqrt_c2 + eps), with
// step_size = lr / (1 − β1^t) and sqrt_c2 = sqrt(1 − β2^t) computed on the host in f64, exactly
// as the CPU does. `grad_scale` (device, nullable) multiplies every gradient: the clipping
// coefficient from clip_coef, applied without a separate pass. Nothing changes unless `guard` and
// `grad_scale` are finite (optim::step_open). grid = total blocks, block 256.
extern "C" __global__ void __launch_bounds__(256)
    adamw_multi(const TensorSlot* slots, int nslots, const float* grad_scale, const float* guard,
                float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                float sqrt_c2) {
    if (!optim::step_open(guard, grad_scale)) return;
    const TensorSlot s = slots[optim::find_slot(slots, nslots, blockIdx.x)];
    u64 begin, end;
    optim::block_range(s, blockIdx.x, &begin, &end);
    const float gs = grad_scale ? *grad_scale : 1.0f;
    const float shrink = s.decay ? 1.0f - lr * weight_decay : 1.0f;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float g = s.grad[i] * gs;
        const float m = beta1 * s.m[i] + (1.0f - beta1) * g;
        const float v = beta2 * s.v[i] + (1.0f - beta2) * g * g;
        s.m[i] = m;
        s.v[i] = v;
        const float denom = sqrtf(v) / sqrt_c2 + eps;
        const float p = s.param[i] * shrink - step_size * m / denom;
        s.param[i] = p;
        if (s.param_bf16) s.param_bf16[i] = to_bf16(p);
    }
}

// PyTorch SGD with momentum (no dampening, no Nesterov) and L2 decay:
// d = g + wd·p·decay;  buf = μ·buf + d;  p -= lr·buf. Guarded as adamw_multi. grid = total
// blocks, block 256.
extern "C" __global__ void __launch_bounds__(256)
    sgd_multi(const TensorSlot* slots, int nslots, const float* grad_scale, const float* guard,
              float lr, float momentum, float weight_decay) {
    if (!optim::step_open(guard, grad_scale)) return;
    const TensorSlot s = slots[optim::find_slot(slots, nslots, blockIdx.x)];
    u64 begin, end;
    optim::block_range(s, blockIdx.x, &begin, &end);
    const float gs = grad_scale ? *grad_scale : 1.0f;
    const float wd = s.decay ? weight_decay : 0.0f;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float d = s.grad[i] * gs + wd * s.param[i];
        const float buf = momentum * s.m[i] + d;
        s.m[i] = buf;
        const float p = s.param[i] - lr * buf;
        s.param[i] = p;
        if (s.param_bf16) s.param_bf16[i] = to_bf16(p);
    }
}

// partials[b] = Σ grad² over block b's chunk, in f64 (then elementwise.cu sumsq_finish adds the
// partials in order). grid = total blocks, block 256.
extern "C" __global__ void __launch_bounds__(256)
    grad_sumsq_multi(const TensorSlot* slots, int nslots, double* partials) {
    __shared__ double red[optim::THREADS];
    const TensorSlot s = slots[optim::find_slot(slots, nslots, blockIdx.x)];
    u64 begin, end;
    optim::block_range(s, blockIdx.x, &begin, &end);
    double acc = 0.0;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const double g = s.grad[i];
        acc += g * g;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = optim::THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

// torch.nn.utils.clip_grad_norm_: coef = max_norm / (‖g‖ + 1e-6), used only when below 1.
// Writes coef[0] = min(that, 1) and, when norm is not null, norm[0] = ‖g‖. Where ‖g‖ is not
// finite (a gradient holds a NaN or an infinity) coef[0] is NaN, which the update kernels and
// grad_scale_multi take as "change nothing": torch's rule would scale by 1 (NaN norm) or 0 (inf·0
// = NaN) and write NaN into every parameter and moment. Such a step adds 1 to skipped[0] (nullable)
// when its guard (nullable, the step's loss) is finite: a step the loss already stops is not the
// gradients' to count. The sum of squares is f64, so it overflows only where a gradient does.
// grid 1, block 1: the one thread owns the counter, so the increment needs no atomic.
extern "C" __global__ void clip_coef(const double* sumsq, double max_norm, float* coef,
                                     double* norm, const float* guard, u64* skipped) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double n = sqrt(sumsq[0]);
    if (fabs(n) <= 1.7976931348623157e308) {
        const double c = max_norm / (n + 1e-6);
        coef[0] = c < 1.0 ? (float)c : 1.0f;
    } else {
        coef[0] = __int_as_float(0x7fc00000);
        if (skipped && optim::finite_or_null(guard)) skipped[0] += 1;
    }
    if (norm) norm[0] = n;
}

// grad *= coef[0] for every slot (clipping in place, as the CPU does); a NaN coef (clip_coef's
// non-finite norm) leaves the gradients as they are, as the CPU's clip_grad_norm does. grid =
// total blocks.
extern "C" __global__ void __launch_bounds__(256)
    grad_scale_multi(const TensorSlot* slots, int nslots, const float* coef) {
    const TensorSlot s = slots[optim::find_slot(slots, nslots, blockIdx.x)];
    u64 begin, end;
    optim::block_range(s, blockIdx.x, &begin, &end);
    const float c = coef[0];
    if (c == 1.0f || !optim::finite_or_null(coef)) return;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) s.grad[i] *= c;
}
