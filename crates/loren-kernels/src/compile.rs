//! NVRTC compilation of the kernel sources to PTX, with an in-process and an on-disk cache.
//!
//! Options, the same for every file:
//! - `--gpu-architecture=sm_XX` for the device's exact arch, and on Hopper (compute capability
//!   9.0) `sm_90a`, its arch-specific target: the files then also build their wgmma parts (under
//!   `__CUDA_ARCH_FEAT_SM90_ALL`), and everything else is what plain `sm_90` gives;
//! - `-std=c++17`, `--include-path=<dir of cuda_bf16.h>`, `-lineinfo` (for compute-sanitizer);
//! - precise math: `--fmad=true --ftz=false --prec-div=true --prec-sqrt=true`, and **no**
//!   `--use_fast_math`. Fast math would flush denormals and approximate division and square root,
//!   which AdamW (`m / (sqrt(v) + eps)`) and LayerNorm (`rsqrt(var + eps)`) feed straight into
//!   f32 parameters checked to 1e-5, and it would swap `expf`/`logf` in the cross-entropy for
//!   approximations. Where an approximation is harmless the kernel asks for it explicitly: the
//!   attention softmax uses `exp2f` on log2-scaled scores, an ex2.approx whose 2-ulp error is far
//!   inside its bf16 output. GELU keeps the exact `erff` (fast math has no erf intrinsic anyway).
//!
//! Cache: per process, once per (file, arch); on disk under `$LOREN_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/loren/ptx`, else `~/.cache/loren/ptx`, keyed by a 128-bit hash of the source,
//! the shared header, the arch, the NVRTC version and the options. Files are written to a temporary
//! name and renamed, so a crash never leaves a torn file.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::sys;

use crate::error::{KernelError, Result};
use crate::probe;
use crate::sources::{COMMON_HEADER, COMMON_HEADER_NAME, KernelSource};

/// A GPU architecture, `sm_{major}{minor}`, or with `specific` its arch-specific target
/// `sm_{major}{minor}a`, whose code runs on that compute capability alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    pub specific: bool,
}

impl Arch {
    pub const SM80: Arch = Arch::new(8, 0);
    pub const SM90: Arch = Arch::new(9, 0);
    /// Hopper's arch-specific target: what wgmma needs.
    pub const SM90A: Arch = Arch {
        specific: true,
        ..Arch::SM90
    };

    pub const fn new(major: u32, minor: u32) -> Arch {
        Arch {
            major,
            minor,
            specific: false,
        }
    }

    /// `sm_80`, `sm_90`, `sm_90a`, ...
    pub fn name(self) -> String {
        self.to_string()
    }

    fn code(self) -> u32 {
        self.major * 10 + self.minor
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = if self.specific { "a" } else { "" };
        write!(f, "sm_{}{}{a}", self.major, self.minor)
    }
}

/// PTX for one kernel file and arch.
#[derive(Clone, Debug)]
pub struct Ptx {
    pub file: &'static str,
    pub arch: Arch,
    /// The PTX text.
    pub text: String,
    /// NVRTC's log: warnings, if any. Empty when the PTX came from the disk cache.
    pub log: String,
    /// Whether the PTX came from the disk cache rather than NVRTC.
    pub from_disk: bool,
}

impl Ptx {
    /// The names of the `.entry` points (the `__global__` kernels) in the PTX.
    pub fn entries(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix(".visible")?.trim_start();
                let rest = rest.strip_prefix(".entry")?.trim_start();
                let end = rest.find(|c: char| c == '(' || c.is_whitespace())?;
                Some(&rest[..end])
            })
            .collect()
    }
}

/// The type of a kernel parameter as PTX declares it (pointers are `.u64`, `int` is `.u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    U32,
    U64,
    F32,
    F64,
    /// Anything else (a struct passed by value, ...).
    Other,
}

impl Ptx {
    /// The parameter types of entry `name`, in order; `None` when it is not an entry.
    pub fn params(&self, name: &str) -> Option<Vec<ParamKind>> {
        let mut lines = self.text.lines().skip_while(|l| {
            let t = l.trim();
            !(t.starts_with(".visible") && t.contains(".entry") && {
                let after = t.split(".entry").nth(1).unwrap_or("").trim_start();
                after.strip_prefix(name).is_some_and(|r| r.starts_with('('))
            })
        });
        let header = lines.next()?;
        let mut kinds = Vec::new();
        if header.trim_end().ends_with("()") {
            return Some(kinds);
        }
        for l in lines {
            let t = l.trim();
            if t.starts_with(')') {
                break;
            }
            let Some(rest) = t.strip_prefix(".param") else {
                continue;
            };
            let ty = rest.split_whitespace().next().unwrap_or("");
            kinds.push(match ty {
                ".u32" | ".s32" | ".b32" => ParamKind::U32,
                ".u64" | ".s64" | ".b64" => ParamKind::U64,
                ".f32" => ParamKind::F32,
                ".f64" => ParamKind::F64,
                _ => ParamKind::Other,
            });
        }
        Some(kinds)
    }
}

