// A CPU stand-in for kernels/common.cuh and the bits of CUDA the kernels use, so the real kernel
// sources run on the host (tests/emulate.rs, and scripts/emulated-gpu.sh through fake_cuda.cpp).
// A fiber per CUDA thread, blocks shared out among the cores (below, "the emulated block");
// __syncthreads, __syncwarp and the warp collectives are barriers.
//
// What it models, from the PTX ISA:
// - mma.sync.m16n8k16 bf16 fragments (A: a0 (g,2q) a1 (g+8,2q) a2 (g,2q+8) a3 (g+8,2q+8);
//   B: b0 (k=2q..2q+1, n=g) b1 (k=2q+8.., n=g); C/D: (g, 2q..) and (g+8, 2q..)), products exact,
//   sums in double, in order, rounded to f32, or, with LOREN_EMU_TC=truncate, as the A100's or the
//   H100's tensor cores add, bit for bit (emu_tc_mode);
// - ldmatrix .x4 and .x4.trans (lanes 8i..8i+7 address the rows of matrix i);
// - cp.async: the destination is poisoned (0xFFFF, bf16 NaN) when the copy is issued, since the
//   hardware may land it any time from then on, and the copy itself happens at
//   cp.async.wait_group; so a read of a stage before its wait sees poison, and a stage
//   overwritten while other threads still read it is a race ThreadSanitizer reports
//   (tests/emulate.rs builds the emulator with it, each fiber a thread to it);
// - dynamic shared memory is poisoned with 0xFF bytes (bf16 NaN) before each block;
// - Hopper's wgmma.mma_async m64n128k16 bf16 -> f32 with both operands in shared memory behind
//   128-byte-swizzle K-major descriptors (start address, stride byte offset, swizzle mode
//   decoded from the 64-bit descriptor; the XOR of address bits 4-6 with bits 7-9 applied to the
//   address itself; K-major and MN-major B); its accumulator fragment (thread t of the warpgroup: row 16·(t/32) + (t%32)/4
//   (+8), columns 8j + 2(t%4) (+1)); and its asynchrony: the products are formed at
//   wgmma.wait_group, reading shared memory then, so a stage overwritten before the wait shows.
//   Shared addresses start at EMU_SMEM_ORIGIN, off a 1024-byte boundary, so a kernel that does
//   not align its swizzled tiles reads the wrong elements. The proxies: a wgmma reads through the
//   async proxy, so one with no wgmma.fence, or reading shared memory stored (cp.async or a plain
//   store) since the last fence.proxy.async and block barrier, aborts; so do the threads of a
//   warpgroup issuing other wgmmas (descriptors, scale-d, B's major) between two block barriers;
// - a full-warp shuffle, mma.sync or ldmatrix after a lane of the warp has returned, or reached
//   by its lanes from different call sites (EmuSite, default arguments the kernels never pass),
//   aborts: the hardware leaves the first undefined, and the second for the .aligned mma.sync and
//   ldmatrix; the shuffles are held to the same rule, which the kernels keep.
// Not modelled: timing, bank conflicts, memory-model subtleties beyond barrier ordering; the
// warp collectives order memory within a warp, which real shuffles and mma do not.
#pragma once
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sched.h>
#include <sys/mman.h>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct __nv_bfloat16 {
    uint16_t x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
template <class T>
inline T min(T a, T b) {
    return a < b ? a : b;
}

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;
typedef unsigned long long u64;

#define WARP 32
#define FULL_MASK 0xffffffffu
#define INF_F __int_as_float(0x7f800000)

// ---- the emulated block -------------------------------------------------------------------------

// Two ways to run a block's CUDA threads, with the same results:
// - fibers (x86-64): every CUDA thread is a fiber with a stack of its own, and waiting at a
//   barrier is a switch to the next fiber, some nanoseconds, where an OS thread per CUDA thread
//   pays the kernel's scheduler for every wait (ten times slower in all, and far more under
//   ThreadSanitizer); blocks run in parallel, one OS thread per core, each with its own fibers
//   and its own copy of static shared memory; a block whose threads wait at different barriers
//   is reported as the hang it would be;
// - OS threads, one per CUDA thread and blocks one at a time: elsewhere, under AddressSanitizer
//   (which would take a fiber's stack for a stray pointer), with CET shadow stacks, or with
//   -DEMU_OS_THREADS.
#if defined(__SANITIZE_THREAD__)
#define EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
// With CET shadow stacks (-fcf-protection), emu_switch's return onto another stack would fault.
#if defined(__CET__)
#define EMU_SHADOW_STACK (__CET__ & 2)
#else
#define EMU_SHADOW_STACK 0
#endif
#if defined(__x86_64__) && !defined(EMU_ASAN) && !defined(EMU_OS_THREADS) && !EMU_SHADOW_STACK
#define EMU_FIBERS 1
#endif

// ThreadSanitizer sees each fiber as a thread of its own, and a switch between them as no
// synchronisation at all: the happens-before edges it is given are the barriers' (release on
// arrival, acquire on leaving), so that a shared buffer read and written without a barrier
// between is a race it reports, as it would be on a GPU.
#if defined(EMU_FIBERS) && defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
inline void emu_tsan_release(void* a) { __tsan_release(a); }
inline void emu_tsan_acquire(void* a) { __tsan_acquire(a); }
#else
inline void emu_tsan_release(void*) {}
inline void emu_tsan_acquire(void*) {}
#endif

#ifdef EMU_FIBERS
// Each OS thread runs its own blocks, so a block's static shared memory is per OS thread.
#define __shared__ static thread_local
#define EMU_PER_WORKER thread_local
#else
#define __shared__ static
#define EMU_PER_WORKER
#endif

