#!/usr/bin/env bash
# The whole test suite, as README.md gives it and CI runs it.
#
# The kernel compile check needs NVIDIA's NVRTC and CUDA headers, which come as pip wheels
# pinned to the 13.0 line: scripts/cuda-wheels.sh installs them into .cache/cuda-wheels the
# first time. Every kernel is then compiled for sm_80, sm_90 and sm_90a, one line per file and arch in
# the log; a kernel that does not compile fails the run. The kernels also run on a CPU emulator
# of the GPU (needs a C++20 compiler), alone and under ThreadSanitizer, and, through a fake CUDA
# driver and cuBLAS over it, under the GPU test suites of the launchers, of every op, of whole
# training steps, of recomputed blocks and of memory by tag, then again as a Hopper with its
# wgmma kernels, and again with tensor cores that truncate as NVIDIA's do
# (scripts/emulated-gpu.sh). Tests that need a real GPU say plainly when they are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/cuda-wheels.sh
# shellcheck source=/dev/null
. .cache/cuda-wheels/env.sh

# The kernels crate with its output shown: the compile log is what proves the kernels build.
cargo test -p loren-kernels "$@" -- --nocapture
cargo test --workspace --exclude loren-kernels "$@"

# The GPU suites through cudarc on the emulator (the fake libcuda needs a C++20 compiler).
if command -v "${CXX:-c++}" >/dev/null; then
    scripts/emulated-gpu.sh kernels,parity,training,recompute,memprofile,hopper,truncated "$@"
elif [ -n "${LOREN_REQUIRE_EMULATOR:-}" ]; then
    echo "error: LOREN_REQUIRE_EMULATOR is set, but there is no C++20 compiler (\$CXX or c++) for the emulated GPU suites" >&2
    exit 1
else
    echo "skipped: the emulated GPU suites (scripts/emulated-gpu.sh) need a C++20 compiler (\$CXX or c++)"
fi
