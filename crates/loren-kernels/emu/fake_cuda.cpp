// A stand-in for the CUDA driver (libcuda) and cuBLAS (libcublas) that runs loren's kernels on
// the CPU emulator (common.cuh here), so the whole GPU code path (cudarc, the launchers, the
// CUDA tensors, a training step) runs on a machine with no GPU. scripts/emulated-gpu.sh builds it
// twice from this one file, as libcuda.so and as libcublas.so, and puts them first on
// LD_LIBRARY_PATH; NVRTC is NVIDIA's own (its PTX is read only for the kernel names).
//
// What it models: one device ("loren CPU emulator", compute capability from LOREN_FAKE_CC, default
// 8.0, or 9.0 for the sm_90a build with the wgmma kernels, or 7.0 for a GPU loren refuses); device memory is host memory, so device
// pointers are host pointers; the stream runs every call at once, in order (launches are
// serialised by one lock, as the emulator keeps per-launch globals); events read the host clock.
// The stream-ordered pool is modelled by its byte counts: freed memory stays reserved until the
// release threshold lets it go at a synchronisation, or cuMemPoolTrimTo, and cuMemGetInfo's free
// figure counts what is reserved as used. cublasGemmStridedBatchedEx computes in double from
// bf16 inputs, or, both bf16 under LOREN_EMU_TC=truncate, as the emulated tensor cores add. A copy out of page-locked host memory (cuMemHostAlloc) is queued, as the
// hardware's DMA is, and carried out only when the stream next does anything else or is waited
// for, so a host that refills its staging buffer before waiting for the copy out of it sends the
// new contents, as it would on a GPU. Nothing else of either library is there: a call to
// anything else fails to load (cudarc panics naming the missing symbol), which is the signal to
// add it.
//
// LOREN_FAKE_NO_COMPUTE=1 turns it into a probe of the host's own cost: launches, GEMMs, memsets,
// device-to-device copies and copies out of page-locked memory (the DMA engine's work) are
// accepted but not carried out, so a step timed on it (events read the host clock) is the time
// loren takes to issue the step's work, the part a real GPU cannot hide when the kernels are
// shorter. The values it leaves are meaningless, but finite (fresh memory is zeroed).
#include <chrono>
#include <climits>
#include <dlfcn.h>
#include <cstdarg>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common.cuh"

#define API extern "C" __attribute__((visibility("default")))

namespace fake {
// LOREN_FAKE_NO_COMPUTE (above): issue everything, compute nothing.
bool no_compute() {
    static const bool on = [] {
        const char* v = std::getenv("LOREN_FAKE_NO_COMPUTE");
        return v && *v && std::string(v) != "0";
    }();
    return on;
}
}  // namespace fake

#ifdef FAKE_CUDA_DRIVER
#include "lora.cu"
#include "attention.cu"
#include "norm.cu"
#include "activation.cu"
#include "loss.cu"
#include "optim.cu"
#include "embed.cu"
#undef GRID_STRIDE  // elementwise.cu defines its own
#include "elementwise.cu"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_FOUND = 500,
};