struct EmuCopy {
    void* dst;
    const void* src;
    int bytes;
};
struct EmuWgmma {
    float* d;
    u64 da, db;
    int scale_d;
    bool b_mn;
};
// What a wgmma.mma_async asks of the warpgroup, which its four warps must ask alike.
struct EmuWgmmaIssue {
    u64 da, db;
    bool scale_d, b_mn;
    bool operator==(const EmuWgmmaIssue&) const = default;
};
// What a CUDA thread holds besides its registers (its stack): its cp.async and wgmma groups, and
// the fences the PTX ISA asks of a wgmma that the emulator would otherwise not miss:
//   unfenced   its cp.async copies landed in shared memory (generic proxy) since its last
//              fence.proxy.async, so the tensor cores (async proxy) may not see them yet;
//   wg_fenced  a wgmma.fence since its last commit: the first wgmma of a batch, and any after
//              the thread read or wrote the accumulators, needs one.
struct EmuThread {
    std::vector<EmuCopy> open;
    std::vector<std::vector<EmuCopy>> groups;
    std::vector<EmuWgmma> wg_open;
    std::vector<std::vector<EmuWgmma>> wg_groups;
    bool unfenced = false;
    bool wg_fenced = false;
    void clear() {
        open.clear();
        groups.clear();
        wg_open.clear();
        wg_groups.clear();
        unfenced = false;
        wg_fenced = false;
    }
};
inline thread_local EmuThread* emu_self = nullptr;

#ifdef EMU_FIBERS
inline void emu_yield();
inline void emu_progress();

// A block's fibers all run on one OS thread, so its counts need no lock; they are atomics only
// so that ThreadSanitizer does not report them, and relaxed, so that they order nothing.
class EmuBarrier {
  public:
    explicit EmuBarrier(long n) : size_(n), expected_(n) {}
    // Run by the last thread to arrive, before any leaves.
    std::function<void()> on_open;
    void arrive_and_wait() {
        const unsigned long phase = get(phase_);
        emu_progress();
        emu_tsan_release(&sync_[phase & 1]);
        if (add(arrived_, 1) == get(expected_))
            next_phase();
        else
            while (get(phase_) == phase) emu_yield();
        emu_tsan_acquire(&sync_[phase & 1]);
    }
    // Leaves for good (a thread that has returned from the kernel).
    void arrive_and_drop() {
        emu_tsan_release(&sync_[get(phase_) & 1]);
        if (add(expected_, -1) > 0 && get(arrived_) == get(expected_)) next_phase();
    }
    // How many have left for good.
    long dropped() const { return size_ - get(expected_); }

  private:
    template <class T> static T get(const std::atomic<T>& a) { return a.load(std::memory_order_relaxed); }
    template <class T> static T add(std::atomic<T>& a, std::type_identity_t<T> d) {
        a.store(get(a) + d, std::memory_order_relaxed);
        return get(a);
    }
    void next_phase() {
        if (on_open) {
            // It reads what every thread wrote before arriving, and those leaving after it may
            // overwrite what it read.
            char* sync = &sync_[get(phase_) & 1];
            emu_tsan_acquire(sync);
            on_open();
            emu_tsan_release(sync);
        }
        arrived_.store(0, std::memory_order_relaxed);
        add(phase_, 1);
    }
    const long size_;
    std::atomic<long> expected_, arrived_{0};
    std::atomic<unsigned long> phase_{0};
    // One synchronisation address per phase parity: a fiber already at the next barrier cannot
    // release into what the ones still leaving this one acquire.
    char sync_[2];
};
#else
// A mutex of its own, so that the happens-before edges ThreadSanitizer sees are exactly this
// barrier's (libstdc++'s std::barrier waits through a process-wide pool of mutexes, which links
// unrelated barriers and would hide real races from it).
class EmuBarrier {
  public:
    explicit EmuBarrier(long n) : size_(n), expected_(n) {}
    // Run by the last thread to arrive, before any leaves.
    std::function<void()> on_open;
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned long phase = phase_;
        if (++arrived_ == expected_) return next_phase();
        cv_.wait(lock, [&] { return phase_ != phase; });
    }
    // Leaves for good (a thread that has returned from the kernel).
    void arrive_and_drop() {
        std::unique_lock<std::mutex> lock(m_);
        if (--expected_ > 0 && arrived_ == expected_) next_phase();
    }
    // How many have left for good.
    long dropped() {
        std::unique_lock<std::mutex> lock(m_);
        return size_ - expected_;
    }

  private:
    void next_phase() {
        if (on_open) on_open();
        arrived_ = 0;
        ++phase_;
        cv_.notify_all();
    }
    std::mutex m_;
    std::condition_variable cv_;
    const long size_;
    long expected_, arrived_ = 0;
    unsigned long phase_ = 0;
};
#endif

// Where a lane called a warp collective: a default argument of the emulator's collectives and of
// the helpers that call them, so it names the kernel's line (builtins, where <source_location>
// would need a newer compiler; GCC has no column).
#if defined(__has_builtin)
#if __has_builtin(__builtin_COLUMN)
#define EMU_COLUMN() __builtin_COLUMN()
#endif
#endif
#ifndef EMU_COLUMN
#define EMU_COLUMN() 0u
#endif
struct EmuSite {
    const char* file = "";
    unsigned line = 0, column = 0;
    static EmuSite here(const char* file = __builtin_FILE(), unsigned line = __builtin_LINE(),
                        unsigned column = EMU_COLUMN()) {
        return {file, line, column};
    }
    bool operator==(const EmuSite& o) const {
        return line == o.line && column == o.column && std::strcmp(file, o.file) == 0;
    }
};

