use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use loren_kernels::Gpu;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::{MemTag, MemoryTracker};

/// Which hardware a [`Device`] is ([`Device::kind`]): what its `Display` writes as `cpu` or
/// `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host, computing in f32 on rayon's current thread pool (see [`DeviceSpec`]).
    Cpu,
    /// CUDA device `N` (0-based); [`Device::compute_dtype`] says what it stores in bf16.
    Cuda(usize),
}

/// A handle to where tensors live, with that place's memory accounting.
///
/// Cloning is cheap and shares the accounting. Two calls to [`Device::cpu`] give two devices with
/// separate accounting, so independent runs (the methods of `loren compare`, or tests running in
/// parallel) measure their own peaks.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    kind: DeviceKind,
    memory: MemoryTracker,
    pool: Mutex<BufferPool>,
    gpu: Option<Arc<Gpu>>,
}

/// Freed CPU buffers kept for reuse by length. A training step allocates the same sizes every
/// time, so after the first step allocation costs neither a page fault nor a trip to the OS.
/// The pool holds at most as many bytes as the device's peak accounted use, so the process never
/// keeps more than twice its working set.
///
/// When a freed buffer does not fit, the buffers freed longest ago make room for it: sizes that
/// stop recurring (the last, shorter batch of an evaluation set, another set's batches) would
/// otherwise fill the pool for good and leave every new size to the OS.
#[derive(Default)]
struct BufferPool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    /// The length of every free buffer, oldest first.
    order: VecDeque<usize>,
    bytes: u64,
}

impl BufferPool {
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        let v = self.free.get_mut(&len).and_then(Vec::pop)?;
        if let Some(i) = self.order.iter().rposition(|&l| l == len) {
            self.order.remove(i);
        }
        self.bytes -= (len * 4) as u64;
        Some(v)
    }

    /// Keep `v`, evicting the oldest buffers if it would take the pool over `cap`.
    fn keep(&mut self, v: Vec<f32>, cap: u64) {
        let bytes = (v.len() * 4) as u64;
        if bytes > cap {
            return;
        }
        while self.bytes + bytes > cap {
            let Some(len) = self.order.pop_front() else {
                return;
            };
            if self.free.get_mut(&len).and_then(Vec::pop).is_some() {
                self.bytes -= (len * 4) as u64;
            }
        }
        self.bytes += bytes;
        self.order.push_back(v.len());
        self.free.entry(v.len()).or_default().push(v);
    }
}

/// The pool may always hold this much, whatever the peak.
const POOL_FLOOR: u64 = 64 << 20;

impl Device {
    /// The CPU, with accounting of its own (see [`Device`]). Cannot fail and opens nothing.
    pub fn cpu() -> Device {
        Device {
            inner: Arc::new(DeviceInner {
                kind: DeviceKind::Cpu,
                memory: MemoryTracker::default(),
                pool: Mutex::default(),
                gpu: None,
            }),
        }
    }