namespace fake {
// Opaque handles: addresses of these, never dereferenced by the caller.
struct Context {
    int unused;
};
struct Stream {
    int unused;
};
struct Event {
    double ms;
    // When it was last recorded, in the order of recordings and copies to the host (-1: never).
    long long seq;
};
struct Pool {
    int unused;
};

using Invoke = void (*)(dim3, dim3, size_t, void**);

void check_guard(const char* kernel, const void* p);

// A pointer argument, for the guard check after the launch; null for any other argument.
template <class A>
const void* pointer_arg(void** p, size_t i) {
    if constexpr (std::is_pointer_v<std::remove_cv_t<A>>)
        return *static_cast<std::remove_cv_t<A>*>(p[i]);
    else
        return nullptr;
}

template <class... A, size_t... I>
void invoke_with(const char* name, void (*k)(A...), dim3 g, dim3 b, size_t smem, void** p,
                 std::index_sequence<I...>) {
    emu_launch(k, g, b, smem, *static_cast<std::remove_cv_t<A>*>(p[I])...);
    (check_guard(name, pointer_arg<A>(p, I)), ...);
}
template <class... A>
void invoke(const char* name, void (*k)(A...), dim3 g, dim3 b, size_t smem, void** p) {
    invoke_with(name, k, g, b, smem, p, std::index_sequence_for<A...>{});
}

// Every kernel sources.rs registers: entries.inc is generated from it by scripts/emulated-gpu.sh.
#define ENTRY(name) {#name, [](dim3 g, dim3 b, size_t s, void** p) { invoke(#name, name, g, b, s, p); }},
const std::map<std::string, Invoke> kernels = {
#include "entries.inc"
};
#undef ENTRY

struct Function {
    std::string name;
    Invoke run;
};

Context context;
Pool pool;
std::mutex lock;
// A device allocation: the bytes asked for, then a guard of CANARY bytes up to `rounded` (the
// 256-byte granule) and GUARD more. No kernel may store there: a store past the end of a buffer
// lands in another buffer on a GPU, whose allocator packs them, where here it would land in slack.
struct Allocation {
    size_t bytes, rounded;
};
constexpr size_t GUARD = 256;
constexpr unsigned char CANARY = 0xa5;
std::map<CUdeviceptr, Allocation> live;
std::multimap<size_t, void*> reusable;  // freed blocks by size, kept under LOREN_FAKE_NO_COMPUTE
size_t live_bytes = 0, cached_bytes = 0;
unsigned long long release_threshold = 0;
const size_t total_bytes = size_t(16) << 30;

// Copies out of page-locked memory, queued until the stream's next operation or a wait.
struct Dma {
    void* dst;
    const void* src;
    size_t n;
};
std::mutex dma_lock;
std::map<const char*, size_t> pinned;  // page-locked host allocations -> bytes
std::vector<Dma> queued;

bool is_pinned(const void* p) {
    std::lock_guard<std::mutex> g(dma_lock);
    const char* c = static_cast<const char*>(p);
    auto it = pinned.upper_bound(c);
    if (it == pinned.begin()) return false;
    --it;
    return c < it->first + it->second;
}

// Copies into page-locked memory: the data is taken at the copy's place on the stream, but the
// host sees it only once it waits for the copy (an event recorded after it, or the stream), as
// with a DMA engine; waiting on an event never recorded waits for nothing, as on a GPU.
struct Landing {
    void* dst;
    std::vector<char> data;
    long long seq;
};
std::vector<Landing> landing;
long long seq = 0;  // advanced by every event record and every copy into page-locked memory

// Make visible the copies into page-locked memory issued before `upto` (LLONG_MAX: all of them).
void land(long long upto) {
    std::lock_guard<std::mutex> g(dma_lock);
    std::vector<Landing> later;
    for (Landing& l : landing) {
        if (l.seq < upto)
            std::memcpy(l.dst, l.data.data(), l.data.size());
        else
            later.push_back(std::move(l));
    }
    landing = std::move(later);
}

// The stream reaches its next operation: the queued copies happen first, in order.
// Issuing without computing, they are the DMA engine's work, not the host's: dropped.
void run_queued() {
    std::lock_guard<std::mutex> g(dma_lock);
    if (!no_compute())
        for (const Dma& d : queued) std::memcpy(d.dst, d.src, d.n);
    queued.clear();
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// A synchronisation point: the pool hands back what it holds above its release threshold.
void trim_pool() {
    std::lock_guard<std::mutex> g(lock);
    if (cached_bytes > release_threshold) cached_bytes = release_threshold;
}

void synchronised() {
    run_queued();
    land(LLONG_MAX);
    trim_pool();
}

CUresult alloc(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::mutex> g(lock);
    const size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded > total_bytes - live_bytes) return OUT_OF_MEMORY;
    void* m = nullptr;
    // Issuing without computing, the host's cost should not include the C library's mmap and
    // munmap of big blocks, which the driver's pool does not do: reuse a freed block of the size.
    if (auto it = reusable.find(rounded); it != reusable.end()) {
        m = it->second;
        reusable.erase(it);
    } else {
        m = std::aligned_alloc(256, rounded + GUARD);
        // Nothing computed, memory holds only zeros and what was uploaded: a loss read back is
        // finite, so training's NaN guard does not stop a timed run on uninitialised bytes.
        if (m && no_compute()) std::memset(m, 0, rounded + GUARD);
    }
    if (!m) return OUT_OF_MEMORY;
    if (!no_compute()) std::memset(static_cast<char*>(m) + bytes, CANARY, rounded + GUARD - bytes);
    *p = reinterpret_cast<CUdeviceptr>(m);
    live[*p] = {bytes, rounded};
    live_bytes += rounded;
    cached_bytes -= std::min(cached_bytes, rounded);  // reuse what the pool holds first
    return OK;
}

// Stop, naming `who`, if a store reached past the end of the allocation at `base`.
void check_allocation(CUdeviceptr base, const Allocation& a, const char* who) {
    if (no_compute()) return;
    const auto* m = reinterpret_cast<const unsigned char*>(base);
    for (size_t i = a.bytes; i < a.rounded + GUARD; ++i) {
        if (m[i] == CANARY) continue;
        std::fprintf(stderr, "emulator: %s stored at byte %zu of a device allocation of %zu bytes\n",
                     who, i, a.bytes);
        std::abort();
    }
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(lock);
    auto it = live.find(p);
    if (it == live.end()) return INVALID_VALUE;
    check_allocation(it->first, it->second, "a kernel (one of those run before this free)");
    live_bytes -= it->second.rounded;
    cached_bytes += it->second.rounded;
    if (no_compute())
        reusable.emplace(it->second.rounded, reinterpret_cast<void*>(p));
    else
        std::free(reinterpret_cast<void*>(p));
    live.erase(it);
    return OK;
}

// After a launch: the allocation a kernel's pointer argument points into, if it points into one,
// checked for stores past its end. With `lock` held, as launches run under it.
void check_guard(const char* kernel, const void* p) {
    if (!p) return;
    const auto at = reinterpret_cast<CUdeviceptr>(p);
    auto it = live.upper_bound(at);
    if (it == live.begin()) return;
    --it;
    if (at >= it->first + it->second.rounded + GUARD) return;
    const std::string who = std::string("kernel ") + kernel;
    check_allocation(it->first, it->second, who.c_str());
}

// "9.0" a Hopper; "7.0" a Volta, which loren refuses, to check what `--device auto` says of it.
int compute_capability_major() {
    const char* cc = std::getenv("LOREN_FAKE_CC");
    return cc && *cc ? std::atoi(cc) : 8;
}
}  // namespace fake