struct EmuWarp {
    std::unique_ptr<EmuBarrier> bar;
    const void* ptr[32];
    unsigned a[32][4];
    unsigned b[32][2];
    double v[32];
    // Where each lane called the collective it is in.
    EmuSite site[32];
};
struct EmuBlock {
    std::unique_ptr<EmuBarrier> bar;
    std::vector<EmuWarp> warps;
    // The launch's dynamic shared memory, `smem` bytes, then a guard of GUARD bytes of CANARY
    // that no store may change: on a GPU a store past the launch's size faults or lands in
    // another block's memory, where here it would land in the slack unseen.
    std::vector<unsigned char> dyn;
    size_t smem = 0;
    // How many of its threads hold cp.async copies not yet fenced for the async proxy.
    std::atomic<int> unfenced{0};
    // Dynamic shared memory as the async proxy (wgmma's operand reads) may see it: copied from
    // `dyn` as a block barrier opens after any thread ran fence.proxy.async, so that a wgmma
    // reading a byte stored since (a plain store or a landed cp.async, with no fence between the
    // store and the barrier) finds the two differ.
    std::vector<unsigned char> async_view;
    std::atomic<bool> proxy_fenced{false};
    // Each thread's wgmma issues since the last block barrier: wgmma.mma_async is .sync.aligned
    // over the warpgroup, so its 128 threads must issue the same ones.
    std::vector<std::vector<EmuWgmmaIssue>> wg_issued;
    static constexpr size_t GUARD = 4096;
    static constexpr unsigned char CANARY = 0x5a;

    // Fresh barriers and poisoned dynamic shared memory for a block of n threads.
    void reset(unsigned n, size_t bytes) {
        bar = std::make_unique<EmuBarrier>(n);
        warps.clear();
        warps.resize((n + 31) / 32);
        for (unsigned w = 0; w < warps.size(); ++w)
            warps[w].bar = std::make_unique<EmuBarrier>(std::min(32u, n - 32 * w));
        smem = bytes;
        unfenced.store(0, std::memory_order_relaxed);
        dyn.assign(smem + GUARD, 0xff);
        std::fill(dyn.begin() + smem, dyn.end(), CANARY);
        async_view.assign(smem, 0xff);
        proxy_fenced.store(false, std::memory_order_relaxed);
        wg_issued.assign(n, {});
        bar->on_open = [this] {
            if (proxy_fenced.exchange(false, std::memory_order_relaxed))
                std::memcpy(async_view.data(), dyn.data(), smem);
            check_warpgroups();
        };
    }
    // Stop, naming the threads, where a thread of a warpgroup issued other wgmmas (descriptors,
    // scale-d, B's major) than the warpgroup's first thread since the last block barrier.
    void check_warpgroups() {
        for (size_t t = 0; t < wg_issued.size(); ++t) {
            const size_t lead = t - t % 128;
            const auto &mine = wg_issued[t], &theirs = wg_issued[lead];
            if (mine == theirs) continue;
            size_t i = 0;
            while (i < mine.size() && i < theirs.size() && mine[i] == theirs[i]) ++i;
            std::fprintf(stderr,
                         "emulator: since the last block barrier thread %zu issued %zu wgmmas and "
                         "thread %zu of its warpgroup %zu; the first to differ is number %zu",
                         t, mine.size(), lead, theirs.size(), i + 1);
            if (i < mine.size() && i < theirs.size())
                std::fprintf(stderr, " (descriptors %#llx, %#llx against %#llx, %#llx)",
                             (unsigned long long)mine[i].da, (unsigned long long)mine[i].db,
                             (unsigned long long)theirs[i].da, (unsigned long long)theirs[i].db);
            std::fprintf(stderr, ": a warpgroup issues each wgmma.mma_async together\n");
            std::abort();
        }
        for (auto& issued : wg_issued) issued.clear();
    }
    // Once the block's threads have all returned: stop, naming the block, if one of them
    // stored past the dynamic shared memory its launch asked for, or a warpgroup's threads issued
    // different wgmmas since the last barrier.
    void check_end(dim3 at) {
        check_warpgroups();
        for (size_t i = smem; i < dyn.size(); ++i) {
            if (dyn[i] == CANARY) continue;
            std::fprintf(stderr,
                         "emulator: block (%u,%u,%u) stored at byte %zu of dynamic shared memory, "
                         "past the %zu bytes its launch asked for\n",
                         at.x, at.y, at.z, i, smem);
            std::abort();
        }
    }
    // A thread that has returned from the kernel leaves its warp's and the block's barriers.
    void leave(unsigned t) {
        warps[t / 32].bar->arrive_and_drop();
        bar->arrive_and_drop();
    }
};
inline EMU_PER_WORKER EmuBlock* emu_block = nullptr;

inline unsigned char* emu_dynamic_smem() { return emu_block->dyn.data(); }
inline EmuWarp& emu_warp() { return emu_block->warps[threadIdx.x / 32]; }
inline int emu_lane() { return threadIdx.x % 32; }

inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }
// A lane at a kernel's __syncwarp is at no collective: a lane that meets it at one sees the
// difference. The collectives' own closing barrier (emu_warp_done) leaves the sites alone, as a
// lane through it early would otherwise overwrite a site its warp is still comparing.
inline void __syncwarp(unsigned = FULL_MASK) {
    emu_warp().site[threadIdx.x % 32] = {"__syncwarp", 0, 0};
    emu_warp().bar->arrive_and_wait();
}
inline void emu_warp_done() { emu_warp().bar->arrive_and_wait(); }

// The first barrier of a full-warp shuffle, mma or ldmatrix, where each lane has published its
// operands. The hardware leaves such a collective undefined once a lane of the warp has returned
// (the barrier here would go on without it, reading what it left), and mma.sync and ldmatrix
// (.aligned) when the lanes reach them from different places in the kernel, so each aborts; a
// shuffle is held to the same rule, stricter than sm_70's shfl.sync, which the kernels keep.
// Every lane still running has arrived by the time the barrier opens, so the count of those gone
// is final.
inline void emu_warp_exchange(const char* what, const EmuSite& at) {
    EmuWarp& w = emu_warp();
    const int lane = emu_lane();
    w.site[lane] = at;
    w.bar->arrive_and_wait();
    if (long gone = w.bar->dropped()) {
        std::fprintf(stderr, "emulator: %s in warp %u of block (%u,%u,%u) after %ld of its lanes returned\n",
                     what, threadIdx.x / 32, blockIdx.x, blockIdx.y, blockIdx.z, gone);
        std::abort();
    }
    const EmuSite& first = w.site[0];
    if (!(at == first)) {
        std::fprintf(stderr,
                     "emulator: %s in warp %u of block (%u,%u,%u): lane %d reached it at %s:%u:%u, "
                     "lane 0 at %s:%u:%u (the warp has diverged)\n",
                     what, threadIdx.x / 32, blockIdx.x, blockIdx.y, blockIdx.z, lane,
                     at.file, at.line, at.column, first.file, first.line, first.column);
        std::abort();
    }
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask,
                         EmuSite at = EmuSite::here()) {
    EmuWarp& w = emu_warp();
    w.v[emu_lane()] = (double)v;
    emu_warp_exchange("a full-warp shuffle", at);
    T r = (T)w.v[emu_lane() ^ mask];
    emu_warp_done();
    return r;
}

