#!/usr/bin/env bash
# The GPU validation and benchmarks, run on a machine with an NVIDIA GPU from the repository root
# with the bundle from scripts/gpu-bundle.sh in .gpu/. It is written for the device tool: one call
# of at most 10 minutes, and at most 8 files back from $OUT, none deeper than two folders.
#
#   bash .gpu/run.sh [STAGES] [--budget SECONDS]
#
# STAGES, comma-separated, run in the order given (default: all):
#   parity     kernel launcher tests, every op against its CPU twin, a whole training step
#   train      `loren train` on cuda and on cpu, the same run, accuracy and ECE compared; the
#              cuda model's `loren predict` on assets/examples on both devices, compared; then
#              `loren compare --device cuda`, every method for 3 epochs
#   memcheck   compute-sanitizer memcheck over the launchers' tests (the wgmma GEMMs on a
#              Hopper included) and over every op's
#   racecheck  compute-sanitizer racecheck over the same
#   sanitizer  memcheck,racecheck
#   bench      kernel-bench, `loren bench` and `loren memprofile` on cuda
#   profile    Nsight Compute (ncu) over the fused lora_* and attention_* kernels at ViT-B shapes:
#              speed of light, occupancy, launch statistics (not in all; for tuning)
#   all        parity,train,memcheck,bench,racecheck: what issue 3 needs to resolve first (parity,
#              the train comparison, memcheck), then the benchmarks, the slow racecheck last
#
# Every check runs under `timeout`, cut to what is left of --budget (default 540 s, under the
# device tool's 600 s; pass less when the tool's limit_s will be less), so the script always ends
# by itself. What it has is packed after every stage, so a run cut short still brings back the
# stages it finished. In $OUT (or .gpu/out) it leaves:
#   summary.md      one line per check (pass, FAIL, or TIMEOUT with the seconds it had)
#   device.txt      nvidia-smi, nvcc, the driver, the date
#   parity.log  train.log  bench.log  sanitizer.log
#   results.tar.gz  kernel-bench/, bench/, bench-breakdown/, bench-wgmma/, memprofile/, memprofile-recompute/,
#                   bench-mc-dropout/ (JSON, Markdown, SVG),
#                   train-{cuda,cpu}/, predict-{cuda,cpu}.csv, compare-cuda/, profile/ncu.txt
# scripts/gpu-results.sh turns that folder into benches/results/<date>-<gpu>/ here.
# It exits non-zero when any check fails or runs out of time.
set -uo pipefail
bin=.gpu/bin
out=${OUT:-.gpu/out}
stages=all
budget=540
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
        *) stages=$1; shift ;;
    esac
