//! Runs the real kernel sources on the CPU, no GPU needed: `emu/common.cuh` stands in for
//! `kernels/common.cuh` and the CUDA runtime (one OS thread per CUDA thread, barriers for
//! __syncthreads and the warp collectives, mma.sync/ldmatrix per the PTX fragment layouts,
//! cp.async deferred to its wait_group), and `emu/harness.cpp` checks every kernel of lora.cu,
//! attention.cu, norm.cu, activation.cu, loss.cu, optim.cu, embed.cu and most of elementwise.cu
//! against f64 references, with NaN-poisoned outputs and shared memory. Launch shapes in the
//! harness mirror src/launch/*.rs; the launchers themselves run only in tests/gpu.rs.
//!
//! It needs a C++20 compiler (`$CXX`, else c++, g++ or clang++); without one it says so and
//! passes. `LOREN_EMU_SANITIZE=1` builds with AddressSanitizer and UBSan (slower).

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

#[test]
fn kernels_on_the_cpu_emulator() {
    let Some(cxx) = compiler() else {
        // CI sets it: there a missing compiler would leave the kernels' arithmetic unchecked.
        if std::env::var_os("LOREN_REQUIRE_EMULATOR").is_some_and(|v| !v.is_empty()) {
            panic!("LOREN_REQUIRE_EMULATOR is set, but there is no C++ compiler for the emulator");
        }
        println!("skipped: no C++ compiler (set CXX, or install c++/g++/clang++)");
        return;
    };
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = crate_dir.join("../../kernels");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emu");
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
    let sanitize = std::env::var("LOREN_EMU_SANITIZE").is_ok_and(|v| v == "1");
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
    if sanitize {
        cmd.args([
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
        ]);
    } else {
        cmd.arg("-O2");
    }
    let out = cmd.output().expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "building the emulator failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("running the emulator");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}");
    assert!(
        out.status.success(),
        "kernels failed on the emulator:\n{}\n{}",
        log.lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}