#ifdef EMU_FIBERS
// Saves the callee-saved registers and the SSE and x87 control words on the current stack, stores
// its pointer in *save, and resumes the stack at `load` (System V x86-64).
extern "C" void emu_switch(void** save, void* load);
// In a COMDAT section of its own, so that two files that include this one link.
asm(R"(
    .pushsection .text.emu_switch,"axG",@progbits,emu_switch,comdat
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .popsection
)");

#ifdef EMU_TSAN
inline void* emu_tsan_new_fiber() { return __tsan_create_fiber(0); }
inline void* emu_tsan_current() { return __tsan_get_current_fiber(); }
inline void emu_tsan_switch(void* to) { __tsan_switch_to_fiber(to, __tsan_switch_to_fiber_no_sync); }
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
inline void emu_tsan_ignore_writes(bool on) {
    on ? AnnotateIgnoreWritesBegin(__FILE__, __LINE__) : AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
}
#else
inline void* emu_tsan_new_fiber() { return nullptr; }
inline void* emu_tsan_current() { return nullptr; }
inline void emu_tsan_switch(void*) {}
inline void emu_tsan_ignore_writes(bool) {}
#endif

[[noreturn]] inline void emu_fiber_main();

// emu_switch, telling ThreadSanitizer first (everything read for it is read before).
inline void emu_switch_to(void* tsan, void** save, void* load) {
    emu_tsan_switch(tsan);
    emu_switch(save, load);
}

// A fiber's stack, with an unmapped page below it so that overflowing it is a crash at once.
class EmuStack {
  public:
    EmuStack() {
        base_ = static_cast<char*>(mmap(nullptr, GUARD + BYTES, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (base_ == MAP_FAILED || mprotect(base_, GUARD, PROT_NONE) != 0) {
            std::perror("emulator: a fiber's stack");
            std::abort();
        }
    }
    ~EmuStack() { munmap(base_, GUARD + BYTES); }
    EmuStack(const EmuStack&) = delete;
    EmuStack& operator=(const EmuStack&) = delete;
    // 16-byte aligned, as the ABI wants a stack.
    char* top() const { return base_ + GUARD + BYTES; }

  private:
    static constexpr size_t GUARD = 4096, BYTES = size_t(256) << 10;
    char* base_;
};

// A CUDA thread as a fiber, made once and kept for every later block on its OS thread (never
// moved to another: compiled code may keep a thread-local variable's address across a switch).
struct EmuFiber {
    explicit EmuFiber(unsigned t) : t(t) {
        // The stack as emu_switch leaves one, so that switching to it enters emu_fiber_main as if
        // called, with this thread's floating-point control words.
        auto* top = reinterpret_cast<uint64_t*>(stack.top());
        uint32_t mxcsr;
        uint16_t fpcw;
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(fpcw));
        top[-1] = 0;  // emu_fiber_main's return address: it never returns
        top[-2] = reinterpret_cast<uint64_t>(&emu_fiber_main);
        for (int i = 3; i <= 8; ++i) top[-i] = 0;  // rbp, rbx, r12-r15
        top[-9] = uint64_t(mxcsr) | (uint64_t(fpcw) << 32);
        sp = top - 9;
    }
    EmuStack stack;
    void* sp;
    void* tsan = emu_tsan_new_fiber();
    const unsigned t;
    EmuThread state;
    std::atomic<bool> done{false};
};

// One launch, as the OS threads running it share it.
struct EmuGrid {
    void (*body)(const void*);
    const void* arg;
    dim3 grid, block;
    size_t smem;
    unsigned long blocks;
    std::atomic<unsigned long> next{0};
};

// An OS thread's part in a launch: the block it is running and a fiber per thread of it.
struct EmuWorker {
    void* main_sp = nullptr;
    void* main_tsan = emu_tsan_current();
    std::vector<std::unique_ptr<EmuFiber>> fibers;
    EmuFiber* current = nullptr;
    // Barrier arrivals and returns so far, to tell a hang from a wait.
    std::atomic<unsigned long> progress{0};
    const EmuGrid* grid = nullptr;
    EmuBlock block;
    // Released as a block starts, acquired by each fiber; released by each fiber as it returns,
    // acquired as the block ends.
    char started = 0, finished = 0;