/// NVRTC's version, e.g. (13, 0). Loads NVRTC.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    Ok(probe::nvrtc()?.version)
}

/// The real architectures this NVRTC can compile for, ascending (e.g. 75, 80, 86, ..., 120).
pub fn supported_archs() -> Result<Vec<Arch>> {
    probe::nvrtc()?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; the buffer has room for `n` entries.
    let codes = unsafe {
        sys::nvrtcGetNumSupportedArchs(&mut n)
            .result()
            .map_err(|e| KernelError::Unavailable(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
        let mut codes = vec![0i32; n.max(0) as usize];
        sys::nvrtcGetSupportedArchs(codes.as_mut_ptr())
            .result()
            .map_err(|e| KernelError::Unavailable(format!("nvrtcGetSupportedArchs: {e:?}")))?;
        codes
    };
    let mut archs: Vec<Arch> = codes
        .into_iter()
        .filter(|&c| c > 0)
        .map(|c| Arch::new(c as u32 / 10, c as u32 % 10))
        .collect();
    archs.sort();
    Ok(archs)
}

/// The arch to compile for on a device of compute capability `cc`: the newest arch NVRTC supports
/// that is not newer than the device (PTX for an older arch runs on newer devices), and on a 9.0
/// device that NVRTC compiles for, `sm_90a`.
pub fn arch_for_device(cc: (i32, i32)) -> Result<Arch> {
    let device = Arch::new(cc.0.max(0) as u32, cc.1.max(0) as u32);
    let supported = supported_archs()?;
    if device == Arch::SM90 && supported.contains(&Arch::SM90) {
        return Ok(Arch::SM90A);
    }
    supported
        .iter()
        .copied()
        .filter(|a| a.code() <= device.code() && a.major == device.major)
        .max()
        .or_else(|| {
            supported
                .iter()
                .copied()
                .filter(|a| a.code() <= device.code())
                .max()
        })
        .ok_or_else(|| {
            KernelError::Unavailable(format!(
                "NVRTC supports no arch at or below the device's {device}"
            ))
        })
}

/// The NVRTC options for `arch` (see the module docs).
pub fn options(arch: Arch) -> Result<Vec<String>> {
    let include = probe::cuda_include_dir()?;
    Ok(vec![
        format!("--gpu-architecture={}", arch.name()),
        "-std=c++17".into(),
        format!("--include-path={}", include.display()),
        "-lineinfo".into(),
        "--fmad=true".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
    ])
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn c_string(s: &str, what: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| KernelError::invalid("compile", format!("{what} contains a NUL byte")))
}

fn chars_to_string(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .trim_end()
        .to_string()
}

fn nvrtc_error_string(status: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a static C string.
    unsafe {
        let p = sys::nvrtcGetErrorString(status);
        if p.is_null() {
            format!("{status:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Compile `src` for `arch` with NVRTC, bypassing both caches. The returned [`Ptx::log`] holds
/// NVRTC's warnings, if any.
pub fn compile_uncached(src: &KernelSource, arch: Arch) -> Result<Ptx> {
    let opts = options(arch)?;
    compile_with(src, arch, &opts)
}

fn compile_with(src: &KernelSource, arch: Arch, opts: &[String]) -> Result<Ptx> {
    probe::nvrtc()?;
    let code = c_string(src.code, src.file)?;
    let name = c_string(src.file, "file name")?;
    let header = c_string(COMMON_HEADER, COMMON_HEADER_NAME)?;
    let header_name = c_string(COMMON_HEADER_NAME, "header name")?;
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let c_opts: Vec<CString> = opts
        .iter()
        .map(|o| c_string(o, "option"))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();

    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string that outlives the program.
    let status = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            code.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Compile {
            file: src.file,
            arch: arch.name(),
            status: nvrtc_error_string(status),
            log: "nvrtcCreateProgram failed".into(),
        });
    }
    let prog = Program(raw);
    // SAFETY: `prog` is a live program; the option pointers outlive the call.
    let status =
        unsafe { sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    // SAFETY: `prog` is live.
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog.0) }
        .map(chars_to_string)
        .unwrap_or_else(|e| format!("(no log: {e:?})"));
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Compile {
            file: src.file,
            arch: arch.name(),
            status: nvrtc_error_string(status),
            log: format!("{log}\noptions: {}", opts.join(" ")),
        });
    }
    // SAFETY: `prog` compiled successfully.
    let text = unsafe { cudarc::nvrtc::result::get_ptx(prog.0) }
        .map(chars_to_string)
        .map_err(|e| KernelError::Compile {
            file: src.file,
            arch: arch.name(),
            status: format!("{e:?}"),
            log: "nvrtcGetPTX failed".into(),
        })?;
    Ok(Ptx {
        file: src.file,
        arch,
        text,
        log,
        from_disk: false,
    })
}

/// What ptxas reported for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    /// Static shared memory (dynamic shared memory is set at launch).
    pub smem_bytes: u32,
}

