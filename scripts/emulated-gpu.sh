#!/usr/bin/env bash
# Run loren's GPU tests on the CPU: a fake libcuda and libcublas (crates/loren-kernels/emu/
# fake_cuda.cpp) that run the real kernel sources on the emulator stand in for the driver, so
# cudarc, the launchers, the CUDA tensors and whole training steps run here as on a GPU, only
# far slower. It checks the GPU code path between GPU sessions; it does not replace them (no
# timing, no real tensor cores, no real memory model).
#
#   scripts/emulated-gpu.sh [SUITES] [-- CARGO TEST ARGS]
#
# SUITES, comma-separated (default: kernels,parity,training,recompute,memprofile,hopper,truncated, what
# scripts/test.sh runs; times on 2 cores):
#   kernels    loren-kernels tests/gpu.rs: every launcher against an f64 reference (~15 s)
#   parity     loren-tensor tests/gpu_parity.rs: every op against its CPU twin (~10 s)
#   training   loren-nn tests/gpu_training.rs: a whole AdamW step of the tiny ViT, LoRA, explicit,
#              single and MC Dropout, against the CPU, and a NaN step that changes nothing (~30 s)
#   recompute  loren-nn tests/recompute.rs on the GPU: two steps of every method, recomputed
#              blocks against kept ones, bit for bit (~80 s)
#   recompute-lora  the same for LoRA-Ensemble alone (~30 s)
#   memprofile tests/memprofile.rs on the GPU: every tag's measured peak against the analytic
#              model, tiny, LoRA and explicit at M = 1, 2, to the byte; and loren-nn's unit tests
#              of each op's bytes, and an inference pass's, against the model's replay (~10 s)
#   hopper     kernels, parity and training again on a Hopper (below): the wgmma kernels beside
#              the mma.sync ones, and the training steps on them (~60 s)
#   truncated  kernels, parity and training again, and the Hopper's kernels and training, with
#              the tensor cores adding as the A100's and the H100's do, bit for bit
#              (LOREN_EMU_TC=truncate, emu/common.cuh's emu_tc_mode), so that no bound rests on
#              the emulator's exact sums (~3 min)
# LOREN_FAKE_CC=9.0 makes the device a Hopper (sm_90a build, wgmma kernels loaded; LOREN_WGMMA=1
# then runs the fused GEMMs on them).
# LOREN_FAKE_NO_COMPUTE=1 makes it issue everything and compute nothing: with the libraries it
# builds in target/emu-gpu on LD_LIBRARY_PATH, `loren bench --device cuda` then times what the host
# spends issuing a step (README, "On a GPU").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

suites=kernels,parity,training,recompute,memprofile,hopper,truncated
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    suites=$1
    shift
fi
[ "${1:-}" = "--" ] && shift

scripts/cuda-wheels.sh
# shellcheck source=/dev/null
. .cache/cuda-wheels/env.sh

build=target/emu-gpu
mkdir -p "$build"
cp crates/loren-kernels/emu/common.cuh crates/loren-kernels/emu/fake_cuda.cpp "$build/"
# Dynamic shared memory is the one declaration plain C++ cannot take as written (as in
# tests/emulate.rs).
for f in kernels/*.cu; do
    sed 's/extern __shared__ __align__(16) unsigned char smem_raw\[\];/unsigned char* smem_raw = emu_dynamic_smem();/' \
        "$f" >"$build/$(basename "$f")"
done
# Every kernel the launchers may call, from the registry in sources.rs.
grep -oE '^ +[A-Z][A-Za-z0-9]* = "[a-z0-9_]+",' crates/loren-kernels/src/sources.rs |
    sed -E 's/.*"([a-z0-9_]+)",/ENTRY(\1)/' >"$build/entries.inc"
cxx=${CXX:-c++}
flags=(-std=c++20 -O2 -fPIC -shared -pthread -w -D__CUDA_ARCH_FEAT_SM90_ALL)
(cd "$build" && "$cxx" "${flags[@]}" -DFAKE_CUDA_DRIVER fake_cuda.cpp -o libcuda.so &&
    "$cxx" "${flags[@]}" -DFAKE_CUBLAS fake_cuda.cpp -o libcublas.so)
echo "emulated-gpu: built $build/libcuda.so and $build/libcublas.so ($(wc -l <"$build/entries.inc") kernels)"

export LD_LIBRARY_PATH="$PWD/$build${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A test that finds no usable GPU fails instead of passing as skipped; one that needs the
# emulator itself (its compute capability set by LOREN_FAKE_CC) knows it is there.
export LOREN_REQUIRE_GPU=1 LOREN_EMULATED_GPU=1
# The crates' suites build with the package selection scripts/test.sh builds the workspace's
# tests with (features are unified over it), so that they reuse that build instead of making
# another.
kernels() { cargo test -p loren-kernels --test gpu "$@" -- --test-threads=1; }
others() {
    local test=$1 filter=$2
    shift 2
    cargo test --workspace --exclude loren-kernels --test "$test" "$@" -- --test-threads=1 ${filter:+"$filter"}
}
for suite in ${suites//,/ }; do
    case "$suite" in
        kernels) kernels "$@" ;;
        parity) others gpu_parity "" "$@" ;;
        training) others gpu_training "" "$@" ;;
        recompute) others recompute on_a_gpu "$@" ;;
        recompute-lora) others recompute on_a_gpu_lora "$@" ;;
        memprofile)
            others memprofile on_a_gpu "$@"
            others memprofile on_the_emulated_gpu "$@"
            cargo test --workspace --exclude loren-kernels --lib "$@" -- --test-threads=1 memory_model::each_op::on_a_gpu
            ;;
        hopper)
            export LOREN_FAKE_CC=9.0 LOREN_WGMMA=1
            kernels "$@"
            others gpu_parity "" "$@"
            others gpu_training "" "$@"
            unset LOREN_FAKE_CC LOREN_WGMMA
            ;;
        truncated)
            export LOREN_EMU_TC=truncate
            kernels "$@"
            others gpu_parity "" "$@"
            others gpu_training "" "$@"
            export LOREN_FAKE_CC=9.0 LOREN_WGMMA=1
            kernels "$@"
            others gpu_training "" "$@"
            unset LOREN_EMU_TC LOREN_FAKE_CC LOREN_WGMMA
            ;;
        *) echo "emulated-gpu: unknown suite '$suite'" >&2; exit 2 ;;
    esac
done