    /// CUDA device `ordinal`, with accounting of its own. The GPU itself (its context, stream
    /// and loaded kernels) is opened once per process and shared by every `Device` on it.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device {
            inner: Arc::new(DeviceInner {
                kind: DeviceKind::Cuda(ordinal),
                memory: MemoryTracker::default(),
                pool: Mutex::default(),
                gpu: Some(shared_gpu(ordinal)?),
            }),
        })
    }

    /// The same hardware with fresh accounting, for a run that measures its own peaks.
    pub fn fresh(&self) -> Device {
        Device {
            inner: Arc::new(DeviceInner {
                kind: self.inner.kind,
                memory: MemoryTracker::default(),
                pool: Mutex::default(),
                gpu: self.inner.gpu.clone(),
            }),
        }
    }

    /// The GPU behind a CUDA device.
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.inner.gpu.as_ref()
    }

    /// The GPU, or an error naming `op` for a CPU device.
    pub(crate) fn require_gpu(&self, op: &'static str) -> Result<&Gpu> {
        self.inner.gpu.as_deref().ok_or_else(|| Error::Unsupported {
            op,
            device: self.to_string(),
        })
    }

    /// What activations and GEMM weights are stored in here: f32 on the CPU, bf16 on a GPU.
    pub fn compute_dtype(&self) -> DType {
        if self.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }
    }

    /// The dtype a tensor asked for as `want` gets: the CPU computes everything in f32.
    pub fn storage_dtype(&self, want: DType) -> DType {
        if self.is_cpu() { DType::F32 } else { want }
    }

    /// Hand the GPU memory kept for reuse back to the driver, so that [`Device::mem_info`]
    /// counts it as free (freed device memory otherwise stays with the process, as freed host
    /// buffers stay in this device's pool). Synchronises; a no-op on the CPU.
    pub fn release_cached_memory(&self) -> Result<()> {
        match self.gpu() {
            Some(g) => Ok(g.release_cached_memory()?),
            None => Ok(()),
        }
    }

    /// The device's own free and total bytes (cuMemGetInfo), on a GPU. Memory the process has
    /// freed but keeps for reuse counts as used (see [`Device::release_cached_memory`]).
    pub fn mem_info(&self) -> Option<(usize, usize)> {
        self.gpu().and_then(|g| g.context().mem_get_info().ok())
    }

    /// The device's name: "cpu", or the GPU's.
    pub fn name(&self) -> String {
        match self.gpu() {
            Some(g) => g.name().to_string(),
            None => "cpu".to_string(),
        }
    }

    pub fn kind(&self) -> DeviceKind {
        self.inner.kind
    }

    pub fn is_cpu(&self) -> bool {
        self.inner.kind == DeviceKind::Cpu
    }

    pub fn memory(&self) -> &MemoryTracker {
        &self.inner.memory
    }

    /// A host buffer of `len` elements, reused from the pool when one is free. Its contents are
    /// whatever was there: the caller overwrites them.
    pub(crate) fn host_buffer(&self, len: usize) -> Vec<f32> {
        let reused = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.take(len)
        };
        reused.unwrap_or_else(|| vec![0.0; len])
    }

    /// Give a host buffer back for reuse, or drop it when the pool is full.
    pub(crate) fn recycle(&self, v: Vec<f32>) {
        let bytes = (v.len() * 4) as u64;
        if bytes == 0 {
            return;
        }
        let cap = self.inner.memory.report().total_peak.max(POOL_FLOOR);
        let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.keep(v, cap);
    }

    /// Wait until every queued operation has finished: a no-op on the CPU, where ops run as they
    /// are called. Timers call it before reading the clock.
    pub fn synchronize(&self) -> Result<()> {
        match self.gpu() {
            Some(g) => Ok(g.synchronize()?),
            None => Ok(()),
        }
    }

    /// `f`, and the seconds its work takes here: CUDA events on the stream around the work it
    /// enqueues on a GPU, the wall clock on the CPU (where ops run as they are called).
    pub fn time<R>(&self, f: impl FnOnce() -> R) -> Result<(R, f64)> {
        let start = self.mark()?;
        let out = f();
        let end = self.mark()?;
        Ok((out, self.seconds_between(&start, &end)?))
    }

    /// A point on this device's timeline: an event on a GPU's stream, which the device passes
    /// once the work enqueued before it is done; the wall clock on the CPU.
    pub fn mark(&self) -> Result<Mark> {
        Ok(match self.gpu() {
            Some(g) => Mark::Gpu(g.mark()?),
            None => Mark::Cpu(std::time::Instant::now()),
        })
    }

    /// Seconds of this device's time from `earlier` to `later` (two of its [`Device::mark`]s),
    /// waiting for `later` on a GPU.
    pub fn seconds_between(&self, earlier: &Mark, later: &Mark) -> Result<f64> {
        match (self.gpu(), earlier, later) {
            (Some(g), Mark::Gpu(a), Mark::Gpu(b)) => Ok(g.seconds_between(a, b)?),
            (None, Mark::Cpu(a), Mark::Cpu(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            _ => Err(Error::invalid(
                "seconds_between",
                format!("the marks were not both made on {self}"),
            )),
        }
    }

    /// Whether two handles are the same device with the same accounting.
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// A point on a device's timeline ([`Device::mark`]).
pub enum Mark {
    Cpu(std::time::Instant),
    Gpu(loren_kernels::GpuMark),
}

impl fmt::Debug for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mark::Cpu(t) => write!(f, "Mark::Cpu({t:?})"),
            Mark::Gpu(_) => f.write_str("Mark::Gpu"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.kind {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Which device to open: `auto`, `cpu`, `cuda` (GPU 0) or `cuda:N`, as the command line spells
/// it (parsed by [`FromStr`], which also takes `gpu` for GPU 0).
///
/// # What opening a device does to the process
///
/// - **The first GPU open compiles every kernel.** The first open of a GPU in a process (by
///   [`DeviceSpec::Cuda`], or [`DeviceSpec::Auto`] where a GPU can be used) loads the CUDA driver
///   and NVRTC, checks that cuBLAS is there (its handle is made at the first product that uses it),
///   compiles every kernel file with NVRTC for the device's arch (in parallel; seconds when
///   nothing is cached) and loads the modules. A device of compute capability below
///   8.0 is refused. The GPU (context, stream, modules) then stays open until the process ends,
///   shared by every later [`Device`] on it (each with accounting of its own). An open that
///   failed is tried again by the next, but with what the first search for NVRTC, the headers
///   and cuBLAS found, or failed to find: each is searched for once a process. Device memory
///   the process frees stays with it for reuse ([`Device::release_cached_memory`] hands it
///   back).
/// - **PTX is cached on disk**, in `$LOREN_CACHE_DIR` (that folder itself), else
///   `$XDG_CACHE_HOME/loren/ptx`, else `$HOME/.cache/loren/ptx`, and nowhere when none of these
///   is set. Files are keyed by a hash of the source, arch, NVRTC version and options, so later
///   processes skip NVRTC. A cache that cannot be read or written is skipped without an error.
/// - **Where CUDA is looked for** (see [`loren_kernels::probe`]): NVRTC from
///   `$LOREN_NVRTC_LIB` (the path of a `libnvrtc.so*`; nothing else is tried when it is set),
///   else the loader's search path (`LD_LIBRARY_PATH`, the ld.so cache), else the pip wheels of
///   `scripts/cuda-wheels.sh` under `$LOREN_CUDA_WHEELS` or `.cache/cuda-wheels` in the source
///   tree loren was built from (never the working directory's). The headers (`cuda_bf16.h`) from
///   `$LOREN_CUDA_INCLUDE` alone when it is set, else beside that NVRTC, `$CUDA_HOME/include`,
///   `$CUDA_PATH/include`, `/usr/local/cuda/include`, `/opt/cuda/include`, `/usr/include`, the
///   wheels. The driver (`libcuda`) and cuBLAS from the loader's search path.
/// - **Other environment variables.** `LOREN_WGMMA=1` makes the fused LoRA products take
///   Hopper's wgmma kernels on an sm_90a build (read when a GPU is opened; mma.sync otherwise).
///   `LOREN_REQUIRE_GPU` concerns loren's own GPU tests and benchmarks only.
/// - **`Auto` falls back to the CPU silently.** It takes GPU 0 where the driver sees a device
///   and the driver, NVRTC, cuBLAS and the kernels all work, and the CPU otherwise, with no error
///   and no message. [`DeviceSpec::open_explained`] says why, where a GPU was there but could
///   not be used; [`Device::kind`] (or `loren::Ensemble::device_name`) says which was taken.
///   `Cuda(n)` fails instead of falling back.
/// - **CPU ops run on rayon's current thread pool**: the matrix products
///   ([`crate::ops::gemm`]) and the other ops alike. Called from inside
///   [`rayon::ThreadPool::install`], they use that pool, so
///   `pool.install(|| ens.predict(&images, b))` bounds the computation's threads; elsewhere,
///   rayon's global pool (`RAYON_NUM_THREADS`, by default one thread per logical CPU). Called
///   from a thread outside the pool, each op's parallel section wakes the pool's workers and
///   sleeps until they finish: a small model's training step makes hundreds of them, so a
///   caller that trains or predicts on the CPU does best to call from inside the pool
///   (`rayon::scope(|_| ...)` or `pool.install(...)`), as the `loren` binary runs its
///   commands. A prediction or training epoch of more than one batch also makes the next batch
///   on one background thread of its own, whose parallel parts (MC Dropout's image hashes, a
///   GPU's staging copy) run on rayon's global pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// GPU 0 where one can be used, else the CPU (see above).
    Auto,
    /// The CPU, in f32.
    Cpu,
    /// CUDA device `N` (0-based), or an error where it cannot be used.
    Cuda(usize),
}

/// `auto`, `cpu`, `cuda` (or `gpu`) or `cuda:N`, in any case, spaces around ignored.
impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(Error::Device(format!(
                    "unknown device '{s}': expected auto, cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Device bytes held outside a tensor (a kernel's table, its scratch, a copy of keys), booked
/// under one tag from when they are made until this is dropped.
pub(crate) struct Booked {
    device: Device,
    tag: MemTag,
    bytes: u64,
}

impl Booked {
    pub(crate) fn new(device: &Device, tag: MemTag, bytes: u64) -> Booked {
        device.memory().alloc(tag, bytes);
        Booked {
            device: device.clone(),
            tag,
            bytes,
        }
    }
}

impl Drop for Booked {
    fn drop(&mut self) {
        self.device.memory().free(self.tag, self.bytes);
    }
}

impl DeviceSpec {
    /// Open the device. `auto` takes GPU 0 when one can be used and the CPU otherwise
    /// ([`DeviceSpec::open_explained`] says why not, where a GPU is there).
    pub fn open(self) -> Result<Device> {
        Ok(self.open_explained()?.0)
    }

    /// [`DeviceSpec::open`], and, where `auto` took the CPU on a machine whose driver sees a
    /// CUDA device, why that device could not be used (no NVRTC or cuBLAS, an arch older than
    /// sm_80, a kernel that failed to build): a run many times slower than its user expects
    /// should say so. None on a machine with no GPU, where the CPU is no surprise.
    pub fn open_explained(self) -> Result<(Device, Option<String>)> {
        let device = match self {
            DeviceSpec::Cpu => Device::cpu(),
            DeviceSpec::Cuda(i) => Device::cuda(i)?,
            DeviceSpec::Auto if !loren_kernels::gpu_present() => Device::cpu(),
            DeviceSpec::Auto => {
                let gpu = loren_kernels::cuda_available().map_err(Error::from);
                return Ok(match gpu.and_then(|()| Device::cuda(0)) {
                    Ok(gpu) => (gpu, None),
                    Err(e) => (Device::cpu(), Some(e.to_string())),
                });
            }
        };
        Ok((device, None))
    }
}

/// Each GPU is opened once per process: opening loads every kernel module, which costs seconds.
fn shared_gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut gpus = GPUS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(g) = gpus.get(&ordinal) {
        return Ok(Arc::clone(g));
    }
    let gpu = Arc::new(Gpu::new(ordinal)?);
    gpus.insert(ordinal, Arc::clone(&gpu));
    Ok(gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_stays_under_its_cap_by_evicting_the_oldest_buffers() {
        let mut pool = BufferPool::default();
        let cap = 4 * 100;
        pool.keep(vec![0.0; 40], cap);
        pool.keep(vec![0.0; 30], cap);
        pool.keep(vec![0.0; 20], cap);
        assert_eq!(pool.bytes, 4 * 90);
        // 50 more elements only fit once the oldest (40) is gone; 30 and 20 stay.
        pool.keep(vec![0.0; 50], cap);
        assert_eq!(pool.bytes, 4 * 100);
        assert!(pool.take(40).is_none());
        assert_eq!(pool.take(30).map(|v| v.len()), Some(30));
        assert_eq!(pool.order, [20, 50]);
        // Larger than the whole pool: not kept, nothing evicted.
        pool.keep(vec![0.0; 101], cap);
        assert_eq!(pool.bytes, 4 * 70);
        assert_eq!(pool.order, [20, 50]);
    }

    #[test]
    fn the_cpu_timer_counts_the_work_and_returns_its_result() {
        let (out, s) = Device::cpu()
            .time(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                7
            })
            .unwrap();
        assert_eq!(out, 7);
        assert!((0.02..1.0).contains(&s), "{s} s for a 20 ms sleep");
    }
}
