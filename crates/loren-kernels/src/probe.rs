//! Finding CUDA at run time: the driver library, NVRTC, and the CUDA headers.
//!
//! cudarc loads `libcuda` and `libnvrtc` by name through `dlopen` and panics when it cannot, so
//! every path here first checks that the library is present.
//!
//! **NVRTC** is taken from the first of:
//! 1. `LOREN_NVRTC_LIB`, the path of a `libnvrtc.so*` file (nothing else is tried when it is set);
//! 2. the loader's own search (`LD_LIBRARY_PATH`, the ld.so cache), under the names cudarc tries;
//! 3. the pip wheels from `scripts/cuda-wheels.sh`: `<dir>/nvidia/cu13/lib/libnvrtc.so.13` for
//!    `<dir>` in `LOREN_CUDA_WHEELS` and `<repo>/.cache/cuda-wheels` (the checkout it was built
//!    in; never the working directory's).
//!
//! A library found by path (1 and 3) is preloaded with `RTLD_GLOBAL`, together with the
//! `libnvrtc-builtins` beside it. The dynamic loader matches later `dlopen("libnvrtc.so.13")` calls
//! (cudarc's) and `dlopen("libnvrtc-builtins.so.13.0")` calls (NVRTC's own) to the loaded copies
//! by their soname, so no `LD_LIBRARY_PATH` is needed.
//!
//! **Headers** (`cuda_bf16.h`): `LOREN_CUDA_INCLUDE` when set (and only it); else the `include`
//! folder beside the NVRTC library that was loaded by path; `$CUDA_HOME/include`,
//! `$CUDA_PATH/include`, `/usr/local/cuda/include`, `/opt/cuda/include`, `/usr/include`; and the
//! wheel folders' `nvidia/cu13/include`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{KernelError, Result};

const WHEEL_LIB: &str = "nvidia/cu13/lib";
const WHEEL_INCLUDE: &str = "nvidia/cu13/include";
const WHEEL_NVRTC: &str = "libnvrtc.so.13";

/// The NVRTC library in use.
#[derive(Clone, Debug)]
pub struct NvrtcInfo {
    /// Where it came from, for messages: a path, or "the system library path".
    pub origin: String,
    /// The folder it was loaded from, when loaded by path.
    pub lib_dir: Option<PathBuf>,
    /// NVRTC's (major, minor) version, e.g. (13, 0).
    pub version: (i32, i32),
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The folders `scripts/cuda-wheels.sh` may have installed into.
pub(crate) fn wheel_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env_path("LOREN_CUDA_WHEELS") {
        dirs.push(d);
    }
    // This crate sits at <repo>/crates/loren-kernels.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dirs.push(
        repo.canonicalize()
            .unwrap_or(repo)
            .join(".cache/cuda-wheels"),
    );
    // Never the working directory's: a service started in a folder others can write would load
    // whatever library they left there.
    dirs.dedup();
    dirs
}

/// Libraries we loaded by path; kept open for the life of the process.
static PRELOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

#[cfg(unix)]
fn preload(path: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NVIDIA's NVRTC runs its initialisers, which have no preconditions.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    PRELOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(lib.into());
    Ok(())
}

#[cfg(not(unix))]
fn preload(path: &Path) -> std::result::Result<(), String> {
    // SAFETY: as above.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    PRELOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(lib);
    Ok(())
}

/// Preload NVRTC from `lib`, builtins first (NVRTC opens them by soname when it compiles).
fn preload_nvrtc(lib: &Path) -> std::result::Result<(), String> {
    if !lib.is_file() {
        return Err(format!("{} does not exist", lib.display()));
    }
    if let Some(dir) = lib.parent()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        let mut builtins: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with("libnvrtc-builtins") && !name.contains(".alt.")
            })
            .collect();
        builtins.sort();
        for b in builtins {
            preload(&b)?;
        }
    }
    preload(lib)
}

fn nvrtc_present() -> bool {
    // SAFETY: only probes dlopen with cudarc's candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn find_nvrtc() -> std::result::Result<NvrtcInfo, String> {
    let (origin, lib_dir) = if let Some(lib) = env_path("LOREN_NVRTC_LIB") {
        preload_nvrtc(&lib).map_err(|e| format!("LOREN_NVRTC_LIB: {e}"))?;
        if !nvrtc_present() {
            return Err(format!(
                "LOREN_NVRTC_LIB={} loaded, but not under a name cudarc looks for \
                 (libnvrtc.so.13, libnvrtc.so.12, ...)",
                lib.display()
            ));
        }
        (
            lib.display().to_string(),
            lib.parent().map(Path::to_path_buf),
        )
    } else if nvrtc_present() {
        ("the system library path".to_string(), None)
    } else {
        let candidates: Vec<PathBuf> = wheel_dirs()
            .into_iter()
            .map(|d| d.join(WHEEL_LIB).join(WHEEL_NVRTC))
            .collect();
        let Some(lib) = candidates.iter().find(|p| p.is_file()) else {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "NVRTC (libnvrtc) is missing: not on the library path, LOREN_NVRTC_LIB unset, \
                 and none of {} exists; run scripts/cuda-wheels.sh",
                looked.join(", ")
            ));
        };
        preload_nvrtc(lib)?;
        if !nvrtc_present() {
            return Err(format!(
                "{} loaded, but cudarc still cannot open libnvrtc",
                lib.display()
            ));
        }
        let lib = lib.canonicalize().unwrap_or_else(|_| lib.clone());
        (
            lib.display().to_string(),
            lib.parent().map(Path::to_path_buf),
        )
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for the call.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!(
            "nvrtcVersion failed ({status:?}) for NVRTC from {origin}"
        ));
    }
    Ok(NvrtcInfo {
        origin,
        lib_dir,
        version: (major, minor),
    })
}