done
[ "$stages" = all ] && stages=parity,train,memcheck,bench,racecheck
[ "$stages" = validate ] && stages=parity,train,memcheck,racecheck
stages=${stages//sanitizer/memcheck,racecheck}
# A carried file may come without its execute bit.
chmod +x $bin/* 2>/dev/null
export RUST_BACKTRACE=1

mkdir -p "$out"
work=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# NVRTC: the toolkit's when the loader finds it, else the first libnvrtc.so.13 on the machine
# (the image's pip wheel, for one), named to loren by path.
if [ -z "${LOREN_NVRTC_LIB:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so\.13' &&
    [ ! -e /usr/local/cuda/lib64/libnvrtc.so.13 ]; then
    nvrtc=$(find /usr /opt -name 'libnvrtc.so.13' 2>/dev/null | head -n 1)
    [ -n "$nvrtc" ] && export LOREN_NVRTC_LIB=$nvrtc
fi
# cuBLAS, which cudarc opens by name: the toolkit's, else the first libcublas.so.13 on the machine.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13' && [ ! -e /usr/local/cuda/lib64/libcublas.so.13 ]; then
    cublas=$(find /usr /opt -name 'libcublas.so.13' 2>/dev/null | head -n 1)
    [ -n "$cublas" ] && export LD_LIBRARY_PATH=$(dirname "$cublas"):$LD_LIBRARY_PATH
fi
export LOREN_CACHE_DIR=${LOREN_CACHE_DIR:-/tmp/loren-ptx}
# On the GPU machine a test that finds no usable GPU fails instead of passing as skipped.
export LOREN_REQUIRE_GPU=1
summary="$out/summary.md"
: >"$summary"
failed=0
start=$SECONDS

{ echo "bundle built from commit: $(cat .gpu/commit 2>/dev/null || echo unknown)"; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version; date -u
  echo "NVRTC: ${LOREN_NVRTC_LIB:-not named: the loader search, then the wheels}"; ldconfig -p | grep -E 'nvrtc|cublas'
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ls -l /usr/local/cuda/lib64/libnvrtc* /usr/local/cuda/lib64/libcublas.so* /usr/local/cuda/include/cuda_bf16.h; } >"$out/device.txt" 2>&1

# check NAME LOG CAP COMMAND...: run COMMAND into LOG for at most CAP seconds, or what is left of
# the budget (less 15 s for packing), and write its line in the summary.
check() {
    local name=$1 log=$2 cap=$3
    shift 3
    local left=$((budget - (SECONDS - start) - 15))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        echo "- $name: not run (budget spent)" | tee -a "$summary"
        failed=1
        return
    fi
    echo "== $name (at most ${limit} s): $*" >>"$log"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=pass
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        verdict="TIMEOUT after ${limit} s"
    elif [ $rc != 0 ]; then
        verdict="FAIL (exit $rc)"
    fi
    echo "- $name: $verdict ($((SECONDS - t0)) s)" | tee -a "$summary"
    [ "$verdict" = pass ] || failed=1
}

parity() {
    # The fused GEMMs apart, after the rest: a kernel fault leaves the process's CUDA context
    # unusable, and would fail every test after it in the same binary.
    check "kernel launchers" "$out/parity.log" 90 $bin/kernels_gpu --nocapture --test-threads=1 --skip lora_
    check "kernel launchers, fused LoRA GEMMs" "$out/parity.log" 90 $bin/kernels_gpu --nocapture --test-threads=1 lora_
    check "ops against their CPU twins" "$out/parity.log" 150 $bin/gpu_parity --nocapture --test-threads=1
    check "training step against the CPU" "$out/parity.log" 90 $bin/gpu_training --nocapture --test-threads=1
    check "recomputed blocks, bit for bit" "$out/parity.log" 60 $bin/recompute --nocapture --test-threads=1 on_a_gpu
    check "memory by tag against the analytic model" "$out/parity.log" 60 $bin/memprofile_gpu --nocapture --test-threads=1 on_a_gpu
    check "each op's memory, and an inference pass's, against the analytic model" "$out/parity.log" 30 $bin/memory_ops_gpu --nocapture --test-threads=1 memory_model::each_op::on_a_gpu
    # The same step with the wgmma GEMMs (sm_90a builds only; elsewhere it repeats the above).
    check "training step, wgmma GEMMs" "$out/parity.log" 90 env LOREN_WGMMA=1 $bin/gpu_training --nocapture --test-threads=1
}

train() {
    check "train --device cuda" "$out/train.log" 90 $bin/loren train --device cuda -q --out "$work/train-cuda"
    check "train --device cpu" "$out/train.log" 120 $bin/loren train --device cpu -q --out "$work/train-cpu"
    compare_runs
    # The model trained on the GPU predicting image files on both devices: the path `loren
    # predict` and `loren::Ensemble` take (a checkpoint loaded onto cuda).
    check "predict --device cuda" "$out/train.log" 30 $bin/loren predict --device cuda -q --model "$work/train-cuda" assets/examples --out "$work/predict-cuda.csv"
    check "predict --device cpu" "$out/train.log" 30 $bin/loren predict --device cpu -q --model "$work/train-cuda" assets/examples --out "$work/predict-cpu.csv"
    compare_predictions
    # Every method end to end on the GPU (issue 3's `compare --device cuda`), on a short budget.
    check "compare --device cuda" "$out/train.log" 90 $bin/loren compare --device cuda -q --epochs 3 --no-shift --no-ood --out "$work/compare-cuda"
}

clocks() {
    { echo "== clocks ($1)"; nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; } >>"$out/bench.log" 2>&1
}

bench() {
    clocks "before"
    check "kernel-bench" "$out/bench.log" 120 $bin/kernel-bench --out "$work/kernel-bench"
    check "loren bench" "$out/bench.log" 180 $bin/loren bench --device cuda --members 1,2,4,8,16,32 --out "$work/bench"
    check "loren bench --breakdown" "$out/bench.log" 60 $bin/loren bench --device cuda --config vit-b-32 --members 16 --breakdown --out "$work/bench-breakdown"
    check "loren bench, wgmma GEMMs" "$out/bench.log" 90 env LOREN_WGMMA=1 $bin/loren bench --device cuda --methods lora --config vit-b-32 --members 1,4,16 --out "$work/bench-wgmma"
    check "loren memprofile" "$out/bench.log" 120 $bin/loren memprofile --device cuda --out "$work/memprofile"
    check "loren memprofile --recompute" "$out/bench.log" 60 $bin/loren memprofile --device cuda --recompute --config vit-b-16 --members 1,16 --out "$work/memprofile-recompute"
    check "loren bench, mc-dropout" "$out/bench.log" 45 $bin/loren bench --device cuda --methods mc-dropout --config vit-b-32 --members 1,4,16 --out "$work/bench-mc-dropout"
    clocks "after"
}

profile() {
    mkdir -p "$work/profile"
    check "ncu over the fused kernels" "$work/profile/ncu.txt" 240 \
        ncu --kernel-name "regex:^(lora_|attention_)" --launch-count 40 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        $bin/kernel-bench --warmup 0 --repeats 1 --ranks 8
}

memcheck() {
    check "memcheck, launchers" "$out/sanitizer.log" 120 compute-sanitizer --tool memcheck --error-exitcode 1 $bin/kernels_gpu --test-threads=1
    check "memcheck, ops" "$out/sanitizer.log" 120 compute-sanitizer --tool memcheck --error-exitcode 1 $bin/gpu_parity --test-threads=1
}

racecheck() {
    check "racecheck, launchers" "$out/sanitizer.log" 120 compute-sanitizer --tool racecheck --error-exitcode 1 $bin/kernels_gpu --test-threads=1
    check "racecheck, ops" "$out/sanitizer.log" 120 compute-sanitizer --tool racecheck --error-exitcode 1 $bin/gpu_parity --test-threads=1
}

# The Python on stdin, after a preamble that gives it `summary` and `work` (the paths) and
# say(line), which prints a line and adds it to the summary; its failure fails the run.
py_check() {
    {
        printf '%s\n' 'import sys' 'summary, work = sys.argv[1], sys.argv[2]' 'def say(line):' \
            '    print(line)' '    open(summary, "a").write(line + "\n")'
        cat
    } | python3 - "$summary" "$work" || failed=1
}

compare_runs() {
    py_check <<'PY'
import json
try:
    c = json.load(open(f"{work}/train-cuda/report.json"))["report"]["test"]
    p = json.load(open(f"{work}/train-cpu/report.json"))["report"]["test"]
except Exception as e:
    say(f"- cuda vs cpu: no reports ({e})")
    sys.exit(1)
da, de = abs(c["accuracy"] - p["accuracy"]) * 100, abs(c["ece"] - p["ece"])
ok = da <= 1.0 and de <= 0.01
say(f"- cuda vs cpu: accuracy {100*c['accuracy']:.2f}% vs {100*p['accuracy']:.2f}% (diff {da:.2f} points), "
    f"ECE {c['ece']:.4f} vs {p['ece']:.4f} (diff {de:.4f}): {'pass' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
}

compare_predictions() {
    py_check <<'PY'
import csv
try:
    rows = [list(csv.DictReader(open(f"{work}/predict-{d}.csv"))) for d in ("cuda", "cpu")]
except Exception as e:
    say(f"- predict cuda vs cpu: no predictions ({e})")
    sys.exit(1)
worst = max(abs(float(a[k]) - float(b[k])) for a, b in zip(*rows) for k in a if k.startswith("p:"))
digits = [(a["class"], b["class"]) for a, b in zip(*rows) if "digit-" in a["path"]]
same = all(x == y for x, y in digits)
ok = len(rows[0]) == len(rows[1]) == 12 and same and worst <= 0.05
say(f"- predict cuda vs cpu: {len(digits)} digits, classes {'the same' if same else 'DIFFER'}; "
    f"largest probability difference {worst:.2e} (at most 0.05): {'pass' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
}

# One archive for everything with folders, so what comes back stays within the tool's limits;
# written anew after each stage, so that a run cut short keeps what its finished stages made.
pack() {
    tar -czf "$out/results.tar.gz.part" --exclude='*.safetensors' -C "$work" . &&
        mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

for stage in ${stages//,/ }; do
    case "$stage" in
        parity | train | memcheck | racecheck | bench | profile) "$stage" ;;
        *) echo "gpu-run: unknown stage '$stage' (parity, train, memcheck, racecheck, sanitizer, bench, profile, all)" >&2; exit 2 ;;
    esac
    pack
done
rm -rf "$work"
echo "- total: $((SECONDS - start)) s of a ${budget} s budget" | tee -a "$summary"
exit $failed