    void run(EmuGrid& g) {
        grid = &g;
        // Relaxed: the claim orders nothing, so that ThreadSanitizer still sees blocks on other
        // workers as unordered (blocks on one worker run one after another, as all did before).
        for (unsigned long i; (i = g.next.fetch_add(1, std::memory_order_relaxed)) < g.blocks;)
            run_block(i);
        grid = nullptr;
    }
    void run_block(unsigned long i);
    void resume(EmuFiber& f) {
        // Every fiber reads these, with nothing ordering its read before the next resume's
        // write (nothing orders fibers but barriers): writes ThreadSanitizer is not to see.
        emu_tsan_ignore_writes(true);
        current = &f;
        threadIdx = {f.t, 0, 0};
        emu_self = &f.state;
        emu_tsan_ignore_writes(false);
        emu_switch_to(f.tsan, &main_sp, f.sp);
    }
};
inline thread_local EmuWorker* emu_worker = nullptr;

inline void emu_progress() {
    std::atomic<unsigned long>& p = emu_worker->progress;
    p.store(p.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

inline void emu_yield() {
    EmuWorker& w = *emu_worker;
    emu_switch_to(w.main_tsan, &w.current->sp, w.main_sp);
}

// A fiber's whole life: the kernel, once per block it is resumed for.
[[noreturn]] inline void emu_fiber_main() {
    for (;;) {
        EmuWorker& w = *emu_worker;
        EmuFiber& f = *w.current;
        emu_tsan_acquire(&w.started);
        w.grid->body(w.grid->arg);
        w.block.leave(f.t);
        f.done.store(true, std::memory_order_relaxed);
        emu_progress();
        emu_tsan_release(&w.finished);
        emu_switch_to(w.main_tsan, &f.sp, w.main_sp);
    }
}

// Runs the fibers in turn, each until it waits or returns, until all have returned; a full round
// in which none of them reached a barrier or returned means they wait at different barriers,
// which on a GPU would hang.
inline void EmuWorker::run_block(unsigned long i) {
    const dim3 g = grid->grid;
    const unsigned n = grid->block.x * grid->block.y * grid->block.z;
    blockIdx = {unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / g.x / g.y)};
    block.reset(n, grid->smem);
    emu_block = &block;
    while (fibers.size() < n) fibers.push_back(std::make_unique<EmuFiber>(fibers.size()));
    for (unsigned t = 0; t < n; ++t) {
        fibers[t]->state.clear();
        fibers[t]->done.store(false, std::memory_order_relaxed);
    }
    emu_tsan_release(&started);
    for (unsigned live = n; live > 0;) {
        const unsigned long before = progress.load(std::memory_order_relaxed);
        live = 0;
        for (unsigned t = 0; t < n; ++t) {
            EmuFiber& f = *fibers[t];
            if (f.done.load(std::memory_order_relaxed)) continue;
            resume(f);
            live += !f.done.load(std::memory_order_relaxed);
        }
        if (live > 0 && progress.load(std::memory_order_relaxed) == before) {
            std::fprintf(stderr, "emulator: block (%u,%u,%u) hangs: its threads wait at different barriers\n",
                         blockIdx.x, blockIdx.y, blockIdx.z);
            std::abort();
        }
    }
    emu_tsan_acquire(&finished);
    block.check_end(blockIdx);
    emu_block = nullptr;
    emu_self = nullptr;
}

// The OS threads that run blocks, one per core this process may use (at most 8: each keeps a
// fiber, a stack and, under ThreadSanitizer, nearly a megabyte of its state, for every thread of
// the largest block it has run), started at the first launch and kept for the process (never
// destroyed: they wait for work until it exits).
class EmuPool {
  public:
    static EmuPool& get() {
        static EmuPool* pool = new EmuPool;
        return *pool;
    }
    void run(EmuGrid& g) {
        std::lock_guard<std::mutex> serial(launch_);
        std::unique_lock<std::mutex> lock(m_);
        gridDim = g.grid;
        blockDim = g.block;
        grid_ = &g;
        busy_ = size_;
        ++generation_;
        wake_.notify_all();
        idle_.wait(lock, [&] { return busy_ == 0; });
        grid_ = nullptr;
    }

  private:
    static unsigned workers() {
        cpu_set_t set;
        const int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
        return (unsigned)std::clamp(cores, 1, 8);
    }
    EmuPool() : size_(workers()) {
        for (unsigned k = 0; k < size_; ++k) std::thread([this] { serve(); }).detach();
    }
    [[noreturn]] void serve() {
        EmuWorker w;
        emu_worker = &w;
        for (unsigned long seen = 0;;) {
            EmuGrid* g;
            {
                std::unique_lock<std::mutex> lock(m_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                g = grid_;
            }
            w.run(*g);
            std::lock_guard<std::mutex> lock(m_);
            if (--busy_ == 0) idle_.notify_all();
        }
    }
    std::mutex launch_, m_;
    std::condition_variable wake_, idle_;
    EmuGrid* grid_ = nullptr;
    const unsigned size_;
    unsigned busy_ = 0;
    unsigned long generation_ = 0;
};

// Launch `kernel(args...)` over `grid` blocks of `block` threads, shared out among the pool's
// OS threads, each running its blocks one at a time.
template <class F, class... A>
void emu_launch(F kernel, dim3 grid, dim3 block, size_t smem, A... args) {
    auto call = [&] { kernel(args...); };
    EmuGrid g{[](const void* c) { (*static_cast<const decltype(call)*>(c))(); },
              &call,
              grid,
              block,
              smem,
              (unsigned long)grid.x * grid.y * grid.z};
    EmuPool::get().run(g);
}
#else
// Launch `kernel(args...)` over `grid` blocks of `block` threads, one block at a time, on a pool
// of block-size threads that stays up for the whole launch (fresh barriers for every block).
template <class F, class... A>
void emu_launch(F kernel, dim3 grid, dim3 block, size_t smem, A... args) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    EmuBarrier control(n + 1);
    EmuBlock b;
    dim3 current;
    bool done = false;
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            EmuThread state;
            emu_self = &state;
            for (;;) {
                control.arrive_and_wait();  // the block is set up
                if (done) return;
                threadIdx = {t, 0, 0};
                blockIdx = current;
                state.clear();
                kernel(args...);
                b.leave(t);
                control.arrive_and_wait();  // every thread is done with it
            }
        });
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                b.reset(n, smem);
                emu_block = &b;
                current = {x, y, z};
                control.arrive_and_wait();
                control.arrive_and_wait();
                b.check_end(current);
            }
    done = true;
    control.arrive_and_wait();
    for (auto& t : threads) t.join();
    emu_block = nullptr;
}
#endif

// ---- common.cuh's helpers -----------------------------------------------------------------------

inline float to_f32(bf16 x) { return __bfloat162float(x); }
inline float to_f32(float x) { return x; }
inline bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