/// Find and load NVRTC (once per process).
pub fn nvrtc() -> Result<&'static NvrtcInfo> {
    static NVRTC: OnceLock<std::result::Result<NvrtcInfo, String>> = OnceLock::new();
    NVRTC
        .get_or_init(find_nvrtc)
        .as_ref()
        .map_err(|e| KernelError::Unavailable(e.clone()))
}

/// The folder holding `cuda_bf16.h` (searched once per process).
pub fn cuda_include_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut candidates = Vec::new();
        if let Some(d) = env_path("LOREN_CUDA_INCLUDE") {
            candidates.push(d);
        } else {
            // Headers that belong to the NVRTC in use come first.
            if let Ok(info) = nvrtc()
                && let Some(lib) = &info.lib_dir
            {
                candidates.push(lib.join("../include"));
            }
            for var in ["CUDA_HOME", "CUDA_PATH"] {
                if let Some(d) = env_path(var) {
                    candidates.push(d.join("include"));
                }
            }
            for d in [
                "/usr/local/cuda/include",
                "/opt/cuda/include",
                "/usr/include",
            ] {
                candidates.push(PathBuf::from(d));
            }
            candidates.extend(wheel_dirs().into_iter().map(|d| d.join(WHEEL_INCLUDE)));
        }
        match candidates.iter().find(|d| d.join("cuda_bf16.h").is_file()) {
            Some(d) => Ok(d.canonicalize().unwrap_or_else(|_| d.clone())),
            None => {
                let looked: Vec<String> =
                    candidates.iter().map(|p| p.display().to_string()).collect();
                Err(looked.join(", "))
            }
        }
    })
    .as_deref()
    .map_err(|searched| KernelError::HeadersMissing {
        searched: searched.clone(),
    })
}

/// Check the driver library is present, initialises, and sees at least one device.
pub(crate) fn driver() -> Result<usize> {
    // SAFETY: only probes dlopen with cudarc's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::Unavailable(
            "no CUDA driver library (libcuda.so) on this machine".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| {
        KernelError::Unavailable(format!("the CUDA driver did not initialise ({e})"))
    })?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| KernelError::Unavailable(format!("cannot count CUDA devices ({e})")))?;
    if count <= 0 {
        return Err(KernelError::Unavailable("no CUDA device".into()));
    }
    Ok(count as usize)
}

/// cuBLAS, which the frozen MLP products and the explicit ensemble's per-member weights run
/// through: probed with the rest, so that `--device auto` falls back to the CPU without it
/// instead of failing at the first product. Once per process: the probe loads the library (and
/// cublasLt behind it) and lets it go again.
pub(crate) fn cublas() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only probes dlopen with cudarc's candidate names.
    if *PRESENT.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() }) {
        return Ok(());
    }
    Err(KernelError::Unavailable(
        "no cuBLAS library (libcublas.so): install CUDA's cuBLAS, or put the folder holding it \
         on LD_LIBRARY_PATH"
            .into(),
    ))
}

/// Whether this machine has a CUDA device the driver sees, usable by loren or not: where it
/// has one, `--device auto` falling back to the CPU is worth a word.
pub fn gpu_present() -> bool {
    driver().is_ok()
}

/// Whether this process can run loren's kernels: a driver library, a device, NVRTC and cuBLAS.
/// The error carries a one-line reason, e.g. "CUDA is not available: no CUDA device".
pub fn cuda_available() -> Result<()> {
    driver()?;
    nvrtc()?;
    cublas()?;
    Ok(())
}

/// Whether `LOREN_REQUIRE_GPU` is set: GPU tests and benchmarks then fail where they would skip.
/// The GPU run script sets it, so on a GPU machine a driver or NVRTC that cannot be loaded fails
/// the run instead of passing it as skipped.
pub fn gpu_required() -> bool {
    std::env::var_os("LOREN_REQUIRE_GPU").is_some_and(|v| !v.is_empty())
}

/// What a GPU test does where there is no GPU: say it skipped, or panic when [`gpu_required`].
pub fn skip_without_gpu(reason: impl std::fmt::Display) {
    if gpu_required() {
        panic!("LOREN_REQUIRE_GPU is set, but the GPU cannot be used: {reason}");
    }
    println!("skipped: {reason}");
}