/// Compile `src` for `arch` through NVRTC's built-in ptxas (`--ptxas-options=-v`), which
/// assembles the PTX to machine code for the real arch: it rejects PTX the driver's JIT would
/// reject, and reports registers and spills per kernel. No GPU needed.
pub fn ptxas_resources(src: &KernelSource, arch: Arch) -> Result<(Ptx, Vec<Resources>)> {
    let mut opts = options(arch)?;
    opts.push("--ptxas-options=-v".into());
    let ptx = compile_with(src, arch, &opts)?;
    let mut out: Vec<Resources> = Vec::new();
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit)
            .and_then(|i| line[..i].split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    };
    for line in ptx.log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Resources {
                kernel: name,
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains("registers") {
                r.registers = num_before(line, "registers");
                r.smem_bytes = num_before(line, "bytes smem");
            }
        }
    }
    Ok((ptx, out))
}

/// The NVRTC log without ptxas's `-v` info lines: what is left are real warnings.
pub fn warnings_only(log: &str) -> String {
    log.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("ptxas info") || t.starts_with("ptxas         .") || t.is_empty())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// 128-bit FNV-1a over length-prefixed parts: stable across Rust releases, unlike std's hasher.
fn cache_key(parts: &[&[u8]]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let mut h = OFFSET;
    for part in parts {
        for &b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// The on-disk PTX cache folder, if there is a place for one.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("LOREN_CACHE_DIR") {
        return Some(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(d.join("loren/ptx"));
    }
    var("HOME").map(|h| h.join(".cache/loren/ptx"))
}

fn looks_like_ptx(text: &str) -> bool {
    text.contains(".version") && text.contains(".target") && text.contains(".entry")
}

/// Write `text` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}.{nanos}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("ptx"),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

type MemCache = Mutex<HashMap<(&'static str, Arch), Arc<Ptx>>>;

/// Compile `src` for `arch`, through the in-process cache and then the disk cache. A disk cache
/// that cannot be read or written is skipped, never an error.
pub fn compile(src: &KernelSource, arch: Arch) -> Result<Arc<Ptx>> {
    static MEM: OnceLock<MemCache> = OnceLock::new();
    let mem = MEM.get_or_init(Default::default);
    if let Some(p) = mem
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(src.file, arch))
    {
        return Ok(p.clone());
    }
    let version = probe::nvrtc()?.version;
    let opts = options(arch)?;
    let version_s = format!("{}.{}", version.0, version.1);
    let opts_s = opts.join("\n");
    let arch_s = arch.name();
    let key = cache_key(&[
        src.code.as_bytes(),
        COMMON_HEADER.as_bytes(),
        arch_s.as_bytes(),
        version_s.as_bytes(),
        opts_s.as_bytes(),
    ]);
    let stem = src.file.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{arch_s}-{key:032x}.ptx")));

    let cached = path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .filter(|t| looks_like_ptx(t));
    let ptx = match cached {
        Some(text) => Ptx {
            file: src.file,
            arch,
            text,
            log: String::new(),
            from_disk: true,
        },
        None => {
            let ptx = compile_with(src, arch, &opts)?;
            if let Some(p) = &path {
                let _ = write_atomic(p, &ptx.text);
            }
            ptx
        }
    };
    let ptx = Arc::new(ptx);
    mem.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((src.file, arch), ptx.clone());
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_parsed() {
        let ptx = Ptx {
            file: "x.cu",
            arch: Arch::SM80,
            text: ".version 9.0\n.target sm_80\n.visible .entry foo(\n\t.param .u64 a\n)\n\
                   .visible .entry bar_d32(\n)\n.func baz(\n"
                .into(),
            log: String::new(),
            from_disk: false,
        };
        assert_eq!(ptx.entries(), ["foo", "bar_d32"]);
        assert_eq!(ptx.params("foo"), Some(vec![ParamKind::U64]));
        assert_eq!(ptx.params("bar_d32"), Some(vec![]));
        assert_eq!(ptx.params("bar"), None);
    }

    #[test]
    fn cache_key_separates_parts() {
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(cache_key(&[b"ab", b"c"]), cache_key(&[b"ab", b"c"]));
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::SM80.name(), "sm_80");
        assert_eq!(Arch::new(12, 0).to_string(), "sm_120");
        assert_eq!(Arch::SM90A.name(), "sm_90a");
    }
}