// Each takes its caller's site, so a lane's shuffles inside are named by the kernel's line.
inline float warp_sum(float v, EmuSite at = EmuSite::here()) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o, at);
    return v;
}
inline double warp_sum_f64(double v, EmuSite at = EmuSite::here()) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o, at);
    return v;
}
inline float warp_max(float v, EmuSite at = EmuSite::here()) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o, at));
    return v;
}
inline unsigned pack_bf16x2(float lo, float hi) {
    return unsigned(to_bf16(lo).x) | (unsigned(to_bf16(hi).x) << 16);
}

inline float emu_lo(unsigned r) { return __bfloat162float({uint16_t(r & 0xffff)}); }
inline float emu_hi(unsigned r) { return __bfloat162float({uint16_t(r >> 16)}); }

// How the tensor cores add (LOREN_EMU_TC): `exact`, the default, each dot product summed in
// double, in order, and rounded to f32; or as one generation's bf16 multipliers are measured to,
// bit for bit (Xie, Wang, Yang & Yang, "MMA-Sim: Bit-Accurate Reference Model of Tensor Cores and
// Matrix Cores", 2025, validated against the hardware; the kind first measured by Fasi, Higham,
// Mikaitis & Pranesh, PeerJ CS 2021). Each fused dot-add takes the accumulator and a block of products (a bf16 product is
// exact: its significand, up to 4, at the sum of its factors' exponents), aligns every term to
// the largest exponent among them, cuts each toward zero `bits` fractional bits below it, adds
// them exactly and cuts the sum toward zero to f32, past its largest finite value to an infinity
// (a NaN or an infinity among the terms is passed on as the exact sum has it; a zero is +0, as
// MMA-Sim gives it):
//   `ampere` (sm_80): m16n8k16 as two blocks of 8, 24 bits;
//   `hopper` (sm_90): mma.sync and wgmma over all 16 products at once, 25 bits;
//   `truncate`: the fake device's own (`hopper` under LOREN_FAKE_CC=9.0, else `ampere`).
// Parity bounds that hold under both do not rest on the emulator's exact sums.
enum class EmuTc { Exact, Ampere, Hopper };

inline EmuTc emu_tc_mode() {
    static const EmuTc mode = [] {
        const char* v = std::getenv("LOREN_EMU_TC");
        const char* cc = std::getenv("LOREN_FAKE_CC");
        const bool hopper_device = cc && std::strcmp(cc, "9.0") == 0;
        if (!v || !*v || std::strcmp(v, "exact") == 0) return EmuTc::Exact;
        if (std::strcmp(v, "ampere") == 0) return EmuTc::Ampere;
        if (std::strcmp(v, "hopper") == 0) return EmuTc::Hopper;
        if (std::strcmp(v, "truncate") == 0) return hopper_device ? EmuTc::Hopper : EmuTc::Ampere;
        std::fprintf(stderr, "LOREN_EMU_TC=%s: expected exact, ampere, hopper or truncate\n", v);
        std::abort();
    }();
    return mode;
}

// The exponent the multipliers align a nonzero bf16 or f32 value by (normal as a double, so its
// exponent field is the value's): subnormals sit at -126.
inline int emu_tc_exponent(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    return std::max(int((bits >> 52) & 0x7ff) - 1023, -126);
}

// c + Σ a[k]·b[k] over k < n ≤ 16, as one fused dot-add keeping `bits` fractional bits (above).
// Every term is a whole number of units under 2^27 of them, so their sum is exact in double.
inline float emu_tc_fused(float c, const double* a, int a_step, const double* b, int b_step, int n,
                          int bits) {
    if (n > 16) {
        std::fprintf(stderr, "emu_tc_fused: %d products, where one mma or wgmma adds at most 16\n", n);
        std::abort();
    }
    double p[16];
    double exact = c;
    int emax = c != 0 ? emu_tc_exponent(c) : INT_MIN;
    for (int k = 0; k < n; ++k) {
        const double x = a[k * a_step], y = b[k * b_step];
        p[k] = x * y;
        exact += p[k];
        if (p[k] != 0) emax = std::max(emax, emu_tc_exponent(x) + emu_tc_exponent(y));
    }
    if (!std::isfinite(exact)) return (float)exact;
    if (emax == INT_MIN) return 0.0f;
    // Powers of two: scaling by them is exact.
    const double per_unit = std::ldexp(1.0, bits - emax), unit = std::ldexp(1.0, emax - bits);
    double units = std::trunc(c * per_unit);
    for (int k = 0; k < n; ++k) units += std::trunc(p[k] * per_unit);
    const double s = units * unit;
    if (std::fabs(s) >= 0x1p128) return std::copysign(INFINITY, s);
    float f = (float)s;
    if (std::fabs((double)f) > std::fabs(s)) f = std::nextafter(f, 0.0f);
    return f == 0 ? 0.0f : f;
}

// d + Σ a[k]·b[k] over k < n (at most 16: one mma's or wgmma's K) as `mode` adds it.
inline float emu_tc_dot(EmuTc mode, float d, const double* a, int a_step, const double* b,
                        int b_step, int n) {
    switch (mode) {
    case EmuTc::Hopper:
        return emu_tc_fused(d, a, a_step, b, b_step, n, 25);
    case EmuTc::Ampere: {
        const int first = std::min(n, 8);
        d = emu_tc_fused(d, a, a_step, b, b_step, first, 24);
        if (n == first) return d;
        return emu_tc_fused(d, a + first * a_step, a_step, b + first * b_step, b_step, n - first, 24);
    }
    case EmuTc::Exact:
        break;
    }
    double exact = d;
    for (int k = 0; k < n; ++k) exact += a[k * a_step] * b[k * b_step];
    return (float)exact;
}

inline float emu_tc_dot16(float d, const double* a, int a_step, const double* b, int b_step) {
    return emu_tc_dot(emu_tc_mode(), d, a, a_step, b, b_step, 16);
}

