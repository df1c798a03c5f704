#!/usr/bin/env bash
# The GPU validation, run on a machine with an NVIDIA GPU from the repository root with the
# bundle from scripts/gpu-bundle.sh in .gpu/. Everything it finds goes to $OUT (or .gpu/out):
#   device.txt    nvidia-smi, nvcc, driver
#   parity.log    kernel launcher tests, every op against its CPU twin, a whole training step
#   sanitizer.log compute-sanitizer memcheck and racecheck over the parity suite
#   train.log     `loren train` on cuda and on cpu, the same run
#   summary.md    one line per check, and the cuda-vs-cpu accuracy and ECE
# Its argument picks the stages: parity, train, sanitizer (each alone), validate (the default:
# parity, then train, then sanitizer, so the most telling logs are written first should the
# device tool's 10-minute call run out), or bench: kernel-bench/, bench/ and memprofile/, each
# with its JSON, table and log. It exits non-zero when any check fails.
set -uo pipefail
bin=.gpu/bin
out=${OUT:-.gpu/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export LOREN_CACHE_DIR=${LOREN_CACHE_DIR:-/tmp/loren-ptx}
summary="$out/summary.md"
: >"$summary"
failed=0

{ nvidia-smi; nvcc --version; date -u; } >"$out/device.txt" 2>&1

check() { # name log command...
    local name=$1 log=$2
    shift 2
    echo "== $name: $*" >>"$log"
    local t0=$SECONDS
    "$@" >>"$log" 2>&1
    local rc=$?
    echo "- $name: $([ $rc = 0 ] && echo pass || echo "FAIL (exit $rc)") ($((SECONDS - t0)) s)" | tee -a "$summary"
    [ $rc = 0 ] || failed=1
}

stage=${1:-validate}

bench() {
    check "kernel-bench" "$out/kernel-bench.log" $bin/kernel-bench --out "$out/kernel-bench"
    check "loren bench" "$out/bench.log" $bin/loren bench --device cuda -q --out "$out/bench"
    check "loren memprofile" "$out/memprofile.log" $bin/loren memprofile --device cuda -q --out "$out/memprofile"
}

parity() {
    check "kernel launchers" "$out/parity.log" $bin/kernels_gpu --nocapture --test-threads=1
    check "ops against their CPU twins" "$out/parity.log" $bin/gpu_parity --nocapture --test-threads=1
    check "training step against the CPU" "$out/parity.log" $bin/gpu_training --nocapture --test-threads=1
}

sanitizer() {
    check "memcheck" "$out/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 $bin/gpu_parity --test-threads=1
    check "racecheck" "$out/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 1 $bin/gpu_parity --test-threads=1
}

train() {
    check "train --device cuda" "$out/train.log" $bin/loren train --device cuda --out /tmp/train-cuda
    check "train --device cpu" "$out/train.log" $bin/loren train --device cpu --out /tmp/train-cpu
    compare_runs
}

compare_runs() {
    python3 - "$summary" <<'PY' || failed=1
import json, sys
try:
    c = json.load(open("/tmp/train-cuda/report.json"))["report"]["test"]
    p = json.load(open("/tmp/train-cpu/report.json"))["report"]["test"]
except Exception as e:
    line = f"- cuda vs cpu: no reports ({e})"
    print(line)
    open(sys.argv[1], "a").write(line + "\n")
    sys.exit(1)
da, de = abs(c["accuracy"] - p["accuracy"]) * 100, abs(c["ece"] - p["ece"])
ok = da <= 1.0 and de <= 0.01
line = (f"- cuda vs cpu: accuracy {100*c['accuracy']:.2f}% vs {100*p['accuracy']:.2f}% (diff {da:.2f} points), "
        f"ECE {c['ece']:.4f} vs {p['ece']:.4f} (diff {de:.4f}): {'pass' if ok else 'FAIL'}")
print(line)
open(sys.argv[1], "a").write(line + "\n")
sys.exit(0 if ok else 1)
PY
}

case "$stage" in
    parity | train | sanitizer | bench) "$stage" ;;
    validate) parity; train; sanitizer ;;
    *) echo "gpu-run: unknown stage '$stage' (parity, train, sanitizer, validate or bench)" >&2; exit 2 ;;
esac
exit $failed