// ---- libcuda --------------------------------------------------------------------------------------

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "loren CPU emulator (sm_%d0)", fake::compute_capability_major());
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = fake::total_bytes;
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;             // max threads per block
        case 2: case 3: *v = 1024; break;     // max block dims x, y
        case 4: *v = 64; break;               // max block dim z
        case 5: *v = 2147483647; break;       // max grid dim x
        case 6: case 7: *v = 65535; break;    // max grid dims y, z
        case 8: *v = 49152; break;            // shared memory per block
        case 10: *v = 32; break;              // warp size
        case 13: *v = 1410000; break;         // clock rate, kHz
        case 16: *v = 2; break;               // multiprocessors
        case 36: *v = 1215000; break;         // memory clock, kHz
        case 37: *v = 5120; break;            // memory bus width
        case 38: *v = 40 << 20; break;        // L2 cache size
        case 75: *v = fake::compute_capability_major(); break;
        case 76: *v = 0; break;
        case 97: *v = 232448; break;          // shared memory per block, opt-in
        case 115: *v = 1; break;              // memory pools supported
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &fake::context;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
API CUresult cuCtxSetCurrent(void*) { return OK; }
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &fake::context;
    return OK;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return OK;
}
API CUresult cuCtxSynchronize() {
    fake::synchronised();
    return OK;
}
API CUresult cuStreamCreate(void** s, unsigned) {
    *s = new fake::Stream{};
    return OK;
}
API CUresult cuStreamDestroy_v2(void* s) {
    delete static_cast<fake::Stream*>(s);
    return OK;
}
API CUresult cuStreamSynchronize(void*) {
    fake::synchronised();
    return OK;
}
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
API CUresult cuEventCreate(void** e, unsigned) {
    *e = new fake::Event{fake::now_ms(), -1};
    return OK;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<fake::Event*>(e);
    return OK;
}
API CUresult cuEventRecord(void* e, void*) {
    auto* ev = static_cast<fake::Event*>(e);
    ev->ms = fake::now_ms();
    std::lock_guard<std::mutex> g(fake::dma_lock);
    ev->seq = ++fake::seq;
    return OK;
}
API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuEventSynchronize(void* e) {
    const long long upto = static_cast<fake::Event*>(e)->seq;
    if (upto < 0) return OK;  // never recorded: nothing to wait for
    fake::run_queued();
    fake::land(upto);
    fake::trim_pool();
    return OK;
}
// Always "complete": what was recorded has landed.
API CUresult cuEventQuery(void* e) {
    const long long upto = static_cast<fake::Event*>(e)->seq;
    if (upto >= 0) {
        fake::run_queued();
        fake::land(upto);
    }
    return OK;
}
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(static_cast<fake::Event*>(b)->ms - static_cast<fake::Event*>(a)->ms);
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return fake::alloc(p, bytes); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return fake::alloc(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return fake::release(p); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return fake::release(p); }
API CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> g(fake::lock);
    *total = fake::total_bytes;
    *free = fake::total_bytes - fake::live_bytes - fake::cached_bytes;
    return OK;
}
API CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice) {
    *pool = &fake::pool;
    return OK;
}
API CUresult cuMemPoolSetAttribute(void*, int attr, void* value) {
    if (attr == 4) {  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
        std::lock_guard<std::mutex> g(fake::lock);
        fake::release_threshold = *static_cast<unsigned long long*>(value);
    }
    return OK;
}
API CUresult cuMemPoolTrimTo(void*, size_t keep) {
    std::lock_guard<std::mutex> g(fake::lock);
    fake::cached_bytes = std::min(fake::cached_bytes, keep);
    return OK;
}
// Page-locked host memory is ordinary host memory here, registered so that copies out of it are
// queued (see the top).
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    *p = std::aligned_alloc(4096, rounded);
    if (!*p) return OUT_OF_MEMORY;
    // The copies into it are not carried out when nothing is computed: what the host reads back
    // is then zeros, not uninitialised bytes (a NaN loss would stop the timed run).
    if (fake::no_compute()) std::memset(*p, 0, rounded);
    std::lock_guard<std::mutex> g(fake::dma_lock);
    fake::pinned[static_cast<const char*>(*p)] = bytes;
    return OK;
}
API CUresult cuMemFreeHost(void* p) {
    fake::run_queued();
    fake::land(LLONG_MAX);
    {
        std::lock_guard<std::mutex> g(fake::dma_lock);
        fake::pinned.erase(static_cast<const char*>(p));
    }
    std::free(p);
    return OK;
}
// For libcublas (built from this file), whose GEMMs are stream operations too.
API void loren_fake_run_queued() { fake::run_queued(); }
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    fake::run_queued();
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return OK;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    if (!fake::is_pinned(src)) return cuMemcpyHtoD_v2(dst, src, n);
    std::lock_guard<std::mutex> g(fake::dma_lock);
    fake::queued.push_back({reinterpret_cast<void*>(dst), src, n});
    return OK;
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    fake::run_queued();
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return OK;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    if (!fake::is_pinned(dst)) return cuMemcpyDtoH_v2(dst, src, n);
    fake::run_queued();
    if (fake::no_compute()) return OK;
    const char* from = reinterpret_cast<const char*>(src);
    std::lock_guard<std::mutex> g(fake::dma_lock);
    fake::landing.push_back({dst, std::vector<char>(from, from + n), ++fake::seq});
    return OK;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    fake::run_queued();
    if (fake::no_compute()) return OK;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return OK;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    fake::run_queued();
    if (fake::no_compute()) return OK;
    std::memset(reinterpret_cast<void*>(dst), v, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) {
    return cuMemsetD8_v2(dst, v, n);
}
API CUresult cuModuleLoadData(void** module, const void*) {
    *module = new int(0);
    return OK;
}
API CUresult cuModuleUnload(void* module) {
    delete static_cast<int*>(module);
    return OK;
}
API CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = fake::kernels.find(name);
    if (it == fake::kernels.end()) return NOT_FOUND;
    *f = new fake::Function{it->first, it->second};
    return OK;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return OK; }
API CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned smem, void*, void** params, void**) {
    if (by != 1 || bz != 1) {
        std::fprintf(stderr, "fake libcuda: %s: only 1-D blocks are emulated\n",
                     static_cast<fake::Function*>(f)->name.c_str());
        return INVALID_VALUE;
    }
    fake::run_queued();
    if (fake::no_compute()) return OK;
    std::lock_guard<std::mutex> g(fake::lock);
    static_cast<fake::Function*>(f)->run(dim3{gx, gy, gz}, dim3{bx, 1, 1}, smem, params);
    return OK;
}
API CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == OUT_OF_MEMORY ? "out of memory (fake libcuda)" : "error (fake libcuda)";
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_FAKE";
    return OK;
}
#endif  // FAKE_CUDA_DRIVER

#ifdef FAKE_CUBLAS
// ---- libcublas ------------------------------------------------------------------------------------

namespace fake {
struct Blas {
    int unused;
};

double read(const void* p, int type, size_t i) {
    if (type == 0) return static_cast<const float*>(p)[i];       // CUDA_R_32F
    return __bfloat162float(static_cast<const bf16*>(p)[i]);      // CUDA_R_16BF
}
// The driver's queued copies land before a GEMM reads (see libcuda's loren_fake_run_queued).
void run_queued() {
    static void (*f)() = [] {
        void* h = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        if (!h) h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        void* sym = h ? dlsym(h, "loren_fake_run_queued") : nullptr;
        if (!sym) {
            std::fprintf(stderr, "fake libcublas: the fake libcuda is not loaded\n");
            std::abort();
        }
        return reinterpret_cast<void (*)()>(sym);
    }();
    f();
}
void write(void* p, int type, size_t i, double v) {
    if (type == 0)
        static_cast<float*>(p)[i] = (float)v;
    else
        static_cast<bf16*>(p)[i] = __float2bfloat16_rn((float)v);
}

// Four running sums, not one, for speed (an order cuBLAS does not fix either).
double exact_dot(const double* a, const double* b, int k) {
    double acc4[4] = {0, 0, 0, 0};
    int l = 0;
    for (; l + 4 <= k; l += 4)
        for (int u = 0; u < 4; ++u) acc4[u] += a[l + u] * b[l + u];
    for (; l < k; ++l) acc4[0] += a[l] * b[l];
    return (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
}

// A bf16 GEMM on the tensor cores as LOREN_EMU_TC models them (emu_tc_mode): K in steps of 16,
// each added into an f32 accumulator as one mma or wgmma would (the order a real cuBLAS takes is
// its own; this is one it could).
double tc_dot(const double* a, const double* b, int k) {
    float acc = 0;
    for (int l = 0; l < k; l += 16)
        acc = emu_tc_dot(emu_tc_mode(), acc, a + l, 1, b + l, 1, std::min(16, k - l));
    return acc;
}
}  // namespace fake

API int cublasCreate_v2(void** h) {
    *h = new fake::Blas{};
    return 0;
}
API int cublasDestroy_v2(void* h) {
    delete static_cast<fake::Blas*>(h);
    return 0;
}
API int cublasSetStream_v2(void*, void*) { return 0; }

// Column-major C[i + j·ldc] = alpha·Σ_l op(A)[i, l]·op(B)[l, j] + beta·C, per batch entry.
API int cublasGemmStridedBatchedEx(void*, int transa, int transb, int m, int n, int k,
                                   const void* alpha, const void* A, int atype, int lda,
                                   long long sa, const void* B, int btype, int ldb, long long sb,
                                   const void* beta, void* C, int ctype, int ldc, long long sc,
                                   int batch, int compute, int) {
    if (compute != 68) return 7;  // CUBLAS_STATUS_INVALID_VALUE: only CUBLAS_COMPUTE_32F
    fake::run_queued();
    if (fake::no_compute()) return 0;
    const double al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    // Both operands bf16 (CUDA_R_16BF): cuBLAS runs it on the tensor cores.
    const bool tensor_cores = atype == 14 && btype == 14 && emu_tc_mode() != EmuTc::Exact;
    // Each operand's rows along k, widened once, so that the inner loop reads two contiguous rows.
    std::vector<double> a((size_t)m * k), b((size_t)n * k);
    for (int q = 0; q < batch; ++q) {
        for (int i = 0; i < m; ++i)
            for (int l = 0; l < k; ++l)
                a[(size_t)i * k + l] = fake::read(A, atype, q * sa + (transa ? (size_t)l + (size_t)i * lda : (size_t)i + (size_t)l * lda));
        for (int j = 0; j < n; ++j)
            for (int l = 0; l < k; ++l)
                b[(size_t)j * k + l] = fake::read(B, btype, q * sb + (transb ? (size_t)j + (size_t)l * ldb : (size_t)l + (size_t)j * ldb));
        // Columns shared out among the cores (each output is the same sum whoever computes it).
        auto columns = [&](int j0, int j1) {
            for (int j = j0; j < j1; ++j)
                for (int i = 0; i < m; ++i) {
                    const double* ar = &a[(size_t)i * k];
                    const double* br = &b[(size_t)j * k];
                    const double acc = tensor_cores ? fake::tc_dot(ar, br, k) : fake::exact_dot(ar, br, k);
                    const size_t ci = q * sc + (size_t)i + (size_t)j * ldc;
                    const double old = be == 0 ? 0 : be * fake::read(C, ctype, ci);
                    fake::write(C, ctype, ci, al * acc + old);
                }
        };
        const bool large = (double)m * n * k > (1 << 22);
        const int parts = large ? (int)std::min<unsigned>(std::max(1u, std::thread::hardware_concurrency()), n) : 1;
        std::vector<std::thread> helpers;
        for (int p = 1; p < parts; ++p) helpers.emplace_back(columns, n * p / parts, n * (p + 1) / parts);
        columns(0, n / parts);
        for (auto& h : helpers) h.join();
    }
    return 0;
}
#endif  // FAKE_CUBLAS
