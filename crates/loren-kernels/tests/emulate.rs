//! Runs the real kernel sources on the CPU, no GPU needed: `emu/common.cuh` stands in for
//! `kernels/common.cuh` and the CUDA runtime (a fiber per CUDA thread, barriers for
//! __syncthreads and the warp collectives, mma.sync/ldmatrix per the PTX fragment layouts,
//! cp.async poisoning its destination at issue and copying at its wait_group), and
//! `emu/harness.cpp` checks every kernel of lora.cu,
//! attention.cu, norm.cu, activation.cu, loss.cu, optim.cu, embed.cu and elementwise.cu
//! against f64 references, with NaN-poisoned outputs and shared memory. Launch shapes in the
//! harness mirror src/launch/*.rs; the launchers themselves run only in tests/gpu.rs.
//!
//! It needs a C++20 compiler (`$CXX`, else c++, g++ or clang++); without one it says so and
//! passes. `LOREN_EMU_SANITIZE=1` builds with AddressSanitizer and UBSan (slower). A second
//! build under ThreadSanitizer runs the same checks and fails on any data race between the
//! emulated CUDA threads: a shared buffer read and written without a barrier between. (Each
//! of five barriers deleted in turn, from loss.cu, attention.cu and the mma.sync and wgmma
//! pipelines of lora.cu, was seen to fail it.)

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &[
    "lora.cu",
    "attention.cu",
    "norm.cu",
    "activation.cu",
    "loss.cu",
    "optim.cu",
    "embed.cu",
    "elementwise.cu",
];
const DYNAMIC_SMEM: &str = "extern __shared__ __align__(16) unsigned char smem_raw[];";

fn compiler() -> Option<String> {
    let candidates: Vec<String> = std::env::var("CXX")
        .ok()
        .into_iter()
        .chain(["c++", "g++", "clang++"].map(String::from))
        .collect();
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// How the emulator is built.
#[derive(Clone, Copy, PartialEq)]
enum Build {
    Plain,
    /// AddressSanitizer and UBSan (`LOREN_EMU_SANITIZE=1`).
    Memory,
    /// ThreadSanitizer: each fiber is a thread to it, ordered only by the barriers, so a missing
    /// barrier is a data race it reports, as compute-sanitizer's racecheck would on a GPU.
    Threads,
}

#[test]
fn kernels_on_the_cpu_emulator() {
    let sanitize = std::env::var("LOREN_EMU_SANITIZE").is_ok_and(|v| v == "1");
    run_harness(if sanitize {
        Build::Memory
    } else {
        Build::Plain
    });
}

#[test]
fn kernels_have_no_data_races_on_the_cpu_emulator() {
    run_harness(Build::Threads);
}

/// Without a C++ compiler (or, for ThreadSanitizer, its runtime) it says so and returns, unless
/// CI's LOREN_REQUIRE_EMULATOR makes that a failure: there the kernels would go unchecked.
fn skip(why: &str) {
    if std::env::var_os("LOREN_REQUIRE_EMULATOR").is_some_and(|v| !v.is_empty()) {
        panic!("LOREN_REQUIRE_EMULATOR is set, but {why}");
    }
    println!("skipped: {why}");
}

fn run_harness(build: Build) {
    let Some(cxx) = compiler() else {
        return skip(
            "there is no C++ compiler for the emulator (set CXX, or install c++/g++/clang++)",
        );
    };
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = crate_dir.join("../../kernels");
    let name = match build {
        Build::Plain => "emu",
        Build::Memory => "emu-asan",
        Build::Threads => "emu-tsan",
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("creating the build folder");
    for f in ["common.cuh", "harness.cpp"] {
        std::fs::copy(crate_dir.join("emu").join(f), dir.join(f)).expect("copying the emulator");
    }
    for f in KERNELS {
        let src = std::fs::read_to_string(kernels.join(f)).expect("reading a kernel");
        // Dynamic shared memory is the one declaration plain C++ cannot take as written.
        let src = src.replace(
            DYNAMIC_SMEM,
            "unsigned char* smem_raw = emu_dynamic_smem();",
        );
        assert!(
            !src.contains("extern __shared__"),
            "{f}: declare dynamic shared memory exactly as `{DYNAMIC_SMEM}`"
        );
        std::fs::write(dir.join(f), src).expect("writing a kernel copy");
    }
    let exe = dir.join("harness");
    let mut cmd = Command::new(&cxx);
    cmd.current_dir(&dir)
        // The kernels' Hopper (sm_90a) parts too, on the emulated wgmma.
        .args([
            "-std=c++20",
            "-pthread",
            "-w",
            "-D__CUDA_ARCH_FEAT_SM90_ALL",
            "harness.cpp",
            "-o",
        ])
        .arg(&exe);
    match build {
        Build::Plain => cmd.arg("-O2"),
        Build::Memory => cmd.args(["-O1", "-g", "-fsanitize=address,undefined"]),
        Build::Threads => cmd.args(["-O1", "-g", "-fsanitize=thread"]),
    };
    if build != Build::Plain {
        cmd.arg("-fno-omit-frame-pointer");
    }
    let out = cmd.output().expect("running the C++ compiler");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && build == Build::Threads && stderr.contains("tsan") {
        return skip(&format!("{cxx} cannot link ThreadSanitizer:\n{stderr}"));
    }
    assert!(
        out.status.success(),
        "building the emulator failed:\n{stderr}"
    );
    // Every race, not only the first; ThreadSanitizer's exit code says whether there was one.
    let out = Command::new(&exe)
        .env("TSAN_OPTIONS", "halt_on_error=0 exitcode=66")
        .output()
        .expect("running the emulator");
    let log = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{log}");
    assert!(
        !stderr.contains("WARNING: ThreadSanitizer: data race"),
        "ThreadSanitizer found a data race in the kernels (a missing __syncthreads, \
         __syncwarp or cp.async wait):\n{stderr}"
    );
    // Anything else it says (a lock misuse, or it could not run at all) fails too, as itself.
    assert!(
        !stderr.contains("ThreadSanitizer"),
        "ThreadSanitizer:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "kernels failed on the emulator:\n{}\n{stderr}",
        log.lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