inline void mma_bf16_16816(float d[4], const unsigned a[4], unsigned b0, unsigned b1,
                           EmuSite at = EmuSite::here()) {
    EmuWarp& w = emu_warp();
    const int lane = emu_lane();
    for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    emu_warp_exchange("mma.sync", at);
    double A[16][16], B[16][8];
    for (int t = 0; t < 32; ++t) {
        const int g = t / 4, q = t % 4;
        const unsigned* at = w.a[t];
        A[g][2 * q] = emu_lo(at[0]);
        A[g][2 * q + 1] = emu_hi(at[0]);
        A[g + 8][2 * q] = emu_lo(at[1]);
        A[g + 8][2 * q + 1] = emu_hi(at[1]);
        A[g][2 * q + 8] = emu_lo(at[2]);
        A[g][2 * q + 9] = emu_hi(at[2]);
        A[g + 8][2 * q + 8] = emu_lo(at[3]);
        A[g + 8][2 * q + 9] = emu_hi(at[3]);
        B[2 * q][g] = emu_lo(w.b[t][0]);
        B[2 * q + 1][g] = emu_hi(w.b[t][0]);
        B[2 * q + 8][g] = emu_lo(w.b[t][1]);
        B[2 * q + 9][g] = emu_hi(w.b[t][1]);
    }
    emu_warp_done();
    const int g = lane / 4, q = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
        d[e] = emu_tc_dot16(d[e], A[row], 1, &B[0][col], 8);
    }
}

// ldmatrix reads each row as one 16-byte line: the PTX ISA asks row addresses aligned to it.
inline void emu_check_ldmatrix_row(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "ldmatrix with a row address not aligned to 16 bytes\n");
        std::abort();
    }
}

inline void ldmatrix_x4(unsigned r[4], const void* p,
                        EmuSite at = EmuSite::here()) {
    emu_check_ldmatrix_row(p);
    EmuWarp& w = emu_warp();
    const int lane = emu_lane();
    w.ptr[lane] = p;
    emu_warp_exchange("ldmatrix", at);
    for (int i = 0; i < 4; ++i) {
        const uint16_t* row = static_cast<const uint16_t*>(w.ptr[8 * i + lane / 4]);
        r[i] = unsigned(row[2 * (lane % 4)]) | (unsigned(row[2 * (lane % 4) + 1]) << 16);
    }
    emu_warp_done();
}

inline void ldmatrix_x4_trans(unsigned r[4], const void* p,
                              EmuSite at = EmuSite::here()) {
    emu_check_ldmatrix_row(p);
    EmuWarp& w = emu_warp();
    const int lane = emu_lane();
    w.ptr[lane] = p;
    emu_warp_exchange("ldmatrix.trans", at);
    for (int i = 0; i < 4; ++i) {
        const uint16_t* r0 = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * (lane % 4)]);
        const uint16_t* r1 = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * (lane % 4) + 1]);
        r[i] = unsigned(r0[lane / 4]) | (unsigned(r1[lane / 4]) << 16);
    }
    emu_warp_done();
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0) {
        std::fprintf(stderr, "cp.async with a misaligned address\n");
        std::abort();
    }
    // Volatile, so that the compiler keeps every store and ThreadSanitizer sees each one.
    volatile uint16_t* poison = static_cast<volatile uint16_t*>(dst);
    for (int i = 0; i < 8; ++i) poison[i] = 0xffff;
    emu_self->open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
    emu_self->groups.push_back(std::move(emu_self->open));
    emu_self->open.clear();
}
template <int N> inline void cp_async_wait() {
    auto& groups = emu_self->groups;
    while (groups.size() > (size_t)N) {
        for (const EmuCopy& c : groups.front()) {
            if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
            std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
            if (!emu_self->unfenced) {
                emu_self->unfenced = true;
                emu_block->unfenced.fetch_add(1, std::memory_order_relaxed);
            }
        }
        groups.erase(groups.begin());
    }
}

inline int group_index(int g, int groups) { return groups == 1 ? 0 : g; }

// As kernels/common.cuh: V = 8 elements per access (one 16-byte unit for bf16, two for f32), or
// V = 1. The vector path insists on the 16-byte alignment the hardware needs, so a launcher that
// picks it for an unaligned pointer fails here too.
constexpr int VEC = 8;

// Run `body<VEC>` or `body<1>` as the launcher chose (its `vec` argument).
#define DISPATCH_VEC(vec, body, ...) \
    do {                             \
        if (vec)                     \
            body<VEC>(__VA_ARGS__);  \
        else                         \
            body<1>(__VA_ARGS__);    \
    } while (0)

inline void emu_aligned16(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "emulator: misaligned 16-byte vector access at %p\n", p);
        std::abort();
    }
}

template <int V> inline void load_vec(const bf16* p, float (&v)[V]) {
    if constexpr (V == 8) emu_aligned16(p);
    for (int i = 0; i < V; ++i) v[i] = to_f32(p[i]);
}
template <int V> inline void load_vec(const float* p, float (&v)[V]) {
    if constexpr (V == 8) emu_aligned16(p);
    for (int i = 0; i < V; ++i) v[i] = p[i];
}
template <int V> inline void store_vec(bf16* p, const float (&v)[V]) {
    if constexpr (V == 8) emu_aligned16(p);
    for (int i = 0; i < V; ++i) p[i] = to_bf16(v[i]);
}
template <int V> inline void store_vec(float* p, const float (&v)[V]) {
    if constexpr (V == 8) emu_aligned16(p);
    for (int i = 0; i < V; ++i) p[i] = v[i];
}

