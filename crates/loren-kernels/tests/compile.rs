//! The CI kernel check, no GPU needed: every `kernels/*.cu` compiles with NVRTC for sm_80, sm_90
//! and sm_90a (Hopper's arch-specific target, which adds the wgmma kernels), through NVRTC's
//! built-in ptxas (so the PTX is also assembled to machine code, which catches PTX the driver
//! would reject), with no compiler warnings and no register spills; and every kernel a launcher
//! can call is an `.entry` of its file's PTX (and every entry is one a launcher calls).
//!
//! Without NVRTC or the CUDA headers this FAILS, naming scripts/cuda-wheels.sh: it never skips.

use loren_kernels::{
    Arch, Kernel, SOURCES, compile, cuda_include_dir, nvrtc, ptxas_resources, warnings_only,
};

const ARCHS: [Arch; 3] = [Arch::SM80, Arch::SM90, Arch::SM90A];

fn require_toolchain() {
    let hint = "The kernel compile check needs NVRTC and the CUDA headers. Run \
                scripts/cuda-wheels.sh (it installs NVIDIA's pip wheels into .cache/cuda-wheels, \
                which loren-kernels finds by itself), or set LOREN_NVRTC_LIB and \
                LOREN_CUDA_INCLUDE.";
    let info = nvrtc().unwrap_or_else(|e| panic!("{e}\n{hint}"));
    let include = cuda_include_dir().unwrap_or_else(|e| panic!("{e}\n{hint}"));
    println!(
        "NVRTC {}.{} from {}; headers from {}",
        info.version.0,
        info.version.1,
        info.origin,
        include.display()
    );
}

#[test]
fn every_kernel_compiles_for_sm80_sm90_and_sm90a() {
    require_toolchain();
    let mut failures = Vec::new();
    for src in SOURCES {
        for arch in ARCHS {
            let (ptx, resources) = match ptxas_resources(src, arch) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(e.to_string());
                    continue;
                }
            };
            let entries = ptx.entries();
            println!(
                "{:<15} {arch}: {:>8} bytes of PTX, {} entries: {}",
                src.file,
                ptx.text.len(),
                entries.len(),
                entries.join(", ")
            );
            for r in &resources {
                let mut spill = String::new();
                if r.spill_stores + r.spill_loads > 0 {
                    spill += &format!("  SPILLS {}/{} bytes", r.spill_stores, r.spill_loads);
                    // Every kernel fits its registers today; a spill is a slowdown to fix, not to
                    // find later in a profile.
                    failures.push(format!(
                        "{} for {arch}: {} spills {} bytes of stores and {} of loads to local memory",
                        src.file, r.kernel, r.spill_stores, r.spill_loads
                    ));
                }
                // A stack frame without spills is a register array indexed at run time.
                if r.stack_bytes > 0 {
                    spill += &format!("  stack frame {} bytes", r.stack_bytes);
                }
                println!(
                    "    {:<28} {:>3} registers, {:>5} bytes static smem{spill}",
                    r.kernel, r.registers, r.smem_bytes
                );
            }
            let warnings = warnings_only(&ptx.log);
            if !warnings.is_empty() {
                failures.push(format!(
                    "{} for {arch}: NVRTC warnings:\n{warnings}",
                    src.file
                ));
            }
            for kernel in src.kernels(arch) {
                if !entries.contains(&kernel.name()) {
                    failures.push(format!(
                        "{} for {arch}: the launchers call {} ({kernel:?}), which is not an entry",
                        src.file,
                        kernel.name()
                    ));
                }
            }
            for e in &entries {
                if !src.kernels(arch).any(|k| k.name() == *e) {
                    failures.push(format!(
                        "{} for {arch}: entry {e} has no launcher (add it to sources.rs)",
                        src.file
                    ));
                }
            }
            if resources.len() != entries.len() {
                failures.push(format!(
                    "{} for {arch}: ptxas reported {} kernels for {} entries",
                    src.file,
                    resources.len(),
                    entries.len()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernel compile check failed:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn every_registered_kernel_has_a_source() {
    for k in Kernel::ALL {
        assert!(
            SOURCES.iter().any(|s| s.file == k.file()),
            "{k:?} names {}, which is not a kernel source",
            k.file()
        );
    }
}

#[test]
fn compile_caches_in_process() {
    require_toolchain();
    let src = &SOURCES[0];
    let a = compile(src, Arch::SM80).unwrap_or_else(|e| panic!("{e}"));
    let b = compile(src, Arch::SM80).unwrap_or_else(|e| panic!("{e}"));
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(a.entries().len() == src.kernels(Arch::SM80).count());
}
