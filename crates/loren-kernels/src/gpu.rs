//! [`Gpu`]: one device, one stream, every kernel module loaded.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{
    self as cu, CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUmemPool_attribute,
    cudaError_enum,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};

use crate::compile::{self, Arch, ParamKind};
use crate::error::{KernelError, Result};
use crate::launch::lora::GemmPath;
use crate::probe;
use crate::sources::{Kernel, SOURCES};
use crate::staging::Staging;

/// One CUDA device with loren's kernels loaded, and the single stream every launcher uses.
///
/// All modules are compiled (or read from the PTX cache) and loaded when the `Gpu` is opened,
/// not lazily: a kernel that fails to build or load is reported at start-up rather than in the
/// middle of a training step, and no launcher ever stalls the host on NVRTC. A cold compile of
/// every file takes a few seconds (the files compile in parallel); afterwards the disk cache makes
/// it instant.
///
/// Launchers are asynchronous: they validate shapes and buffer lengths on the host, enqueue on
/// [`Gpu::stream`], and return. None synchronises. cudarc's cross-stream event tracking is turned
/// off for this context (one stream needs none, and it would add event records to every launch),
/// so buffers used with a `Gpu` must be allocated on its stream, after it was opened.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    arch: Arch,
    /// The tensor-core path of the fused LoRA GEMMs (see [`GemmPath::choose`]).
    gemm_path: GemmPath,
    functions: HashMap<Kernel, CudaFunction>,
    /// Each kernel's parameter types, read from its PTX: every launch is checked against them.
    signatures: HashMap<Kernel, Vec<ParamKind>>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    /// The page-locked buffers staged data goes up from ([`Gpu::stage`]).
    staging: Staging,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field("arch", &self.arch)
            .finish()
    }
}

impl Gpu {
    /// Open device `ordinal`: probe the driver, NVRTC and cuBLAS, create the context and stream, pick
    /// the arch from the compute capability, and build and load every kernel module. Buffers come
    /// from the device's stream-ordered pool, which from here on keeps freed memory for reuse
    /// until [`Gpu::release_cached_memory`].
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let count = probe::driver()?;
        if ordinal >= count {
            return Err(KernelError::Unavailable(format!(
                "there is no CUDA device {ordinal} ({count} found)"
            )));
        }
        let nvrtc = probe::nvrtc()?;
        probe::cublas()?;
        let ctx = CudaContext::new(ordinal).map_err(KernelError::driver("opening the device"))?;
        // SAFETY: no CudaSlice exists on this context object yet, and loren uses one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(KernelError::driver("creating the stream"))?;
        let name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        let cc = ctx
            .compute_capability()
            .map_err(KernelError::driver("reading the compute capability"))?;
        if cc.0 < 8 {
            return Err(KernelError::Unavailable(format!(
                "{name} has compute capability {}.{}; loren's kernels need 8.0 (Ampere) or newer",
                cc.0, cc.1
            )));
        }
        let arch = compile::arch_for_device(cc)?;