// The first stage's store of a column sum over a strip of 32·V columns (the bias-gradient,
// LayerNorm-parameter and bias + GELU partials): each warp's `acc` (lane l holds strip columns
// V·l .. V·l + V − 1, summed over that warp's rows) goes to `red`, then one thread per column adds
// the warps in order and writes out[col] for the `cols` strip columns that exist. Every thread of
// the block must call it.
template <int V>
inline void strip_sums(const float (&acc)[V], float (*red)[WARP * VEC], int cols, float* out) {
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

// ---- Hopper's wgmma (the kernels' __CUDA_ARCH_FEAT_SM90_ALL parts) ------------------------------

// The made-up shared address of dynamic shared memory's first byte: 16-byte aligned, as the
// hardware guarantees, but not 1024-byte aligned.
constexpr unsigned EMU_SMEM_ORIGIN = 0x410;

inline unsigned emu_smem_addr(const void* p) {
    const auto* c = static_cast<const unsigned char*>(p);
    const unsigned char* base = emu_block->dyn.data();
    if (c < base || c >= base + emu_block->smem) {
        std::fprintf(stderr, "a wgmma operand outside dynamic shared memory\n");
        std::abort();
    }
    return EMU_SMEM_ORIGIN + unsigned(c - base);
}

inline unsigned char* align_1024(unsigned char* p) {
    return p + ((1024u - (emu_smem_addr(p) & 1023u)) & 1023u);
}

inline u64 sw128_desc(const void* tile, unsigned lbo = 16) {
    return (u64)((emu_smem_addr(tile) & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) |
           ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

inline void fence_proxy_async() {
    emu_block->proxy_fenced.store(true, std::memory_order_relaxed);
    if (emu_self->unfenced) {
        emu_self->unfenced = false;
        emu_block->unfenced.fetch_sub(1, std::memory_order_relaxed);
    }
}
inline void wgmma_fence() { emu_self->wg_fenced = true; }
inline void wgmma_fence_operands(float (&)[64]) {}

// Element (mn, k) of a bf16 operand behind a 128-byte-swizzle descriptor, K-major or MN-major,
// by the PTX ISA's canonical layouts (in 16-byte units T = 8 elements):
//   K-major   ((8, m), (T, 2k)) : ((8T, SBO), (1, T))    a row of 64 K values is 128 bytes
//   MN-major  ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))   a K row of 64 MN values is 128 bytes
// then the 128-byte swizzle on the byte address: bits 4-6 ^= bits 7-9.
inline double emu_desc_read(u64 desc, int mn, int k, bool mn_major) {
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "wgmma descriptor %016llx: only the 128-byte swizzle at base offset 0 is modelled\n", desc);
        std::abort();
    }
    const unsigned start = unsigned(desc & 0x3FFF) << 4;
    const unsigned lbo = unsigned((desc >> 16) & 0x3FFF) << 4;
    const unsigned sbo = unsigned((desc >> 32) & 0x3FFF) << 4;
    unsigned addr = mn_major
        ? start + unsigned(mn / 64) * lbo + unsigned(mn % 64) * 2 + unsigned(k / 8) * sbo + unsigned(k % 8) * 128
        : start + unsigned(mn / 8) * sbo + unsigned(mn % 8) * 128 + unsigned(k) * 2;
    addr ^= ((addr >> 7) & 7) << 4;
    if (addr < EMU_SMEM_ORIGIN || addr - EMU_SMEM_ORIGIN + 2 > emu_block->smem) {
        std::fprintf(stderr, "wgmma reads shared address %#x, outside dynamic shared memory\n", addr);
        std::abort();
    }
    uint16_t v, seen;
    std::memcpy(&v, emu_block->dyn.data() + (addr - EMU_SMEM_ORIGIN), 2);
    std::memcpy(&seen, emu_block->async_view.data() + (addr - EMU_SMEM_ORIGIN), 2);
    if (v != seen) {
        std::fprintf(stderr,
                     "wgmma reads shared address %#x, stored since the last fence.proxy.async "
                     "before a barrier: the tensor cores may read stale data\n",
                     addr);
        std::abort();
    }
    return __bfloat162float({v});
}


template <bool B_MN = false>
inline void wgmma_m64n128k16(float (&d)[64], u64 desc_a, u64 desc_b, int scale_d) {
    if (blockDim.x % 128 != 0) {
        std::fprintf(stderr, "wgmma in a block of %u threads: not whole warpgroups\n", blockDim.x);
        std::abort();
    }
    if (!emu_self->wg_fenced) {
        std::fprintf(stderr, "wgmma.mma_async with no wgmma.fence since the last commit\n");
        std::abort();
    }
    // Checked where the fibers of a block stand between two barriers: a thread that ran before
    // this one and fenced is not caught, one that has not yet run its fence is.
    if (emu_block->unfenced.load(std::memory_order_relaxed) > 0) {
        std::fprintf(stderr,
                     "wgmma.mma_async while cp.async copies are in shared memory with no "
                     "fence.proxy.async after them: the tensor cores may read stale data\n");
        std::abort();
    }
    emu_self->wg_open.push_back({d, desc_a, desc_b, scale_d, B_MN});
    emu_block->wg_issued[threadIdx.x].push_back({desc_a, desc_b, scale_d != 0, B_MN});
}

inline void wgmma_commit() {
    emu_self->wg_groups.push_back(std::move(emu_self->wg_open));
    emu_self->wg_open.clear();
    emu_self->wg_fenced = false;
}

// This thread's 64 accumulators of D[64x128] = A[64x16]·B[16x128] (+ D).
inline void emu_wgmma_run(const EmuWgmma& op) {
    const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
    for (int i = 0; i < 64; ++i) {
        const int row = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
        const int col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        double a[16], b[16];
        for (int k = 0; k < 16; ++k) {
            a[k] = emu_desc_read(op.da, row, k, false);
            b[k] = emu_desc_read(op.db, col, k, op.b_mn);
        }
        op.d[i] = emu_tc_dot16(op.scale_d ? op.d[i] : 0.0f, a, 1, b, 1);
    }
}

template <int N> inline void wgmma_wait() {
    auto& groups = emu_self->wg_groups;
    while (groups.size() > (size_t)N) {
        for (const EmuWgmma& op : groups.front()) emu_wgmma_run(op);
        groups.erase(groups.begin());
    }
}
