#!/usr/bin/env bash
# Build here everything the GPU machine runs (it has no cargo) and pack it into .gpu/:
#   .gpu/bin/{loren, kernel-bench, gpu_parity, gpu_training, recompute, kernels_gpu, memprofile_gpu,
#             memory_ops_gpu}
#   and  .gpu/run.sh
# Then, on the GPU machine, from the repository root: `bash .gpu/run.sh` for the validation and
# `bash .gpu/run.sh bench` for the benchmarks (logs and results go to $OUT).
# .gpu/ is listed in .git/info/exclude and .gitignore; pass it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rm -rf .gpu && mkdir -p .gpu/bin
cargo build --release -p loren -p loren-kernels --bin loren --bin kernel-bench
cp target/release/loren target/release/kernel-bench .gpu/bin/

# The test binaries in the test profile: optimised, with debug assertions on, so every
# `Tensor::empty` is NaN-poisoned and an unwritten output element fails its parity test.
tests=(-p loren-tensor --test gpu_parity -p loren-nn --test gpu_training --test recompute
       -p loren-kernels --test gpu -p loren --test memprofile)
# loren-nn's unit tests hold each op's memory against the analytic model's replay of it.
lib=(-p loren-nn --lib)
cargo test --no-run "${tests[@]}"
cargo test --no-run "${lib[@]}"
{
    cargo test --no-run --message-format=json "${tests[@]}"
    cargo test --no-run --message-format=json "${lib[@]}"
} 2>/dev/null | python3 -c '
import json, shutil, sys
names = {"gpu_parity": "gpu_parity", "gpu_training": "gpu_training", "recompute": "recompute",
         "gpu": "kernels_gpu", "memprofile": "memprofile_gpu", "loren_nn": "memory_ops_gpu"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in names:
        shutil.copy(m["executable"], ".gpu/bin/" + names[m["target"]["name"]])
        print("bundled", names[m["target"]["name"]])
'
cp scripts/gpu-run.sh .gpu/run.sh
# The results name the commit the binaries were built from, not whatever HEAD is when they are filed.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!benches/results' || echo ' (with uncommitted changes)')" >.gpu/commit
for b in loren kernel-bench gpu_parity gpu_training recompute kernels_gpu memprofile_gpu memory_ops_gpu; do
    [[ -x .gpu/bin/$b ]] || { echo "gpu-bundle: $b is missing" >&2; exit 1; }
    # The device tool carries 64 MiB at most; debug info is most of a binary.
    strip --strip-debug ".gpu/bin/$b"
done
du -sh .gpu