        let ptxs = std::thread::scope(|s| {
            let handles: Vec<_> = SOURCES
                .iter()
                .map(|src| s.spawn(move || compile::compile(src, arch)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(KernelError::Unavailable(
                            "a kernel compile thread panicked".into(),
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;

        let mut functions = HashMap::new();
        let mut signatures = HashMap::new();
        for (src, ptx) in SOURCES.iter().zip(ptxs) {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.text.clone()))
                .map_err(|e| load_error(e, src.file, arch, nvrtc.version))?;
            for kernel in src.kernels(arch) {
                let f =
                    module
                        .load_function(kernel.name())
                        .map_err(|_| KernelError::MissingEntry {
                            file: src.file,
                            name: kernel.name(),
                        })?;
                functions.insert(kernel, f);
                let params = ptx.params(kernel.name()).ok_or(KernelError::MissingEntry {
                    file: src.file,
                    name: kernel.name(),
                })?;
                signatures.insert(kernel, params);
            }
        }

        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(KernelError::driver("reading the shared memory limit"))?
            as usize;
        for (kernel, bytes) in crate::launch::dynamic_smem() {
            let Some(f) = functions.get(&kernel) else {
                continue; // not built for this arch
            };
            if bytes > optin {
                return Err(KernelError::Unavailable(format!(
                    "{} needs {bytes} bytes of shared memory per block; {name} allows {optin}",
                    kernel.name()
                )));
            }
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(KernelError::driver(format!(
                "raising the shared memory limit of {}",
                kernel.name()
            )))?;
        }

        keep_freed_memory(&ctx)?;
        let gemm_path = GemmPath::choose(arch);
        Ok(Gpu {
            ctx,
            stream,
            name,
            compute_capability: cc,
            arch,
            gemm_path,
            functions,
            signatures,
            blas: OnceLock::new(),
            staging: Staging::new(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The one stream every launcher enqueues on. Allocate and copy on it too.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The arch the kernels were compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The tensor-core path [`Gpu::lora_forward`] and [`Gpu::lora_backward`] take.
    pub fn gemm_path(&self) -> GemmPath {
        self.gemm_path
    }

    /// Whether this device's build has the wgmma kernels (sm_90a: H100, H200).
    pub fn has_wgmma(&self) -> bool {
        self.arch == Arch::SM90A
    }

    /// Hand the memory the stream-ordered pool keeps for reuse (see [`Gpu::new`]) back to the
    /// driver, so that cuMemGetInfo counts it as free again: before reading free memory for a
    /// budget, or between measured runs that should not see each other's peaks. Synchronises.
    pub fn release_cached_memory(&self) -> Result<()> {
        self.synchronize()?;
        if let Some(pool) = default_pool(&self.ctx)? {
            // SAFETY: `pool` is this device's default pool; trimming only releases memory no
            // allocation holds (and after the synchronisation, no freed buffer is still in use).
            unsafe { cu::cuMemPoolTrimTo(pool, 0) }
                .result()
                .map_err(KernelError::driver("trimming the memory pool"))?;
        }
        Ok(())
    }

    /// Wait for everything enqueued so far (the only synchronising call in this crate, besides
    /// [`Gpu::stage`]'s wait for the last copy out of the staging buffer it takes).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(KernelError::driver("synchronising the stream"))
    }

    /// `f`, and the milliseconds between two timing events recorded on the stream before and
    /// after the work it enqueues: the device's own clock, without the host's launch latency
    /// at either end. Waits for the end event.
    pub fn time_ms<R>(&self, f: impl FnOnce() -> R) -> Result<(R, f32)> {
        let start = self.mark()?;
        let out = f();
        let end = self.mark()?;
        Ok((out, (self.seconds_between(&start, &end)? * 1e3) as f32))
    }

    /// A timing event recorded on the stream now: the device's clock when the work enqueued so far
    /// is done. [`Gpu::seconds_between`] reads two of them.
    pub fn mark(&self) -> Result<GpuMark> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map(GpuMark)
            .map_err(KernelError::driver("recording a timing event"))
    }

    /// Seconds of device time from `earlier` to `later`, waiting for `later`.
    pub fn seconds_between(&self, earlier: &GpuMark, later: &GpuMark) -> Result<f64> {
        let ms = earlier
            .0
            .elapsed_ms(&later.0)
            .map_err(KernelError::driver("reading the time between events"))?;
        Ok(f64::from(ms) / 1e3)
    }

    pub(crate) fn staging(&self) -> &Staging {
        &self.staging
    }

    /// cuBLAS on this stream, created on first use.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only probes dlopen with cudarc's candidate names.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("the cuBLAS library (libcublas) was not found".to_string());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
            })
            .as_ref()
            .map_err(|msg| KernelError::Blas {
                what: "opening cuBLAS",
                msg: msg.clone(),
            })
    }

    pub(crate) fn function(&self, kernel: Kernel) -> Result<&CudaFunction> {
        self.functions
            .get(&kernel)
            .ok_or(KernelError::MissingEntry {
                file: kernel.file(),
                name: kernel.name(),
            })
    }

    /// A buffer a kernel reads: checks it is on this device and holds at least `need` elements.
    pub(crate) fn input<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: &'a dyn DevicePtr<T>,
        need: usize,
    ) -> Result<Ptr<'a>> {
        self.check_buffer(op, what, buf.len(), buf.stream(), need)?;
        let (ptr, guard) = buf.device_ptr(&self.stream);
        Ok(Ptr {
            ptr,
            _guard: Some(guard),
        })
    }

    /// As [`Gpu::input`], for a buffer the kernel writes.
    pub(crate) fn output<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: &'a mut dyn DevicePtrMut<T>,
        need: usize,
    ) -> Result<Ptr<'a>> {
        self.check_buffer(op, what, buf.len(), buf.stream(), need)?;
        let (ptr, guard) = buf.device_ptr_mut(&self.stream);
        Ok(Ptr {
            ptr,
            _guard: Some(guard),
        })
    }

    /// An optional input: a null pointer when absent.
    pub(crate) fn input_opt<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: Option<&'a dyn DevicePtr<T>>,
        need: usize,
    ) -> Result<Ptr<'a>> {
        match buf {
            Some(b) => self.input(op, what, b, need),
            None => Ok(Ptr::null()),
        }
    }

    fn check_buffer(
        &self,
        op: &'static str,
        what: &str,
        len: usize,
        stream: &Arc<CudaStream>,
        need: usize,
    ) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(KernelError::invalid(
                op,
                format!("{what} lives on another device"),
            ));
        }
        if len < need {
            return Err(KernelError::invalid(
                op,
                format!("{what} holds {len} elements, needs {need}"),
            ));
        }
        Ok(())
    }

    /// Enqueue `kernel` with `args`, after checking their number and types against the kernel's
    /// PTX signature (a launcher out of step with its kernel is an error, not a corrupt launch).
    pub(crate) fn launch(&self, kernel: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(kernel)?;
        if let Some(sig) = self.signatures.get(&kernel) {
            let kinds: Vec<ParamKind> = args.iter().map(Arg::kind).collect();
            if &kinds != sig {
                return Err(KernelError::invalid(
                    "launch",
                    format!(
                        "{} takes {sig:?}, the launcher passed {kinds:?}",
                        kernel.name()
                    ),
                ));
            }
        }
        let mut builder = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U64(v) => builder.arg(v),
                Arg::U32(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
                Arg::F64(v) => builder.arg(v),
            };
        }
        // SAFETY: the launchers check dimensions against buffer lengths, and the arguments match
        // the kernel's parameter list in number and type (checked above).
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(KernelError::driver(format!("launching {}", kernel.name())))
    }
}

/// The pool cudarc's stream-ordered allocations (cuMemAllocAsync) come from, where the device
/// has them.
fn default_pool(ctx: &CudaContext) -> Result<Option<cu::CUmemoryPool>> {
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out pointer and the device handle comes from the live context.
    unsafe { cu::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(KernelError::driver("reading the default memory pool"))?;
    Ok(Some(pool))
}

/// Let the pool keep freed memory for reuse. Its default release threshold of 0 hands every
/// freed byte back to the driver at each synchronisation, so each training step (which reads its
/// loss) would map and unmap its activations again; a step allocates the same sizes every time.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let Some(pool) = default_pool(ctx)? else {
        return Ok(());
    };
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold attribute takes a cuuint64_t, which `threshold` is.
    unsafe {
        cu::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .map_err(KernelError::driver(
        "setting the memory pool's release threshold",
    ))
}

/// One kernel argument. Pointers travel as `U64` device addresses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    F64(f64),
}

impl Arg {
    fn kind(&self) -> ParamKind {
        match self {
            Arg::U64(_) => ParamKind::U64,
            Arg::U32(_) | Arg::I32(_) => ParamKind::U32,
            Arg::F32(_) => ParamKind::F32,
            Arg::F64(_) => ParamKind::F64,
        }
    }
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::U64(v)
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::U32(v)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::I32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::F32(v)
    }
}
impl From<f64> for Arg {
    fn from(v: f64) -> Arg {
        Arg::F64(v)
    }
}

/// A point on the stream's timeline ([`Gpu::mark`]).
pub struct GpuMark(CudaEvent);

/// A raw device pointer for a kernel argument, holding cudarc's borrow of the buffer until the
/// launch is enqueued.
pub(crate) struct Ptr<'a> {
    pub ptr: u64,
    _guard: Option<SyncOnDrop<'a>>,
}

impl Ptr<'_> {
    pub fn null() -> Self {
        Ptr {
            ptr: 0,
            _guard: None,
        }
    }

    /// The pointer as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::U64(self.ptr)
    }

    /// Whether the address is a multiple of `bytes`.
    pub fn aligned(&self, bytes: u64) -> bool {
        self.ptr.is_multiple_of(bytes)
    }
}

fn load_error(
    e: cudarc::driver::DriverError,
    file: &'static str,
    arch: Arch,
    nvrtc: (i32, i32),
) -> KernelError {
    if e.0 == cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
        let mut v = 0;
        // SAFETY: the driver is initialised; `v` is a valid out pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        return KernelError::Unavailable(format!(
            "the driver (CUDA {}.{}) is older than NVRTC {}.{} and cannot load its PTX for {file}; \
             update the driver or point LOREN_NVRTC_LIB at an NVRTC no newer than the driver",
            v / 1000,
            (v % 1000) / 10,
            nvrtc.0,
            nvrtc.1
        ));
    }
    KernelError::Driver {
        what: format!("loading the {arch} module of {file}"),
        reason: e,
    }
}
